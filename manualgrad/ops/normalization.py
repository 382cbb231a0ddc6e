"""Normalization: batch_norm, layer_norm, group_norm, rms_norm.

Each normalizes x over a set of dims D (M elements per statistic), then scales and shifts:

    x_hat = (x - mean_D(x)) * r,     r = 1 / sqrt(var_D(x) + eps)     (var biased)
    rms_norm: x_hat = x * r,         r = 1 / sqrt(mean_D(x^2) + eps)
    y = x_hat * w + b

    batch_norm  x (N, C, *)  D = every dim but C          w, b (C,)
    layer_norm  x (*, S)     D = the dims of S            w, b S = normalized_shape
    group_norm  x (N, C, *)  D = the C/G channels of a group and *, per sample   w, b (C,)
    rms_norm    x (*, S)     D = the dims of S            w S

The Jacobian of x -> x_hat is symmetric,

    J = r (I - 1 1^T / M - x_hat x_hat^T / M)       (rms_norm: without the 1 1^T / M term)

(d mean = mean(dx), d r = -r^3 mean((x - mean) dx), so d x_hat = r (dx - mean(dx) - x_hat mean(x_hat dx))),
hence the vjp and the jvp are one formula, ``normalized_vjp``, applied to g = dy * w (backward) or to
the tangent dx (jvp). batch_norm in eval mode normalizes with the running stats, constants: J = r I.

Backward recomputes mean and r from the saved input x rather than saving them from forward: a
saved intermediate would be a constant for double backward. (The one exception: batch_norm's plain
backward, no graph and no transform, takes forward's per-channel batch stats, as torch's does.)
Forward is torch's own kernel: bit-identical output, torch's argument checks and messages, and
torch's in-place running-stat update for batch_norm (unbiased variance into running_var).
"""
import math

import torch
import torch.nn.functional as TF

from ..memory import tag
from ._apply import FLOAT32_ON_CUDA, INPUT, apply
from ._checks import can_write_inplace


def _stats(x, dims, eps, center=True):
    """x_hat and r of x over dims, differentiable in x (backward and jvp run it on the saved x)."""
    if center:
        # (torch.var_mean is ~100x slower than mean on CPU: two plain means instead)
        # xc = x - mean_D(x)                                 like x
        xc = x - x.mean(dims, keepdim=True)
        # r = 1 / sqrt(mean_D(xc^2) + eps), the biased var   (stat) keepdim, like x with D -> 1
        r = ((xc * xc).mean(dims, keepdim=True) + eps).rsqrt()
        # x_hat = xc r                                       like x
        return (xc.mul_(r) if can_write_inplace(xc, r) else xc * r), r
    # r = 1 / sqrt(mean(x^2) + eps)                          (stat)
    r = (x.square().mean(dims, keepdim=True) + eps).rsqrt()
    # x_hat = x r                                            like x
    return x * r, r


def normalized_vjp(g, x_hat, r, dims, center=True):
    """J g for x -> x_hat (J symmetric: the vjp of dy * w, and the jvp of a tangent dx)."""
    # t = g - x_hat mean_D(g x_hat)                          like x
    t = torch.addcmul(g, x_hat, (g * x_hat).mean(dims, keepdim=True), value=-1)
    inplace = can_write_inplace(t, g, r)  # plain backward: update the fresh t in place
    if center:
        # t -= mean_D(g)                                     like x
        m = g.mean(dims, keepdim=True)
        t = t.sub_(m) if inplace else t - m
    # J g = r t                                              like x
    return t.mul_(r) if inplace else t * r


def _no_elements(x, param_shape, needs):
    """(dx, dw, db) for an x without elements: dx empty like x, dw and db sums over nothing, zeros
    of the parameters' shape (as torch; the statistics of nothing are nan and must not reach them)."""
    return (torch.zeros_like(x) if needs[0] else None,
            x.new_zeros(param_shape) if needs[1] else None,
            x.new_zeros(param_shape) if needs[2] else None)


def _sum(t, dims):
    # t.sum(()) would sum over every dim: no dims to sum is t itself
    return t.sum(dims) if dims else t


