"""More loss modules: the torch classes (options as attributes, weights as buffers, as torch
keeps them) with forward routed to manualgrad.functional."""
import torch

from .. import functional as F


class PoissonNLLLoss(torch.nn.PoissonNLLLoss):
    def forward(self, log_input, target):
        return F.poisson_nll_loss(
            log_input, target, log_input=self.log_input, full=self.full, eps=self.eps, reduction=self.reduction
        )


class GaussianNLLLoss(torch.nn.GaussianNLLLoss):
    def forward(self, input, target, var):
        return F.gaussian_nll_loss(input, target, var, full=self.full, eps=self.eps, reduction=self.reduction)
