"""EmbeddingBag: the torch class with forward routed to manualgrad.functional.embedding_bag."""
import torch

from .. import functional as F


class EmbeddingBag(torch.nn.EmbeddingBag):
    """Drop-in for ``torch.nn.EmbeddingBag`` (``from_pretrained`` included, inherited): sum, mean
    or max of bags of rows, with a hand-written backward; every option (``max_norm`` rescales the
    rows read in place, ``sparse=True`` gives a sparse weight gradient, as torch's)."""

    def forward(self, input, offsets=None, per_sample_weights=None):
        return F.embedding_bag(input, self.weight, offsets, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                               self.mode, self.sparse, per_sample_weights, self.include_last_offset, self.padding_idx)
