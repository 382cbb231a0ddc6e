"""A plain ``pip install .`` (no extras) in a fresh venv runs what the README shows for it, and a
command that needs an extra stops with one line naming the package and the extra.

The venv is clean (no system site-packages): it sees only what the install brought, not the
test venv's scikit-learn or matplotlib. torch goes in first, with ``--no-index --no-deps``: the
version running these tests, from the wheel on this machine's disk (pip's find-links), never
resolved from an index, where it would be GBs of CUDA wheels; the test skips if it is not on disk.
Everything else comes the way a user's ``pip install .`` gets it, with the machine's pip
configuration. The project is built from a copy of the source tree (no build/ or egg-info left
in it, no stale build/lib), and the commands run in an empty folder, so ``python -m train``
imports the installed package and not the source tree's.
"""
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest
import torch

from manualgrad._extras import EXTRAS

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_JUNK = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
    "runs", "checkpoints", "data", "*.ubyte", "*.ubyte.gz", ".ipynb_checkpoints",
)
DIGITS_MESSAGE = "--dataset digits needs scikit-learn: pip install 'manualgrad[digits]'"
PLOT_MESSAGE = "plotting a run needs matplotlib: pip install 'manualgrad[plot]'"

# What the README's Python examples leave to the reader, made up.
README_GIVENS = """
import torch
x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
existing_torch_model = torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.GELU(), torch.nn.Linear(32, 10))
"""
MONITOR_GIVENS = README_GIVENS + """
import manualgrad
model = torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = torch.nn.CrossEntropyLoss()
loader = [(x, y)] * 3
"""


def readme_python_block(after_heading=None):
    """The first ```python block of README.md (after the line ``after_heading``, if given)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    if after_heading is not None:
        assert after_heading in text, f"README.md has no line {after_heading!r}"
        text = text.split(after_heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, f"README.md has no python example after {after_heading!r}"
    return match.group(1)


def write_idx(path, data):
    """uint8 tensor -> an IDX file as MNIST ships it (type code 0x08, big-endian dimensions)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    path.write_bytes(header + data.numpy().tobytes())