def _affine_jvp(dxh, x_hat, w, dw, db, shape):
    """Tangent of y = x_hat * w + b given dxh, the tangent of x_hat (or None); w, dw, db broadcast as
    ``shape`` (the view that lines them up with x)."""
    # dy = dx_hat w + x_hat dw + db                          like x
    out = None
    if dxh is not None:
        out = dxh if w is None else dxh * w.view(shape)
    if dw is not None:
        t = x_hat * dw.view(shape)
        out = t if out is None else out + t
    if db is not None:
        out = db.view(shape).expand(x_hat.shape) if out is None else out + db.view(shape)
    return torch.zeros_like(x_hat) if out is None else out


# ---------------------------------------------------------------------------------------------
# batch_norm: per channel, over the batch and spatial dims

def _channel_dims(x):
    # D = (0, 2, 3, ...) and the (1, C, 1, ...) view that lines a (C,) vector up with x
    return [0] + list(range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)


def batch_norm_forward(x, running_mean, running_var, w, b, training, momentum, eps):
    """torch's kernel, with torch.nn.functional.batch_norm's argument checks. Returns y and, in
    training, the batch mean and r = 1 / sqrt(var + eps) per channel (C,) that the kernel computes on
    the way (empty in eval). In training it updates the running stats in place (no grad), as torch:
    running_mean = (1 - momentum) running_mean + momentum mean,
    running_var = (1 - momentum) running_var + momentum var * M / (M - 1)."""
    if training:
        TF._verify_batch_size(x.size())  # "Expected more than 1 value per channel when training"
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    # (torch.batch_norm's own path, keeping the per-channel stats it drops)
    y, mean, r, _, _ = torch._batch_norm_impl_index(
        x, w, b, running_mean, running_var, training, momentum, eps, torch.backends.cudnn.enabled)
    return y, mean, r


def _batch_norm_backward_plain(dy, x, w, eps, needs, mean=None, r=None):
    """batch_norm_backward in training for a plain backward (no graph, no transform): x as (N, C, H),
    one buffer (dx's). ``mean`` and ``r`` are forward's batch stats, or None to compute them here.

        xc = x - mean,  s = sum_D xc dy,  sdy = sum_D dy,  sdyx = sum_D dy x_hat = r s
        dx = r w (dy - sdy / M - x_hat sdyx / M) = (r w) dy + k xc + c,  k = -r w r sdyx / M,  c = -r w sdy / M

    s is summed from the centred product (a sum of x dy less mean sdy cancels to nothing when
    |mean| >> std and dy has a mean of its own), and dx is formed from it too, as torch's kernel
    does: k x and k mean would cancel to k xc, with errors ~ eps |mean| / std relative to it."""
    n, c = x.shape[:2]
    x3, dy3 = x.reshape(n, c, -1), dy.reshape(n, c, -1)
    m = x3.numel() // c
    if mean is None:
        # mean = mean_D(x),  r = 1 / sqrt(|x - mean|^2 / M + eps): per row, then over N (a norm over
        # dims (0, 2) at once runs ~8x slower on CPU)                  (C,)
        mean = x3.mean((0, 2))
        r = torch.linalg.vector_norm(x3 - mean.view(1, c, 1), dim=2).square_().sum(0).div_(m).add_(eps).rsqrt_()
    mean3 = mean.view(1, c, 1)
    # sdy = sum_D dy (per row, then over N: ~2x faster than both dims at once)   (C,)
    sdy = dy3.sum(2).sum(0)
    # s = sum_D (x - mean) dy, in dx's buffer                          (N, C, H) -> (C,)
    buf = x3 - mean3
    sdyx = buf.mul_(dy3).sum(2).sum(0).mul_(r)  # sum_D dy x_hat = r s
    dx = None
    if needs[0]:
        rw = r if w is None else r * w
        # k = -r w r sdyx / M,  c = -r w sdy / M                       (C,)
        k = (rw * r).mul_(sdyx).div_(-m)
        c0 = (rw * sdy).div_(-m)
        # dx = k (x - mean) + c + r w dy                               (N, C, H) -> like x
        torch.sub(x3, mean3, out=buf).mul_(k.view(1, c, 1)).add_(c0.view(1, c, 1))
        dx = buf.addcmul_(dy3, rw.view(1, c, 1)).view(x.shape)
    # dw = sum_D dy x_hat,  db = sum_D dy                              (C,)
    return dx, (sdyx if needs[1] else None), (sdy if needs[2] else None)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def in_float32(backward, dy, x, w, *args):
    """Run a norm's backward in float32 when x is float16/bfloat16, as torch's norm kernels do.

    The backward's row means of dy and dy x_hat cancel to small differences that 8 bits of
    mantissa cannot hold (bfloat16 layer_norm gradients would be off by tens of percent).
    dx comes back in x's dtype, dw and db in w's, like torch's."""
    if x.dtype not in _LOW_PRECISION:
        return backward(dy, x, w, *args)
    dx, dw, db = backward(dy.float(), x.float(), None if w is None else w.float(), *args)
    pdtype = x.dtype if w is None else w.dtype
    return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(pdtype),
            None if db is None else db.to(pdtype))


