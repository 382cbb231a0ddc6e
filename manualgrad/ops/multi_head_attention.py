"""multi_head_attention_forward: torch.nn.functional's, built from manualgrad's Functions.

L target length, S source length, N batch, E embed dim, H heads, hd = E / H:

    q, k, v = x W_q^T + b_q, ...                (L, N, E), (S, N, E), (S, N, E)    linear
    k, v += [bias_k], [bias_v]                  (S + 1, N, E)         optional, appended
    q, k, v split into heads                    (N H, L, hd), (N H, S, hd)
    k, v += [0]                                 (N H, S + 1, hd)      add_zero_attn
    mask = attn_mask + key_padding_mask         (N H or 1, L or 1, S) float, -inf = masked
    O = dropout(softmax(q k^T / sqrt(hd) + mask)) v                   scaled_dot_product_attention
    out = O W_out^T + b_out                     (L, N, E)             linear

With need_weights=True the attention weights must be materialised and returned, so, as torch
does, the scores are a baddbmm (bmm without a mask), then softmax, dropout and a bmm: each one a
manualgrad Function too. Every step with FLOPs in backward is hand-written; the reshapes,
transposes, concatenations and mask padding are torch's views and copies (no backward FLOPs).

Inputs, masks, checks and exceptions are torch's (its private ``_mha_shape_check``,
``_canonical_mask`` and ``_check_key_padding_mask`` are reused as they are). Reshapes are
written with ``reshape``/``view``, never ``Tensor.unflatten``, which Dynamo cannot trace inside
a TorchFunctionMode (``manualgrad.enable()`` under torch.compile).
"""
import math

import torch
import torch.nn.functional as TF

from .attention import scaled_dot_product_attention
from .dropout import dropout
from .linear import linear
from .matmul import baddbmm, bmm
from .softmax import softmax


def reject_nested(name, *tensors):
    """Nested tensors take torch's own fast path only: NotImplementedError (the mode then runs torch)."""
    if any(t.is_nested for t in tensors):
        raise NotImplementedError(f"{name}: nested tensors are not supported by manualgrad")


def _split_last(t, n, e):
    """(..., n e) -> n contiguous tensors (..., e): torch's unflatten(-1, (n, e)).unsqueeze(0)
    .transpose(0, -2).squeeze(-2).contiguous(), with reshape in place of unflatten."""
    return t.reshape(*t.shape[:-1], n, e).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous().unbind(0)


def _in_projection_packed(q, k, v, w, b):
    """torch's _in_projection_packed: w (3E, E) holds W_q, W_k, W_v stacked; q is k is v is one
    linear (self-attention), k is v one linear for both (encoder-decoder)."""
    e = q.size(-1)
    if k is v:
        if q is k:
            # self-attention: one linear, then split        (L, N, 3E) -> 3 x (L, N, E)
            return _split_last(linear(q, w, b), 3, e)
        w_q, w_kv = w.split([e, 2 * e])
        b_q, b_kv = (None, None) if b is None else b.split([e, 2 * e])
        return (linear(q, w_q, b_q), *_split_last(linear(k, w_kv, b_kv), 2, e))
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return linear(q, w_q, b_q), linear(k, w_k, b_k), linear(v, w_v, b_v)


def _in_projection(q, k, v, w_q, w_k, w_v, b):
    """torch's _in_projection: separate W_q (E, E), W_k (E, kdim), W_v (E, vdim), bias packed (3E,)."""
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    e = q.size(-1)
    for name, x, w, bias in (("query", q, w_q, b_q), ("key", k, w_k, b_k), ("value", v, w_v, b_v)):
        if w.shape != (e, x.size(-1)):
            raise AssertionError(f"expecting {name} weights shape of {(e, x.size(-1))}, but got {w.shape}")
        if bias is not None and bias.shape != (e,):
            raise AssertionError(f"expecting {name} bias shape of {(e,)}, but got {bias.shape}")
    return linear(q, w_q, b_q), linear(k, w_k, b_k), linear(v, w_v, b_v)


def _attn_mask_3d(attn_mask, tgt_len, src_len, batch_heads):
    """A 2-D (L, S) mask as (1, L, S); a 3-D one must be (N H, L, S)."""
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2:
        if attn_mask.shape != (tgt_len, src_len):
            raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}.")
        return attn_mask.unsqueeze(0)
    if attn_mask.dim() == 3:
        if attn_mask.shape != (batch_heads, tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(batch_heads, tgt_len, src_len)}."
            )
        return attn_mask
    raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")


def _heads(t, static, name, batch_heads, head_dim):
    """(S, N, E) -> (N H, S, hd), or the given static key / value (N H, S, hd) in its place."""
    if static is None:
        return t.view(t.shape[0], batch_heads, head_dim).transpose(0, 1)
    if static.size(0) != batch_heads:
        raise AssertionError(f"expecting {name}.size(0) of {batch_heads}, but got {static.size(0)}")
    if static.size(2) != head_dim:
        raise AssertionError(f"expecting {name}.size(2) of {head_dim}, but got {static.size(2)}")
    return static


def _pad_masks(attn_mask, key_padding_mask):
    # one more key position, not masked (0 in a float mask)
    return tuple(None if m is None else TF.pad(m, (0, 1)) for m in (attn_mask, key_padding_mask))


def _weights_path(q, k, v, attn_mask, dropout_p, is_causal):
    """O and W = dropout(softmax(q k^T / sqrt(hd) + mask)), W materialised.   (N H, L, hd), (N H, L, S)"""
    if is_causal and attn_mask is None:
        raise AssertionError("FIXME: is_causal not implemented for need_weights")
    q_scaled = q * math.sqrt(1.0 / float(q.size(-1)))
    # scores = mask + (q / sqrt(hd)) k^T                      (N H, L, S)
    k_t = k.transpose(-2, -1)
    scores = bmm(q_scaled, k_t) if attn_mask is None else baddbmm(attn_mask, q_scaled, k_t)
    weights = softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = dropout(weights, p=dropout_p)
    return bmm(weights, v), weights  #                         (N H, L, hd)


def multi_head_attention_forward(
    query,
    key,
    value,
    embed_dim_to_check,
    num_heads,
    in_proj_weight,
    in_proj_bias,
    bias_k,
    bias_v,
    add_zero_attn,
    dropout_p,
    out_proj_weight,
    out_proj_bias,
    training=True,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    use_separate_proj_weight=False,
    q_proj_weight=None,
    k_proj_weight=None,
    v_proj_weight=None,
    static_k=None,
    static_v=None,
    average_attn_weights=True,
    is_causal=False,
):
    """Drop-in for ``torch.nn.functional.multi_head_attention_forward`` (the general path of
    ``nn.MultiheadAttention``) with hand-written backwards for the projections and attention.

    query (L, N, E) or unbatched (L, E); key (S, N, kdim), value (S, N, vdim) (or (S, kdim),
    (S, vdim)). Returns (out (L, N, E) or (L, E), weights or None): weights (N, L, S) averaged
    over heads or (N, H, L, S) per head, without the N for unbatched input. Bool masks: True =
    masked; float masks are added to the scores. Dropout draws torch's mask in either path
    (need_weights=True: dropout on the weights; False: sdpa's dropout_p, as torch's).
    Nested tensors raise NotImplementedError.
    """
    reject_nested("multi_head_attention_forward", query, key, value)
    is_batched = TF._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        # (L, E) -> (L, 1, E), squeezed off the result; as torch, q, k, v are then distinct tensors
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]

    # masks: bool -> float (-inf where True), as torch
    key_padding_mask = TF._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=TF._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
            "`generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the hint: sdpa's is_causal replaces the mask
    else:
        attn_mask = TF._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal

    if embed_dim != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    if use_separate_proj_weight:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")
    elif key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")

    # projections                                              (L, N, E), (S, N, E), (S, N, E)
    if not use_separate_proj_weight:
        if in_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
        q, k, v = _in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    else:
        for name, w in (("q", q_proj_weight), ("k", k_proj_weight), ("v", v_proj_weight)):
            if w is None:
                raise AssertionError(f"use_separate_proj_weight is True but {name}_proj_weight is None")
        q, k, v = _in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, in_proj_bias)

    batch_heads = bsz * num_heads
    attn_mask = _attn_mask_3d(attn_mask, tgt_len, src_len, batch_heads)
    if bias_k is not None and bias_v is not None:
        if static_k is not None:
            raise AssertionError("bias cannot be added to static key.")
        if static_v is not None:
            raise AssertionError("bias cannot be added to static value.")
        # one learned key / value appended to the sequence     (S + 1, N, E)
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
    elif bias_k is not None:
        raise AssertionError("bias_k is set but bias_v is None")
    elif bias_v is not None:
        raise AssertionError("bias_v is set but bias_k is None")

    # heads                                                    (N H, L, hd), (N H, S, hd)
    q = q.view(tgt_len, batch_heads, head_dim).transpose(0, 1)
    k = _heads(k, static_k, "static_k", batch_heads, head_dim)
    v = _heads(v, static_v, "static_v", batch_heads, head_dim)
    if add_zero_attn:
        # one zero key / value appended                        (N H, S + 1, hd)
        k = torch.cat([k, torch.zeros((batch_heads, 1, head_dim), dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros((batch_heads, 1, head_dim), dtype=v.dtype, device=v.device)], dim=1)
        attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
    src_len = k.size(1)

    if key_padding_mask is not None:
        TF._check_key_padding_mask(key_padding_mask, src_len, bsz)
        # (N, S) -> (N H, 1, S), added to the attention mask
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
        key_padding_mask = key_padding_mask.reshape(batch_heads, 1, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0

    weights = None
    if need_weights:
        out, weights = _weights_path(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)  # (N H, L, hd) -> (L N, E)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if attn_mask is not None:
            # (1, L, S) -> (1, 1, L, S); (N H, L | 1, S) -> (N, H, L | 1, S)
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)  # (N, H, L, hd)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)  #               (L N, E)
    out = linear(out, out_proj_weight, out_proj_bias)
    out = out.view(tgt_len, bsz, out.size(1))  #                  (L, N, E)
    if not is_batched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights
