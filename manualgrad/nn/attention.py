"""MultiheadAttention: the torch class with forward rebuilt from manualgrad's linear, attention,
softmax and dropout (torch.nn.functional.multi_head_attention_forward, step by step).

Reshapes, transposes and (for add_bias_kv / add_zero_attn) concatenations are torch's views and
ops; with need_weights=True, the two batched matmuls around the softmax are torch's bmm, as the
attention weights must then be materialised and returned anyway. torch's inference fast path
(``torch._native_multi_head_attention``) is not taken: forward is always the general path,
which gives the same values.
"""
import math

import torch
import torch.nn.functional as TF

from .. import functional as F


def _in_projection(query, key, value, m):
    """q, k, v = the input projections (torch's _in_projection_packed / _in_projection)."""
    E = m.embed_dim
    w, b = m.in_proj_weight, m.in_proj_bias
    if not m._qkv_same_embed_dim:
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return F.linear(query, m.q_proj_weight, b_q), F.linear(key, m.k_proj_weight, b_k), F.linear(value, m.v_proj_weight, b_v)
    if key is value:
        if query is key:
            # self-attention: one linear, then split           (L, N, 3E) -> 3 x (L, N, E)
            proj = F.linear(query, w, b)
            return proj.reshape(*proj.shape[:-1], 3, E).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous().unbind(0)
        # encoder-decoder: q, then k and v from one linear
        w_q, w_kv = w.split([E, 2 * E])
        b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
        kv = F.linear(key, w_kv, b_kv)
        kv = kv.reshape(*kv.shape[:-1], 2, E).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return F.linear(query, w_q, b_q), kv[0], kv[1]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` with hand-written backwards for its
    projections and attention. Parameters, state_dict and repr are torch's."""

    # forward uses out_proj's weight and bias directly, never out_proj's own forward:
    # convert(strict=True) need not list it.
    covers_submodules = True

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError("MultiheadAttention: nested tensors are not supported by manualgrad")
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            # (N, L, E) -> (L, N, E), keeping q is k is v where it holds (self-attention)
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
        """torch.nn.functional.multi_head_attention_forward on (L, N, E) inputs."""
        num_heads, training, dropout_p = self.num_heads, self.training, self.dropout
        is_batched = TF._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
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
                is_causal = False
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        head_dim = embed_dim // num_heads
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if not self._qkv_same_embed_dim and key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")

        # projections                                          (L, N, E), (S, N, E), (S, N, E)
        q, k, v = _in_projection(query, key, value, self)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                        f"{(bsz * num_heads, tgt_len, src_len)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        if self.bias_k is not None and self.bias_v is not None:
            # one learned key / value appended to the sequence  (S + 1, N, E)
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = TF.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = TF.pad(key_padding_mask, (0, 1))

        # heads                                                (N H, L, hd), (N H, S, hd)
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

        if self.add_zero_attn:
            # one zero key / value appended                     (N H, S + 1, hd)
            zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = TF.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = TF.pad(key_padding_mask, (0, 1))

        src_len = k.size(1)
        if key_padding_mask is not None:
            TF._check_key_padding_mask(key_padding_mask, src_len, bsz)
            # (N, S) -> (N H, 1, S), added to the attention mask
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

        if not training:
            dropout_p = 0.0

        if need_weights:
            if is_causal and attn_mask is None:
                raise AssertionError("FIXME: is_causal not implemented for need_weights")
            # W = softmax(Q K^T / sqrt(hd) + mask)              (N H, L, S)
            scores = torch.bmm(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1))
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v)  #                      (N H, L, hd)
            out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights

        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)  # (N, H, L, hd)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
        return out, None
