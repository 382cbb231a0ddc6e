"""LocalResponseNorm and CrossMapLRN2d with a hand-written backward. Constructors, repr and
attributes are torch's."""
import torch

from .. import functional as F
from ..ops.lrn import cross_map_lrn2d


class LocalResponseNorm(torch.nn.LocalResponseNorm):
    """Drop-in for ``torch.nn.LocalResponseNorm`` (input (N, C, *)) with a hand-written backward."""

    def forward(self, input):
        return F.local_response_norm(input, self.size, self.alpha, self.beta, self.k)


class CrossMapLRN2d(torch.nn.CrossMapLRN2d):
    """Drop-in for ``torch.nn.CrossMapLRN2d`` (input (N, C, H, W)): torch's outputs, and the true
    gradient of them (torch's own backward is not; see manualgrad/ops/lrn.py)."""

    def forward(self, input):
        return cross_map_lrn2d(input, self.size, self.alpha, self.beta, self.k)
