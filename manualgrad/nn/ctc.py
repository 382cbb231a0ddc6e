"""CTC loss module: torch.nn.CTCLoss (blank, reduction, zero_infinity as torch keeps them) with
forward routed to manualgrad.functional (ops/ctc.py)."""
import torch

from .. import functional as F


class CTCLoss(torch.nn.CTCLoss):
    """Drop-in for ``torch.nn.CTCLoss`` with the alpha/beta recursion and its gradient written out."""

    def forward(self, log_probs, targets, input_lengths, target_lengths):
        return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction,
                          self.zero_infinity)
