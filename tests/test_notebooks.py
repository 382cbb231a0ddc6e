"""The learning path in notebooks/: every notebook runs top to bottom, and is stored clean.

Each ``notebooks/*.ipynb`` (found by glob, so a new notebook is picked up without editing this
file) is executed in a fresh kernel with nbclient, in notebooks/ as the working directory. A
cell that raises (the notebooks check their results with ``assert torch.allclose(...)``) fails
the test with that cell's traceback. The committed files carry no outputs, so diffs stay
readable: a second test reads the JSON and says which cell still holds output.

The kernel is ipykernel's native ``python3`` spec, which runs ``sys.executable``: the Python
running pytest (the project's .venv), never another ``python3`` kernelspec the machine may
have installed elsewhere.
"""
import importlib
import json
import os
import pathlib
import re
import sys

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 120  # seconds per cell
ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def _execute(nb):
    """Run every cell of ``nb`` (a NotebookNode) in a fresh kernel in notebooks/; returns it."""
    nbclient = _require("nbclient")
    _require("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # kernel_dirs=[]: only ipykernel's built-in spec, whose argv is [sys.executable, -m, ipykernel_launcher].
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    # One thread in the kernel: the build machine's cores are shared, and OpenMP stalls under load.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        client.execute(env=env)
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb


def _require(module):
    """Import ``module``, or skip the test saying how to get it (any import failure counts)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"executing notebooks needs {module}, which does not import ({e}): pip install -e .[test]")


def _read(path):
    return _require("nbformat").read(path, as_version=4)


@pytest.mark.slow
@pytest.mark.trajectory
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom_without_error(path):
    nbclient = _require("nbclient")
    try:
        _execute(_read(path))
    except nbclient.exceptions.CellExecutionError as e:
        # The message holds the failing cell's source and traceback; drop the chained internals.
        pytest.fail(f"{path.name}: a cell raised\n{ANSI_COLOR.sub('', str(e))}", pytrace=False)


@pytest.mark.slow
def test_notebook_kernel_is_the_python_running_the_tests():
    nbformat = _require("nbformat")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os, sys, manualgrad\nprint(sys.executable, sys.prefix, os.getcwd(), sep='\\n')")]
    outputs = _execute(nb).cells[0].outputs
    executable, prefix, cwd = "".join(o["text"] for o in outputs if o["output_type"] == "stream").splitlines()
    # the same interpreter and environment (a venv's python resolves to the system one: compare as given)
    assert (executable, prefix) == (sys.executable, sys.prefix)
    assert pathlib.Path(cwd).resolve() == NOTEBOOK_DIR


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs_or_execution_counts(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4, f"{path.name}: nbformat {nb['nbformat']}, expected 4"
    dirty = [
        i for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them before committing "
        f"(jupyter nbconvert --clear-output --inplace {path.name})"
    )
