"""EmbeddingBag: the torch class with forward routed to manualgrad.functional.embedding_bag."""
import torch

from .. import functional as F


def _unsupported(module):
    """Why manualgrad cannot run this EmbeddingBag (None if it can): convert() leaves it torch's."""
    if module.sparse:
        return "sparse=True (a sparse weight gradient)"
    if module.max_norm is not None:
        return f"max_norm={module.max_norm} (rewrites the weight in place)"
    return None


class EmbeddingBag(torch.nn.EmbeddingBag):
    """Drop-in for ``torch.nn.EmbeddingBag`` (``from_pretrained`` included, inherited): sum, mean
    or max of bags of rows, with a hand-written backward. ``max_norm`` and ``sparse=True`` raise
    NotImplementedError in forward (and convert leaves such a module torch's)."""

    unsupported = staticmethod(_unsupported)

    def forward(self, input, offsets=None, per_sample_weights=None):
        return F.embedding_bag(input, self.weight, offsets, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                               self.mode, self.sparse, per_sample_weights, self.include_last_offset, self.padding_idx)
