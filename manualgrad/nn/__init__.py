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
# convolution

# pooling

# normalization

# embedding and attention

# fused linear + cross-entropy

# The module classes only (dir() would also list the submodules: activation, loss, ...).
__all__ = [name for name, value in list(globals().items()) if isinstance(value, type)]
