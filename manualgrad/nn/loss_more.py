"""More loss modules: the torch classes (options as attributes, weights as buffers, as torch
keeps them) with forward routed to manualgrad.functional."""
import warnings

import torch

from .. import functional as F
from .loss import NLLLoss


class PoissonNLLLoss(torch.nn.PoissonNLLLoss):
    def forward(self, log_input, target):
        return F.poisson_nll_loss(
            log_input, target, log_input=self.log_input, full=self.full, eps=self.eps, reduction=self.reduction
        )


class GaussianNLLLoss(torch.nn.GaussianNLLLoss):
    def forward(self, input, target, var):
        return F.gaussian_nll_loss(input, target, var, full=self.full, eps=self.eps, reduction=self.reduction)


class MarginRankingLoss(torch.nn.MarginRankingLoss):
    def forward(self, input1, input2, target):
        return F.margin_ranking_loss(input1, input2, target, margin=self.margin, reduction=self.reduction)


class HingeEmbeddingLoss(torch.nn.HingeEmbeddingLoss):
    def forward(self, input, target):
        return F.hinge_embedding_loss(input, target, margin=self.margin, reduction=self.reduction)


class SoftMarginLoss(torch.nn.SoftMarginLoss):
    def forward(self, input, target):
        return F.soft_margin_loss(input, target, reduction=self.reduction)


class MultiLabelSoftMarginLoss(torch.nn.MultiLabelSoftMarginLoss):
    def forward(self, input, target):
        return F.multilabel_soft_margin_loss(input, target, weight=self.weight, reduction=self.reduction)


class MultiLabelMarginLoss(torch.nn.MultiLabelMarginLoss):
    def forward(self, input, target):
        return F.multilabel_margin_loss(input, target, reduction=self.reduction)


class MultiMarginLoss(torch.nn.MultiMarginLoss):
    def forward(self, input, target):
        return F.multi_margin_loss(
            input, target, p=self.p, margin=self.margin, weight=self.weight, reduction=self.reduction
        )


# torch.nn.NLLLoss2d is marked @deprecated: a subclass warns where it is defined (at import here),
# an instance of the subclass does not. So the class is defined quietly and warns when built, as torch's.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)

    class NLLLoss2d(torch.nn.NLLLoss2d, NLLLoss):
        """Deprecated alias of NLLLoss, as in torch: forward is manualgrad's NLLLoss's (through the MRO)."""

        def __init__(self, *args, **kwargs):
            warnings.warn(
                "`NLLLoss2d` has been deprecated. Please use `NLLLoss` instead as a drop-in replacement and see "
                "https://pytorch.org/docs/main/nn.html#torch.nn.NLLLoss for more details.",
                FutureWarning,
                stacklevel=2,
            )
            super().__init__(*args, **kwargs)
