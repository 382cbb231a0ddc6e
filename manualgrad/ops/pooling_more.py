"""More pooling: power-average (lp) pooling, max unpooling, fractional max pooling.

Shapes: x (N, C, *S) or unbatched (C, *S), S = (L,), (H, W) or (D, H, W); y (N, C, *O) or (C, *O).
Forward values come from torch's kernels (bit for bit torch's numbers and, for the max-type
ops, torch's argmax among ties); the backwards are written here:

- lp pooling, as torch defines it: y = (K s)^(1/p) with s = avg_pool(x^p) (no padding) and K
  the kernel's size, i.e. the window's sum of x^p to the power 1/p. By the chain rule
  dx = p x^(p-1) * avg_pool_backward(K (1/p) (K s)^(1/p - 1) dy), with no gradient where
  K s = 0 (torch: sign(s) relu(|s|), and relu passes nothing at 0). p = +inf is the max of |x|
  over the window, p = -inf its min (torch: max pooling of |x|, or of -|x|): y[w] = |x[idx[w]]|,
  so dx = sign(x) * scatter_add of dy at idx.
- max unpooling: y = zeros, y[idx[w]] = x[w] per (n, c) plane, so dx[w] = dy[idx[w]] (a gather)
  and the jvp is the unpooling of the tangent.
- fractional max pooling: y[w] = x[idx[w]] over windows placed by the random samples, so
  dx = scatter_add of dy at idx (as max pooling) and the jvp is a gather.

Every backward is written with differentiable torch ops, so double backward differentiates it.
Indices are non-differentiable outputs (or inputs).
"""
import math

import torch

from ._apply import FLOAT32_ON_CPU, INPUT, apply
from .pooling import (
    _tuple,
    avg_pool_backward,
    avg_pool_forward,
    max_pool_backward,
    max_pool_forward,
    max_pool_jvp,
)

# ---------------------------------------------------------------------------------------------
# lp pooling: y[w] = (sum over window w of x^p)^(1/p), as (K avg_pool(x^p))^(1/p)


def lp_pool_forward(x, d, p, kernel_size, stride, ceil_mode):
    """y = (K s)^(1/p), s = avg_pool(x^p), K = prod(kernel_size): torch's ops in torch's order."""
    s = avg_pool_forward(x.pow(p), d, kernel_size, stride, 0, ceil_mode, True, None)
    return (s * math.prod(_tuple(kernel_size, d))).pow(1.0 / p)


def _lp_sum(x, d, p, k, s, ceil_mode):
    # S = K avg_pool(x^p): the window sums of x^p (torch's divisor on windows ceil_mode clips)   (*, *O)
    return avg_pool_forward(x.pow(p), d, k, s, 0, ceil_mode, True, None) * math.prod(k)


def _lp_outer(S, p):
    """dy/dS = (1/p) S^(1/p - 1), 0 where S = 0 (S^(..) is inf there: computed on S = 1 instead,
    so that differentiating this again meets no inf * 0)."""
    zero = S == 0
    return torch.where(zero, 0.0, S.masked_fill(zero, 1).pow(1.0 / p - 1) / p)


def lp_pool_backward(dy, x, d, p, k, s, ceil_mode):
    # S = sum over window w of x^p (torch's clipped-window scaling)            (*, *O)
    S = _lp_sum(x, d, p, k, s, ceil_mode)
    # dS = dy (1/p) S^(1/p - 1), 0 where S = 0                                 (*, *O)
    dS = dy * _lp_outer(S, p)
    # d(x^p)[j] = sum over windows w containing j of K dS[w] / divisor[w]     (*, *S)
    dxp = avg_pool_backward(dS * math.prod(k), x.shape, d, k, s, (0,) * d, True, None)
    # dx = d(x^p) p x^(p-1)                                                    (*, *S) like x
    return dxp * p * x.pow(p - 1)


def lp_pool_jvp(dx, x, d, p, k, s, ceil_mode):
    # dS = K avg_pool(p x^(p-1) dx): the window sums of the tangent of x^p     (*, *O)
    dS = avg_pool_forward(dx * p * x.pow(p - 1), d, k, s, 0, ceil_mode, True, None) * math.prod(k)
    # dy = (1/p) S^(1/p - 1) dS                                                (*, *O)
    return _lp_outer(_lp_sum(x, d, p, k, s, ceil_mode), p) * dS


class LPPoolFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (pow and avg_pool1d/2d are on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, d, norm_type, kernel_size, stride, ceil_mode):
        return lp_pool_forward(x, d, norm_type, kernel_size, stride, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, d, norm_type, kernel_size, stride, ceil_mode = inputs
        k = _tuple(kernel_size, d)
        s = (_tuple(stride, d) if stride is not None else ()) or k
        # only x is kept: backward recomputes the window sums S (one avg_pool of the output's
        # size), so that double backward sees S as the function of x it is
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.args = d, norm_type, k, s, ceil_mode

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = lp_pool_backward(dy, x, *ctx.args) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        (x,) = ctx.saved_tensors
        return lp_pool_jvp(dx, x, *ctx.args)


class LPPool3dFunction(LPPoolFunction):
    """LPPoolFunction with d = 3, for its autocast policy: torch's lp_pool3d runs avg_pool3d,
    which torch's CPU autocast runs in float32 (output float32). Here x is cast first, so x^p
    too is computed in float32 (torch: in the autocast dtype)."""
    autocast = FLOAT32_ON_CPU


class LPPoolInfFunction(torch.autograd.Function):
    """p = +-inf: y[w] = |x[idx[w]]|, the largest (+inf) or smallest (-inf) |x| of window w."""
    autocast = INPUT  # autocast: in the input's dtype (torch's max_pool1d/2d are on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, d, norm_type, kernel_size, stride, ceil_mode):
        # torch's composition: max_pool(|x|), or -max_pool(-|x|) (no padding, no dilation)
        if norm_type > 0:
            return max_pool_forward(x.abs(), d, kernel_size, stride, 0, 1, ceil_mode)
        y, idx = max_pool_forward(-x.abs(), d, kernel_size, stride, 0, 1, ceil_mode)
        return -y, idx

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, d = inputs[:2]
        _, idx = output
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # a missing dy comes in as None (see MaxPoolFunction)
        ctx.d = d
        ctx.save_for_backward(x, idx)
        ctx.save_for_forward(x, idx)

    @staticmethod
    def backward(ctx, dy, _didx):
        x, idx = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0] and dy is not None:
            # d|x|[j] = sum of dy[w] over the windows w whose pick idx[w] is j        (*, *S)
            # dx = sign(x) d|x|                                                      (*, *S) like x
            dx = x.sign() * max_pool_backward(dy, idx, x.shape, ctx.d)
        return dx, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        x, idx = ctx.saved_tensors
        # dy[w] = sign(x) dx at idx[w]                                               (*, *O)
        return max_pool_jvp(x.sign() * dx, idx, ctx.d), None


class LPPoolInf3dFunction(LPPoolInfFunction):
    """LPPoolInfFunction with d = 3: torch's max_pool3d is on its CPU float32 autocast list."""
    autocast = FLOAT32_ON_CPU


def _lp_pool(input, d, norm_type, kernel_size, stride, ceil_mode):
    if d > 1 and not isinstance(kernel_size, int) and len(kernel_size) != d:
        # torch unpacks the kernel into d sizes first (a ValueError there)
        raise ValueError(f"lp_pool{d}d: kernel_size must be an int or {d} ints, got {tuple(kernel_size)}")
    if norm_type in (math.inf, -math.inf):
        fn = LPPoolInf3dFunction if d == 3 else LPPoolInfFunction
        return apply(fn, input, d, norm_type, kernel_size, stride, ceil_mode)[0]
    return apply(LPPool3dFunction if d == 3 else LPPoolFunction, input, d, norm_type, kernel_size, stride, ceil_mode)


def lp_pool1d(input, norm_type, kernel_size, stride=None, ceil_mode=False):
    """Drop-in for ``torch.nn.functional.lp_pool1d``; bad arguments fail in torch's kernel."""
    if not isinstance(kernel_size, int):
        # torch multiplies by kernel_size itself: a sequence fails there
        raise TypeError(f"lp_pool1d: kernel_size must be an int, got {type(kernel_size).__name__}")
    return _lp_pool(input, 1, norm_type, kernel_size, stride, ceil_mode)


def lp_pool2d(input, norm_type, kernel_size, stride=None, ceil_mode=False):
    """Drop-in for ``torch.nn.functional.lp_pool2d``; bad arguments fail in torch's kernel."""
    return _lp_pool(input, 2, norm_type, kernel_size, stride, ceil_mode)


def lp_pool3d(input, norm_type, kernel_size, stride=None, ceil_mode=False):
    """Drop-in for ``torch.nn.functional.lp_pool3d``; bad arguments fail in torch's kernel."""
    return _lp_pool(input, 3, norm_type, kernel_size, stride, ceil_mode)


