"""convert(model): swap every supported torch.nn submodule for its manualgrad twin, in place.

Each manualgrad module subclasses its torch class and adds no state, so the swap is a change
of ``__class__``: the very same object keeps its Parameters, buffers, hooks and attributes,
and an optimizer built before the call keeps working.

Two optional hooks on a twin class refine this: ``unsupported(module)`` returns why a given
torch module's configuration cannot run on the twin (then it is left as it is and strict
mode lists the reason), and ``covers_submodules = True`` says the twin's forward does the
work of its submodules itself (their own forward never runs), so they are not listed.

A parametrized module (``torch.nn.utils.parametrize``: weight_norm, spectral_norm, orthogonal)
has a class of its own, made by torch for it: ``ParametrizedConv1d``, the torch class plus
one property per parametrized tensor. It becomes the same class made on the twin (the properties
copied), and its parametrizations are modules of their own, swapped like any other (weight_norm's
has a twin; one without stays torch's and strict mode lists it). The deprecated
``torch.nn.utils.weight_norm`` is a forward pre-hook object instead: it gets its twin's class.
"""
import torch
from torch.nn.utils import parametrize

from . import nn as mgnn

# Modules that only hold other modules: nothing of their own to convert.
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.ParameterList, torch.nn.ParameterDict)


def _twins():
    """torch.nn class -> manualgrad.nn class, read off manualgrad.nn's class hierarchy."""
    table = {}
    for cls in [getattr(mgnn, name) for name in mgnn.__all__] + list(mgnn.PARAMETRIZATIONS):
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            torch_cls = cls.__bases__[0]
            if torch_cls.__module__.startswith("torch.nn"):
                table[torch_cls] = cls
    return table


def supported_modules():
    """The torch.nn classes that ``convert`` swaps."""
    return tuple(_twins())


_PARAMETRIZED = {}  # torch's parametrized class of one module -> the same class on the twin


def _parametrized_twin(cls, twins):
    """The twin of a class torch made for a parametrized module, or None (not one, or its torch
    class has no twin). Made once per class (torch makes one per module)."""
    if cls.__module__ != parametrize.__name__ or not cls.__name__.startswith("Parametrized"):
        return None
    twin = twins.get(cls.__bases__[0])
    if twin is None:
        return None
    if cls not in _PARAMETRIZED:
        body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        body["__module__"] = twin.__module__
        _PARAMETRIZED[cls] = type(cls.__name__, (twin,), body)
    return _PARAMETRIZED[cls]


def _twin_of(module, twins):
    cls = type(module)
    return twins.get(cls) or _parametrized_twin(cls, twins)


def _reason(twin, module):
    check = getattr(twin, "unsupported", None)
    return check(module) if check is not None else None


def _unsupported(module, twins):
    """Why ``module`` will still run torch's backward after convert, or None."""
    cls = type(module)
    if isinstance(module, _CONTAINERS) or cls in twins.values() or cls in _PARAMETRIZED.values():
        return None
    twin = _twin_of(module, twins)
    if twin is not None:
        return _reason(twin, module)
    if cls.__module__.startswith("torch.nn"):
        return "no twin"  # a torch layer manualgrad has no twin for (yet)
    # A user's module: its own forward is beyond reach, but parameters it holds directly
    # are used by that forward through torch ops.
    return "holds parameters its own forward uses" if module._parameters else None


def _covered(modules, twins):
    """Names of modules whose work a covering twin (or module) does itself."""
    covered = set()
    for name, m in modules:
        owner = twins.get(type(m), type(m))
        if getattr(owner, "covers_submodules", False):
            covered.update(f"{name}.{sub}" if name else sub for sub, _ in m.named_modules() if sub)
    return covered


def convert(model, strict=False):
    """Turn every supported ``torch.nn`` submodule of ``model`` (the model itself included)
    into its manualgrad twin, in place, and return ``model``.

    Only modules whose class is exactly a supported torch class are swapped: a user's
    subclass of ``torch.nn.Linear`` may override ``forward`` and is left alone. Everything
    else stays as it is; with ``strict=True`` a ``NotImplementedError`` lists what would
    still run torch's backward (torch.nn layers with no twin or in a configuration the twin
    does not support, and user modules that hold parameters directly) and nothing is changed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    twins = _twins()
    modules = list(model.named_modules(remove_duplicate=True))
    if strict:
        covered = _covered(modules, twins)
        left = []
        for name, m in modules:
            reason = None if name in covered else _unsupported(m, twins)
            if reason is not None:
                left.append(f"{name or '(root)'}: {type(m).__name__}" + ("" if reason == "no twin" else f" ({reason})"))
        if left:
            raise NotImplementedError("manualgrad cannot convert these modules: " + ", ".join(left))
    hook_twins = {cls.__bases__[0]: cls for cls in mgnn.FORWARD_PRE_HOOKS}
    for _, m in modules:
        twin = _twin_of(m, twins)
        if twin is not None and _reason(twin, m) is None:
            m.__class__ = twin
        for hook in m._forward_pre_hooks.values():  # the deprecated torch.nn.utils.weight_norm's
            if type(hook) in hook_twins:
                hook.__class__ = hook_twins[type(hook)]
    return model
