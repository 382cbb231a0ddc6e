"""manualgrad.functional: the torch.nn.functional names, signatures and defaults, each
backed by a Function with a hand-written backward (manualgrad/ops/<family>.py).

    import manualgrad.functional as F
    loss = F.cross_entropy(F.linear(x, w, b), target)
"""
# Each op family adds its names here, one import block per family.

# linear
from .ops.linear import linear

# activation
from .ops.activation import relu

# softmax

# dropout

# regression losses

# binary and distribution losses

# classification losses

__all__ = [name for name in dir() if not name.startswith("_")]
