"""scaled_dot_product_attention: O = dropout(softmax(scale Q K^T + mask)) V.

Shapes: Q (*, L, E), K (*, S, E), V (*, S, Ev), O (*, L, Ev); ``*`` batch dims that broadcast
(heads at dim -3). mask: bool (True = take part) or float (added), broadcastable to (*, L, S).

    S  = scale Q K^T + mask                  (*, L, S)   scores
    P  = softmax(S)                          (*, L, S)   rows where S is all -inf give P = 0
    Pd = P * D                               (*, L, S)   D = keep / (1 - p), the dropout mask
    O  = Pd V                                (*, L, Ev)

    dV = Pd^T dO                             (*, S, Ev)
    dP = (dO V^T) * D                        (*, L, S)
    dS = P * (dP - rowsum(dP * P))           (*, L, S)   softmax backward
    dQ = scale dS K,   dK = scale dS^T Q,   dmask = dS (summed to the mask's shape)

Memory: backward recomputes P from the saved inputs Q, K (and the mask) instead of keeping the
(L x S) attention matrix, and redraws the dropout mask from the generator state it was drawn
from (a few KB): nothing of size L x S is saved. Recomputing from inputs also keeps double
backward right: P is then a differentiable function of Q and K, not a constant. A fully
masked row gives O = 0 and zero gradients, as torch's kernels give (torch's math path uses a
"safe" softmax there).

The forward without dropout is torch's own fused kernel; with dropout, the math above.

Dropout draws torch's mask: on the CPU torch runs SDPA with dropout through its math path
(``_scaled_dot_product_attention_math``, aten/src/ATen/native/transformers/attention.cpp), which
applies ``at::dropout`` to P: ``bernoulli_(1 - p)`` on a contiguous tensor of P's shape and dtype
from the global generator, divided by (1 - p). Forward draws exactly that, so under the same
seed the output, the gradients and the generator's state afterwards are torch's; backward and
jvp replay the draw from the state saved before it, in a private generator. p = 1 draws
nothing, as in torch. Elsewhere (CUDA...) torch's fused kernels draw the mask inside the
kernel with their own counter-based generator, which cannot be replayed here: dropout there
raises NotImplementedError.

Under torch.compile the generator's state cannot be read while tracing: there forward draws
the same mask (in the graph) and keeps it bit-packed (L S / 8 bytes a head) for backward
instead of the state.
"""
import math

import torch

from ._apply import LOWER, apply
from ._checks import can_write_inplace, is_transformed
from .dropout import pack_bits, unpack_bits
from .softmax import softmax_backward, softmax_jvp

# The ``state`` option under torch.compile: forward outputs its dropout mask bit-packed, to keep.
KEEP_MASK = "keep the mask"


def _scale(q, scale):
    if scale is None and q.size(-1) == 0:
        return 1.0  # E = 0: every score is an empty sum, 0 whatever the scale
    return 1.0 / math.sqrt(q.size(-1)) if scale is None else scale


