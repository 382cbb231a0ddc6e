"""instance_norm: batch_norm of each (sample, channel) plane on its own.

    x (N, C, *)  D = the dims of *, per sample and channel      w, b (C,)
    x_hat = (x - mean_D(x)) * r,  r = 1 / sqrt(var_D(x) + eps),  y = x_hat * w + b

This is batch_norm of x viewed as (1, N*C, *) with w, b and the running stats repeated N times,
which is how torch computes it (aten/src/ATen/native/Normalization.cpp, ``instance_norm``). With
running stats to use or update (or float16/bfloat16 input), forward calls torch's batch_norm kernel
on that view, so outputs and running stats are bit for bit torch's. Without them (the default:
InstanceNorm's track_running_stats=False), in float32/64, the statistics are two row reductions
here (a mean, then the norm of x - mean) and y one pass over the centred rows: the same formula
to float32 rounding, ~4x faster than torch's kernel, whose per-channel statistics loops are scalar
(1.2 ms against 0.3 ms at (16,64,32,32) on one thread). Backward is batch_norm's hand-written
backward (ops/normalization.py) on the (N, C, D) rows, or on the (1, N*C, *) view with a graph,
with the repeated w's gradient summed back over N:

    dx = batch_norm's dx of the (1, N*C, *) view, viewed back     like x
    dw = sum_N dw_rep.view(N, C),  db = sum_N db_rep.view(N, C)   (C,)

Running stats, as torch: the (N*C,) repeats are updated by batch_norm (momentum, unbiased var),
then each running stat becomes the mean over N of its repeats (torch 2.13 does this in training
only: with use_input_stats False the running stats are left as they are, bit for bit).
"""
import torch
import torch.nn.functional as TF

from ._apply import INPUT, apply
from ._checks import can_write_inplace
from .normalization import _LOW_PRECISION, batch_norm_backward, batch_norm_forward, batch_norm_jvp, in_float32


def _repeat(t, n):
    # torch's repeat_if_defined: (C,) -> (N*C,), channel c of sample i at i*C + c
    return None if t is None else t.repeat(n)


def _planes(x):
    # x (N, C, *) -> (1, N*C, *): one batch_norm channel per (sample, channel)
    return x.contiguous().view(1, x.shape[0] * x.shape[1], *x.shape[2:])


def _instance_norm_forward_rows(x, w, b, eps):
    """y and the per-plane mean and r (N*C,), the statistics computed here (no running stats):

        mean = mean_D(x),  r = 1 / sqrt(|x - mean|^2 / D + eps),  y = (x - mean) r w + b"""
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    m = x3.shape[2]
    # mean = mean_D(x)                                                (N, C, 1)
    mean3 = x3.mean(2, keepdim=True)
    # xc = x - mean, in y's buffer                                    (N, C, D)
    buf = x3 - mean3
    # r = 1 / sqrt(|xc|^2 / D + eps), the biased var (torch.var_mean is ~10x slower on CPU)   (N, C, 1)
    r3 = torch.linalg.vector_norm(buf, dim=2, keepdim=True).square_().div_(m).add_(eps).rsqrt_()
    # y = xc r w + b                                                  (N, C, D) -> like x
    s = r3 if w is None else r3 * w.view(1, c, 1)
    b3 = None if b is None else b.view(1, c, 1)
    if can_write_inplace(buf, s, b3):
        y = buf.mul_(s) if b3 is None else buf.mul_(s).add_(b3)
    else:  # (under vmap of w or b alone, buf is not batched)
        y = buf * s if b3 is None else buf * s + b3
    return y, mean3.view(n * c), r3.view(n * c)


