"""Lazy modules (in_features / in_channels / num_features inferred from the first input) with
hand-written backwards.

torch's Lazy module is its eager class plus LazyModuleMixin: the first forward's pre-hook creates
the parameters from the input's shape and then turns the object into ``cls_to_become`` (torch's
LazyConv2d becomes a torch.nn.Conv2d). Each twin here is torch's Lazy class with manualgrad's
eager class as ``cls_to_become`` and that class's forward (which the first call runs), so it ends
up as the manualgrad module. ``convert`` therefore handles a lazy model either way: before
materialization it swaps torch's Lazy class for the twin below, after it torch's eager class for
manualgrad's."""
import torch

from .conv import Conv1d, Conv2d, Conv3d
from .conv_transpose import ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from .instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .linear import Linear
from .normalization import BatchNorm1d, BatchNorm2d, BatchNorm3d


class LazyLinear(torch.nn.LazyLinear):
    """Drop-in for ``torch.nn.LazyLinear``: becomes manualgrad's Linear on its first forward."""

    cls_to_become = Linear
    forward = Linear.forward


class LazyConv1d(torch.nn.LazyConv1d):
    """Drop-in for ``torch.nn.LazyConv1d``: becomes manualgrad's Conv1d on its first forward."""

    cls_to_become = Conv1d
    forward = Conv1d.forward


class LazyConv2d(torch.nn.LazyConv2d):
    """Drop-in for ``torch.nn.LazyConv2d``: becomes manualgrad's Conv2d on its first forward."""

    cls_to_become = Conv2d
    forward = Conv2d.forward


class LazyConv3d(torch.nn.LazyConv3d):
    """Drop-in for ``torch.nn.LazyConv3d``: becomes manualgrad's Conv3d on its first forward."""

    cls_to_become = Conv3d
    forward = Conv3d.forward


class LazyConvTranspose1d(torch.nn.LazyConvTranspose1d):
    """Drop-in for ``torch.nn.LazyConvTranspose1d``: becomes manualgrad's ConvTranspose1d on its first forward."""

    cls_to_become = ConvTranspose1d
    forward = ConvTranspose1d.forward


class LazyConvTranspose2d(torch.nn.LazyConvTranspose2d):
    """Drop-in for ``torch.nn.LazyConvTranspose2d``: becomes manualgrad's ConvTranspose2d on its first forward."""

    cls_to_become = ConvTranspose2d
    forward = ConvTranspose2d.forward


class LazyConvTranspose3d(torch.nn.LazyConvTranspose3d):
    """Drop-in for ``torch.nn.LazyConvTranspose3d``: becomes manualgrad's ConvTranspose3d on its first forward."""

    cls_to_become = ConvTranspose3d
    forward = ConvTranspose3d.forward


class LazyBatchNorm1d(torch.nn.LazyBatchNorm1d):
    """Drop-in for ``torch.nn.LazyBatchNorm1d``: becomes manualgrad's BatchNorm1d on its first forward."""

    cls_to_become = BatchNorm1d
    forward = BatchNorm1d.forward


class LazyBatchNorm2d(torch.nn.LazyBatchNorm2d):
    """Drop-in for ``torch.nn.LazyBatchNorm2d``: becomes manualgrad's BatchNorm2d on its first forward."""

    cls_to_become = BatchNorm2d
    forward = BatchNorm2d.forward


class LazyBatchNorm3d(torch.nn.LazyBatchNorm3d):
    """Drop-in for ``torch.nn.LazyBatchNorm3d``: becomes manualgrad's BatchNorm3d on its first forward."""

    cls_to_become = BatchNorm3d
    forward = BatchNorm3d.forward


# (InstanceNorm: torch's forward is kept, as in nn/instance_norm.py; only the call it ends in is ours)
class LazyInstanceNorm1d(torch.nn.LazyInstanceNorm1d):
    """Drop-in for ``torch.nn.LazyInstanceNorm1d``: becomes manualgrad's InstanceNorm1d on its first forward."""

    cls_to_become = InstanceNorm1d
    _apply_instance_norm = InstanceNorm1d._apply_instance_norm


class LazyInstanceNorm2d(torch.nn.LazyInstanceNorm2d):
    """Drop-in for ``torch.nn.LazyInstanceNorm2d``: becomes manualgrad's InstanceNorm2d on its first forward."""

    cls_to_become = InstanceNorm2d
    _apply_instance_norm = InstanceNorm2d._apply_instance_norm


class LazyInstanceNorm3d(torch.nn.LazyInstanceNorm3d):
    """Drop-in for ``torch.nn.LazyInstanceNorm3d``: becomes manualgrad's InstanceNorm3d on its first forward."""

    cls_to_become = InstanceNorm3d
    _apply_instance_norm = InstanceNorm3d._apply_instance_norm
