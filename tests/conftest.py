import pathlib
import sys

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run: CI is repeatable, and a new failing
# example is found by running with --hypothesis-seed=random or the "explore" profile.
settings.register_profile("repeatable", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile("repeatable")

MNIST_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def mnist_dir():
    """The real MNIST test set beside the project (../shared/data/mnist); skip when absent."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture
def uninstalled(monkeypatch):
    """``uninstalled("sklearn")``: for this test, that package (and each of its modules) does not
    import, as if it were not installed: ModuleNotFoundError with ``name == "sklearn"``."""

    def hide(top):
        for name in [n for n in sys.modules if n.startswith(top + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, top, None)

    return hide


def noncontiguous(t):
    """The same values as t in a non-contiguous layout (a transposed copy, transposed back)."""
    if t.dim() < 2:
        return t.repeat_interleave(2)[::2].detach().requires_grad_(t.requires_grad)
    return t.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_(t.requires_grad)