# ---------------------------------------------------------------------------------------------
# max unpooling: y = zeros (*, *O), y[.., idx[.., w]] = x[.., w]


def _unpool_output_size(input, kernel_size, stride, padding, output_size):
    """torch's rule: (L - 1) stride + kernel - 2 padding per dim, or output_size (its last d
    entries of a d + 2 one) within a stride of that; written here to keep torch's private
    helper out of the call (torch.compile traces this)."""
    d = len(kernel_size)
    default = [(input.size(-d + i) - 1) * stride[i] + kernel_size[i] - 2 * padding[i] for i in range(d)]
    if output_size is None:
        size = default
    else:
        if len(output_size) == d + 2:
            output_size = output_size[2:]
        if len(output_size) != d:
            raise ValueError(f"output_size should be a sequence containing {d} or {d + 2} elements, but it has "
                             f"a length of '{len(output_size)}'")
        for i in range(d):
            low, high = default[i] - stride[i], default[i] + stride[i]
            if not low < output_size[i] < high:
                raise ValueError(f'invalid output_size "{output_size}" (dim {i} must be between {low} and {high})')
        size = list(output_size)
    for i in range(d):
        if size[i] < 0:
            raise ValueError("max_unpooling: output_size must contain non-negative spatial dimensions, "
                             f"but got output_size[{i}]={size[i]}")
    return size


def max_unpool_forward(x, idx, d, output_size, stride, padding):
    """torch's kernel: it checks idx (int64, x's shape, each in range of its output plane)."""
    if d == 1:
        # as torch: the 2-d kernel with a width of 1
        return torch._C._nn.max_unpool2d(x.unsqueeze(-1), idx.unsqueeze(-1), list(output_size) + [1]).squeeze(-1)
    if d == 2:
        return torch._C._nn.max_unpool2d(x, idx, output_size)
    return torch._C._nn.max_unpool3d(x, idx, output_size, stride, padding)


def max_unpool_backward(dy, idx, d):
    # dx[.., w] = dy[.., idx[.., w]]: each input went to one place             (*, *S) like idx
    # (reshape, not flatten: the legacy vmap of gradcheck has no flatten rule)
    flat_dy = dy.reshape(dy.shape[:-d] + (math.prod(dy.shape[-d:]),))
    flat_idx = idx.reshape(idx.shape[:-d] + (math.prod(idx.shape[-d:]),))
    return flat_dy.gather(-1, flat_idx).view(idx.shape)


class MaxUnpoolFunction(torch.autograd.Function):
    # autocast: float32 on the CPU (torch's CPU float32 list has max_unpool2d, behind 1-d too, and 3d)
    autocast = FLOAT32_ON_CPU
    generate_vmap_rule = True

    @staticmethod
    def forward(x, idx, d, output_size, stride, padding):
        return max_unpool_forward(x, idx, d, output_size, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, idx, d, output_size, stride, padding = inputs
        ctx.save_for_backward(idx)
        ctx.save_for_forward(idx)
        ctx.args = d, output_size, stride, padding

    @staticmethod
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        dx = max_unpool_backward(dy, idx, ctx.args[0]) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        # linear in x: dy = the unpooling of dx with the same indices
        (idx,) = ctx.saved_tensors
        return max_unpool_forward(dx, idx, *ctx.args)


def _max_unpool(input, indices, d, kernel_size, stride, padding, output_size):
    kernel_size = _tuple(kernel_size, d)
    stride = kernel_size if stride is None else _tuple(stride, d)
    padding = _tuple(padding, d)
    output_size = _unpool_output_size(input, kernel_size, stride, padding, output_size)
    return apply(MaxUnpoolFunction, input, indices, d, output_size, stride, padding)


def max_unpool1d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """Drop-in for ``torch.nn.functional.max_unpool1d``; bad indices fail in torch's kernel."""
    return _max_unpool(input, indices, 1, kernel_size, stride, padding, output_size)


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """Drop-in for ``torch.nn.functional.max_unpool2d``; bad indices fail in torch's kernel."""
    return _max_unpool(input, indices, 2, kernel_size, stride, padding, output_size)


def max_unpool3d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """Drop-in for ``torch.nn.functional.max_unpool3d``; bad indices fail in torch's kernel."""
    return _max_unpool(input, indices, 3, kernel_size, stride, padding, output_size)


# ---------------------------------------------------------------------------------------------
# fractional max pooling: y[w] = x[idx[w]], windows of kernel_size placed by random samples u:
# along a dim of length L to o outputs, alpha = (L - k) / (o - 1), window i starts at
# ceil(alpha (i + u)) - ceil(alpha u) (the last at L - k); torch's kernel does the placing


class FractionalMaxPoolFunction(torch.autograd.Function):
    # autocast: float32 on the CPU (torch's CPU float32 list has fractional_max_pool2d/3d)
    autocast = FLOAT32_ON_CPU
    generate_vmap_rule = True

    @staticmethod
    def forward(x, d, kernel_size, output_size, samples):
        if d == 2:
            return torch._C._nn.fractional_max_pool2d(x, kernel_size, output_size, samples)
        return torch._C._nn.fractional_max_pool3d(x, kernel_size, output_size, samples)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, d, _, _, _ = inputs
        _, idx = output
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # a missing dy comes in as None (see MaxPoolFunction)
        ctx.d, ctx.x_shape = d, x.shape
        ctx.save_for_backward(idx)
        ctx.save_for_forward(idx)

    @staticmethod
    def backward(ctx, dy, _didx):
        (idx,) = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0] and dy is not None:
            # dx[.., j] = sum of dy[.., w] over the windows w whose argmax is j   (*, *S)
            dx = max_pool_backward(dy, idx, ctx.x_shape, ctx.d)
        return dx, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        # dy[.., w] = dx[.., idx[.., w]]                                        (*, *O)
        (idx,) = ctx.saved_tensors
        return max_pool_jvp(dx, idx, ctx.d), None


def _fractional_max_pool(input, d, kernel_size, output_size, output_ratio, return_indices, _random_samples):
    """torch's Python steps before its kernel, in its order: the output size from output_ratio
    (int(size * ratio) per dim), then, when no samples are given, one torch.rand(N, C, d) draw
    from the global generator in x's dtype and device (so the same seed gives torch's windows)."""
    if output_size is None and output_ratio is None:
        raise ValueError(f"fractional_max_pool{d}d requires specifying either an output_size or an output_ratio")
    if output_size is None:
        if d == 2 and len(output_ratio) > 2:  # (as torch: a single float fails here with TypeError)
            raise ValueError("fractional_max_pool2d requires output_ratio to either be a single Int or tuple of Ints.")
        ratio = (output_ratio,) * d if isinstance(output_ratio, (int, float)) else tuple(output_ratio)
        output_size = [int(input.size(-d + i) * ratio[i]) for i in range(d)]
    if _random_samples is None:
        n_batch = 1 if input.dim() == d + 1 else input.size(0)
        _random_samples = torch.rand(n_batch, input.size(-d - 1), d, dtype=input.dtype, device=input.device)
    y, idx = apply(FractionalMaxPoolFunction, input, d, kernel_size, output_size, _random_samples)
    return (y, idx) if return_indices else y


def fractional_max_pool2d(input, kernel_size, output_size=None, output_ratio=None, return_indices=False,
                          _random_samples=None):
    """Drop-in for ``torch.nn.functional.fractional_max_pool2d``: the same windows as torch's
    under the same seed (or the same ``_random_samples``, shape (N, C, 2))."""
    return _fractional_max_pool(input, 2, kernel_size, output_size, output_ratio, return_indices, _random_samples)


def fractional_max_pool3d(input, kernel_size, output_size=None, output_ratio=None, return_indices=False,
                          _random_samples=None):
    """Drop-in for ``torch.nn.functional.fractional_max_pool3d``: the same windows as torch's
    under the same seed (or the same ``_random_samples``, shape (N, C, 3))."""
    return _fractional_max_pool(input, 3, kernel_size, output_size, output_ratio, return_indices, _random_samples)


# torch's *_with_indices names (what return_indices=True dispatches to): always (output, indices)

def fractional_max_pool2d_with_indices(input, kernel_size, output_size=None, output_ratio=None,
                                       return_indices=False, _random_samples=None):
    """Drop-in for ``torch.nn.functional.fractional_max_pool2d_with_indices``: (output, indices)."""
    return _fractional_max_pool(input, 2, kernel_size, output_size, output_ratio, True, _random_samples)


def fractional_max_pool3d_with_indices(input, kernel_size, output_size=None, output_ratio=None,
                                       return_indices=False, _random_samples=None):
    """Drop-in for ``torch.nn.functional.fractional_max_pool3d_with_indices``: (output, indices)."""
    return _fractional_max_pool(input, 3, kernel_size, output_size, output_ratio, True, _random_samples)
