"""LinearCrossEntropyLoss: torch's module (its Linear child holds the weight, flat) with
forward routed to manualgrad.functional.linear_cross_entropy."""
import torch

from .. import functional as F


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """Drop-in for torch.nn.LinearCrossEntropyLoss, always chunked over the tokens, with a
    hand-written backward."""

    def forward(self, input, target):
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = (
            self.linear.bias.reshape((self.num_classes, *self.out_features)) if self.linear.bias is not None else None
        )
        return F.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
        )
