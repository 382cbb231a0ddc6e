"""sync_batch_norm: batch_norm over a batch split between the processes of a process group.

Each of the K processes holds x_k (N_k, C, *), M_k = N_k * prod(*) elements per channel. They
normalize with the statistics of the whole batch, M = sum_k M_k elements per channel:

    mean = sum_k M_k mean_k / M                                  (C,)
    var  = sum_k M_k (var_k + (mean_k - mean)^2) / M              (C,)  (biased; parallel variance)
    x_hat = (x_k - mean) r,   r = 1 / sqrt(var + eps),   y = x_hat w + b

The collectives follow torch.nn.modules._functions.SyncBatchNorm: forward all-gathers each
process's (mean_k, var_k, M_k), 2C + 1 numbers (an all-gather, not an all-reduce, because the counts
may differ between processes; a process with an empty batch sends M_k = 0 and still takes part).
torch gathers invstd_k and turns it back into var_k; the biased var_k itself is gathered here (no
1 / r^2 - eps round trip). Backward all-reduces the two per-channel sums dx needs,

    sdy = sum_{all k, D} dy,   sdyx = sum_{all k, D} dy x_hat    (C,)
    dx_k = r w (dy_k - sdy / M - x_hat sdyx / M)                  like x_k

(batch_norm's dx, with the sums and M of the whole batch: see ops/normalization.py). dw and db
stay this process's own sums, sum_D dy_k x_hat and sum_D dy_k, as torch's: DistributedDataParallel
all-reduces parameter gradients itself (a second all-reduce here would count them twice).

Running stats, as torch (and as batch_norm on the whole batch): running_mean = (1 - momentum)
running_mean + momentum mean, running_var = (1 - momentum) running_var + momentum var M / (M - 1),
the same on every process.

Not supported, with NotImplementedError: double backward (the gradient of dx would need the
collectives differentiated too), forward-mode AD and vmap. Only the synchronized training path is
here; eval, world size 1 and no process group are batch_norm's (nn.SyncBatchNorm chooses).
"""
import torch
import torch.distributed as dist

from ._apply import INPUT, apply
from .normalization import _LOW_PRECISION, _channel_dims


def _local_stats(x):
    """This process's (mean_k, var_k) per channel (C,) and M_k; zeros for an empty batch."""
    c = x.shape[1]
    m = x.numel() // c if c else 0
    if m == 0:
        # no elements: weight M_k = 0 in the sums below, zeros so that 0 * stat is 0 (not nan)
        return x.new_zeros(c), x.new_zeros(c), 0
    dims, shape = _channel_dims(x)
    # mean_k = mean_D(x_k)                                   (C,)
    mean = x.mean(dims)
    # var_k = mean_D((x_k - mean_k)^2), biased               (C,)
    xc = x - mean.view(shape)
    return mean, (xc * xc).mean(dims), m


def _gather_stats(mean, var, m, group, world_size):
    """All processes' (mean_k, var_k, M_k), stacked: (K, C), (K, C), (K, 1). One all-gather."""
    c = mean.numel()
    # [mean_k, var_k, M_k]                                   (2C + 1,)
    mine = torch.cat([mean, var, mean.new_full((1,), m)])
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine, group=group)
    # (K, 2C + 1) -> (K, C), (K, C), (K, 1)
    return torch.stack(every).split([c, c, 1], dim=1)


def sync_batch_norm_forward(x, running_mean, running_var, w, b, momentum, eps, group, world_size):
    """y, the global mean and r (C,), and M (a Python int). Updates the running stats in place."""
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    xf = x.float() if x.dtype in _LOW_PRECISION else x  # stats in float32, as torch's kernels
    means, vars_, counts = _gather_stats(*_local_stats(xf), group, world_size)
    m = int(counts.sum().item())
    if m <= 1:  # every process raises alike: M is the same everywhere
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {m}")
    # mean = sum_k M_k mean_k / M                            (C,)
    mean = (counts * means).sum(0) / m
    # var = sum_k M_k (var_k + (mean_k - mean)^2) / M        (C,)
    var = (counts * (vars_ + (means - mean).square())).sum(0) / m
    # r = 1 / sqrt(var + eps)                                (C,)
    r = (var + eps).rsqrt()
    with torch.no_grad():
        if running_mean is not None:
            # running_mean = (1 - momentum) running_mean + momentum mean
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            # running_var = (1 - momentum) running_var + momentum var M / (M - 1)   (unbiased)
            running_var.mul_(1 - momentum).add_((var * (m / (m - 1))).to(running_var.dtype), alpha=momentum)
    _, shape = _channel_dims(x)
    # y = (x - mean) r w + b                                 like x
    y = (xf - mean.view(shape)) * r.view(shape)
    if w is not None:
        y = y * w.view(shape)
    if b is not None:
        y = y + b.view(shape)
    return y.to(x.dtype), mean, r, m


def sync_batch_norm_backward(dy, x, w, mean, r, m, group, needs=(True, True, True)):
    """(dx, dw, db) of this process. One all-reduce (of 2C numbers) when dx is needed, as torch's."""
    dtype = x.dtype
    if dtype in _LOW_PRECISION:  # in float32, as batch_norm's backward (ops/normalization.in_float32)
        dy, x = dy.float(), x.float()
    c = x.shape[1]
    dims, shape = _channel_dims(x)
    if x.numel() == 0:
        sdy = sdyx = x.new_zeros(c)
    else:
        # x_hat = (x - mean) r, with the whole batch's mean and r      like x
        x_hat = (x - mean.view(shape)) * r.view(shape)
        # sdy_k = sum_D dy_k,  sdyx_k = sum_D dy_k x_hat               (C,)
        sdy, sdyx = dy.sum(dims), (dy * x_hat).sum(dims)
    pdtype = dtype if w is None else w.dtype
    # dw = sum_D dy_k x_hat,  db = sum_D dy_k: this process's own  (C,)
    dw = sdyx.to(pdtype) if needs[1] else None
    db = sdy.to(pdtype) if needs[2] else None
    dx = None
    if needs[0]:
        # [sdy, sdyx] summed over the processes: the whole batch's   (2C,)
        total = torch.cat([sdy, sdyx])
        dist.all_reduce(total, dist.ReduceOp.SUM, group=group)
        sdy_all, sdyx_all = total.split(c)
        if x.numel() == 0:
            return torch.zeros_like(x, dtype=dtype), dw, db
        # s = r w                                                      (1, C, 1, ...)
        s = r.view(shape) if w is None else r.view(shape) * w.view(shape)
        # dx = r w (dy - sdy / M - x_hat sdyx / M)                     like x
        dx = ((dy - (sdy_all / m).view(shape) - x_hat * (sdyx_all / m).view(shape)) * s).to(dtype)
    return dx, dw, db


class _NoDoubleBackward(torch.autograd.Function):
    """apply(k, *inputs, *grads): the k grads as they are, made functions of the inputs (x, w, dy of
    the backward) whose own backward raises NotImplementedError."""
    autocast = INPUT

    @staticmethod
    def forward(k, *tensors):
        return tuple(t.clone() for t in tensors[-k:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError("sync_batch_norm: double backward across processes is not supported "
                                  "(its gradient would need the collectives differentiated too)")


class SyncBatchNormFunction(torch.autograd.Function):
    """apply(x, running_mean, running_var, w, b, momentum, eps, group, world_size): the training
    path of SyncBatchNorm with world_size > 1 processes in ``group``."""
    autocast = INPUT  # as BatchNormFunction: on no autocast list

    @staticmethod
    def forward(x, running_mean, running_var, w, b, momentum, eps, group, world_size):
        y, mean, r, m = sync_batch_norm_forward(x, running_mean, running_var, w, b, momentum, eps, group, world_size)
        return y, mean, r, m

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, _, w, b, _, _, group, _ = inputs
        _, mean, r, m = output
        ctx.mark_non_differentiable(mean, r)
        ctx.set_materialize_grads(False)
        ctx.m, ctx.group, ctx.has_bias = m, group, b is not None
        # x and the whole batch's mean and r (C,): as torch saves
        ctx.save_for_backward(x, w, mean, r)

    @staticmethod
    def backward(ctx, dy, _dmean, _dr, _dm):
        x, w, mean, r = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = (need[0], w is not None and need[3], ctx.has_bias and need[4])
        if dy is None:  # y unused; still take part in the all-reduce the other processes run
            dy = torch.zeros_like(x)
        with torch.no_grad():
            dx, dw, db = sync_batch_norm_backward(dy, x, w, mean, r, ctx.m, ctx.group, needs)
        if torch.is_grad_enabled():  # create_graph: the gradients are not differentiable
            dx, dw, db = _once((x, w, dy), (dx, dw, db))
        return dx, None, None, dw, db, None, None, None, None

    @staticmethod
    def jvp(ctx, *_):
        raise NotImplementedError("sync_batch_norm: forward-mode AD across processes is not supported")

    @staticmethod
    def vmap(info, in_dims, *args):
        raise NotImplementedError("sync_batch_norm: vmap across processes is not supported")


def _once(inputs, grads):
    present = [g for g in grads if g is not None]
    out = iter(_NoDoubleBackward.apply(len(present), *[t for t in inputs if t is not None], *present))
    return tuple(None if g is None else next(out) for g in grads)


def sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, process_group, world_size):
    """Batch norm with the statistics of the batch split over ``world_size`` processes of
    ``process_group`` (training only; the arguments of torch's sync_batch_norm Function, as
    nn.SyncBatchNorm passes them). Every process must call it, with the same channels."""
    return apply(SyncBatchNormFunction, input, running_mean, running_var, weight, bias, momentum, eps,
                 process_group, world_size)[0]
