"""SGD with momentum, dampening, Nesterov and weight decay, written out by hand.

Drop-in twin of ``torch.optim.SGD`` (torch 2.13): same constructor, defaults, validation,
``param_groups`` keys and ``state`` (``'momentum_buffer'``, created on the first step), so a
``state_dict`` moves between the two in either direction. The update follows the for-loop
(``foreach=False``) path of torch, operation for operation, so results agree bit for bit.

    g_t = -grad if maximize else grad
    g_t = g_t + λ θ_{t-1}                       if λ != 0       (L2 penalty)
    b_t = g_t                                   t = 1           (no dampening on the first step)
    b_t = μ b_{t-1} + (1 - τ) g_t               t > 1
    g_t = g_t + μ b_t  (nesterov)  or  b_t      if μ != 0
    θ_t = θ_{t-1} - γ g_t
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._base import HandWrittenOptimizer, to_scalar

__all__ = ["SGD", "sgd_update_"]

def sgd_update_(param, grad, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """One SGD step of one parameter, in place. Returns the momentum buffer (None if μ = 0).

    ``momentum_buffer`` is None on the first step; the returned buffer is then a new tensor.
    Works for dense and sparse ``grad`` alike, as torch's does.
    """
    # g = -∇θ L if maximize else ∇θ L                          like θ
    g = -grad if maximize else grad
    if weight_decay != 0:
        # g = g + λ θ                                            like θ
        g = g.add(param, alpha=weight_decay)
    if momentum != 0:
        if momentum_buffer is None:
            # b_1 = g_1  (first step: the buffer starts at the gradient, undampened)
            momentum_buffer = g.detach().clone()
        else:
            # b_t = μ b_{t-1} + (1 - τ) g_t
            momentum_buffer.mul_(momentum).add_(g, alpha=1 - dampening)
        if nesterov:
            # g = g + μ b_t
            g = g.add(momentum_buffer, alpha=momentum)
        else:
            # g = b_t
            g = momentum_buffer
    # θ_t = θ_{t-1} - γ g
    param.add_(g, alpha=-lr)
    return momentum_buffer


class SGD(HandWrittenOptimizer):
    """Stochastic gradient descent (optionally with momentum), hand-written twin of torch.optim.SGD.

    Args:
        params (iterable): parameters, named parameters or parameter-group dicts.
        lr (float or Tensor, optional): learning rate γ (default: 1e-3).
        momentum (float, optional): momentum factor μ (default: 0).
        dampening (float, optional): dampening τ for momentum (default: 0).
        weight_decay (float or Tensor, optional): L2 penalty λ (default: 0).
        nesterov (bool, optional): Nesterov momentum; needs μ > 0 and τ = 0 (default: False).
        maximize (bool, optional): maximize the objective instead (default: False).
        foreach, differentiable, fused: accepted only at their defaults (None, False, None);
            anything else raises NotImplementedError.

    Example:
        >>> opt = manualgrad.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    UNSUPPORTED = {"foreach": None, "differentiable": False, "fused": None}
    GROUP_DEFAULTS = {"nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": False}

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        *,
        maximize=False,
        foreach=None,
        differentiable=False,
        fused=None,
    ):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults)

    def _step_group(self, group, params):
        for p in params:
            state = self.state[p] if group["momentum"] != 0 else {}
            buf = sgd_update_(
                p,
                p.grad,
                state.get("momentum_buffer"),
                lr=to_scalar(group["lr"]),
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
            if group["momentum"] != 0:
                state["momentum_buffer"] = buf
