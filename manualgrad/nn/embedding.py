"""Embedding: the torch class with forward routed to manualgrad.functional."""
import torch

from .. import functional as F


class Embedding(torch.nn.Embedding):
    """Drop-in for ``torch.nn.Embedding`` (``from_pretrained`` included, inherited), every option:
    ``max_norm`` rescales the rows read in place in forward, ``sparse=True`` gives a sparse
    weight gradient, both as torch's."""

    def forward(self, input):
        return F.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
