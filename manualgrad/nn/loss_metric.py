"""Metric-learning loss modules: the torch classes (options as torch keeps them) with forward
routed to manualgrad.functional (ops/loss_metric.py)."""
import torch

from .. import functional as F


class CosineEmbeddingLoss(torch.nn.CosineEmbeddingLoss):
    """Drop-in for ``torch.nn.CosineEmbeddingLoss`` with a hand-written backward."""

    def forward(self, input1, input2, target):
        return F.cosine_embedding_loss(input1, input2, target, margin=self.margin, reduction=self.reduction)


class TripletMarginLoss(torch.nn.TripletMarginLoss):
    """Drop-in for ``torch.nn.TripletMarginLoss`` with a hand-written backward."""

    def forward(self, anchor, positive, negative):
        return F.triplet_margin_loss(
            anchor, positive, negative, margin=self.margin, p=self.p, eps=self.eps, swap=self.swap,
            reduction=self.reduction,
        )


class TripletMarginWithDistanceLoss(torch.nn.TripletMarginWithDistanceLoss):
    """Drop-in for ``torch.nn.TripletMarginWithDistanceLoss``. Its default distance, a
    ``PairwiseDistance`` submodule, is converted with it; a torch function is routed to its
    manualgrad twin; the user's own function runs as it is."""

    def forward(self, anchor, positive, negative):
        return F.triplet_margin_with_distance_loss(
            anchor, positive, negative, distance_function=self.distance_function, margin=self.margin,
            swap=self.swap, reduction=self.reduction,
        )
