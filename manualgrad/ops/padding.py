"""padding: y = pad(x, pad, mode, value), torch.nn.functional.pad's op.

``pad`` lists (before, after) pairs starting from the last dim: (pl, pr) pads dim -1,
(pl, pr, pt, pb) dims -1 and -2, and so on. A negative pad crops. Along a padded dim of size L
the output has Lo = L + pl + pr positions, and output position j sits at i = j - pl in x's
coordinates:

    constant   y[j] = x[i] for 0 <= i < L, else value      (any number of dims, any input dim)
    reflect    y[j] = x[r(i)], r mirrors about 0 and L - 1 without repeating the edge:
               r(i) = |i| for i < L, 2 (L - 1) - i beyond          (needs pl, pr < L)
    replicate  y[j] = x[clamp(i, 0, L - 1)]: the edge value repeated
    circular   y[j] = x[a + (i - a) mod L'], where torch first crops the negative pads
               (a = max(-pl, 0) before, b = max(-pr, 0) after, L' = L - a - b) and then wraps the
               cropped signal of length L' (needs every positive pad <= L')
(the non-constant modes pad 1, 2 or 3 trailing dims of a (N, C, *S) or unbatched (C, *S) input).
For x = [a b c] and (pl, pr) = (2, 1): reflect gives [c b a b c b], replicate [a a a b c c],
circular [b c a b c a]; with (-1, 2) circular crops to [b c] and wraps it: [b c b c].

Each padded dim is a gather y = x[src] along that dim, with src one index per output position
(``source_index``); the dims are independent, so y is these gathers one dim after the other.

The backward is the adjoint of the gathers: every dy[j] goes back to the input position it was
read from, src[j], and positions read several times (the mirrored, repeated or wrapped ones)
sum their gradients: dx = zeros(L).index_add(src, dy) per padded dim, a scatter-add. For the
constant mode src is the identity on the kept positions, so the scatter-add is a crop of dy
(the padded positions have no source) and a zero-fill of what the forward cropped: a constant
pad of dy with the pads negated. The backward is linear in dy and built from differentiable
torch ops (index_add, constant pad), so double backward differentiates it again; the jvp is the
same pad of the tangent (with value 0: the constant has no tangent).

The forward runs torch's own padding kernels (the same numbers and the same checks, with their
exception types and messages), except for one check torch lacks: a circular pad larger than
what remains of its dim after the negative pad on the other side (torch returns uninitialized
memory or a RuntimeError about overlapping memory there).
"""
import torch

from ._apply import FLOAT32_ON_CPU, INPUT, apply
from ._checks import can_write_inplace


def pad_forward(x, pad, mode, value):
    # y = x padded (or cropped) along the last len(pad) / 2 dims      (*, *S + pl + pr)
    return torch._C._nn.pad(x, pad, mode, value)


def source_index(L, pl, pr, mode, device=None):
    """src[j]: the input position that output position j reads along one dim, for j < L + pl + pr
    (reflect, replicate, circular; see the module docstring)."""
    # i = j - pl: output position j in x's coordinates                  (Lo,)
    i = torch.arange(-pl, L + pr, device=device)
    if mode == "reflect":
        # mirror about 0 (i < 0 -> -i), then about L - 1 (i > L - 1 -> 2 (L - 1) - i)
        i = i.abs()
        return torch.where(i > L - 1, 2 * (L - 1) - i, i)
    if mode == "replicate":
        # the nearest edge for positions outside [0, L)
        return i.clamp(0, L - 1)
    # circular: crop the negative pads (a before, b after), wrap the rest of length L'
    a, b = max(-pl, 0), max(-pr, 0)
    kept = L - a - b
    if kept <= 0:  # nothing left: no output position either (checked in pad())
        return i[:0]
    return (i - a) % kept + a


def pad_backward(dy, x_shape, pad, mode):
    """dx for y = pad(x, pad, mode): dy (*, *S + pl + pr) -> dx (*, *S) like x."""
    if mode == "constant":
        # the kept positions pass dy back, the padded ones have no source, the cropped ones
        # get 0: a constant pad of dy with every pad negated             (*, *S)
        return torch.constant_pad_nd(dy, [-p for p in pad])
    # into fresh zeros in place when no graph is recorded (see pooling's max_pool_backward)
    inplace = can_write_inplace(dy)
    g = dy
    for k in range(len(pad) // 2):
        dim = -1 - k
        pl, pr = pad[2 * k], pad[2 * k + 1]
        L = x_shape[dim]
        # src[j]: the x position output position j read along this dim          (Lo,)
        src = source_index(L, pl, pr, mode, dy.device)
        shape = list(g.shape)
        shape[dim] = L
        # dx[.., s, ..] = sum over the j with src[j] = s of g[.., j, ..]: a scatter-add
        # (reflected, replicated, wrapped positions collect several)             (.., L, ..)
        zeros = g.new_zeros(shape)
        g = zeros.index_add_(dim, src, g) if inplace else zeros.index_add(dim, src, g)
    return g  #                                                                  (*, *S) like x


class PadFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (constant, circular and 3-d reflect: on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, pad, mode, value):
        return pad_forward(x, pad, mode, value)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, pad, mode, _ = inputs
        ctx.x_shape, ctx.pad, ctx.mode = x.shape, pad, mode

    @staticmethod
    def backward(ctx, dy):
        dx = pad_backward(dy, ctx.x_shape, ctx.pad, ctx.mode) if ctx.needs_input_grad[0] else None
        return dx, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        # linear in x: dy = pad(dx), with 0 where the forward put the constant (it has no tangent)
        return pad_forward(dx, ctx.pad, ctx.mode, None)


class ReflectReplicatePadFunction(PadFunction):
    """PadFunction for the pads on torch's CPU autocast float32 list (reflection_pad1d/2d,
    replication_pad1d/2d/3d): in float32 on the CPU, in the input's dtype on CUDA."""
    autocast = FLOAT32_ON_CPU


def _function(mode, pad):
    if mode == "replicate" or (mode == "reflect" and len(pad) <= 4):
        return ReflectReplicatePadFunction
    return PadFunction


def _check_circular(input, pad):
    """torch's circular pad checks each pad against the dim's full size; where the negative pad
    on the other side has cropped the dim below the positive pad, its kernel wraps into memory
    it has not written yet (uninitialized values, or an overlapping-copy RuntimeError). The same
    condition torch names, checked against what the crop leaves."""
    if len(pad) % 2 or len(pad) > 2 * input.dim() or not all(isinstance(p, int) for p in pad):
        return  # torch's own checks say what is wrong
    for k in range(len(pad) // 2):
        pl, pr = pad[2 * k], pad[2 * k + 1]
        L = input.shape[-1 - k]
        kept = L - max(-pl, 0) - max(-pr, 0)
        if pl <= L and pr <= L and L + pl + pr >= 0 and max(pl, pr) > kept:
            raise RuntimeError(
                f"Padding value causes wrapping around more than once: circular padding ({pl}, {pr}) of "
                f"dimension {input.dim() - 1 - k} (size {L}) leaves {max(kept, 0)} positions after the "
                f"negative padding, fewer than the {max(pl, pr)} to wrap"
            )


def pad(input, pad, mode="constant", value=None):
    """Drop-in for ``torch.nn.functional.pad`` with a hand-written backward.

    Bad pads, modes and input sizes fail in torch's kernel, with its exception and message."""
    if mode == "circular":
        _check_circular(input, pad)
    return apply(_function(mode, pad), input, pad, mode, value)
