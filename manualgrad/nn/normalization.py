"""Normalization layers: torch.nn's BatchNorm1d/2d/3d, LayerNorm, RMSNorm and GroupNorm with
hand-written backwards. Constructors, parameters, buffers, state_dict and repr are torch's."""
import torch

from .. import functional as F


def _batch_norm_forward(self, input):
    """torch.nn.modules.batchnorm._BatchNorm.forward, calling manualgrad.functional.batch_norm."""
    self._check_input_dim(input)
    # momentum=None: a cumulative moving average, factor 1 / num_batches_tracked after the increment
    exponential_average_factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats:
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
    # Batch stats normalize in training, and in eval when there are no running stats.
    bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
    # The buffers are passed only when they are updated (training, tracked) or used (eval).
    track = not self.training or self.track_running_stats
    return F.batch_norm(
        input,
        self.running_mean if track else None,
        self.running_var if track else None,
        self.weight,
        self.bias,
        bn_training,
        exponential_average_factor,
        self.eps,
    )


class BatchNorm1d(torch.nn.BatchNorm1d):
    """Drop-in for ``torch.nn.BatchNorm1d`` (input (N, C) or (N, C, L)) with a hand-written backward."""

    def forward(self, input):
        return _batch_norm_forward(self, input)


class BatchNorm2d(torch.nn.BatchNorm2d):
    """Drop-in for ``torch.nn.BatchNorm2d`` (input (N, C, H, W)) with a hand-written backward."""

    def forward(self, input):
        return _batch_norm_forward(self, input)


class BatchNorm3d(torch.nn.BatchNorm3d):
    """Drop-in for ``torch.nn.BatchNorm3d`` (input (N, C, D, H, W)) with a hand-written backward."""

    def forward(self, input):
        return _batch_norm_forward(self, input)


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm`` with a hand-written backward."""

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """Drop-in for ``torch.nn.RMSNorm`` with a hand-written backward."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class GroupNorm(torch.nn.GroupNorm):
    """Drop-in for ``torch.nn.GroupNorm`` with a hand-written backward."""

    def forward(self, input):
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
