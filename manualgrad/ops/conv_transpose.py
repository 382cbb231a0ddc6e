"""transposed convolution: y = conv_transpose(x, W) + b, in 1, 2 and 3 spatial dims.

Shapes (n = 1, 2 or 3 spatial dims, g = groups, q = output_padding):
    x (N, C, *L) or unbatched (C, *L)     W (C, O/g, *K)     b (O,) or None
    y (N, O, *Lo) with Lo = (L - 1) s - 2p + d (K - 1) + q + 1 per spatial dim.

Each input position scatters a kernel-sized patch into the output:
    y[n, o, i s + k d - p] += W[c, o, k] x[n, c, i]      (c in o's group; positions outside
                                                          [0, Lo) dropped, q adds some at the end)
That is the adjoint of the convolution y' = conv(x', W) with the same s, p, d, g (conv's input
gradient, ops/conv.py), so the gradients of conv_transpose are convolutions again, with the
roles of x and dy swapped:
    dx = conv(dy, W), the same s, p, d, g:   dx[n, c, i] = sum_{o, k} W[c, o, k] dyp[n, o, i s + k d]
         where dyp is dy padded with p zeros both sides                         (N, C, *L)
    dW[c, o, k] = sum_{n, i} x[n, c, i] dyp[n, o, i s + k d]                  (C, O/g, *K)
         the correlation conv's weight gradient computes (ops/conv.py, _conv_weight_grad), with
         x in the place of conv's output gradient and dy in the place of its input
    db[o] = sum of dy over all but the channel dim                               (O,)
The forward is torch's transposed-convolution kernel; backward and jvp are written with torch's
forward ops (conv, conv_transpose, pad, slicing), which keeps them differentiable for double
backward.
"""
import torch

from ._apply import LOWER, apply
from .conv import _CONV, _CONV_T, _conv_weight_grad, _expand, _window


def conv_transpose_forward(x, w, b, stride, padding, output_padding, groups, dilation):
    # y = conv_transpose(x, W) + b                          (N, O, *Lo) or (O, *Lo)
    return _CONV_T[w.dim() - 2](x, w, b, stride, padding, output_padding, groups, dilation)


def conv_transpose_backward(dy, x, w, x_shape, k_size, stride, padding, groups, dilation,
                            needs=(True, True, True)):
    """Gradients of y = conv_transpose(x, W) + b. ``needs`` says which of (dx, dW, db) to compute.

    x is needed only for dW and w only for dx (None otherwise); x_shape is x's shape and
    k_size W's kernel size (*K). (output_padding only made dy longer: nothing else to undo.)
    """
    n = len(stride)
    unbatched = dy.dim() == n + 1
    if unbatched:  # as a batch of one
        dy = dy.unsqueeze(0)
        x = x.unsqueeze(0) if x is not None else None
    dx = dw = db = None
    if needs[0]:
        # dx = conv(dy, W), W read as conv's (C, O/g, *K) weight         (N, C, *L')
        dx = _CONV[n](dy, w, None, stride, padding, dilation, groups)
        # L' = floor(((L - 1) s + q) / s) + 1 is L, unless q >= s (allowed when q < d): the
        # positions past L are no input's: drop them                        (N, C, *L)
        dx = _window(dx, (0,) * n, x_shape[-n:])
        if unbatched:
            dx = dx.squeeze(0)  #                                            (C, *L)
    if needs[1]:
        # dW[c, o, k] = sum_{n, i} x[n, c, i] dyp[n, o, i s + k d]          (C, O/g, *K)
        # conv's dW[o', c', k] = sum_{n, i} dy'[n, o', i] xp'[n, c', i s + k d] with its output
        # gradient dy' = x (N, C, *L) and its input xp' = dy (N, O, *Lo), padded by p inside
        dw = _conv_weight_grad(x, dy, k_size, stride, padding, dilation, groups)
    if needs[2]:
        # db[o] = sum_{n, i} dy[n, o, i]                                   (O,)
        db = dy.sum((0,) + tuple(range(2, 2 + n)))
    return dx, dw, db