def repeat_heads(t, n_heads):
    """GQA: K or V with H_k heads repeated to the query's n_heads (each head n_heads // H_k times)."""
    return t if t.size(-3) == n_heads else t.repeat_interleave(n_heads // t.size(-3), -3)


def _sum_heads(g, h):
    """The transpose of repeat_heads: the gradient of the repeated heads summed per original head."""
    return g if g.size(-3) == h else g.reshape(*g.shape[:-3], h, -1, *g.shape[-2:]).sum(-3)


def _sum_to(g, shape):
    # the transpose of broadcasting: sum over broadcast dims (a no-op when shapes agree)
    return g if g.shape == shape else g.sum_to_size(shape)


def dropout_keep(probs, p, state=None):
    """D = keep / (1 - p), keep ~ Bernoulli(1 - p): torch's at::dropout noise for the attention
    probabilities ``probs``, drawn as torch draws it (``empty_like(P).bernoulli_(1 - p)``, also
    under vmap) from the global generator (state None or KEEP_MASK: forward), or replayed from
    ``state``, the global generator's state before forward drew it (backward, jvp), in a private
    generator; or, under torch.compile, unpacked from the mask forward kept (``state`` a tensor)."""
    if p == 1:
        return torch.zeros_like(probs)
    if isinstance(state, torch.Tensor):
        # (as 0/1 bytes, not bools: inductor's CPU code for a bool -> float cast does not compile)
        keep = unpack_bits(state, probs.numel()).view(torch.uint8).view(probs.shape).to(probs.dtype)
        return keep.div_(1 - p)  # the same 0/1 values, the same division
    g = None
    if isinstance(state, GeneratorState):
        g = torch.Generator(device=probs.device)
        g.set_state(state.tensor)
    keep = torch.empty_like(probs).bernoulli_(1 - p, generator=g)
    return keep.div_(1 - p)  # in P's dtype, rounded as torch's noise.div_(1 - p)


def _fits(mask, s):
    return torch.broadcast_shapes(mask.shape, s.shape) == s.shape


def _times(t, scale):
    # t * scale, in place on a fresh t where allowed
    return t.mul_(scale) if can_write_inplace(t) else t * scale


def attention_probs(q, k, mask, is_causal, scale):
    """P = softmax(scale Q K^T + mask), fully masked rows 0. k already has the query's heads."""
    # (a fresh S may be updated in place outside double backward and transforms; the mask
    #  must then broadcast into S's shape)
    inplace = can_write_inplace(q, k) and (mask is None or not is_transformed(mask))
    # S = (scale Q) K^T                                      (*, L, S)
    s = torch.matmul(q * scale, k.transpose(-2, -1))
    if is_causal:
        # top-left aligned: query i sees keys j <= i           (L, S)
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril_()
    if mask is None:
        return torch.softmax(s, -1)
    if mask.dtype == torch.bool:
        # S = -inf where the mask is False                    (*, L, S)
        s = s.masked_fill_(~mask, -math.inf) if inplace and _fits(mask, s) else s.masked_fill(~mask, -math.inf)
    else:
        # S = S + mask                                         (*, L, S)
        s = s.add_(mask) if inplace and _fits(mask, s) else s + mask
    p = torch.softmax(s, -1)
    if is_causal or s.size(-1) == 0:
        return p  # every row sees key 0, or there are no keys
    # P = 0 on rows where every score is -inf (softmax gives nan there)   (*, L, S)
    dead = s.amax(-1, keepdim=True) == -math.inf
    return p.masked_fill_(dead, 0) if inplace else p.masked_fill(dead, 0)


def sdpa_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    """O, and the dropout noise D it drew (None without dropout)."""
    if dropout_p == 0:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        ), None
    h = q.size(-3) if q.dim() >= 3 else None
    kr, vr = (repeat_heads(k, h), repeat_heads(v, h)) if enable_gqa else (k, v)
    p = attention_probs(q, kr, mask, is_causal, _scale(q, scale))
    d = dropout_keep(p, dropout_p)
    # O = (P * D) V                                          (*, L, Ev)
    return torch.matmul(p.mul_(d), vr), d


def sdpa_backward(do, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, state, needs):
    """Gradients (dQ, dK, dV, dmask); ``needs`` says which to compute."""
    dq = dk = dv = dmask = None
    if do.numel() == 0 or k.size(-2) == 0:
        # no output or no keys (O = 0): every gradient is a sum over nothing, 0; torch's kernel
        # leaves the mask out of the graph then (no dmask)
        zeros = [t.new_zeros(t.shape) if need else None for t, need in zip((q, k, v), needs)]
        return (*zeros, None)
    scale = _scale(q, scale)
    if _causal_blocks_apply(do, q, k, v, mask, dropout_p, is_causal, enable_gqa):
        return (*causal_backward_blocked(do, q, k, v, scale, needs), None)
    h = q.size(-3) if q.dim() >= 3 else None
    kr, vr = (repeat_heads(k, h), repeat_heads(v, h)) if enable_gqa else (k, v)
    # P recomputed from the inputs (not saved)               (*, L, S)
    p = attention_probs(q, kr, mask, is_causal, scale)
    d = dropout_keep(p, dropout_p, state) if dropout_p else None
    if needs[2]:
        pd = p if d is None else p * d  #                    (*, L, S)
        # dV = Pd^T dO  (then summed over repeated heads and broadcast dims)   (*, S, Ev)
        dv = torch.matmul(pd.transpose(-2, -1), do)
        dv = _sum_to(_sum_heads(dv, v.size(-3)) if enable_gqa else dv, v.shape)
    if needs[0] or needs[1] or needs[3]:
        # dP = (dO V^T) * D                                    (*, L, S)
        dp = torch.matmul(do, vr.transpose(-2, -1))
        if d is not None:
            dp = dp.mul_(d) if can_write_inplace(dp, d) else dp * d
        # dS = P * (dP - rowsum(dP * P))                       (*, L, S)
        ds = softmax_backward(dp, p, -1)
        if needs[0]:
            # dQ = scale dS K                                  (*, L, E)
            dq = _sum_to(_times(torch.matmul(ds, kr), scale), q.shape)
        if needs[1]:
            # dK = scale dS^T Q                                (*, S, E)
            dk = _times(torch.matmul(ds.transpose(-2, -1), q), scale)
            dk = _sum_to(_sum_heads(dk, k.size(-3)) if enable_gqa else dk, k.shape)
        if needs[3]:
            # dmask = dS, summed over the dims the mask broadcasts along
            dmask = _sum_to(ds, mask.shape)
    return dq, dk, dv, dmask


