"""dropout: y = x * mask / (1 - p), mask ~ Bernoulli(1 - p) elementwise; dx = dy * mask / (1 - p).

The mask is drawn exactly as torch's CPU dropout draws it (``bernoulli_(1 - p)`` on a
tensor laid out like the input, aten/src/ATen/native/Dropout.cpp; under vmap on a contiguous
(*batch, *sample) tensor, as torch's batching rules draw it), and the scale is rounded as
torch rounds it, so under the same seed outputs and gradients equal torch's bit for bit.
In place on a view, the Function runs in place on a copy of the view, then copy_ writes the
result into the view (see ``_apply``).

What is saved for backward is the mask bit-packed: ceil(numel / 8) bytes, where torch keeps
a float copy of the scaled mask (numel * element_size bytes). Inside ``manualgrad.lean()``, on
the CPU, when that is more than the generator's state (5056 bytes), the state the mask was drawn
from is kept instead and backward redraws the mask from it, as scaled_dot_product_attention does.

vmap: the Function takes a hidden ``vmap_dims`` argument, empty outside vmap. Its vmap rule
applies the Function to the batched tensor and records there which dims are batch dims, as
``(dim, same)`` pairs: the mask is packed per sample (so every vmap level sees the packed mask
of its own samples), and ``same`` (randomness="same") draws one mask shared along that dim.
"""
import math

import torch

from ..memory import Recipe, recipe_of, tag
from ._apply import INPUT, apply


# ---------------------------------------------------------------------------------------------
# bit packing along the last dim: bit i of byte k holds element 8k + i