def batch_norm_backward(dy, x, w, running_mean, running_var, training, eps, needs=(True, True, True),
                        mean=None, r=None):
    """Gradients (dx, dw, db). ``training``: normalized with the batch stats (else the running ones).
    ``mean``, ``r``: forward's batch stats (C,), used by the plain backward only: with a graph (double
    backward) or a transform they would be constants, so that path recomputes them from x."""
    if x.numel() == 0:
        return _no_elements(x, x.shape[1:2], needs)
    if training and can_write_inplace(dy, x, w, mean, r):
        return _batch_norm_backward_plain(dy, x, w, eps, needs, mean, r)
    dims, shape = _channel_dims(x)
    if training:
        x_hat, r = _stats(x, dims, eps)
    else:
        # r = 1 / sqrt(running_var + eps)                    (1, C, 1, ...)
        r = (running_var + eps).rsqrt().view(shape)
    # sdy = sum_D dy                                         (1, C, 1, ...)
    sdy = dy.sum(dims, keepdim=True) if needs[2] or (training and needs[0]) else None
    sdyx = None
    if training and (needs[0] or needs[1]):
        # sdyx = sum_D dy x_hat                              (1, C, 1, ...)
        sdyx = (dy * x_hat).sum(dims, keepdim=True)
    elif needs[1]:
        # sdyx = sum_D dy x_hat = r sum_D dy (x - running_mean)  (r constant over D: one rounding, as torch)
        sdyx = (dy * (x - running_mean.view(shape))).sum(dims, keepdim=True) * r
    dx = dw = db = None
    if needs[0]:
        # s = r w                                            (1, C, 1, ...)
        s = r if w is None else r * w.view(shape)
        if training:
            m = x.numel() // x.shape[1]
            # dx = r w (dy - sum(dy) / M - x_hat sum(dy x_hat) / M)   (w constant over D)   like x
            dx = torch.addcmul(dy, x_hat, sdyx / m, value=-1)
            dx = dx.sub_(sdy / m).mul_(s) if can_write_inplace(dx, s) else (dx - sdy / m) * s
        else:
            # dx = dy r w                                    like x
            dx = dy * s
    if needs[1]:
        # dw = sum_D dy x_hat                                (C,)
        dw = sdyx.view(-1)
    if needs[2]:
        # db = sum_D dy                                      (C,)
        db = sdy.view(-1)
    return dx, dw, db


def batch_norm_jvp(dx, dw, db, x, w, running_mean, running_var, training, eps):
    dims, shape = _channel_dims(x)
    if training:
        x_hat, r = _stats(x, dims, eps)
        # d x_hat = J dx                                     like x
        dxh = normalized_vjp(dx, x_hat, r, dims) if dx is not None else None
    else:
        r = (running_var + eps).rsqrt().view(shape)
        x_hat = (x - running_mean.view(shape)) * r
        # d x_hat = r dx                                     like x
        dxh = dx * r if dx is not None else None
    return _affine_jvp(dxh, x_hat, w, dw, db, shape)