# Causal attention without dropout, L = S: a faster form of the backward above, by blocks of
# query rows. Query rows [i0, i1) see keys [0, i1) only (P = 0 and dS = 0 beyond), so each
# block's products stop at key i1: with 4 blocks the five L x S products do 5/8 of the plain
# work (bench_lean's GPT: attention backward ~1.3x faster). Same formulas, exact up to float
# rounding (dK, dV summed block by block); the plain form above stays the tested reference.
CAUSAL_BLOCK_ROWS = 64


def _causal_blocks_apply(do, q, k, v, mask, dropout_p, is_causal, enable_gqa):
    L = q.size(-2)
    return (
        is_causal and mask is None and dropout_p == 0 and not enable_gqa and q.dim() >= 2
        and L >= 2 * CAUSAL_BLOCK_ROWS and k.size(-2) == L
        and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] == do.shape[:-2]
        and can_write_inplace(do, q, k, v)
    )


def causal_backward_blocked(do, q, k, v, scale, needs):
    """(dQ, dK, dV) of causal attention, query rows by blocks of CAUSAL_BLOCK_ROWS."""
    L = q.size(-2)
    dq = torch.empty_like(q) if needs[0] else None
    dk = torch.zeros_like(k) if needs[1] else None
    dv = torch.zeros_like(v) if needs[2] else None
    qs = q * scale  # scale Q                                 (*, L, E)
    for i0 in range(0, L, CAUSAL_BLOCK_ROWS):
        i1 = min(i0 + CAUSAL_BLOCK_ROWS, L)
        kb, vb, dob = k[..., :i1, :], v[..., :i1, :], do[..., i0:i1, :]
        # S_b = scale Q_b K_{:i1}^T, -inf where key j > query i    (*, B, i1)
        s = torch.matmul(qs[..., i0:i1, :], kb.transpose(-2, -1))
        keep = torch.ones(i1 - i0, i1, dtype=torch.bool, device=q.device).tril_(i0)
        p = torch.softmax(s.masked_fill_(~keep, -math.inf), -1)
        if needs[2]:
            # dV_{:i1} += P_b^T dO_b                           (*, i1, Ev)
            dv[..., :i1, :].add_(torch.matmul(p.transpose(-2, -1), dob))
        if needs[0] or needs[1]:
            # dS_b = P_b * (dP_b - rowsum(dP_b * P_b)), dP_b = dO_b V_{:i1}^T   (*, B, i1)
            ds = softmax_backward(torch.matmul(dob, vb.transpose(-2, -1)), p, -1)
            if needs[0]:
                # dQ_b = scale dS_b K_{:i1}                    (*, B, E)
                dq[..., i0:i1, :] = torch.matmul(ds, kb).mul_(scale)
            if needs[1]:
                # dK_{:i1} += scale dS_b^T Q_b                 (*, i1, E)
                dk[..., :i1, :].add_(torch.matmul(ds.transpose(-2, -1), qs[..., i0:i1, :]))
    return dq, dk, dv


def sdpa_jvp(dq, dk, dv, dmask, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, state):
    scale = _scale(q, scale)
    h = q.size(-3) if q.dim() >= 3 else None
    kr, vr = (repeat_heads(k, h), repeat_heads(v, h)) if enable_gqa else (k, v)
    p = attention_probs(q, kr, mask, is_causal, scale)
    d = dropout_keep(p, dropout_p, state) if dropout_p else None
    # dS = scale (dQ K^T + Q dK^T) + dmask                   (*, L, S)
    ds = None
    if dq is not None:
        ds = torch.matmul(dq * scale, kr.transpose(-2, -1))
    if dk is not None:
        dkr = repeat_heads(dk, h) if enable_gqa else dk
        t = torch.matmul(q * scale, dkr.transpose(-2, -1))
        ds = t if ds is None else ds + t
    if dmask is not None:
        ds = dmask.expand(p.shape) if ds is None else ds + dmask
    out = None
    if ds is not None:
        # dP = P * (dS - rowsum(P * dS)), then dropped        (*, L, S)
        dp = softmax_jvp(ds, p, -1)
        # dO = (dP * D) V                                      (*, L, Ev)
        out = torch.matmul(dp if d is None else dp * d, vr)
    if dv is not None:
        dvr = repeat_heads(dv, h) if enable_gqa else dv
        # dO += (P * D) dV                                     (*, L, Ev)
        t = torch.matmul(p if d is None else p * d, dvr)
        out = t if out is None else out + t
    return out


class ScaledDotProductAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, state)``: state is the
    global generator's state before forward draws the dropout mask (a GeneratorState; None
    without dropout; KEEP_MASK under torch.compile). Outputs (O, the dropout mask bit-packed
    where state is KEEP_MASK, else empty); the mask output is non-differentiable, for
    setup_context."""
    autocast = LOWER  # autocast: in the autocast dtype (torch's lower-precision list)

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, state):
        o, d = sdpa_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)
        if state is KEEP_MASK:  # kept where D != 0, i.e. D = 1 / (1 - p)
            return o, pack_bits((d != 0).reshape(-1))
        return o, torch.empty(0, dtype=torch.uint8, device=o.device)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, *options = inputs
        packed = output[1]
        ctx.mark_non_differentiable(packed)
        ctx.options = options
        # the inputs only: P is recomputed in backward (no L x S tensor saved), the dropout
        # mask redrawn from the generator state (under torch.compile: the packed mask as well)
        kept = (packed,) if options[-1] is KEEP_MASK else ()
        ctx.save_for_backward(q, k, v, mask, *kept)
        ctx.save_for_forward(q, k, v, mask)

    @staticmethod
    def backward(ctx, do, _):
        q, k, v, mask, *kept = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if not any(needs):
            return (None,) * 9
        options = (*ctx.options[:-1], kept[0]) if kept else ctx.options  # the packed mask as the state
        return (*sdpa_backward(do, q, k, v, mask, *options, needs), None, None, None, None, None)

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, *_):
        q, k, v, mask = ctx.saved_tensors
        if mask is None or mask.dtype == torch.bool:
            dmask = None
        return sdpa_jvp(dq, dk, dv, dmask, q, k, v, mask, *ctx.options), None


def _check(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """torch's checks, for the dropout path (without dropout, torch's kernel makes them)."""
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    # torch's shape, dtype and mask checks, run on meta tensors (no data, no compute)
    meta = [t if t is None else t.detach().to("meta") for t in (query, key, value, attn_mask)]
    torch.nn.functional.scaled_dot_product_attention(*meta[:3], attn_mask=meta[3], is_causal=is_causal, enable_gqa=enable_gqa)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` with a hand-written
    backward that recomputes the attention matrix instead of saving it.

    With ``0 < dropout_p < 1`` the mask is torch's CPU mask, drawn from torch's global generator
    as torch draws it (same seed, same output, gradients and generator state afterwards); on
    other devices it raises NotImplementedError (see the module docstring).
    """
    state = None
    if dropout_p:
        _check(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        if dropout_p < 1:
            state = _generator_state(query.device)
    return apply(
        ScaledDotProductAttentionFunction, query, key, value, attn_mask, float(dropout_p), is_causal, scale, enable_gqa, state
    )[0]


def _generator_state(device):
    """The state of the global generator forward's dropout draws from, for backward to replay;
    under torch.compile, where it cannot be read, KEEP_MASK: forward keeps the mask it draws."""
    if device.type == "meta":  # no data, nothing drawn
        return None
    if device.type != "cpu":
        raise NotImplementedError(
            f"scaled_dot_product_attention with dropout on {device.type}: torch's fused kernels draw the "
            "dropout mask inside the kernel, which manualgrad cannot reproduce (its mask is torch's CPU one); "
            "use dropout_p=0.0 or run on the CPU"
        )
    if torch.compiler.is_compiling():
        return KEEP_MASK
    return GeneratorState(torch.default_generator.get_state())


class GeneratorState:
    """A generator's state (a uint8 tensor) as a plain object: an option of the Function, not a
    tensor input, which autograd and the torch.func transforms would track and wrap."""
    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor
