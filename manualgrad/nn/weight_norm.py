"""Weight normalization (w = g v / ||v||) with forward routed to manualgrad.functional.weight_norm,
in both of torch's forms:

- ``WeightNorm``: the parametrization ``torch.nn.utils.parametrizations.weight_norm`` registers;
- ``LegacyWeightNorm``: the forward pre-hook of the deprecated ``torch.nn.utils.weight_norm``
  (still common in vocoders), which recomputes ``weight`` from ``weight_g``, ``weight_v``.

``convert`` swaps either inside a weight-normalized module (a Conv1d, say) and the module itself
for its twin, so the whole layer runs hand-written backward passes.
"""
import sys

from torch.nn.utils.parametrizations import _WeightNorm

from .. import functional as F

# (torch.nn.utils.weight_norm is also the name of the function, re-exported: the module by name)
_legacy = sys.modules["torch.nn.utils.weight_norm"]


class WeightNorm(_WeightNorm):
    """Drop-in for torch's weight-norm parametrization: ``weight = g v / ||v||``, the norm over
    every dim of v but ``dim``, with the Salimans & Kingma gradient written out."""

    def forward(self, weight_g, weight_v):
        return F.weight_norm(weight_v, weight_g, self.dim)


class LegacyWeightNorm(_legacy.WeightNorm):
    """Drop-in for the forward pre-hook of the deprecated ``torch.nn.utils.weight_norm``."""

    def compute_weight(self, module):
        g = getattr(module, self.name + "_g")
        v = getattr(module, self.name + "_v")
        return F.weight_norm(v, g, self.dim)
