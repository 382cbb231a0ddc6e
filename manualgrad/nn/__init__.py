"""manualgrad.nn: torch.nn names. Each class subclasses its torch twin and overrides only
``forward`` (calling manualgrad.functional), so constructor, parameters, buffers,
``state_dict``, ``repr``, ``reset_parameters`` and ``isinstance`` are torch's own."""
from .activation import ELU, GELU, LeakyReLU, LogSoftmax, ReLU, Sigmoid, SiLU, Softmax, Softplus, Tanh
from .dropout import Dropout
from .linear import Linear
from .loss import (
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    HuberLoss,
    KLDivLoss,
    L1Loss,
    MSELoss,
    NLLLoss,
    SmoothL1Loss,
)

__all__ = [name for name in dir() if not name.startswith("_")]
