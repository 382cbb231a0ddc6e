"""Rearrangements: pixel_shuffle, pixel_unshuffle, channel_shuffle, unfold (im2col), fold (col2im).

None of them computes anything: each output element is an input element (the shuffles: a
permutation) or a sum of some (fold). So each is linear, its backward is its adjoint, and the
adjoint of each is another op of this file:

- pixel_shuffle with factor r: x (*, C r^2, H, W) -> y (*, C, H r, W r),
      y[.., c, h r + i, w r + j] = x[.., c r^2 + i r + j, h, w]
  (x viewed as (*, C, r, r, H, W), permuted to (*, C, H, r, W, r), viewed as y).
  A permutation: its adjoint is its inverse, pixel_unshuffle with the same r, and the other way
  round: dx = pixel_unshuffle(dy, r), and for y = pixel_unshuffle(x, r), dx = pixel_shuffle(dy, r).
- channel_shuffle with g groups: x (N, C, *) -> y (N, C, *), C = g m,
      y[:, j g + i] = x[:, i m + j]      (x viewed as (N, g, m, *), transposed to (N, m, g, *))
  Its inverse reads the channels the other way round, which is channel_shuffle with C / g
  groups: dx = channel_shuffle(dy, C / g).
- unfold (im2col): x (N, C, H, W) -> cols (N, C kh kw, L), one column per sliding block
  (kernel k, dilation d, padding p, stride s; L blocks in all):
      cols[n, c kh kw + a kw + b, l] = xp[n, c, oh(l) s_h + a d_h, ow(l) s_w + b d_w]
  (xp: x zero-padded by p; block l = (oh, ow)). Each column entry is a copy of one x entry (or of
  a padding zero), but one x entry can sit in several overlapping blocks.
- fold (col2im): cols (N, C kh kw, L) -> y (N, C, H, W) puts every column entry back where unfold
  reads it from and sums the entries that land on the same position (overlapping blocks);
  positions in the padding are dropped.
  fold is the adjoint of unfold (same k, d, p, s, output_size = (H, W)) and unfold the adjoint of
  fold: unfold's backward sums each position's copies back, dx = fold(dcols), and fold's
  backward hands each column entry the gradient of the position it was added into,
  dcols = unfold(dy). Unbatched inputs (C, H, W) / (C kh kw, L) work the same way.

The forwards and backwards run torch's own kernels for these ops (the same numbers and torch's
checks and messages for bad arguments); each backward is a forward op of this file, linear in dy
and differentiable by torch's autograd, so double backward works, and the jvp of each op is the
same op on the tangent.
"""
import torch

from ._apply import INPUT, apply


def _pair(v):
    # torch's _pair (written here: an int -> (v, v); a sequence passes through for torch to check)
    return (v, v) if isinstance(v, int) else tuple(v)

# ---------------------------------------------------------------------------------------------
# pixel_shuffle / pixel_unshuffle: inverse permutations of each other


def pixel_shuffle_forward(x, r):
    # y[.., c, h r + i, w r + j] = x[.., c r^2 + i r + j, h, w]        (*, C, H r, W r)
    return torch.pixel_shuffle(x, r)


def pixel_unshuffle_forward(x, r):
    # y[.., c r^2 + i r + j, h, w] = x[.., c, h r + i, w r + j]        (*, C r^2, H / r, W / r)
    return torch.pixel_unshuffle(x, r)


def _empty_or(dy, x_shape, backward, r):
    """backward(dy, r), or zeros like x when there are no elements: torch's pixel_shuffle and
    pixel_unshuffle return an empty input unchanged, in its shape, not the rearranged one (so
    its own backward of an empty pixel_shuffle fails)."""
    return dy.new_zeros(x_shape) if dy.numel() == 0 else backward(dy, r)


def pixel_shuffle_backward(dy, r):
    # a permutation's adjoint is its inverse: dx = pixel_unshuffle(dy)   (*, C r^2, H, W) like x
    return pixel_unshuffle_forward(dy, r)


def pixel_unshuffle_backward(dy, r):
    # dx = pixel_shuffle(dy)                                               (*, C, H, W) like x
    return pixel_shuffle_forward(dy, r)


class PixelShuffleFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, r):
        return pixel_shuffle_forward(x, r)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.r, ctx.x_shape = inputs[1], inputs[0].shape

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None
        return _empty_or(dy, ctx.x_shape, pixel_shuffle_backward, ctx.r), None

    @staticmethod
    def jvp(ctx, dx, _):
        # linear: dy = pixel_shuffle(dx)
        return pixel_shuffle_forward(dx, ctx.r)


class PixelUnshuffleFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, r):
        return pixel_unshuffle_forward(x, r)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.r, ctx.x_shape = inputs[1], inputs[0].shape

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None
        return _empty_or(dy, ctx.x_shape, pixel_unshuffle_backward, ctx.r), None

    @staticmethod
    def jvp(ctx, dx, _):
        # linear: dy = pixel_unshuffle(dx)
        return pixel_unshuffle_forward(dx, ctx.r)


def pixel_shuffle(input, upscale_factor):
    """Drop-in for ``torch.nn.functional.pixel_shuffle``; bad arguments fail in torch's kernel."""
    return apply(PixelShuffleFunction, input, upscale_factor)


def pixel_unshuffle(input, downscale_factor):
    """Drop-in for ``torch.nn.functional.pixel_unshuffle``; bad arguments fail in torch's kernel."""
    return apply(PixelUnshuffleFunction, input, downscale_factor)

# ---------------------------------------------------------------------------------------------
# channel_shuffle: C = g m channels, y[:, j g + i] = x[:, i m + j]


def channel_shuffle_forward(x, groups):
    # (N, g, m, *) -> (N, m, g, *)                                         (N, C, *) like x
    return torch.channel_shuffle(x, groups)


def channel_shuffle_backward(dy, groups):
    C = dy.shape[1]
    if C == 0:  # no channels: nothing to permute (and C / g = 0 groups is no valid argument)
        return dy
    # the inverse permutation: dx[:, i m + j] = dy[:, j g + i], a shuffle with m = C / g groups
    return channel_shuffle_forward(dy, C // groups)  #                     (N, C, *) like x


class ChannelShuffleFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, groups):
        return channel_shuffle_forward(x, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.groups = inputs[1]

    @staticmethod
    def backward(ctx, dy):
        return channel_shuffle_backward(dy, ctx.groups) if ctx.needs_input_grad[0] else None, None

    @staticmethod
    def jvp(ctx, dx, _):
        # linear: dy = channel_shuffle(dx)
        return channel_shuffle_forward(dx, ctx.groups)


def channel_shuffle(input, groups):
    """Drop-in for ``torch.nn.functional.channel_shuffle``; bad arguments fail in torch's kernel."""
    return apply(ChannelShuffleFunction, input, groups)

# ---------------------------------------------------------------------------------------------
# unfold (im2col) and fold (col2im): adjoints of each other


def unfold_forward(x, kernel_size, dilation, padding, stride):
    # cols[n, c kh kw + a kw + b, l] = xp[n, c, block l's row + a dh, its column + b dw]
    #                                                                      (N, C kh kw, L)
    return torch._C._nn.im2col(x, kernel_size, dilation, padding, stride)


def fold_forward(cols, output_size, kernel_size, dilation, padding, stride):
    # y[n, c, h, w] = sum of the column entries that unfold reads from (h, w)   (N, C, H, W)
    return torch._C._nn.col2im(cols, output_size, kernel_size, dilation, padding, stride)


def unfold_backward(dcols, x_spatial, kernel_size, dilation, padding, stride):
    # each x entry was copied into every block containing it: its gradient sums those copies'
    # gradients, which is fold of dcols onto x's (H, W)                    (N, C, H, W) like x
    return fold_forward(dcols, x_spatial, kernel_size, dilation, padding, stride)


def fold_backward(dy, kernel_size, dilation, padding, stride):
    # each column entry was added into one position (h, w) (or dropped in the padding): its
    # gradient is dy there, which is unfold of dy                          (N, C kh kw, L) like cols
    return unfold_forward(dy, kernel_size, dilation, padding, stride)


class UnfoldFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, kernel_size, dilation, padding, stride):
        return unfold_forward(x, kernel_size, dilation, padding, stride)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, *args = inputs
        ctx.x_spatial, ctx.args = tuple(x.shape[-2:]), args

    @staticmethod
    def backward(ctx, dcols):
        dx = unfold_backward(dcols, ctx.x_spatial, *ctx.args) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        # linear: dcols = unfold(dx)
        return unfold_forward(dx, *ctx.args)


class FoldFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(cols, output_size, kernel_size, dilation, padding, stride):
        return fold_forward(cols, output_size, kernel_size, dilation, padding, stride)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.output_size, ctx.args = inputs[1], inputs[2:]

    @staticmethod
    def backward(ctx, dy):
        dcols = fold_backward(dy, *ctx.args) if ctx.needs_input_grad[0] else None
        return dcols, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dcols, *_):
        # linear: dy = fold(dcols)
        return fold_forward(dcols, ctx.output_size, *ctx.args)


def unfold(input, kernel_size, dilation=1, padding=0, stride=1):
    """Drop-in for ``torch.nn.functional.unfold`` (im2col); bad arguments fail in torch's kernel."""
    return apply(UnfoldFunction, input, _pair(kernel_size), _pair(dilation), _pair(padding), _pair(stride))


def fold(input, output_size, kernel_size, dilation=1, padding=0, stride=1):
    """Drop-in for ``torch.nn.functional.fold`` (col2im); bad arguments fail in torch's kernel."""
    return apply(FoldFunction, input, _pair(output_size), _pair(kernel_size), _pair(dilation), _pair(padding),
                 _pair(stride))


def native_channel_shuffle(input, groups):
    """Drop-in for ``torch.nn.functional.native_channel_shuffle`` (torch's kernel-level twin of
    ``channel_shuffle``: the same permutation, so the same Function)."""
    return apply(ChannelShuffleFunction, input, groups)
