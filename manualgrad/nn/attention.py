"""MultiheadAttention: the torch class whose forward calls manualgrad's
multi_head_attention_forward (manualgrad/ops/multi_head_attention.py), as torch's module calls
torch.nn.functional.multi_head_attention_forward.

torch's inference fast path (``torch._native_multi_head_attention``) is not taken: forward is
always the general path, which gives the same values.
"""
import torch

from ..ops.multi_head_attention import multi_head_attention_forward, reject_nested


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
        reject_nested("MultiheadAttention", query, key, value)
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
        out, weights = multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights
