"""convert(model): swap every supported torch.nn submodule for its manualgrad twin, in place.

Each manualgrad module subclasses its torch class and adds no state, so the swap is a change
of ``__class__``: the very same object keeps its Parameters, buffers, hooks and attributes,
and an optimizer built before the call keeps working.
"""
import torch

from . import nn as mgnn

# Modules that only hold other modules: nothing of their own to convert.
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.ParameterList, torch.nn.ParameterDict)


def _twins():
    """torch.nn class -> manualgrad.nn class, read off manualgrad.nn's class hierarchy."""
    table = {}
    for name in mgnn.__all__:
        cls = getattr(mgnn, name)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            torch_cls = cls.__bases__[0]
            if torch_cls.__module__.startswith("torch.nn"):
                table[torch_cls] = cls
    return table


def supported_modules():
    """The torch.nn classes that ``convert`` swaps."""
    return tuple(_twins())


def _is_unsupported(module, twins):
    cls = type(module)
    if cls in twins or cls in twins.values() or isinstance(module, _CONTAINERS):
        return False
    if cls.__module__.startswith("torch.nn"):
        return True  # a torch layer manualgrad has no twin for (yet)
    # A user's module: its own forward is beyond reach, but parameters it holds directly
    # are used by that forward through torch ops.
    return len(module._parameters) > 0


def convert(model, strict=False):
    """Turn every supported ``torch.nn`` submodule of ``model`` (the model itself included)
    into its manualgrad twin, in place, and return ``model``.

    Only modules whose class is exactly a supported torch class are swapped: a user's
    subclass of ``torch.nn.Linear`` may override ``forward`` and is left alone. Everything
    else stays as it is; with ``strict=True`` a ``NotImplementedError`` lists what would
    still run torch's backward (torch.nn layers with no twin, and user modules that hold
    parameters directly) and nothing is changed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    twins = _twins()
    modules = list(model.named_modules(remove_duplicate=True))
    if strict:
        left = [f"{name or '(root)'}: {type(m).__name__}" for name, m in modules if _is_unsupported(m, twins)]
        if left:
            raise NotImplementedError(
                "manualgrad has no hand-written twin for these modules: " + ", ".join(left)
            )
    for _, m in modules:
        twin = twins.get(type(m))
        if twin is not None:
            m.__class__ = twin
    return model
