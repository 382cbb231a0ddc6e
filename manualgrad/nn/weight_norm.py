"""WeightNorm: the parametrization torch.nn.utils.parametrizations.weight_norm registers
(w = g v / ||v||), with forward routed to manualgrad.functional.weight_norm.

``convert`` swaps it inside a parametrized module (a weight-normalized Conv1d, say) and swaps
the module itself for its twin, so the whole layer runs hand-written backward passes.
"""
from torch.nn.utils.parametrizations import _WeightNorm

from .. import functional as F


class WeightNorm(_WeightNorm):
    """Drop-in for torch's weight-norm parametrization: ``weight = g v / ||v||``, the norm over
    every dim of v but ``dim``, with the Salimans & Kingma gradient written out."""

    def forward(self, weight_g, weight_v):
        return F.weight_norm(weight_v, weight_g, self.dim)
