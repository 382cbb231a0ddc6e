"""SyncBatchNorm: torch.nn.SyncBatchNorm with hand-written backwards.

Training inside an initialized process group of more than one process runs
ops/sync_batch_norm.py (statistics and their gradient sums shared between the processes); everything
else (eval, world size 1, no process group) is manualgrad's batch_norm, as torch falls back to
F.batch_norm. One difference, deliberate: torch's SyncBatchNorm raises ValueError for a CPU input in
that synchronized case (its kernels are CUDA-only); this one runs it on CPU too (gloo).
"""
import torch
import torch.distributed as dist

from .. import functional as F
from ..ops.sync_batch_norm import sync_batch_norm


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm`` (input (N, C, *)) with a hand-written backward.
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` output converts to it with ``manualgrad.convert``."""

    def forward(self, input):
        # torch.nn.SyncBatchNorm.forward, calling manualgrad's batch_norm / sync_batch_norm
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / self.num_batches_tracked.item()
        # Batch stats normalize in training, and in eval when there are no running stats.
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        # The buffers are passed only when they are updated (training, tracked) or used (eval).
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        # Statistics are shared in training only (never in eval), across more than one process.
        need_sync = bn_training and self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            process_group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(process_group)
            need_sync = world_size > 1
        if not need_sync:
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                                exponential_average_factor, self.eps)
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, exponential_average_factor,
                               self.eps, process_group, world_size)