def write_small_mnist(folder, n_train=256, n_eval=64):
    """Random 28x28 images and labels in MNIST's four file names: what --dataset mnist reads."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for stem, n in (("train", n_train), ("t10k", n_eval)):
        write_idx(folder / f"{stem}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8))
        write_idx(folder / f"{stem}-labels-idx1-ubyte", torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8))


class Venv:
    """A fresh venv at ``path``; ``run`` executes a command in it from the empty folder ``cwd``."""

    def __init__(self, path, cwd):
        self.path, self.cwd = path, cwd
        self.python = str(path / "bin" / "python")
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
        self.env.update(VIRTUAL_ENV=str(path), PATH=f"{path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                        PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", PIP_NO_INPUT="1", TMPDIR=str(path.parent))

    def run(self, *args, timeout=120):
        return subprocess.run(list(args), cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def ok(self, *args, timeout=120):
        proc = self.run(*args, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    def one_line_error(self, *args, code, says):
        proc = self.run(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) == 1 and says in lines[0], (
            f"{' '.join(args)}: expected exit {code} and one line with {says!r}, "
            f"got exit {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
        return lines[0]

    def pip(self, *args):
        return self.ok(self.python, "-m", "pip", "install", "--disable-pip-version-check", *args, timeout=600)


@pytest.fixture
def scratch(tmp_path):
    """A folder for the venv: in memory (/dev/shm) when it has room, removed after the test.

    The build machines' disk is mounted with online discard, where deleting a 1.4 GB venv takes
    about two minutes (measured); in memory it takes none. Elsewhere, tmp_path.
    """
    shm = pathlib.Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * 2**30):
        yield tmp_path
        return
    folder = pathlib.Path(tempfile.mkdtemp(prefix="manualgrad-install-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.install
def test_a_plain_install_runs_the_readme_commands_and_names_the_extra_a_command_lacks(scratch):
    (scratch / "work").mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(scratch / "venv")], check=True, timeout=120)
    venv = Venv(scratch / "venv", scratch / "work")

    # torch from this machine's disk only, or skip.
    torch_spec = f"torch=={torch.__version__}"
    proc = venv.run(venv.python, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--no-deps",
                    torch_spec, timeout=600)
    not_found = ("No matching distribution found", "ResolutionImpossible")  # the latter under a constraints file
    if proc.returncode != 0 and any(says in proc.stderr for says in not_found):
        pytest.skip(f"{torch_spec} is not on this machine's disk (pip install --no-index finds no wheel "
                    "in its find-links); the plain-install test does not download torch")
    assert proc.returncode == 0, f"pip install --no-index {torch_spec} failed:\n{proc.stderr[-3000:]}"

    # pip install . (no extras), from a copy of the source tree
    src = scratch / "src"
    shutil.copytree(ROOT, src, ignore=SOURCE_JUNK)
    venv.pip(str(src))

    # The venv really lacks the extras (else what follows proves nothing), and imports the installed copy.
    found = venv.ok(venv.python, "-c", "import importlib.util as u, manualgrad, train; "
                    "print([m for m in ('sklearn', 'matplotlib') if u.find_spec(m)]); "
                    "print(manualgrad.__file__); print(train.__file__)").stdout.splitlines()
    assert found[0] == "[]", f"the plain install brought {found[0]}"
    site = str(scratch / "venv" / "lib")
    assert found[1].startswith(site) and found[2].startswith(site), found

    # The README's first example, then its gradient-monitor example (x, y, the models made up).
    venv.ok(venv.python, "-c", README_GIVENS + readme_python_block() +
            "\nassert all(p.grad is not None for p in model.parameters())"
            "\nassert type(existing_torch_model[0]).__module__.startswith('manualgrad')")
    venv.ok(venv.python, "-c", MONITOR_GIVENS + readme_python_block("## The gradient monitor") +
            "\nimport pathlib; assert list(pathlib.Path('runs/exp1').glob('events.out.tfevents.*'))")

    # The training command: help, a run on MNIST-format files (TensorBoard log and monitor on)...
    assert venv.ok(venv.python, "-m", "train", "--help").stdout.startswith("usage: python -m train")
    mnist = scratch / "mnist"
    write_small_mnist(mnist)
    out = venv.ok(venv.python, "-m", "train", "--dataset", "mnist", "--data-dir", str(mnist), "--max-steps", "2",
                  "--logdir", "tb").stdout
    assert out.strip().splitlines()[-1].startswith("final eval accuracy: "), out
    assert list((scratch / "work" / "tb").glob("events.out.tfevents.*"))
    # ... and the digits, which need the [digits] extra: one line saying so, asked for or by default.
    venv.one_line_error(venv.python, "-m", "train", "--dataset", "digits", "--max-steps", "2", code=2,
                        says=f"python -m train: error: {DIGITS_MESSAGE}")
    line = venv.one_line_error(venv.python, "-m", "train", "--max-steps", "2", code=2,
                               says="python -m train: error: --dataset digits (the default: no MNIST files in")
    assert line.endswith("needs scikit-learn: pip install 'manualgrad[digits]'"), line
    venv.one_line_error(venv.python, "-m", "manualgrad.monitor.plot", "tb", "-o", "run.png", code=1,
                        says=f"python -m manualgrad.monitor.plot: error: {PLOT_MESSAGE}")

    # python -m manualgrad.coverage on a model module of the user's, and the tensorboard command.
    (scratch / "work" / "mypkg").mkdir()
    (scratch / "work" / "mypkg" / "__init__.py").write_text("")
    (scratch / "work" / "mypkg" / "models.py").write_text(
        "import torch\n\ndef make_model():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.ReLU())\n")
    report = venv.ok(venv.python, "-m", "manualgrad.coverage", "mypkg.models:make_model", "--input-shape", "4,1,28,28",
                     "--convert").stdout
    assert report.startswith("backward of Sequential: 100.0% of"), report
    assert venv.ok(str(scratch / "venv" / "bin" / "tensorboard"), "--version_tb").stdout.strip()

    # Each extra a message names is one the installed package declares, bringing the missing package.
    requires = venv.ok(venv.python, "-c", "import importlib.metadata as m; "
                       "print(*m.metadata('manualgrad').get_all('Requires-Dist'), sep='\\n')").stdout.splitlines()
    for package, extra in EXTRAS.values():
        assert any(re.match(rf'{re.escape(package)}\b.*; extra == "{extra}"$', r) for r in requires), (package, extra, requires)
