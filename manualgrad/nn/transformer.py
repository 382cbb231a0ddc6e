"""Transformer layers: torch's TransformerEncoderLayer, TransformerDecoderLayer,
TransformerEncoder, TransformerDecoder and Transformer, running on manualgrad's layers.

A transformer layer is made of layers that already have twins (MultiheadAttention, Linear,
LayerNorm, Dropout): ``convert`` swaps them too, so torch's own layer code would already call
manualgrad for them. What a twin adds:

- the activation. torch stores ``activation="relu"`` / ``"gelu"`` as the function
  ``torch.nn.functional.relu`` / ``gelu``, which would run torch's backward: it is routed to
  manualgrad.functional's twin of the same name (any torch.nn.functional activation is; an
  activation module such as ``nn.GELU()`` is a submodule, converted with the layer; any other
  callable runs as it is).
- the fast path. In eval, torch's encoder layer runs one fused kernel
  (``torch._transformer_encoder_layer_fwd``) with no autograd, and the encoder packs a padded
  batch into a nested tensor. torch takes it only when no gradient is needed, so a twin does
  the same: when no gradient can flow (grad mode off, or neither the input nor any parameter
  requires grad) it calls torch's forward, fast path and all, and its outputs are torch's bit
  for bit. Whenever a gradient is needed, the layer is computed as below from manualgrad's
  Functions.

Post-norm (norm_first=False) and pre-norm (norm_first=True), as torch's forward::

    x = norm1(x + dropout1(self_attn(x)))            x = x + dropout1(self_attn(norm1(x)))
    x = norm2(x + dropout2(cross_attn(x, mem)))      x = x + dropout2(cross_attn(norm2(x), mem))
    x = norm3(x + dropout3(ff(x)))                   x = x + dropout3(ff(norm3(x)))
    ff(x) = linear2(dropout(activation(linear1(x))))

(the encoder layer has no cross-attention; its ff dropout is ``dropout2``). The residual adds
are torch's AddBackward nodes, which pass the gradient through (no FLOPs). Masks, their checks
and ``is_causal`` detection are torch's own (the private helpers its forward uses).
"""
import torch
import torch.nn.functional as TF
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from .. import functional as MF


def _activation(fn):
    """torch.nn.functional's ``fn`` -> manualgrad.functional's twin; anything else as it is."""
    name = getattr(fn, "__name__", None)
    if name is not None and getattr(TF, name, None) is fn and hasattr(MF, name):
        return getattr(MF, name)
    return fn


def _needs_grad(module, *tensors):
    """Whether a gradient can flow through ``module``'s forward on ``tensors``."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """Drop-in for ``torch.nn.TransformerEncoderLayer``: self-attention and feed-forward with
    hand-written backwards. Constructor, parameters, state_dict and repr are torch's."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if not _needs_grad(self, src):  # no autograd: torch's forward (its fused eval kernel)
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        # torch's mask checks and conversion to float masks
        src_key_padding_mask = TF._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=TF._none_or_dtype(src_mask),
            other_name="src_mask", target_type=src.dtype,
        )
        src_mask = TF._canonical_mask(
            mask=src_mask, mask_name="src_mask", other_type=None, other_name="", target_type=src.dtype, check_other=False,
        )
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _ff_block(self, x):
        x = self.linear2(self.dropout(_activation(self.activation)(self.linear1(x))))
        return self.dropout2(x)


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """Drop-in for ``torch.nn.TransformerDecoderLayer``: self-attention, cross-attention and
    feed-forward with hand-written backwards. Constructor, parameters, state_dict and repr are
    torch's. (torch has no fast path for the decoder layer.)"""

    def forward(
        self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
        tgt_is_causal=False, memory_is_causal=False,
    ):
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _ff_block(self, x):
        x = self.linear2(self.dropout(_activation(self.activation)(self.linear1(x))))
        return self.dropout3(x)


class TransformerEncoder(torch.nn.TransformerEncoder):
    """Drop-in for ``torch.nn.TransformerEncoder``: a stack of encoder layers and an optional
    final norm. Constructor, parameters, state_dict and repr are torch's.

    The nested-tensor path: in eval, with ``enable_nested_tensor`` and a left-aligned
    ``src_key_padding_mask`` (and no ``mask``), torch packs the batch into a nested tensor,
    runs every layer on the real tokens only and pads the result back with zeros, so padded
    positions come out as zeros (then ``norm``, if any, is applied to them). torch does this
    only when neither src nor the first layer's parameters require grad; otherwise its padded
    positions hold the layers' values like any other. With no gradient anywhere the twin
    calls torch's forward. With gradients, where torch would still nest (a frozen first layer
    under trainable ones: torch itself then fails in the second layer on the nested tensor),
    the twin runs the padded batch with the key padding mask, which gives the real tokens
    the same values, and zeros the padded positions as torch's nested path does. So does it
    under a TorchFunctionMode such as ``manualgrad.enable()``, where torch's checks would not
    nest: the twin's output is the same with and without the mode.
    """

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        if not _needs_grad(self, src) and not torch.overrides.has_torch_function((src,)):
            # no autograd and no mode: torch's forward (nested tensors, fused kernels)
            return super().forward(src, mask, src_key_padding_mask, is_causal)
        src_key_padding_mask = TF._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=TF._none_or_dtype(mask),
            other_name="mask", target_type=src.dtype,
        )
        mask = TF._canonical_mask(
            mask=mask, mask_name="mask", other_type=None, other_name="", target_type=src.dtype, check_other=False,
        )
        first = self.layers[0]
        nested = self._nests(src, mask, src_key_padding_mask, first)
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, first.self_attn.batch_first))
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if nested:
            # torch's to_padded_tensor(0.0): padded positions are zeros   (N, S, E)
            output = output.masked_fill((src_key_padding_mask != 0).unsqueeze(-1), 0.0)
        if self.norm is not None:
            output = self.norm(output)
        return output

    def _nests(self, src, mask, src_key_padding_mask, first):
        """torch's conditions for packing src into a nested tensor, out of any TorchFunctionMode
        (the padding mask is float, 0 = keep, as torch's after _canonical_mask)."""
        return (
            not (torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in first.parameters())))
            and torch.backends.mha.get_fastpath_enabled()
            and getattr(self, "use_nested_tensor", False)
            and not first.training
            and src.dim() == 3
            and src_key_padding_mask is not None
            and mask is None
            and not torch.is_autocast_enabled()
            and (src.device.type == "cpu" or src.device.type in ("cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name))
            and (not getattr(self, "mask_check", True) or torch._nested_tensor_from_mask_left_aligned(src, src_key_padding_mask.logical_not()))
        )


class TransformerDecoder(torch.nn.TransformerDecoder):
    """Drop-in for ``torch.nn.TransformerDecoder``: a stack of decoder layers and an optional
    final norm. Constructor, parameters, state_dict and repr are torch's.

    torch's forward is kept as it is: it only detects a causal ``tgt_mask`` and calls its
    layers and norm, which ``convert`` has made twins."""


class Transformer(torch.nn.Transformer):
    """Drop-in for ``torch.nn.Transformer``: an encoder and a decoder. Constructor, parameters,
    state_dict and repr are torch's.

    torch's forward is kept as it is: it checks the shapes and calls its encoder and decoder,
    which ``convert`` has made twins."""
