"""manualgrad: hand-written backward passes for PyTorch.

- ``manualgrad.functional``: torch.nn.functional twins backed by autograd Functions whose
  backward (and forward-mode jvp) is written out by hand in ``manualgrad.ops``.
- ``manualgrad.nn``: drop-in torch.nn modules (subclasses of the torch classes).
- ``manualgrad.convert(model)``: swap a model's torch layers for their twins in place.
- ``manualgrad.testing``: gradcheck/gradgradcheck and side-by-side comparison with torch.
- ``manualgrad.monitor.GradientMonitor``: per-module gradient statistics for any model, in TensorBoard.
- ``manualgrad.lean()``: a context manager under which the forward keeps less for backward
  (outputs recomputed exactly from what is kept anyway), with bit-identical gradients.
- ``manualgrad.optim``: SGD, RMSprop, Adam, AdamW with hand-written updates; ``manualgrad.utils.clip_grad_norm_``.
"""
from . import functional, monitor, nn, ops, optim, testing, utils
from .convert import convert, supported_modules
from .memory import lean
from .mode import enable
from .ops._apply import register_traceable as _register_traceable

_register_traceable()  # every Function's torch.compile twin (see ops/_apply.py)

__version__ = "0.1.0"
__all__ = ["functional", "monitor", "nn", "ops", "optim", "testing", "utils", "convert", "supported_modules", "enable", "lean",
           "coverage"]


def __getattr__(name):
    # manualgrad.coverage (the coverage report: a module that is also the function) is imported
    # on first use, so `python -m manualgrad.coverage` does not find it imported and run it twice.
    if name == "coverage":
        import importlib

        return importlib.import_module(".coverage", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
