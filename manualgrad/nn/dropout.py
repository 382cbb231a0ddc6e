import torch

from .. import functional as F


class Dropout(torch.nn.Dropout):
    """Drop-in for ``torch.nn.Dropout``; the backward keeps the mask bit-packed."""

    def forward(self, input):
        return F.dropout(input, self.p, self.training, self.inplace)