def instance_norm_forward(x, running_mean, running_var, w, b, use_input_stats, momentum, eps):
    """y, and (as batch_norm_forward) the per-plane batch mean and r (N*C,) when use_input_stats.
    Updates the running stats in place as torch does."""
    if use_input_stats:
        TF._verify_spatial_size(x.size())  # "Expected more than 1 spatial element when training"
    elif running_mean is None or running_var is None:
        raise RuntimeError("Expected running_mean and running_var to be defined when use_input_stats is false")
    if x.dim() < 2:
        raise IndexError(f"instance_norm: expected an input with at least 2 dims (N, C, *), got {x.dim()}")
    n, c = x.shape[:2]
    if (use_input_stats and running_mean is None and running_var is None and eps > 0 and x.numel()
            and x.dtype in (torch.float32, torch.float64)):
        # no running stats: the statistics here (see the module docstring)
        y, mean, r = _instance_norm_forward_rows(x, w, b, eps)
        return torch.ops.aten._unsafe_view(y, x.shape), mean, r, None, None
    rm, rv = _repeat(running_mean, n), _repeat(running_var, n)
    y, mean, r = batch_norm_forward(_planes(x), rm, rv, _repeat(w, n), _repeat(b, n), use_input_stats, momentum, eps)
    if use_input_stats:
        with torch.no_grad():
            # running_mean = mean over N of its updated repeats, running_var alike     (C,)
            if running_mean is not None:
                running_mean.copy_(rm.view(n, c).mean(0))
            if running_var is not None:
                running_var.copy_(rv.view(n, c).mean(0))
    # (_unsafe_view: y_planes is forward's own tensor; a tracked view of it as the output would trip
    #  forward AD's check that a view's tangent has the primal's layout under batched tangents)
    return torch.ops.aten._unsafe_view(y, x.shape), mean, r, rm, rv


def _instance_norm_backward_plain(dy, x, w, eps, needs, mean=None, r=None):
    """instance_norm_backward with the input stats for a plain backward (no graph, no transform):
    batch_norm's formula (ops/normalization.py, _batch_norm_backward_plain) on each (sample, channel)
    row of x as (N, C, D), w broadcast over N instead of repeated and its gradient summed over N
    once, one buffer (dx's). The same passes over memory as batch_norm's plain backward on the
    (1, N*C, D) view, less Python around them (~14% faster at (16,64,32,32)). ``mean``, ``r``:
    forward's per-plane stats (N*C,), or None to compute them here.

        xc = x - mean,  sdy = sum_D dy,  sdyx = sum_D dy x_hat = r sum_D xc dy
        dx = r w (dy - sdy / D - x_hat sdyx / D) = k xc + r w dy + c,  k = -r w r sdyx / D,  c = -r w sdy / D

    (sdyx from the centred xc, and dx formed from it, as batch_norm's: see there why.)"""
    n, c = x.shape[:2]
    x3, dy3 = x.reshape(n, c, -1), dy.reshape(n, c, -1)
    m = x3.shape[2]
    if mean is None:
        # mean = mean_D(x)                                            (N, C, 1)
        mean3 = x3.mean(2, keepdim=True)
        # xc = x - mean, in dx's buffer                               (N, C, D)
        buf = x3 - mean3
        # r = 1 / sqrt(|xc|^2 / D + eps)                              (N, C, 1)
        r3 = torch.linalg.vector_norm(buf, dim=2, keepdim=True).square_().div_(m).add_(eps).rsqrt_()
    else:
        mean3, r3 = mean.view(n, c, 1), r.view(n, c, 1)
        # xc = x - mean, in dx's buffer                               (N, C, D)
        buf = x3 - mean3
    # sdy = sum_D dy                                                  (N, C, 1)
    sdy = dy3.sum(2, keepdim=True)
    # sdyx = sum_D dy x_hat = r sum_D xc dy, the product in dx's buffer (N, C, D) -> (N, C, 1)
    sdyx = buf.mul_(dy3).sum(2, keepdim=True).mul_(r3)
    dx = None
    if needs[0]:
        rw = r3 if w is None else r3 * w.view(1, c, 1)
        # k = -r w r sdyx / D,  c = -r w sdy / D                      (N, C, 1)
        k = (rw * r3).mul_(sdyx).div_(-m)
        c0 = (rw * sdy).div_(-m)
        # dx = k xc + r w dy + c, xc again in the buffer (one pass, where a second buffer for
        # the product above would be a fresh allocation: page faults)  (N, C, D) -> like x
        dx = torch.sub(x3, mean3, out=buf).mul_(k).addcmul_(dy3, rw).add_(c0).view(x.shape)
    # dw = sum_N sum_D dy x_hat,  db = sum_N sum_D dy                 (C,)
    dw = sdyx.sum(0).view(c) if needs[1] else None
    db = sdy.sum(0).view(c) if needs[2] else None
    return dx, dw, db


def instance_norm_backward(dy, x, w, rm, rv, use_input_stats, eps, needs=(True, True, True), mean=None, r=None):
    """Gradients (dx, dw, db). ``rm``, ``rv``: the repeated running stats (N*C,) that normalized
    in eval (use_input_stats False); ``mean``, ``r``: forward's per-plane stats (plain backward only)."""
    if use_input_stats and x.numel() and can_write_inplace(dy, x, w, mean, r):
        return _instance_norm_backward_plain(dy, x, w, eps, needs, mean, r)
    n, c = x.shape[:2]
    # batch_norm's backward on the (1, N*C, *) planes, w repeated   (N*C,)
    dx, dw, db = batch_norm_backward(dy.reshape(1, n * c, *x.shape[2:]), _planes(x), _repeat(w, n), rm, rv,
                                     use_input_stats, eps, needs, mean, r)
    # dx: the planes viewed back                              like x
    dx = None if dx is None else dx.view(x.shape)
    # dw = sum over N of the repeats' gradients,  db alike     (C,)
    dw = None if dw is None else dw.view(n, c).sum(0)
    db = None if db is None else db.view(n, c).sum(0)
    return dx, dw, db


def instance_norm_jvp(dx, dw, db, x, w, rm, rv, use_input_stats, eps):
    n, c = x.shape[:2]
    dxp = None if dx is None else dx.reshape(1, n * c, *x.shape[2:])
    dy = batch_norm_jvp(dxp, _repeat(dw, n), _repeat(db, n), _planes(x), _repeat(w, n), rm, rv, use_input_stats, eps)
    return dy.view(x.shape)


class InstanceNormFunction(torch.autograd.Function):
    """apply(x, running_mean, running_var, w, b, use_input_stats, momentum, eps): F.instance_norm's
    argument order. The running stats are buffers, updated in place, never differentiated."""
    autocast = INPUT  # autocast: in the input's dtype (instance_norm is on no CPU or CUDA autocast list)

    generate_vmap_rule = True

    @staticmethod
    def forward(x, running_mean, running_var, w, b, use_input_stats, momentum, eps):
        return instance_norm_forward(x, running_mean, running_var, w, b, use_input_stats, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, running_mean, running_var, w, b, use_input_stats, momentum, eps = inputs
        _, mean, r, rm, rv = output
        ctx.mark_non_differentiable(*(t for t in (mean, r, rm, rv) if t is not None))
        ctx.set_materialize_grads(False)
        ctx.use_input_stats, ctx.eps, ctx.has_bias = use_input_stats, eps, b is not None
        # eval: the repeated running stats normalized (fresh tensors, never updated afterwards);
        # training: the per-plane batch stats, kept in float32/64 only (as BatchNormFunction)
        stats = (rm, rv, None, None)
        if use_input_stats:
            stats = (None, None) + ((None, None) if x.dtype in _LOW_PRECISION else (mean, r))
        ctx.save_for_backward(x, w, *stats)
        ctx.save_for_forward(x, w, *stats[:2])

    @staticmethod
    def backward(ctx, dy, _dmean, _dr, _drm, _drv):
        x, w, rm, rv, mean, r = ctx.saved_tensors
        if dy is None:
            return (None,) * 8
        need = ctx.needs_input_grad
        needs = (need[0], w is not None and need[3], ctx.has_bias and need[4])
        dx, dw, db = in_float32(instance_norm_backward, dy, x, w, rm, rv, ctx.use_input_stats, ctx.eps, needs, mean, r)
        return dx, None, None, dw, db, None, None, None

    @staticmethod
    def jvp(ctx, dx, _rm, _rv, dw, db, _use_input_stats, _momentum, _eps):
        x, w, rm, rv = ctx.saved_tensors
        return instance_norm_jvp(dx, dw, db, x, w, rm, rv, ctx.use_input_stats, ctx.eps), None, None, None, None


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    """Drop-in for ``torch.nn.functional.instance_norm`` with a hand-written backward.

    With ``use_input_stats`` each (sample, channel) plane is normalized by its own statistics and
    the running stats, when given, are updated as torch's; otherwise the running stats normalize.
    """
    return apply(InstanceNormFunction, input, running_mean, running_var, weight, bias, use_input_stats,
                 momentum, eps)[0]