def conv_transpose_jvp(dx, dw, db, x, w, out_shape, stride, padding, output_padding, groups, dilation):
    # bilinear in (x, W): dy = conv_transpose(dx, W) + conv_transpose(x, dW) + db   (N, O, *Lo)
    out = None
    if dx is not None:
        out = conv_transpose_forward(dx, w, None, stride, padding, output_padding, groups, dilation)
    if dw is not None:
        t = conv_transpose_forward(x, dw, None, stride, padding, output_padding, groups, dilation)
        out = t if out is None else out + t
    if db is not None:
        t = db.reshape(-1, *[1] * len(stride))  #                      (O, 1, ...) broadcasts over Lo
        out = t.expand(out_shape) if out is None else out + t
    return out


class ConvTransposeFunction(torch.autograd.Function):
    """conv_transpose1d / 2d / 3d (the weight's dim says which)."""
    autocast = LOWER  # autocast: in the autocast dtype (torch's lower-precision list, as conv)

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, stride, padding, output_padding, groups, dilation):
        return conv_transpose_forward(x, w, b, stride, padding, output_padding, groups, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, stride, padding, output_padding, groups, dilation = inputs
        ctx.args = (stride, padding, output_padding, groups, dilation)
        ctx.x_shape, ctx.w_shape, ctx.out_shape = x.shape, w.shape, output.shape
        ctx.has_bias = b is not None
        # Save only what a gradient we will compute needs: dx needs W, dW needs x.
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_dw else None, w if need_dx else None)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        stride, padding, _, groups, dilation = ctx.args
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        if dy.numel() == 0:
            # no output (N = 0 or O = 0; torch's kernel refuses x without channels or positions):
            # every gradient is a sum over nothing, 0
            dx, dw, db = (dy.new_zeros(s) if need else None
                          for s, need in zip((ctx.x_shape, ctx.w_shape, (ctx.out_shape[-len(stride) - 1],)), needs))
        else:
            dx, dw, db = conv_transpose_backward(dy, x, w, ctx.x_shape, ctx.w_shape[2:], stride, padding, groups,
                                                 dilation, needs=needs)
        return dx, dw, db, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dw, db, *_):
        x, w = ctx.saved_tensors
        return conv_transpose_jvp(dx, dw, db, x, w, ctx.out_shape, *ctx.args)


def _conv_transpose(n, input, weight, bias, stride, padding, output_padding, groups, dilation):
    if input.dim() not in (n + 1, n + 2):
        raise RuntimeError(
            f"Expected {n + 1}D (unbatched) or {n + 2}D (batched) input to conv_transpose{n}d, "
            f"but got input of size: {list(input.shape)}"
        )
    if isinstance(padding, str):  # torch's argument parser: no 'same' / 'valid' here
        raise TypeError(f"conv_transpose{n}d(): argument 'padding' must be tuple of ints, not str")
    stride, padding = _expand(stride, n, "stride"), _expand(padding, n, "padding")
    output_padding, dilation = _expand(output_padding, n, "output_padding"), _expand(dilation, n, "dilation")
    # Two checks of torch's that its oneDNN path reports only as "could not create a primitive
    # descriptor" / "memory descriptor": same exception type, a message that says what is wrong.
    # (An output size of 0 is left to torch's kernel: some of its paths return an empty y.)
    if any(d < 1 for d in dilation):
        raise RuntimeError(f"dilation should be greater than zero, but got dilation={list(dilation)}")
    if weight.dim() == n + 2 and all(s > 0 for s in stride) and all(p >= 0 for p in padding):
        L, K = list(input.shape[-n:]), list(weight.shape[2:])
        out = [(l - 1) * s - 2 * p + d * (k - 1) + q + 1
               for l, s, p, d, k, q in zip(L, stride, padding, dilation, K, output_padding)]
        if all(l > 0 for l in L) and any(o < 0 for o in out):
            raise RuntimeError(f"Given input size per channel: {L}. Calculated output size per channel: {out}. "
                               "Output size is too small")
    return apply(ConvTransposeFunction, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Drop-in for ``torch.nn.functional.conv_transpose1d`` with a hand-written backward.

    Bad shapes and options fail inside torch's kernel with torch's own RuntimeError.
    """
    return _conv_transpose(1, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Drop-in for ``torch.nn.functional.conv_transpose2d`` with a hand-written backward.

    Bad shapes and options fail inside torch's kernel with torch's own RuntimeError.
    """
    return _conv_transpose(2, input, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Drop-in for ``torch.nn.functional.conv_transpose3d`` with a hand-written backward.

    Bad shapes and options fail inside torch's kernel with torch's own RuntimeError.
    """
    return _conv_transpose(3, input, weight, bias, stride, padding, output_padding, groups, dilation)
