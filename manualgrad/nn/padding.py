"""Padding modules: torch.nn's, with manualgrad.functional.pad (hand-written backward) in forward.

Constructor, ``padding`` / ``value`` attributes, ``repr`` and the circular modules' input-dim
check are torch's own. Each class subclasses its torch twin directly (convert reads the first
base) and takes one of the four forwards below.
"""
import torch

from .. import functional as F


def _constant_forward(self, input):
    # torch's _ConstantPadNd.forward (ZeroPad is a ConstantPad with value 0)
    return F.pad(input, self.padding, "constant", self.value)


def _reflection_forward(self, input):
    return F.pad(input, self.padding, "reflect")


def _replication_forward(self, input):
    return F.pad(input, self.padding, "replicate")


def _circular_forward(self, input):
    self._check_input_dim(input)  # torch's: ValueError for an input of the wrong dim
    return F.pad(input, self.padding, "circular")


class ConstantPad1d(torch.nn.ConstantPad1d):
    """Drop-in for ``torch.nn.ConstantPad1d`` with a hand-written backward."""

    forward = _constant_forward

class ConstantPad2d(torch.nn.ConstantPad2d):
    """Drop-in for ``torch.nn.ConstantPad2d`` with a hand-written backward."""

    forward = _constant_forward

class ConstantPad3d(torch.nn.ConstantPad3d):
    """Drop-in for ``torch.nn.ConstantPad3d`` with a hand-written backward."""

    forward = _constant_forward

class ZeroPad1d(torch.nn.ZeroPad1d):
    """Drop-in for ``torch.nn.ZeroPad1d`` with a hand-written backward."""

    forward = _constant_forward

class ZeroPad2d(torch.nn.ZeroPad2d):
    """Drop-in for ``torch.nn.ZeroPad2d`` with a hand-written backward."""

    forward = _constant_forward

class ZeroPad3d(torch.nn.ZeroPad3d):
    """Drop-in for ``torch.nn.ZeroPad3d`` with a hand-written backward."""

    forward = _constant_forward

class ReflectionPad1d(torch.nn.ReflectionPad1d):
    """Drop-in for ``torch.nn.ReflectionPad1d`` with a hand-written backward."""

    forward = _reflection_forward

class ReflectionPad2d(torch.nn.ReflectionPad2d):
    """Drop-in for ``torch.nn.ReflectionPad2d`` with a hand-written backward."""

    forward = _reflection_forward

class ReflectionPad3d(torch.nn.ReflectionPad3d):
    """Drop-in for ``torch.nn.ReflectionPad3d`` with a hand-written backward."""

    forward = _reflection_forward

class ReplicationPad1d(torch.nn.ReplicationPad1d):
    """Drop-in for ``torch.nn.ReplicationPad1d`` with a hand-written backward."""

    forward = _replication_forward

class ReplicationPad2d(torch.nn.ReplicationPad2d):
    """Drop-in for ``torch.nn.ReplicationPad2d`` with a hand-written backward."""

    forward = _replication_forward

class ReplicationPad3d(torch.nn.ReplicationPad3d):
    """Drop-in for ``torch.nn.ReplicationPad3d`` with a hand-written backward."""

    forward = _replication_forward

class CircularPad1d(torch.nn.CircularPad1d):
    """Drop-in for ``torch.nn.CircularPad1d`` with a hand-written backward."""

    forward = _circular_forward

class CircularPad2d(torch.nn.CircularPad2d):
    """Drop-in for ``torch.nn.CircularPad2d`` with a hand-written backward."""

    forward = _circular_forward

class CircularPad3d(torch.nn.CircularPad3d):
    """Drop-in for ``torch.nn.CircularPad3d`` with a hand-written backward."""

    forward = _circular_forward
