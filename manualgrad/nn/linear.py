import torch

from .. import functional as F


class Linear(torch.nn.Linear):
    """Drop-in for ``torch.nn.Linear``: y = x W^T + b with a hand-written backward."""

    def forward(self, input):
        return F.linear(input, self.weight, self.bias)
