import torch

from .. import functional as F


def _unsupported(module):
    """Why manualgrad cannot run this conv module (None if it can): convert() reads this."""
    # torch pads with F.pad for the other modes, whose backward would be torch's.
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros')"
    return None


def _zeros_only(module):
    reason = _unsupported(module)
    if reason is not None:
        raise NotImplementedError(f"manualgrad {type(module).__name__} does not support {reason}")


class Conv1d(torch.nn.Conv1d):
    """Drop-in for ``torch.nn.Conv1d`` (padding_mode='zeros') with a hand-written backward."""

    unsupported = staticmethod(_unsupported)

    def forward(self, input):
        _zeros_only(self)
        return F.conv1d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2d(torch.nn.Conv2d):
    """Drop-in for ``torch.nn.Conv2d`` (padding_mode='zeros') with a hand-written backward."""

    unsupported = staticmethod(_unsupported)

    def forward(self, input):
        _zeros_only(self)
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
