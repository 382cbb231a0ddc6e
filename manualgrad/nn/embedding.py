"""Embedding: the torch class with forward routed to manualgrad.functional."""
import torch

from .. import functional as F


def _unsupported(module):
    """Why manualgrad cannot run this Embedding (None if it can): convert() leaves it torch's."""
    if module.sparse:
        return "sparse=True (a sparse weight gradient)"
    if module.max_norm is not None:
        return f"max_norm={module.max_norm} (rewrites the weight in place)"
    return None


class Embedding(torch.nn.Embedding):
    """Drop-in for ``torch.nn.Embedding`` (``from_pretrained`` included, inherited). ``max_norm``
    and ``sparse=True`` raise NotImplementedError in forward (and convert leaves such a module
    torch's)."""

    unsupported = staticmethod(_unsupported)

    def forward(self, input):
        return F.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