class BatchNormFunction(torch.autograd.Function):
    """apply(x, running_mean, running_var, w, b, training, momentum, eps). The running stats are
    buffers: updated in place in training, never differentiated (None gradients, as torch)."""
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)

    generate_vmap_rule = True

    @staticmethod
    def forward(x, running_mean, running_var, w, b, training, momentum, eps):
        return batch_norm_forward(x, running_mean, running_var, w, b, training, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, running_mean, running_var, w, b, training, momentum, eps = inputs
        _, mean, r = output
        ctx.mark_non_differentiable(mean, r)
        ctx.set_materialize_grads(False)  # no zero gradients made for mean and r; a missing dy is None
        ctx.training, ctx.eps, ctx.has_bias = training, eps, b is not None
        # Eval normalizes with the running stats: backward needs them (unchanged by an eval call).
        # Training: the batch stats (2 C numbers, as torch saves) spare the plain backward two passes
        # over x; kept in float32/64 only (torch's CPU kernel rounds them to a bfloat16 x's dtype).
        # lean(): y recomputed from the kept x by the same kernel (in training the batch stats
        # recomputed as forward computed them, the running stats left alone)
        tag(ctx, output[0], batch_norm, x, None if training else running_mean, None if training else running_var,
            w, b, training, momentum, eps)
        stats = (running_mean, running_var, None, None)
        if training:
            stats = (None, None) + ((None, None) if x.dtype in _LOW_PRECISION else (mean, r))
        ctx.save_for_backward(x, w, *stats)
        ctx.save_for_forward(x, w, *stats[:2])

    @staticmethod
    def backward(ctx, dy, _dmean, _dr):
        x, w, running_mean, running_var, mean, r = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = (need[0], w is not None and need[3], ctx.has_bias and need[4])
        if dy is None:
            return (None,) * 8
        dx, dw, db = in_float32(batch_norm_backward, dy, x, w, running_mean, running_var, ctx.training, ctx.eps,
                                needs, mean, r)
        return dx, None, None, dw, db, None, None, None

    @staticmethod
    def jvp(ctx, dx, _rm, _rv, dw, db, _training, _momentum, _eps):
        x, w, running_mean, running_var = ctx.saved_tensors
        return batch_norm_jvp(dx, dw, db, x, w, running_mean, running_var, ctx.training, ctx.eps), None, None


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Drop-in for ``torch.nn.functional.batch_norm`` with a hand-written backward.

    In training the batch statistics normalize and, when given, the running stats are updated in
    place; in eval the running stats normalize. Bad input fails in torch's own forward.
    """
    return apply(BatchNormFunction, input, running_mean, running_var, weight, bias, training, momentum, eps)[0]


# ---------------------------------------------------------------------------------------------
# layer_norm and rms_norm: over the trailing normalized_shape dims of each row

def _trailing_dims(x, normalized_shape):
    # D = the last len(normalized_shape) dims; L = the leading dims the affine gradients sum over
    k = len(normalized_shape)
    return tuple(range(x.dim() - k, x.dim())), tuple(range(x.dim() - k))


def layer_norm_forward(x, normalized_shape, w, b, eps, stats=False):
    """y; with ``stats``, (y, mean, r): torch's kernel also returns each row's mean and
    r = 1 / sqrt(var + eps), shaped (*L, 1, ...) (kept, as torch keeps them, for the plain backward)."""
    if stats:
        return torch.native_layer_norm(x, normalized_shape, w, b, eps)
    return TF.layer_norm(x, normalized_shape, w, b, eps)


_CHUNK = 1 << 18  # elements of a row block: a block's few buffers stay in the cache


def _layer_norm_backward_plain(dy, x, w, normalized_shape, eps, needs, mean=None, r=None):
    """layer_norm_backward for a plain backward (no graph, no transform), on rows of S = prod(normalized_shape).

    Blocks of rows, so that the dozen passes below run in the cache; one buffer per block, dx's,
    holds x_hat, then dy x_hat (for the reductions), then dx (a fresh CPU tensor costs page faults);
    the row reductions with w are matrix-vector products. ``mean`` and ``r``: forward's row stats,
    or None to compute them here."""
    s = math.prod(normalized_shape)
    x2, dy2 = x.reshape(-1, s), dy.reshape(-1, s)
    mean2 = None if mean is None else mean.reshape(-1, 1)
    r2 = None if r is None else r.reshape(-1, 1)
    w1 = None if w is None else w.reshape(s)
    rows = x2.shape[0]
    dx = torch.empty_like(x2) if needs[0] else None
    dw = x2.new_zeros(s) if needs[1] else None
    db = x2.new_zeros(s) if needs[2] else None
    step = max(1, _CHUNK // max(s, 1))
    scratch = None if needs[0] else x2.new_empty(min(rows, step), s)
    for i in range(0, rows, step):
        j = min(rows, i + step)
        xb, dyb = x2[i:j], dy2[i:j]
        buf = dx[i:j] if needs[0] else scratch[: j - i]
        # mean = mean_S(x),  r = 1 / sqrt(|x - mean|^2 / S + eps)      (B, 1)
        mean = xb.mean(-1, keepdim=True) if mean2 is None else mean2[i:j]
        torch.sub(xb, mean, out=buf)
        if r2 is None:
            r = torch.linalg.vector_norm(buf, dim=-1, keepdim=True).square_().div_(s).add_(eps).rsqrt_()
        else:
            r = r2[i:j]
        # buf = p = dy x_hat = dy (x - mean) r                         (B, S)
        buf.mul_(r).mul_(dyb)
        if needs[1]:
            # dw = sum_R dy x_hat                                      S
            dw += buf.sum(0)
        if needs[2]:
            # db = sum_R dy                                            S
            db += dyb.sum(0)
        if needs[0]:
            # a = mean_S(g), b = mean_S(g x_hat),  g = dy w            (B, 1)
            a = (dyb.sum(-1) if w1 is None else dyb @ w1).unsqueeze(-1).div_(s)
            b = (buf.sum(-1) if w1 is None else buf @ w1).unsqueeze(-1).div_(s)
            # dx = r (g - a - b x_hat) = r (g - a - r b (x - mean))    (B, S)
            torch.sub(xb, mean, out=buf)
            buf.mul_(b.mul_(r).neg_()).sub_(a)
            buf = buf.add_(dyb) if w1 is None else buf.addcmul_(dyb, w1)
            buf.mul_(r)
    dx = None if dx is None else dx.view(x.shape)
    dw = None if dw is None else dw.view(normalized_shape)
    db = None if db is None else db.view(normalized_shape)
    return dx, dw, db


def layer_norm_backward(dy, x, w, normalized_shape, eps, needs=(True, True, True), center=True, mean=None, r=None):
    """Gradients (dx, dw, db) of layer_norm; ``center=False`` is rms_norm's (no mean, no bias).
    ``mean``, ``r``: forward's row stats, used by the plain backward only (with a graph or a
    transform they would be constants: the other path recomputes them from x)."""
    if x.numel() == 0:
        return _no_elements(x, tuple(normalized_shape), needs)
    if center and can_write_inplace(dy, x, w, mean, r):
        return _layer_norm_backward_plain(dy, x, w, tuple(normalized_shape), eps, needs, mean, r)
    dims, lead = _trailing_dims(x, normalized_shape)
    x_hat, r = _stats(x, dims, eps, center)
    dx = dw = db = None
    if needs[0]:
        # g = dy w  (w varies over D: it goes inside J)      like x
        g = dy if w is None else dy * w
        # dx = r (g - mean_D(g) - x_hat mean_D(g x_hat))     like x
        dx = normalized_vjp(g, x_hat, r, dims, center)
    if needs[1]:
        # dw = sum_L dy x_hat                                normalized_shape
        dw = _sum(dy * x_hat, lead)
    if needs[2]:
        # db = sum_L dy                                      normalized_shape
        db = _sum(dy, lead)
    return dx, dw, db


def layer_norm_jvp(dx, dw, db, x, w, normalized_shape, eps, center=True):
    dims, _ = _trailing_dims(x, normalized_shape)
    x_hat, r = _stats(x, dims, eps, center)
    dxh = normalized_vjp(dx, x_hat, r, dims, center) if dx is not None else None
    return _affine_jvp(dxh, x_hat, w, dw, db, tuple(normalized_shape))


class LayerNormFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CUDA  # autocast: float32 on CUDA, input dtype on CPU (torch's lists)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, normalized_shape, w, b, eps):
        return layer_norm_forward(x, normalized_shape, w, b, eps, stats=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, normalized_shape, w, b, eps = inputs
        _, mean, r = output
        ctx.mark_non_differentiable(mean, r)
        ctx.set_materialize_grads(False)  # no zero gradients made for mean and r; a missing dy is None
        ctx.normalized_shape, ctx.eps, ctx.has_bias = tuple(normalized_shape), eps, b is not None
        # the row stats (2 numbers a row, as torch saves) spare the plain backward two passes over x;
        # kept in float32/64 only (a half x goes through in_float32, which recomputes them)
        stats = (None, None) if x.dtype in _LOW_PRECISION else (mean, r)
        tag(ctx, output[0], layer_norm, x, normalized_shape, w, b, eps)  # lean(): y recomputed from the kept x
        ctx.save_for_backward(x, w, *stats)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, dy, _dmean, _dr):
        x, w, mean, r = ctx.saved_tensors
        if dy is None:
            return (None,) * 5
        need = ctx.needs_input_grad
        needs = (need[0], w is not None and need[2], ctx.has_bias and need[3])
        dx, dw, db = in_float32(layer_norm_backward, dy, x, w, ctx.normalized_shape, ctx.eps, needs, True, mean, r)
        return dx, None, dw, db, None

    @staticmethod
    def jvp(ctx, dx, _shape, dw, db, _eps):
        x, w = ctx.saved_tensors
        return layer_norm_jvp(dx, dw, db, x, w, ctx.normalized_shape, ctx.eps), None, None


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Drop-in for ``torch.nn.functional.layer_norm`` with a hand-written backward.

    A normalized_shape that does not match the input's trailing dims fails in torch's forward.
    """
    return apply(LayerNormFunction, input, normalized_shape, weight, bias, eps)[0]


def rms_norm_forward(x, normalized_shape, w, eps):
    return TF.rms_norm(x, normalized_shape, w, eps)


class RMSNormFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (torch's lists name layer_norm and group_norm, not rms_norm)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, normalized_shape, w, eps):
        return rms_norm_forward(x, normalized_shape, w, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, normalized_shape, w, eps = inputs
        ctx.normalized_shape = tuple(normalized_shape)
        # torch's rule: eps=None means the machine epsilon of the input's dtype
        ctx.eps = torch.finfo(x.dtype).eps if eps is None else eps
        tag(ctx, output, rms_norm, x, normalized_shape, w, eps)  # lean(): y recomputed from the kept x
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], w is not None and ctx.needs_input_grad[2], False)
        dx, dw, _ = in_float32(layer_norm_backward, dy, x, w, ctx.normalized_shape, ctx.eps, needs, False)
        return dx, None, dw, None

    @staticmethod
    def jvp(ctx, dx, _shape, dw, _eps):
        x, w = ctx.saved_tensors
        return layer_norm_jvp(dx, dw, None, x, w, ctx.normalized_shape, ctx.eps, center=False)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """Drop-in for ``torch.nn.functional.rms_norm`` with a hand-written backward.

    ``eps=None`` uses ``torch.finfo(input.dtype).eps``, as torch does.
    """
    return apply(RMSNormFunction, input, normalized_shape, weight, eps)


# ---------------------------------------------------------------------------------------------
# group_norm: per sample, over each group of C/G channels and the spatial dims

def group_norm_forward(x, num_groups, w, b, eps):
    return TF.group_norm(x, num_groups, w, b, eps)


def _group_norm_backward_plain(dy, x, w, num_groups, eps, needs):
    """group_norm_backward for a plain backward (no graph, no transform): x as (N, G, C/G, H), one
    buffer (dx's) for x_hat, dy x_hat and dx (see _layer_norm_backward_plain)."""
    n, c = x.shape[:2]
    g, cg = num_groups, x.shape[1] // num_groups
    x4, dy4 = x.reshape(n, g, cg, -1), dy.reshape(n, g, cg, -1)
    k = x4[0, 0].numel()
    # mean = mean_K(x),  r = 1 / sqrt(|x - mean|^2 / K + eps)          (N, G, 1, 1)
    mean = x4.mean((2, 3), keepdim=True)
    buf = x4 - mean
    r = torch.linalg.vector_norm(buf, dim=(2, 3), keepdim=True).square_().div_(k).add_(eps).rsqrt_()
    # buf = dy x_hat                                                   (N, G, C/G, H)
    buf.mul_(r).mul_(dy4)
    # per (sample, channel): sum_H dy x_hat, sum_H dy                  (N, G, C/G, 1)
    ps, dys = buf.sum(3, keepdim=True), dy4.sum(3, keepdim=True)
    dx = None
    if needs[0]:
        w4 = None if w is None else w.view(1, g, cg, 1)
        # a = mean_K(dy w), b = mean_K(dy w x_hat)                     (N, G, 1, 1)
        a = (dys if w4 is None else dys * w4).sum(2, keepdim=True).div_(k)
        b = (ps if w4 is None else ps * w4).sum(2, keepdim=True).div_(k)
        # dx = r (dy w - a - r b (x - mean))                           (N, G, C/G, H) -> like x
        torch.sub(x4, mean, out=buf)
        buf.mul_(b.mul_(r).neg_()).sub_(a)
        buf = buf.add_(dy4) if w4 is None else buf.addcmul_(dy4, w4)
        dx = buf.mul_(r).view(x.shape)
    # dw = sum over N and H of dy x_hat,  db = sum over N and H of dy  (C,)
    dw = ps.sum(0).view(c) if needs[1] else None
    db = dys.sum(0).view(c) if needs[2] else None
    return dx, dw, db


