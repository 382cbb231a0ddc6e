"""convolution: y = conv(x, W) + b, in 1, 2 and 3 spatial dims.

Shapes (n = 1, 2 or 3 spatial dims, g = groups):
    x (N, C, *L) or unbatched (C, *L)     W (O, C/g, *K)     b (O,) or None
    y (N, O, *Lo) with Lo = floor((L + pl + pr - d (K - 1) - 1) / s) + 1 per spatial dim.

y[n, o, i] = b[o] + sum_{c in o's group, k} W[o, c, k] xp[n, c, i s + k d], where xp is x padded
with pl zeros before and pr after. pl = pr except for padding='same' with an odd total d (K - 1),
where torch puts the extra zero after (pr = pl + 1); ``extra`` = pr - pl holds that.

Convolution is bilinear in (x, W), so each gradient is again a convolution:
    dx = the transposed convolution of dy with W (conv_transpose: the adjoint of y = conv(x, W)),
    dW = the correlation of xp with dy over (N, *Lo): a convolution with batch and channels
         swapped, where the stride s of y becomes the dilation of the dy "kernel" and the
         dilation d becomes the stride; or, for 1x1 kernels and few products per output
         (C/g prod(K) small), matrix products over the unfolded input (im2col), which run
         faster there; per tap for depthwise convolutions;
    db = dy summed over all but the channel dim.
The forward uses torch's convolution kernels; backward and jvp are written here with torch's
forward ops (conv, conv_transpose, pad, slicing), which keeps them differentiable for double
backward.
"""
import itertools
import math

import torch
import torch.nn.functional as TF

from ._apply import LOWER, apply

_CONV = {1: TF.conv1d, 2: TF.conv2d, 3: TF.conv3d}
_CONV_T = {1: TF.conv_transpose1d, 2: TF.conv_transpose2d, 3: TF.conv_transpose3d}


def _pad_after(x, extra):
    """x with extra[i] zeros after spatial dim i (padding='same' with an odd total padding)."""
    if not any(extra):
        return x
    pads = []
    for e in reversed(extra):  # F.pad lists the last dim first
        pads += [0, e]
    return TF.pad(x, pads)


def _window(t, starts, stops, steps=None):
    """t[:, :, start:stop:step, ...] over the spatial dims, skipping no-op slices: a full
    slice is an alias op, which the legacy vmap of gradcheck's batched checks cannot batch."""
    steps = steps or (1,) * len(starts)
    for dim, (a, b, s) in enumerate(zip(starts, stops, steps), start=2):
        if a == 0 and b >= t.shape[dim] and s == 1:
            continue
        t = t.narrow(dim, a, min(b, t.shape[dim]) - a)
        if s != 1:
            t = t[(slice(None),) * dim + (slice(None, None, s),)]
    return t


def _pad_both(x, padding):
    """x with padding[i] zeros before and after spatial dim i."""
    if not any(padding):
        return x
    return TF.pad(x, [q for p in reversed(padding) for q in (p, p)])


def _taps(xp, k_size, stride, dilation, lo):
    """For each kernel tap k (in order), the window xp[:, :, i s + k d] over i < Lo  (N, C, *Lo)."""
    for k in itertools.product(*(range(ks) for ks in k_size)):
        starts = [kk * d for kk, d in zip(k, dilation)]
        yield _window(xp, starts, [a + (o - 1) * s + 1 for a, s, o in zip(starts, stride, lo)], stride)


def conv_forward(x, w, b, stride, padding, extra, dilation, groups):
    # y = conv(xp, W) + b                                   (N, O, *Lo) or (O, *Lo)
    return _CONV[w.dim() - 2](_pad_after(x, extra), w, b, stride, padding, dilation, groups)


# Weight gradients of 1x1 kernels, or of at most this many products per output (C/g prod(K)), run
# as batched matrix products (_weight_grad_gemm); the others as a batch-swapped convolution
# (_weight_grad_conv). Measured on CPU (oneDNN convolutions, MKL products; one thread): a 3x3
# stem on 3 channels (27) is 6x faster as a product, 3x3 on 8 channels 3x, strided 1x1 kernels 4x;
# from C/g prod(K) ~ 144 up (3x3 on 16 channels, 7x7 on 3) the convolution is as fast or faster.
_GEMM_MAX = 96


def _weight_grad_gemm(dy, xp, k_size, stride, padding, dilation, groups):
    """dW as matrix products over the unfolded input (im2col), one per sample and group, summed:

        cols[n, c, k, i] = xpp[n, c, i s + k d]   (xpp: xp padded by p both sides)
        dW[o, c, k] = sum_n sum_i dy[n, o, i] cols[n, c, k, i]

    Per sample, dy needs no transposed copy. cols has C prod(K) rows of prod(Lo) per sample: used
    only where that is small (see _GEMM_MAX)."""
    N, C = xp.shape[:2]
    O = dy.shape[1]
    cg, og = C // groups, O // groups
    xp = _pad_both(xp, padding)  #                                     (N, C, *L + 2p)
    # tap k: xpp[n, c, i s + k d]                                       (N, C, *Lo) each
    taps = list(_taps(xp, k_size, stride, dilation, dy.shape[2:]))
    # cols: (N g, C/g prod(K), prod(Lo)),  dy as (N g, O/g, prod(Lo))
    cols = (torch.stack(taps, 2) if len(taps) > 1 else taps[0]).reshape(N * groups, cg * len(taps), -1)
    dyg = dy.reshape(N * groups, og, -1)
    # dW^T per group = sum_n cols[n] dy[n]^T                            (g, C/g prod(K), O/g)
    dwt = torch.bmm(cols, dyg.transpose(1, 2)).reshape(N, groups, cg * len(taps), og).sum(0)
    return dwt.transpose(1, 2).reshape(O, cg, *k_size)  #               (O, C/g, *K)


def _weight_grad_conv(dy, xp, k_size, stride, padding, dilation, groups):
    """dW as one convolution with batch and channels swapped: the C/g input channels of xp become
    images of g N channels, dy's O channels become filters of N channels, convolved with stride d
    and dilation s (see the module docstring)."""
    n = len(k_size)
    N, C = xp.shape[:2]
    cg = C // groups
    lo = dy.shape[2:]
    # xs: xp as cg "images" of g*N channels, channel j*N + n = xp[n, j*cg + c]   (C/g, g N, *Lp)
    xs = xp.reshape(N, groups, cg, *xp.shape[2:]).transpose(0, 2).reshape(cg, groups * N, *xp.shape[2:])
    # The taps k the product needs read xpp positions up to (K - 1) d + (Lo - 1) s: with a stride,
    # the padded xp is longer, and the convolution would compute taps past K (up to 2^n times the
    # work). Pad explicitly to just that length instead (a negative pad after crops).
    need = [(k - 1) * d + (o - 1) * s + 1 for k, d, o, s in zip(k_size, dilation, lo, stride)]
    L = xs.shape[2:]
    if any(l + 2 * p - m >= d for l, p, m, d in zip(L, padding, need, dilation)):
        xs = TF.pad(xs, [q for p, l, m in zip(reversed(padding), reversed(L), reversed(need)) for q in (p, m - l - p)])
        padding = (0,) * n
    # dys: dy as O filters of N channels (filter j*og + o = dy[:, j*og + o])   (O, N, *Lo)
    # 2-d with 64 or more filters per group, 3-d with 32 or more: channels-last filters (N innermost),
    # with which oneDNN's convolution measured 1.3-1.6x faster (2-d: ResNet shapes, 64-256 channels;
    # 3-d: 16->32 and 64->64 3x3x3 on 16^3 and 8^3 volumes); 2-d with 32 and 3-d with 8 or 16
    # measured 10-30% slower. (A permuted copy, not contiguous(memory_format=...), which vmap cannot run.)
    if (n == 2 and dy.shape[1] // groups >= 64) or (n == 3 and dy.shape[1] // groups >= 32):
        dys = dy.movedim(0, -1).contiguous().movedim(-1, 1)
    else:
        dys = dy.transpose(0, 1).contiguous()
    # dW^T = conv(xs, dys) with stride d, dilation s, grouped by g         (C/g, O, *K')
    dwt = _CONV[n](xs, dys, None, dilation, padding, stride, groups)
    # K' >= K: the taps past K read only what no output of y reads; drop them, then (O, C/g, *K)
    dwt = _window(dwt, (0,) * n, k_size)
    return dwt.transpose(0, 1).contiguous()


def _conv_weight_grad(dy, xp, k_size, stride, padding, dilation, groups):
    """dW[o, c, k] = sum_{n, i} dy[n, o, i] xp[n, c, i s + k d], xp already padded after."""
    n = len(k_size)
    N, C = xp.shape[:2]
    O = dy.shape[1]
    if C == groups > 1:
        # Depthwise (one input channel per group): a batch-swapped convolution would be one
        # grouped conv with C groups and an Lo-sized kernel, slow in every backend. Per
        # kernel tap, a product and a sum over (N, *Lo) is several times faster.
        xp = _pad_both(xp, padding)  #                          (N, C, *L + 2p)
        m = O // C
        dyv = dy.reshape(N, C, m, *dy.shape[2:])  #             (N, C, O/C, *Lo)
        sum_dims = (0,) + tuple(range(3, 3 + n))
        taps = []
        for xs in _taps(xp, k_size, stride, dilation, dy.shape[2:]):
            # xs[n, c, i] = xp[n, c, i s + k d] for tap k            (N, C, *Lo)
            # dW[c m + j, 0, k] = sum_{n, i} dy[n, c m + j, i] xs[n, c, i]        (C, O/C)
            taps.append((xs.unsqueeze(2) * dyv).sum(sum_dims))
        return torch.stack(taps, -1).reshape(O, 1, *k_size)  #   (O, 1, *K)
    if math.prod(k_size) == 1 or C // groups * math.prod(k_size) <= _GEMM_MAX:
        return _weight_grad_gemm(dy, xp, k_size, stride, padding, dilation, groups)
    return _weight_grad_conv(dy, xp, k_size, stride, padding, dilation, groups)


def conv_backward(dy, x, w, x_shape, k_size, stride, padding, extra, dilation, groups, needs=(True, True, True)):
    """Gradients of y = conv(x, W) + b. ``needs`` says which of (dx, dW, db) to compute.

    x is needed only for dW and w only for dx (None otherwise); x_shape is x's shape and
    k_size W's kernel size (*K).
    """
    n = len(stride)
    unbatched = dy.dim() == n + 1
    if unbatched:  # as a batch of one
        dy = dy.unsqueeze(0)
        x = x.unsqueeze(0) if x is not None else None
    dx = dw = db = None
    if needs[0]:
        # conv_transpose's size (Lo - 1) s - 2p + d (K - 1) + 1 + output_padding must be the
        # padded-after length L + extra: output_padding restores the positions y's floor
        # division dropped when s does not divide (0 <= output_padding < s).
        L_in = x_shape[-n:]
        out_pad = [
            L + e + 2 * p - d * (k - 1) - 1 - (lo - 1) * s
            for L, e, p, d, k, s, lo in zip(L_in, extra, padding, dilation, k_size, stride, dy.shape[2:])
        ]
        # dx = conv_transpose(dy, W)                          (N, C, *L + extra)
        dx = _CONV_T[n](dy, w, None, stride, padding, out_pad, groups, dilation)
        if any(extra):
            # the zeros padded after x have no gradient: drop them         (N, C, *L)
            dx = _window(dx, (0,) * n, L_in)
        if unbatched:
            dx = dx.squeeze(0)  #                                            (C, *L)
    if needs[1]:
        # dW[o, c, k] = sum_{n, i} dy[n, o, i] xp[n, c, i s + k d]         (O, C/g, *K)
        dw = _conv_weight_grad(dy, _pad_after(x, extra), k_size, stride, padding, dilation, groups)
    if needs[2]:
        # db[o] = sum_{n, i} dy[n, o, i]                                   (O,)
        db = dy.sum((0,) + tuple(range(2, 2 + n)))
    return dx, dw, db


def conv_jvp(dx, dw, db, x, w, out_shape, stride, padding, extra, dilation, groups):
    # conv is bilinear: dy = conv(dx, W) + conv(x, dW) + db              (N, O, *Lo) or (O, *Lo)
    out = None
    if dx is not None:
        out = conv_forward(dx, w, None, stride, padding, extra, dilation, groups)
    if dw is not None:
        t = conv_forward(x, dw, None, stride, padding, extra, dilation, groups)
        out = t if out is None else out + t
    if db is not None:
        t = db.reshape(-1, *[1] * len(stride))  #                      (O, 1, ...) broadcasts over Lo
        out = t.expand(out_shape) if out is None else out + t
    return out


class ConvFunction(torch.autograd.Function):
    """conv1d / conv2d / conv3d (the weight's dim says which) with explicit padding (pl, extra)."""
    autocast = LOWER  # autocast: in the autocast dtype (torch's lower-precision list)

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, stride, padding, extra, dilation, groups):
        return conv_forward(x, w, b, stride, padding, extra, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, stride, padding, extra, dilation, groups = inputs
        ctx.args = (stride, padding, extra, dilation, groups)
        ctx.x_shape, ctx.w_shape, ctx.out_shape = x.shape, w.shape, output.shape
        ctx.has_bias = b is not None
        # Save only what a gradient we will compute needs: dx needs W, dW needs x.
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_dw else None, w if need_dx else None)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        if dy.numel() == 0:
            # no output: every gradient is a sum over nothing, 0 (torch's output for x without
            # channels has none either, whatever W's)
            dx, dw, db = (dy.new_zeros(s) if need else None
                          for s, need in zip((ctx.x_shape, ctx.w_shape, ctx.w_shape[:1]), needs))
        else:
            dx, dw, db = conv_backward(dy, x, w, ctx.x_shape, ctx.w_shape[2:], *ctx.args, needs=needs)
        return dx, dw, db, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dw, db, *_):
        x, w = ctx.saved_tensors
        return conv_jvp(dx, dw, db, x, w, ctx.out_shape, *ctx.args)


