import os
import pathlib
import sys
import tempfile


def inductor_cache_dir(environ):
    """The on-disk cache of torch.compile's inductor for these tests: one per ATEN_CPU_CAPABILITY.

    torch 2.13's inductor picks its vector ISA from ATEN_CPU_CAPABILITY but leaves it out of its
    cache keys. A kernel compiled under one value (avx2, say, to reproduce another CPU here, as
    the README's portability runs do) is then loaded under another, and it writes part of its
    output or crashes (measured with tests/test_compile_dropout.py: garbage outputs, a
    segmentation fault). A directory per value keeps those runs apart. A cache dir the user set
    is left alone."""
    if "TORCHINDUCTOR_CACHE_DIR" in environ:
        return environ["TORCHINDUCTOR_CACHE_DIR"]
    capability = environ.get("ATEN_CPU_CAPABILITY") or "native"
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")  # no getuid on Windows
    return os.path.join(tempfile.gettempdir(), f"torchinductor_manualgrad_{user}", capability)


# before torch is imported: subprocesses (notebook kernels, spawned workers) inherit it too
INDUCTOR_CACHE_SET_BY_USER = "TORCHINDUCTOR_CACHE_DIR" in os.environ
os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir(os.environ)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402
from hypothesis import settings  # noqa: E402

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny ops (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``). torch splits even tiny inputs over
    its OpenMP threads; on a loaded 2-core machine each of the thousands of calls a gradgradcheck
    makes then waits milliseconds at a barrier for the other thread (10-50x slower). Results do
    not depend on it; the thread count is restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def exact_dy(shape):
    """Multiples of 1/4 in [-4, 4]: any sum of a few is exact in float32, whatever the order."""
    return torch.randint(-16, 17, shape).float() / 4


def noncontiguous(t):
    """The same values as t in a non-contiguous layout (a transposed copy, transposed back)."""
    if t.dim() < 2:
        return t.repeat_interleave(2)[::2].detach().requires_grad_(t.requires_grad)
    return t.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_(t.requires_grad)


# In-place ops on views. Each view is of a (4, 6) tensor x = leaf * 1 (not a leaf: in place needs
# that), so the op writes into x and autograd must route gradients through x's history.
VIEWS = {
    "slice": lambda x: x[:, 1:],
    "row": lambda x: x[1],
    "view": lambda x: x.view(3, 8),
    "t": lambda x: x.t(),
    "strided-slice-of-t": lambda x: x.t()[1:, ::2],
}


def inplace_on_view(op, make_view, leaf, w, v, seed=0):
    """``op`` (in place) on ``make_view(leaf * 1)``, run three ways, each after torch.manual_seed(seed):

    - backward: the op's output, x afterwards and the gradient of sum(x * w) w.r.t. the leaf
      (w covers the whole base, the part outside the view too);
    - forward mode: x afterwards and its tangent, for the leaf's tangent v;
    - torch.func: vmap over the first dim (randomness "different") of x afterwards and its vjp for w.
    """
    results = {}
    leaf_ = leaf.detach().clone().requires_grad_()
    x = leaf_ * 1
    view = make_view(x)
    torch.manual_seed(seed)
    out = op(view)
    assert out is view, "an in-place op returns its input"
    (x * w).sum().backward()
    results.update(output=out.detach(), base=x.detach(), grad=leaf_.grad)

    with fwAD.dual_level():
        x = fwAD.make_dual(leaf.detach(), v) * 1
        torch.manual_seed(seed)
        op(make_view(x))
        results["forward_base"], results["forward_tangent"] = fwAD.unpack_dual(x)

    def one(l, g):
        def f(t):
            x = t * 1
            op(make_view(x))
            return x

        x, pull = torch.func.vjp(f, l)
        return x, pull(g)[0]

    torch.manual_seed(seed)
    batch = torch.stack([leaf.detach(), leaf.detach().flip(0)])
    results["vmap_base"], results["vmap_grad"] = torch.func.vmap(one, randomness="different")(batch, torch.stack([w, w]))
    return results