def pack_bits(bits):
    """Bools (..., n) as uint8 bytes (..., ceil(n / 8)), least significant bit first:
    numpy's ``packbits(bits, axis=-1, bitorder="little")``."""
    b = bits.view(torch.uint8)  # 0/1 bytes
    n = b.shape[-1]
    if n % 8:
        b = torch.nn.functional.pad(b, (0, 8 - n % 8))
    # byte k = sum_i bit[8k + i] << i   (distinct bits: the uint8 sum cannot overflow)
    return (b.reshape(*b.shape[:-1], -1, 8) << _shifts(b.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed, n):
    """The bools (..., n) that ``pack_bits`` packed into ``packed`` (..., ceil(n / 8))."""
    b = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1  # (..., bytes, 8) of 0/1
    return b.flatten(-2)[..., :n].view(torch.bool)  # 0/1 bytes are valid bools: no copy


def _shifts(device):
    return torch.arange(8, dtype=torch.uint8, device=device)


# ---------------------------------------------------------------------------------------------
# dropout

def dropout_scale(p, dtype):
    """1 / (1 - p) rounded as torch rounds it (noise.div_(1 - p) on ones of ``dtype``)."""
    return torch.ones((), dtype=dtype).div_(1 - p).item()


def dropout_forward(x, p, inplace=False, vmap_dims=(), pack=True):
    """Returns y and the packed mask (empty when p == 1: nothing is kept, or without ``pack``)."""
    if p == 1:
        # y = x * 0 (torch multiplies by a zero too: -0 and nan come out as in torch)   (*) like x
        return (x.mul_(0) if inplace else x * 0), torch.empty(0, dtype=torch.uint8, device=x.device)
    if not inplace and x.device.type in FUSED_DEVICES:
        if vmap_dims:
            raise NotImplementedError(
                f"dropout under vmap on {x.device.type}: torch draws the mask inside its fused kernel "
                "(native_dropout's batching rule), which manualgrad does not reproduce; use inplace=True "
                "(torch's in-place dropout draws with bernoulli_ there too) or the CPU"
            )
        # torch's out-of-place dropout there is native_dropout, whose kernel draws the mask: run it
        y, mask = torch.native_dropout(x, p, True)
        return y, _pack_mask(mask, ())
    mask = _draw_mask(x, p, vmap_dims)
    scale = dropout_scale(p, x.dtype)
    # y = x * (1 / (1 - p)) * mask     (* 0/1 bytes: faster than * bool)         (*) like x
    y = x.mul_(scale) if inplace else x * scale
    packed = _pack_mask(mask, vmap_dims) if pack else torch.empty(0, dtype=torch.uint8, device=x.device)
    return y.mul_(mask.view(torch.uint8)), packed


def _dropout_again(x, p, mask):
    # y = x * (1 / (1 - p)) * mask, the forward's two products (mask 0/1 bytes)   (*) like x
    return (x * dropout_scale(p, x.dtype)) * mask


def dropout_backward(dy, packed, mask_shape, p, vmap_dims=()):
    # dx = dy * (1 / (1 - p)) * mask                       (*) like dy (the mask broadcasts)
    if p == 1:
        return dy * 0
    return dropout_backward_from_mask(dy, _unpack_mask(packed, mask_shape, vmap_dims), p)


def dropout_backward_from_mask(dy, mask, p):
    # dx = dy * (1 / (1 - p)) * mask                       (*) like dy, mask 0/1 bytes
    return (dy * dropout_scale(p, dy.dtype)).mul_(mask)


# ---------------------------------------------------------------------------------------------
# lean(): the mask redrawn from the generator state it was drawn from

_STATE_BYTES = 5056  # a CPU (mt19937) generator's state


class Replay:
    """The global CPU generator's state before forward drew the mask (a uint8 tensor): a plain
    object, an option of the Function (not a tensor input autograd would track)."""
    __slots__ = ("state",)

    def __init__(self, state):
        self.state = state


def _replayable(x, p):
    """Inside lean(), whether to keep the generator state rather than the packed mask: on the CPU
    (elsewhere torch's fused kernel draws), outside transforms and compile, when it is smaller."""
    from ..memory import in_lean

    return (in_lean() and x.device.type == "cpu" and p != 1 and torch.is_grad_enabled() and x.requires_grad
            and (x.numel() + 7) // 8 > _STATE_BYTES and not torch._C._are_functorch_transforms_active())


def _redraw(state, layout, p):
    """The mask forward drew, drawn again: bernoulli_(1 - p) on bools laid out as forward's
    (``layout``: its shape and strides), from a private generator in the state forward's draw
    started from (0/1 bytes)."""
    g = torch.Generator()
    g.set_state(state)
    mask = torch.empty_strided(*layout, dtype=torch.bool).bernoulli_(1 - p, generator=g)
    return mask.view(torch.uint8)


# Devices where torch's out-of-place dropout runs the fused native_dropout kernel instead of
# bernoulli_ (Dropout.cpp, is_fused_kernel_acceptable); its in-place dropout_ never does.
FUSED_DEVICES = ("cuda", "xpu", "lazy", "privateuseone")


def _draw_mask(x, p, vmap_dims):
    """keep ~ Bernoulli(1 - p), drawn as torch draws it: outside vmap on a tensor laid out like x
    (torch's noise is empty_like(x)); under vmap on a contiguous (*batch, *sample) tensor, the
    batch dims outermost level first (size 1 where randomness="same"), whatever x's layout, as
    torch's vmap batching rules draw it; then moved to the dims of x they belong to."""
    if not vmap_dims:
        return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
    levels = vmap_dims[::-1]  # outermost first
    dims = [d for d, _ in levels]
    batch = [1 if same else x.shape[d] for d, same in levels]
    sample = [s for d, s in enumerate(x.shape) if d not in dims]
    mask = torch.empty((*batch, *sample), dtype=torch.bool, device=x.device).bernoulli_(1 - p)
    return mask.movedim(list(range(len(dims))), dims)


def _mask_shape(shape, vmap_dims):
    shared = {d for d, same in vmap_dims if same}
    return tuple(1 if d in shared else s for d, s in enumerate(shape))


def _pack_mask(mask, vmap_dims):
    # (*batch, *sample) -> (*batch, ceil(numel(sample) / 8)), batch dims in vmap_dims order
    k = len(vmap_dims)
    m = mask.movedim([d for d, _ in vmap_dims], list(range(k)))
    return pack_bits(m.reshape((*m.shape[:k], -1)))


def _unpack_mask(packed, mask_shape, vmap_dims):
    # the inverse of _pack_mask, as 0/1 bytes of mask_shape
    dims = [d for d, _ in vmap_dims]
    sample = [s for d, s in enumerate(mask_shape) if d not in dims]
    bits = unpack_bits(packed, math.prod(sample))  #        (*batch, numel(sample))
    mask = bits.reshape((*bits.shape[:-1], *sample)).movedim(list(range(len(dims))), dims)
    return mask.view(torch.uint8)


class DropoutFunction(torch.autograd.Function):
    """Outputs (y, packed mask); the mask output is non-differentiable, for setup_context."""
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)

    @staticmethod
    def forward(x, p, inplace, vmap_dims, replay):
        y, packed = dropout_forward(x, p, inplace, vmap_dims, pack=replay is None)
        return (x if inplace else y), packed  # in place: the input object itself (Dynamo checks that)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, p, inplace, vmap_dims, replay = inputs
        _, packed = output
        ctx.p, ctx.inplace, ctx.vmap_dims = p, inplace, vmap_dims
        ctx.mask_shape = _mask_shape(x.shape, vmap_dims)
        if inplace:
            ctx.mark_dirty(x)
        ctx.mark_non_differentiable(packed)
        ctx.layout = None
        if replay is not None:
            # lean(): the state the mask was drawn from, and the mask's layout (empty_like(x)'s), not the mask
            ctx.layout = (x.shape, torch.empty_like(x, dtype=torch.bool, device="meta").stride())
            packed = replay.state
        # lean(): dropout of a tagged input (dropout(gelu(x)), say) is that input's recipe times the
        # kept mask (the mask drawn by bernoulli_ only: native_dropout's fused kernel rounds its own way)
        r = recipe_of(x, since=2 if inplace else 0)  # in place, forward wrote x twice (* scale, * mask)
        if r is not None and p != 1 and not vmap_dims and x.device.type not in FUSED_DEVICES:
            tag(ctx, output[0], _dropout_again, r, p, Recipe(_mask, (packed, ctx.layout, ctx.mask_shape, p)),
                inplace=inplace)
        ctx.save_for_backward(packed)
        ctx.save_for_forward(packed)

    @staticmethod
    def _mask(ctx):
        (kept,) = ctx.saved_tensors
        if ctx.layout is not None:
            return _redraw(kept, ctx.layout, ctx.p)
        return _unpack_mask(kept, ctx.mask_shape, ctx.vmap_dims)

    @staticmethod
    def backward(ctx, dy, _):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if ctx.p == 1:
            return dy * 0, None, None, None, None
        return dropout_backward_from_mask(dy, DropoutFunction._mask(ctx), ctx.p), None, None, None, None

    @staticmethod
    def jvp(ctx, dx, _p, _inplace, _vmap_dims, _replay):
        if ctx.p == 1:
            return (dx.mul_(0) if ctx.inplace else dx * 0), None
        mask = DropoutFunction._mask(ctx)
        if not ctx.inplace:
            return dropout_backward_from_mask(dx, mask, ctx.p), None
        # An in-place op must update its input's tangent in place too.
        return dx.mul_(dropout_scale(ctx.p, dx.dtype)).mul_(mask), None

    @staticmethod
    def vmap(info, in_dims, x, p, inplace, vmap_dims, replay):
        """As torch's dropout under torch.func.vmap: randomness="error" raises, "different"
        draws one mask per sample, "same" one mask for the whole batch; p == 1 draws nothing,
        so any randomness works."""
        bdim = in_dims[0]
        random = p != 1
        if random and info.randomness == "error":
            raise RuntimeError(
                "vmap: called random operation while in randomness error mode. Please either use the "
                "'same' or 'different' randomness flags on vmap or perform the randomness operation out of vmap"
            )
        if bdim is None:
            if not (random and info.randomness == "different"):
                return DropoutFunction.apply(x, p, inplace, vmap_dims, None), (None, None)
            if inplace:
                raise RuntimeError(
                    "vmap: dropout(inplace=True) with randomness='different' would write a different "
                    "result per sample into an input that is not batched"
                )
            x, bdim = x.expand(info.batch_size, *x.shape), 0
        # The batch dims of one sample as dims of the batched x, then this level's batch dim.
        same = info.randomness == "same"
        vmap_dims = tuple((d + (d >= bdim), s) for d, s in vmap_dims) + ((bdim, same),)
        y, packed = _apply(x, p, inplace, vmap_dims)
        if not random:
            return (y, packed), (bdim, None)
        k = len(vmap_dims) - 1  # packed is (*batch, bytes), this level's batch dim last
        if same:  # drawn once: size 1 there, expanded (a view) to the batch
            packed = packed.expand(*packed.shape[:k], info.batch_size, *packed.shape[k + 1 :])
        return (y, packed), (bdim, k)


def _mask(kept, layout, mask_shape, p):
    # the mask as 0/1 bytes, from the generator state (layout given) or the packed bits
    return _unpack_mask(kept, mask_shape, ()) if layout is None else _redraw(kept, layout, p)


def _apply(x, p, inplace, vmap_dims):
    """DropoutFunction on x; in place on a view, in place on a copy of the view, then copied
    into it: autograd refuses a Function that writes into a view and returns two tensors (y and
    the mask). The copy has the view's layout, so the draws and values are the same; copy_
    records the write into the view (and so into its base's history) as torch's own in-place
    ops do."""
    replay = Replay(torch.default_generator.get_state()) if not vmap_dims and _replayable(x, p) else None
    if inplace and x._is_view():
        y, packed = apply(DropoutFunction, x.clone(), p, True, vmap_dims, replay)
        return x.copy_(y), packed
    return apply(DropoutFunction, x, p, inplace, vmap_dims, replay)


def dropout(input, p=0.5, training=True, inplace=False):
    """Drop-in for ``torch.nn.functional.dropout``; the backward keeps the mask bit-packed
    (inside ``manualgrad.lean()``, the generator state to redraw it from when that is smaller).

    Like torch, training=False, p=0 and empty inputs return ``input`` itself (no graph node).
    """
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not p >= 0.0:  # nan passes the check above, then torch's kernel raises RuntimeError
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")
    p = float(p)
    if p == 0 or not training or input.numel() == 0:
        return input
    if p != 1 and not input.is_floating_point():
        if input.is_complex():  # torch: bernoulli_ is not implemented for complex
            raise NotImplementedError(f"dropout: complex input ({input.dtype}) is not supported, as in torch")
        raise RuntimeError(f"dropout: expected a floating point input, got {input.dtype}")
    return _apply(input, p, inplace, ())[0]