def group_norm_backward(dy, x, w, num_groups, eps, needs=(True, True, True)):
    if x.numel() == 0:
        return _no_elements(x, x.shape[1:2], needs)
    if can_write_inplace(dy, x, w):
        return _group_norm_backward_plain(dy, x, w, num_groups, eps, needs)
    n = x.shape[0]
    dims, shape = _channel_dims(x)
    # x as (N, G, K), K = C/G * prod(*): one statistic per (sample, group)
    x_hat, r = _stats(x.reshape(n, num_groups, -1), (2,), eps)
    dx = dw = db = None
    if needs[0]:
        # g = dy w  (w varies over a group's channels: it goes inside J)   like x
        g = dy if w is None else dy * w.view(shape)
        # dx = r (g - mean_K(g) - x_hat mean_K(g x_hat)), per (sample, group)   (N, G, K) -> like x
        dx = normalized_vjp(g.reshape(n, num_groups, -1), x_hat, r, (2,)).reshape(x.shape)
    if needs[1]:
        # dw = sum over N and * of dy x_hat                  (C,)
        dw = (dy * x_hat.reshape(x.shape)).sum(dims)
    if needs[2]:
        # db = sum over N and * of dy                        (C,)
        db = dy.sum(dims)
    return dx, dw, db


def group_norm_jvp(dx, dw, db, x, w, num_groups, eps):
    n = x.shape[0]
    _, shape = _channel_dims(x)
    x_hat, r = _stats(x.reshape(n, num_groups, -1), (2,), eps)
    dxh = normalized_vjp(dx.reshape(n, num_groups, -1), x_hat, r, (2,)).reshape(x.shape) if dx is not None else None
    return _affine_jvp(dxh, x_hat.reshape(x.shape), w, dw, db, shape)


class GroupNormFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CUDA  # autocast: float32 on CUDA, input dtype on CPU (torch's lists)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, num_groups, w, b, eps):
        return group_norm_forward(x, num_groups, w, b, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, num_groups, w, b, eps = inputs
        ctx.num_groups, ctx.eps, ctx.has_bias = num_groups, eps, b is not None
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = (need[0], w is not None and need[2], ctx.has_bias and need[3])
        dx, dw, db = in_float32(group_norm_backward, dy, x, w, ctx.num_groups, ctx.eps, needs)
        return dx, None, dw, db, None

    @staticmethod
    def jvp(ctx, dx, _groups, dw, db, _eps):
        x, w = ctx.saved_tensors
        return group_norm_jvp(dx, dw, db, x, w, ctx.num_groups, ctx.eps)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Drop-in for ``torch.nn.functional.group_norm`` with a hand-written backward.

    A num_groups that does not divide the channels fails in torch's forward (RuntimeError).
    """
    return apply(GroupNormFunction, input, num_groups, weight, bias, eps)
