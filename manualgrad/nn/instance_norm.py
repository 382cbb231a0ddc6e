"""InstanceNorm1d/2d/3d with a hand-written backward. Constructor, parameters, buffers, state_dict,
repr and forward (its input checks, the affine/num_features check and unbatched inputs) are
torch's; only the call torch's forward ends in, ``_apply_instance_norm``, is replaced."""
import torch

from .. import functional as F


def _apply_instance_norm(self, input):
    """torch.nn.modules.instancenorm._InstanceNorm._apply_instance_norm, calling
    manualgrad.functional.instance_norm (the batch stats normalize in training or when no running
    stats are tracked)."""
    return F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                           self.training or not self.track_running_stats,
                           self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(torch.nn.InstanceNorm1d):
    """Drop-in for ``torch.nn.InstanceNorm1d`` (input (N, C, L) or (C, L)) with a hand-written backward."""

    _apply_instance_norm = _apply_instance_norm


class InstanceNorm2d(torch.nn.InstanceNorm2d):
    """Drop-in for ``torch.nn.InstanceNorm2d`` (input (N, C, H, W) or (C, H, W)) with a hand-written backward."""

    _apply_instance_norm = _apply_instance_norm


class InstanceNorm3d(torch.nn.InstanceNorm3d):
    """Drop-in for ``torch.nn.InstanceNorm3d`` (input (N, C, D, H, W) or (C, D, H, W)) with a
    hand-written backward."""

    _apply_instance_norm = _apply_instance_norm
