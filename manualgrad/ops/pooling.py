"""Pooling over the last d spatial dims (d = 1, 2 or 3): max, average, adaptive average, adaptive
max. (lp pooling, max unpooling and fractional max pooling: pooling_more.py.)

Shapes: x (N, C, *S) or unbatched (C, *S), S = (L,), (H, W) or (D, H, W); y (N, C, *O) or (C, *O).

The forward values (and, for max pooling, the argmax indices) come from torch's forward
kernels: bit-for-bit torch's numbers, and torch's choice among tied maxima (the first in
scan order; a NaN wins over numbers). 2-d max pooling of a contiguous NCHW CPU input with 8+
channels runs torch's kernel on channels-last copies, 3-7x faster (see _pool_channels_last).
The backwards are written here:

- max pooling: y[w] = x[idx[w]], so dx = scatter_add of dy at idx (windows overlap when
  stride < kernel, so one x can collect several dy), and the jvp is a gather of dx at idx.
- average pooling: y[w] = sum of x over window w / divisor[w], so dx = every window's
  dy[w] / divisor[w] spread back over its window (an expand for tiling windows, else a
  transposed convolution with a ones kernel), cropped to the unpadded input.
- adaptive average pooling: y = A_h x A_w^T with A[i, j] = 1/|window i| on window i,
  so dx = A_h^T dy A_w (one such matrix per dim: 1, 2 or 3 of them).

Every backward is linear in dy with fixed indices / weights and written with differentiable
torch ops, so double backward differentiates it again. Indices are non-differentiable outputs.
"""
import functools
import math

import torch
import torch.nn.functional as TF

from ._apply import FLOAT32_ON_CPU, INPUT, apply
from ._checks import can_write_inplace, is_transformed


def _tuple(v, d):
    """An int or a 1- or d-sequence as a d-tuple (torch's forward has validated it already)."""
    if isinstance(v, int):
        return (v,) * d
    v = tuple(v)
    return v * d if len(v) == 1 else v


def _list_with_default(output_size, input_size):
    """torch's rule for adaptive output sizes: None keeps the input's size in that dim (an int passes through).

    Written here rather than imported from torch.nn.modules.utils, which torch.compile does not trace."""
    if isinstance(output_size, (int, torch.SymInt)):
        return output_size
    if len(input_size) <= len(output_size):
        raise ValueError(f"Input dimension should be at least {len(output_size) + 1}")
    return [n if o is None else o for o, n in zip(output_size, input_size[-len(output_size):])]

# ---------------------------------------------------------------------------------------------
# max pooling (and adaptive max pooling): y[w] = x[idx[w]]


def max_pool_forward(x, d, kernel_size, stride, padding, dilation, ceil_mode):
    """Returns (y, idx): idx holds, per output, the flat index of its max within x's spatial dims."""
    stride = () if stride is None else stride
    if d == 1:
        return torch.max_pool1d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
    if d == 3:
        return torch._C._nn.max_pool3d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
    if _pool_channels_last(x):
        return _max_pool2d_channels_last(x, kernel_size, stride, padding, dilation, ceil_mode)
    return torch._C._nn.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)


# Channels at which max_pool2d of a contiguous (N, C, H, W) CPU input runs on a channels-last copy,
# and the elements (1 MiB of float32) a copied chunk of samples holds.
_CL_MIN_CHANNELS = 8
_CL_CHUNK = 1 << 18


def _pool_channels_last(x):
    """torch's CPU max_pool2d kernel for contiguous NCHW visits each window in scalar code; its
    channels-last kernel runs vectorized over C. With 8+ channels pooling a channels-last copy
    measured 3-7x faster here (2x2 and 3x3 windows, 7x7 to 112x112 maps), copies included."""
    return (x.dim() == 4 and x.device.type == "cpu" and x.shape[1] >= _CL_MIN_CHANNELS and x.numel() > 0
            and x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
            and not is_transformed(x) and x.is_contiguous())


def _max_pool2d_channels_last(x, kernel_size, stride, padding, dilation, ceil_mode):
    """torch's max_pool2d_with_indices on a channels-last copy of x, a chunk of samples at a time
    (small copies: no page faults), written into contiguous outputs as torch's own kernel returns
    them. The values and indices are the same: each window is scanned in the same order."""
    n, per_sample = x.shape[0], x[0].numel()
    step = max(1, _CL_CHUNK // per_sample)
    y = idx = None
    for i in range(0, n, step):
        xc = x[i:i + step].contiguous(memory_format=torch.channels_last)
        yc, ic = torch._C._nn.max_pool2d_with_indices(xc, kernel_size, stride, padding, dilation, ceil_mode)
        if y is None:
            y = x.new_empty((n,) + yc.shape[1:])
            idx = torch.empty(y.shape, dtype=ic.dtype, device=x.device)
        y[i:i + step] = yc
        idx[i:i + step] = ic
    return y, idx


def _flat(t, d):
    # the last d dims as one (reshape, not flatten: the legacy vmap of gradcheck has no flatten rule)
    # (their product spelled out: reshape's -1 cannot tell it for a tensor with no elements)
    return t.reshape(t.shape[:-d] + (math.prod(t.shape[-d:]),)) if d > 1 else t


def max_pool_backward(dy, idx, x_shape, d, live=None):
    """``live`` (*O, bool) marks the windows that hold some input, None when all do: see
    MaxPoolFunction. A window of padding only has y = -inf, a constant, and a junk index."""
    if live is not None:
        # dy and idx with the empty windows sent nowhere: dy = 0 there, idx = 0 (in range)   (*, *O)
        dy, idx = dy * live, idx.masked_fill(~live, 0)
    flat = tuple(x_shape[:-d]) + (math.prod(x_shape[-d:]),)
    # dx[.., j] = sum of dy[.., w] over the windows w whose argmax idx[.., w] is j    (*, prod S)
    dx = dy.new_zeros(flat)
    # plain backward: into the fresh zeros in place (the out-of-place scatter_add copies them first:
    # twice the time); idx is int64, so not among can_write_inplace's one-dtype operands
    plain = can_write_inplace(dy) and not is_transformed(idx)
    scatter_add = dx.scatter_add_ if plain else dx.scatter_add
    dx = scatter_add(-1, _flat(idx, d), _flat(dy, d))
    # back to x's spatial shape                                                     (*, *S)
    return dx.view(x_shape)


def max_pool_jvp(dx, idx, d, live=None):
    if live is None:
        # dy[.., w] = dx[.., idx[.., w]]                                            (*, *O) like idx
        return _flat(dx, d).gather(-1, _flat(idx, d)).view(idx.shape)
    # the same, with 0 for the windows of padding only                            (*, *O)
    return _flat(dx, d).gather(-1, _flat(idx.masked_fill(~live, 0), d)).view(idx.shape) * live


@functools.lru_cache(maxsize=256)
def _live_windows(length, out, k, s, p, dil):
    """Per output position along one dim: does the window hit the input (not only padding)?
    Only possible to miss with dilation > 1, where taps can straddle a short input."""
    return tuple(any(0 <= i * s - p + j * dil < length for j in range(k)) for i in range(out))


class MaxPoolFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, d, kernel_size, stride, padding, dilation, ceil_mode):
        return max_pool_forward(x, d, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, d, kernel_size, stride, padding, dilation, ceil_mode = inputs
        y, idx = output
        ctx.mark_non_differentiable(idx)
        # no zero-filled int64 gradient for idx at every backward (an allocation the size of y's, 2x
        # its bytes); a missing dy comes in as None
        ctx.set_materialize_grads(False)
        ctx.d, ctx.x_shape = d, x.shape
        ctx.save_for_backward(idx)
        ctx.save_for_forward(idx)
        # Windows of padding only (torch returns -inf and an out-of-range index there; its own
        # backward then writes out of bounds): recorded per dim, usually none.
        k = _tuple(kernel_size, d)
        s = (_tuple(stride, d) if stride is not None else ()) or k
        p, dil = _tuple(padding, d), _tuple(dilation, d)
        live = [_live_windows(x.shape[-d + i], y.shape[-d + i], k[i], s[i], p[i], dil[i]) for i in range(d)]
        ctx.live = None if all(all(v) for v in live) else live

    @staticmethod
    def _live(ctx, device):
        if ctx.live is None:
            return None
        # the windows live along every dim: the outer "and" of the per-dim masks         (*O)
        live = torch.tensor(ctx.live[0], device=device)
        for mask in ctx.live[1:]:
            live = live.unsqueeze(-1) & torch.tensor(mask, device=device)
        return live

    @staticmethod
    def backward(ctx, dy, _didx):
        (idx,) = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0] and dy is not None:
            dx = max_pool_backward(dy, idx, ctx.x_shape, ctx.d, MaxPoolFunction._live(ctx, dy.device))
        return dx, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        (idx,) = ctx.saved_tensors
        return max_pool_jvp(dx, idx, ctx.d, MaxPoolFunction._live(ctx, dx.device)), None


class MaxPool3dFunction(MaxPoolFunction):
    """MaxPoolFunction with d = 3, for its autocast policy: torch's CPU autocast runs max_pool3d
    in float32 (on its CPU float32 list, on no CUDA list), unlike max_pool1d/2d."""
    autocast = FLOAT32_ON_CPU


class AdaptiveMaxPoolFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, d, output_size):
        # window i covers [floor(i L / o), ceil((i + 1) L / o)) along each dim: never empty
        if d == 1:
            return torch.adaptive_max_pool1d(x, output_size)
        if d == 3:
            return torch._C._nn.adaptive_max_pool3d(x, output_size)
        return torch._C._nn.adaptive_max_pool2d(x, output_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, d, _ = inputs
        _, idx = output
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # as MaxPoolFunction's
        ctx.d, ctx.x_shape = d, x.shape
        ctx.save_for_backward(idx)
        ctx.save_for_forward(idx)

    @staticmethod
    def backward(ctx, dy, _didx):
        (idx,) = ctx.saved_tensors
        dx = max_pool_backward(dy, idx, ctx.x_shape, ctx.d) if ctx.needs_input_grad[0] and dy is not None else None
        return dx, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        (idx,) = ctx.saved_tensors
        return max_pool_jvp(dx, idx, ctx.d), None


class AdaptiveMaxPool3dFunction(AdaptiveMaxPoolFunction):
    """AdaptiveMaxPoolFunction with d = 3, for its autocast policy: torch's CPU autocast runs
    adaptive_max_pool3d in float32, unlike adaptive_max_pool1d/2d."""
    autocast = FLOAT32_ON_CPU


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Drop-in for ``torch.nn.functional.max_pool1d``; bad arguments fail in torch's kernel."""
    y, idx = apply(MaxPoolFunction, input, 1, kernel_size, stride, padding, dilation, ceil_mode)
    return (y, idx) if return_indices else y


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Drop-in for ``torch.nn.functional.max_pool2d``; bad arguments fail in torch's kernel."""
    y, idx = apply(MaxPoolFunction, input, 2, kernel_size, stride, padding, dilation, ceil_mode)
    return (y, idx) if return_indices else y


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Drop-in for ``torch.nn.functional.max_pool3d``; bad arguments fail in torch's kernel."""
    y, idx = apply(MaxPool3dFunction, input, 3, kernel_size, stride, padding, dilation, ceil_mode)
    return (y, idx) if return_indices else y


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """Drop-in for ``torch.nn.functional.adaptive_max_pool2d`` (None in output_size keeps that input size)."""
    output_size = _list_with_default(output_size, input.size())
    y, idx = apply(AdaptiveMaxPoolFunction, input, 2, output_size)
    return (y, idx) if return_indices else y



def adaptive_max_pool1d(input, output_size, return_indices=False):
    """Drop-in for ``torch.nn.functional.adaptive_max_pool1d``."""
    y, idx = apply(AdaptiveMaxPoolFunction, input, 1, output_size)
    return (y, idx) if return_indices else y


def adaptive_max_pool3d(input, output_size, return_indices=False):
    """Drop-in for ``torch.nn.functional.adaptive_max_pool3d`` (None in output_size keeps that input size)."""
    output_size = _list_with_default(output_size, input.size())
    y, idx = apply(AdaptiveMaxPool3dFunction, input, 3, output_size)
    return (y, idx) if return_indices else y


# ---------------------------------------------------------------------------------------------
# average pooling: y[w] = sum of x over window w (zero padding) / divisor[w]


def avg_pool_forward(x, d, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    stride = () if stride is None else stride
    if d == 1:
        return torch.avg_pool1d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    if d == 3:
        return torch._C._nn.avg_pool3d(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                       divisor_override)
    return torch._C._nn.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@functools.lru_cache(maxsize=256)
def _window_sizes(length, out, k, s, p, count_include_pad):
    """torch's divisor along one dim, per output position: the window clipped to the padded
    input (count_include_pad) or to the input itself."""
    sizes = []
    for i in range(out):
        start = i * s - p
        end = min(start + k, length + p)
        if not count_include_pad:
            start, end = max(start, 0), min(end, length)
        sizes.append(end - start)
    return tuple(sizes)


def _divisor(dy, x_shape, d, k, s, p, count_include_pad, divisor_override):
    """A number when every window has the same divisor, else a tensor broadcasting against dy."""
    if divisor_override:
        return divisor_override
    out = dy.shape[-d:]
    per_dim = [_window_sizes(x_shape[-d + i], out[i], k[i], s[i], p[i], count_include_pad) for i in range(d)]
    if all(len(set(sz)) <= 1 for sz in per_dim):
        return math.prod(sz[0] if sz else 1 for sz in per_dim)
    # divisor[w] = product over dims of the window's size along that dim        (*O)
    div = torch.tensor(per_dim[0], dtype=dy.dtype, device=dy.device)
    for sizes in per_dim[1:]:
        div = div.unsqueeze(-1) * torch.tensor(sizes, dtype=dy.dtype, device=dy.device)
    return div


@functools.lru_cache(maxsize=256)
def _taps(length, out, k, s, p):
    """The (output position, input position) pairs along one dim: window i covers inputs
    i s - p + j, j < k, kept where inside [0, length). As two lists (windows, inputs)."""
    pairs = [(i, i * s - p + j) for i in range(out) for j in range(k) if 0 <= i * s - p + j < length]
    return [i for i, _ in pairs], [t for _, t in pairs]


def _spread(g, x_shape, d, k, s, p):
    """dx[j] = sum of g[w] over the windows w that contain j: the transpose of a window sum."""
    lead, out = g.shape[:-d], g.shape[-d:]
    if g.numel() == 0:
        return g.new_zeros(x_shape)
    if k == s:
        # tiling windows: repeat each g[w] over its k cells, a grid of out * k from the padded start
        # (each output dim o followed by a dim of 1 expanded to k: (*, o1, k1, .., od, kd))
        full = g.reshape(*lead, *(n for o in out for n in (o, 1)))
        full = full.expand(*lead, *(n for o, kk in zip(out, k) for n in (o, kk)))
        full = full.reshape(*lead, *(o * kk for o, kk in zip(out, k)))
        # full starts at the padded input's start: crop the left padding, crop or zero-fill the right end
        pads = []
        for i in reversed(range(d)):
            pads += [-p[i], p[i] + x_shape[-d + i] - full.shape[-d + i]]
        return TF.pad(full, pads) if any(pads) else full
    # overlapping or gapped windows, one dim at a time (the window sum is separable):
    # along a dim, dx[t] = sum over the taps (i, t) of g[i]
    for i in range(d):
        dim = i - d
        windows, inputs = _taps(x_shape[dim], out[i], k[i], s[i], p[i])
        windows = torch.tensor(windows, device=g.device)
        inputs = torch.tensor(inputs, device=g.device)
        shape = list(g.shape)
        shape[dim] = x_shape[dim]
        # g[.., i, ..] gathered per tap, then summed into its input position     (*, .., L, ..)
        g = g.new_zeros(shape).index_add(dim, inputs, g.index_select(dim, windows))
    return g


def avg_pool_backward(dy, x_shape, d, k, s, p, count_include_pad, divisor_override):
    # g[w] = dy[w] / divisor[w]                                                  (*, *O)
    g = dy / _divisor(dy, x_shape, d, k, s, p, count_include_pad, divisor_override)
    # dx[j] = sum over windows w containing j of g[w]                            (*, *S) like x
    return _spread(g, x_shape, d, k, s, p)


class AvgPoolFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, d, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return avg_pool_forward(x, d, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, d, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override = inputs
        k = _tuple(kernel_size, d)
        s = _tuple(stride, d) if stride is not None else ()
        s = s or k  # no stride (None or empty): the kernel size
        ctx.args = inputs[1:]  # for the jvp: the same pooling of the tangent
        ctx.x_shape, ctx.d, ctx.k, ctx.s, ctx.p = x.shape, d, k, s, _tuple(padding, d)
        ctx.count_include_pad, ctx.divisor_override = count_include_pad, divisor_override

    @staticmethod
    def backward(ctx, dy):
        dx = None
        if ctx.needs_input_grad[0]:
            dx = avg_pool_backward(
                dy, ctx.x_shape, ctx.d, ctx.k, ctx.s, ctx.p, ctx.count_include_pad, ctx.divisor_override
            )
        return dx, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        # linear: dy = avg_pool(dx) with the same windows and divisors
        return avg_pool_forward(dx, *ctx.args)


class AvgPool3dFunction(AvgPoolFunction):
    """AvgPoolFunction with d = 3, for its autocast policy: torch's CPU autocast runs avg_pool3d
    in float32 (on its CPU float32 list), unlike avg_pool1d/2d."""
    autocast = FLOAT32_ON_CPU


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """Drop-in for ``torch.nn.functional.avg_pool1d``; bad arguments fail in torch's kernel."""
    return apply(AvgPoolFunction, input, 1, kernel_size, stride, padding, ceil_mode, count_include_pad, None)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """Drop-in for ``torch.nn.functional.avg_pool2d``; bad arguments fail in torch's kernel."""
    return apply(
        AvgPoolFunction, input, 2, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )


def avg_pool3d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """Drop-in for ``torch.nn.functional.avg_pool3d``; bad arguments fail in torch's kernel."""
    return apply(
        AvgPool3dFunction, input, 3, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )


# ---------------------------------------------------------------------------------------------
# adaptive average pooling: window i along a dim of length L, out o: [floor(i L / o), ceil((i + 1) L / o))


def adaptive_avg_pool_forward(x, d, output_size):
    if d == 1:
        return torch.adaptive_avg_pool1d(x, output_size)
    if d == 3:
        return torch._C._nn.adaptive_avg_pool3d(x, output_size)
    return torch._C._nn.adaptive_avg_pool2d(x, output_size)


def _adaptive_matrix(length, out, dy):
    """A (out, length): A[i, j] = 1 / |window i| for j in window i, else 0 (a constant)."""
    i = torch.arange(out, device=dy.device)
    start = (i * length) // out
    end = ((i + 1) * length + out - 1) // out
    j = torch.arange(length, device=dy.device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(dy.dtype) / (end - start).to(dy.dtype)[:, None]


def adaptive_avg_pool_backward(dy, x_shape, d):
    sizes, out = tuple(x_shape[-d:]), tuple(dy.shape[-d:])
    if all(o > 0 and n % o == 0 for n, o in zip(sizes, out)):
        # equal windows that tile the input: average pooling with kernel = stride = n / o
        k = tuple(n // o for n, o in zip(sizes, out))
        # dx[j] = dy[w(j)] / prod(k)                                             (*, *S) like x
        return _spread(dy / math.prod(k), x_shape, d, k, k, (0,) * d)
    if d == 1:
        # dx = dy A                                                              (*, L)
        return torch.matmul(dy, _adaptive_matrix(sizes[0], out[0], dy))
    if d == 2:
        # dx = A_h^T (dy A_w)                                                    (*, H, W)
        return torch.matmul(_adaptive_matrix(sizes[0], out[0], dy).t(),
                            torch.matmul(dy, _adaptive_matrix(sizes[1], out[1], dy)))
    # d = 3: the same product along each dim in turn, W, then H, then D
    # dx[.., w] = sum_i dy[.., i] A_w[i, w]                                      (*, oD, oH, W)
    dx = torch.matmul(dy, _adaptive_matrix(sizes[2], out[2], dy))
    # dx[.., h, :] = sum_i A_h[i, h] dx[.., i, :]                                (*, oD, H, W)
    dx = torch.matmul(_adaptive_matrix(sizes[1], out[1], dy).t(), dx)
    # dx[.., t, :, :] = sum_i A_d[i, t] dx[.., i, :, :]                          (*, D, H, W)
    # (as a product over the last dim: D swapped with W before and after)
    return torch.matmul(dx.transpose(-3, -1), _adaptive_matrix(sizes[0], out[0], dy)).transpose(-3, -1)


class AdaptiveAvgPoolFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, d, output_size):
        return adaptive_avg_pool_forward(x, d, output_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, d, output_size = inputs
        ctx.x_shape, ctx.d, ctx.output_size = x.shape, d, output_size

    @staticmethod
    def backward(ctx, dy):
        dx = adaptive_avg_pool_backward(dy, ctx.x_shape, ctx.d) if ctx.needs_input_grad[0] else None
        return dx, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        # linear: dy = adaptive_avg_pool(dx)
        return adaptive_avg_pool_forward(dx, ctx.d, ctx.output_size)


class AdaptiveAvgPool3dFunction(AdaptiveAvgPoolFunction):
    """AdaptiveAvgPoolFunction with d = 3, for its autocast policy: on torch's CPU float32 list."""
    autocast = FLOAT32_ON_CPU


def adaptive_avg_pool1d(input, output_size):
    """Drop-in for ``torch.nn.functional.adaptive_avg_pool1d``."""
    return apply(AdaptiveAvgPoolFunction, input, 1, output_size)


def adaptive_avg_pool2d(input, output_size):
    """Drop-in for ``torch.nn.functional.adaptive_avg_pool2d`` (None in output_size keeps that input size)."""
    output_size = _list_with_default(output_size, input.size())
    return apply(AdaptiveAvgPoolFunction, input, 2, output_size)


def adaptive_avg_pool3d(input, output_size):
    """Drop-in for ``torch.nn.functional.adaptive_avg_pool3d`` (None in output_size keeps that input size)."""
    output_size = _list_with_default(output_size, input.size())
    return apply(AdaptiveAvgPool3dFunction, input, 3, output_size)


# ---------------------------------------------------------------------------------------------
# torch's *_with_indices names (what F.max_pool2d(..., return_indices=True) dispatches to): the
# output and the indices always, whatever return_indices says, as torch's

def max_pool1d_with_indices(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=False):
    """Drop-in for ``torch.nn.functional.max_pool1d_with_indices``: (output, indices)."""
    return max_pool1d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)


def max_pool2d_with_indices(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=False):
    """Drop-in for ``torch.nn.functional.max_pool2d_with_indices``: (output, indices)."""
    return max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)


def max_pool3d_with_indices(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=False):
    """Drop-in for ``torch.nn.functional.max_pool3d_with_indices``: (output, indices)."""
    return max_pool3d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)


def adaptive_max_pool1d_with_indices(input, output_size, return_indices=False):
    """Drop-in for ``torch.nn.functional.adaptive_max_pool1d_with_indices``: (output, indices)."""
    return adaptive_max_pool1d(input, output_size, return_indices=True)


def adaptive_max_pool2d_with_indices(input, output_size, return_indices=False):
    """Drop-in for ``torch.nn.functional.adaptive_max_pool2d_with_indices``: (output, indices)."""
    return adaptive_max_pool2d(input, output_size, return_indices=True)


def adaptive_max_pool3d_with_indices(input, output_size, return_indices=False):
    """Drop-in for ``torch.nn.functional.adaptive_max_pool3d_with_indices``: (output, indices)."""
    return adaptive_max_pool3d(input, output_size, return_indices=True)