def _expand(value, n, name):
    """An int or a sequence of 1 or n ints as an n-tuple; torch's RuntimeError otherwise."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of {n} values to match the "
            f"convolution dimensions, but got {name}={list(value)}"
        )
    return value


def _conv(n, input, weight, bias, stride, padding, dilation, groups):
    if input.dim() not in (n + 1, n + 2):
        raise RuntimeError(
            f"Expected {n + 1}D (unbatched) or {n + 2}D (batched) input to conv{n}d, "
            f"but got input of size: {list(input.shape)}"
        )
    if weight.dim() != n + 2:
        raise RuntimeError(
            f"Expected {weight.dim()}-dimensional input for {weight.dim()}-dimensional weight{list(weight.shape)}, "
            f"but got {input.dim()}-dimensional input of size {list(input.shape)} instead"
        )
    stride, dilation = _expand(stride, n, "stride"), _expand(dilation, n, "dilation")
    extra = (0,) * n
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * n
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise RuntimeError("padding='same' is not supported for strided convolutions")
            # torch's rule: total d (K - 1), half before, the odd one after
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            padding = tuple(t // 2 for t in total)
            extra = tuple(t % 2 for t in total)
        else:
            raise RuntimeError(f"Invalid padding string: {padding!r}")
    else:
        padding = _expand(padding, n, "padding")
    return apply(ConvFunction, input, weight, bias, stride, padding, extra, dilation, groups)


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Drop-in for ``torch.nn.functional.conv1d`` with a hand-written backward.

    Bad shapes and options fail inside torch's convolution with torch's own RuntimeError.
    """
    return _conv(1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Drop-in for ``torch.nn.functional.conv2d`` with a hand-written backward.

    Bad shapes and options fail inside torch's convolution with torch's own RuntimeError.
    """
    return _conv(2, input, weight, bias, stride, padding, dilation, groups)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Drop-in for ``torch.nn.functional.conv3d`` with a hand-written backward.

    Bad shapes and options fail inside torch's convolution with torch's own RuntimeError.
    """
    return _conv(3, input, weight, bias, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------------------------
# conv_tbc: a 1-d convolution of time-batch-channel data (torch.conv_tbc, fairseq's layout).
#
#     x (T, B, Ci), W (K, Ci, Co), b (Co), pad p:
#     y[t, n, o] = b[o] + sum_{k, i} x[t + k - p, n, i] W[k, i, o]          (T + 2p - K + 1, B, Co)
#
# which is conv1d on permuted views: y = conv1d(x', W', b, padding=p)'' with x' = x.permute(1, 2, 0)
# (B, Ci, T), W' = W.permute(2, 1, 0) (Co, Ci, K), and the output (B, Co, To) permuted (2, 0, 1).
# A permutation is linear and its own adjoint is the inverse permutation, so the gradients are
# conv1d's (conv_backward), permuted back: dx = dx'.permute(2, 0, 1), dW = dW'.permute(2, 1, 0).

def _tbc_views(x, w):
    # x' = x.permute(1, 2, 0): (B, Ci, T);  W' = W.permute(2, 1, 0): (Co, Ci, K)
    return x.permute(1, 2, 0), w.permute(2, 1, 0)


def conv_tbc_forward(x, w, b, pad):
    xp, wp = _tbc_views(x, w)
    T_out = x.shape[0] + 2 * pad - w.shape[0] + 1
    if T_out == 0 or xp.numel() == 0 or wp.numel() == 0:
        # nothing to convolve (no time steps out, no batch or no channels): the bias, or empty
        return b.expand(T_out, x.shape[1], w.shape[2]).contiguous()
    # y' = conv1d(x', W', b, padding=p)                              (B, Co, To)
    y = conv_forward(xp, wp, b, (1,), (pad,), (0,), (1,), 1)
    # y = y'.permute(2, 0, 1)                                          (To, B, Co)
    return y.permute(2, 0, 1).contiguous()


def conv_tbc_backward(dy, x, w, pad, needs=(True, True, True)):
    T_out = dy.shape[0]
    # db[o] = sum_{t, n} dy[t, n, o]                                   (Co,)
    db = dy.sum((0, 1)) if needs[2] else None
    if T_out == 0 or x.numel() == 0 or w.numel() == 0:
        # a sum over nothing: 0
        return (x.new_zeros(x.shape) if needs[0] else None), (w.new_zeros(w.shape) if needs[1] else None), db
    xp, wp = _tbc_views(x, w)
    # dy' = dy.permute(1, 2, 0)                                        (B, Co, To)
    # dx', dW' = conv1d's backward of dy' (x' and W' as in forward)    (B, Ci, T), (Co, Ci, K)
    dxp, dwp, _ = conv_backward(dy.permute(1, 2, 0), xp, wp, xp.shape, wp.shape[2:], (1,), (pad,), (0,), (1,), 1,
                                needs=(needs[0], needs[1], False))
    # dx = dx'.permute(2, 0, 1)                                        (T, B, Ci)
    # dW = dW'.permute(2, 1, 0)                                        (K, Ci, Co)
    dx = dxp.permute(2, 0, 1) if dxp is not None else None
    dw = dwp.permute(2, 1, 0) if dwp is not None else None
    return dx, dw, db


def _conv_tbc_checks(x, w, b, pad):
    # torch's checks and messages (aten/src/ATen/native/ConvolutionTBC.cpp)
    if x.dim() != 3:
        raise RuntimeError("Input must have 3 dims: time, batch, in_channel")
    if w.dim() != 3:
        raise RuntimeError("Weight tensor must have 3 dims: kernel_width, in_channels, out_channels.")
    if b.dim() != 1:
        raise RuntimeError("Bias must be 1-D")
    if b.shape[0] != w.shape[2]:
        raise RuntimeError("Bias size must equal dim 2 in the weight tensor (output channels).")
    if x.shape[2] != w.shape[1]:
        raise RuntimeError("Input dim 2 (input channels) is not == dim 1 in the weight tensor")
    T_out = x.shape[0] + 2 * pad - w.shape[0] + 1
    if T_out < 0:
        raise RuntimeError(f"Trying to create tensor with negative dimension {T_out}: "
                           f"[{T_out}, {x.shape[1]}, {w.shape[2]}]")


class ConvTBCFunction(torch.autograd.Function):
    """torch.conv_tbc: conv1d of (T, B, C) data through permuted views (see above)."""
    autocast = LOWER  # autocast: in the autocast dtype (torch's lower-precision list has conv_tbc)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, pad):
        return conv_tbc_forward(x, w, b, pad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, pad = inputs
        ctx.pad = pad
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx, dw, db = conv_tbc_backward(dy, x, w, ctx.pad, needs=ctx.needs_input_grad[:3])
        return dx, dw, db, None

    @staticmethod
    def jvp(ctx, dx, dw, db, _pad):
        x, w = ctx.saved_tensors
        # bilinear: dy = conv_tbc(dx, W, 0) + conv_tbc(x, dW, 0) + db      (To, B, Co)
        T_out, B, Co = x.shape[0] + 2 * ctx.pad - w.shape[0] + 1, x.shape[1], w.shape[2]
        out = (db if db is not None else x.new_zeros(Co)).expand(T_out, B, Co)
        if dx is not None:
            out = out + conv_tbc_forward(dx, w, x.new_zeros(Co), ctx.pad)
        if dw is not None:
            out = out + conv_tbc_forward(x, dw, x.new_zeros(Co), ctx.pad)
        return out.contiguous()


def conv_tbc(input, weight, bias, pad=0):
    """Drop-in for ``torch.conv_tbc`` (time, batch, channel 1-d convolution; bias required)."""
    _conv_tbc_checks(input, weight, bias, pad)
    return apply(ConvTBCFunction, input, weight, bias, pad)
