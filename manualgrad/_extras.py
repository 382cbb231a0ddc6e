"""Packages that only some commands need, and the extra of manualgrad that brings each.

A plain ``pip install manualgrad`` brings torch, numpy and tensorboard. The rest is imported
where it is used, through ``require``, so a missing one is one line naming the package and the
extra to install, instead of a traceback ending in ``No module named 'sklearn'``.
"""
import importlib
import importlib.util

# import name -> (package name on the index, the extra of manualgrad that installs it)
EXTRAS = {
    "sklearn": ("scikit-learn", "digits"),
    "matplotlib": ("matplotlib", "plot"),
}


class MissingExtra(ModuleNotFoundError):
    """An optional package is not installed; the message says which extra brings it."""


def message(top, what):
    package, extra = EXTRAS[top]
    return f"{what} needs {package}: pip install 'manualgrad[{extra}]'"


def installed(top):
    """True if the optional package ``top`` (an import name in EXTRAS) can be found, without importing it."""
    return importlib.util.find_spec(top) is not None


def require(module, what):
    """Import ``module`` (e.g. ``"sklearn.datasets"``); if its package is not installed, raise
    MissingExtra("<what> needs scikit-learn: pip install 'manualgrad[digits]'").

    An ImportError from inside an installed package (a broken install) propagates unchanged.
    """
    top = module.partition(".")[0]
    try:
        importlib.import_module(top)
    except ModuleNotFoundError as e:
        if e.name != top:
            raise
        raise MissingExtra(message(top, what), name=top) from None
    return importlib.import_module(module)
