"""RMSprop (optionally centered, with momentum), written out by hand.

Drop-in twin of ``torch.optim.RMSprop`` (torch 2.13): same constructor (including torch's
positional order, where ``capturable`` comes before ``foreach``), defaults, validation,
``param_groups`` keys and ``state`` (``'step'`` a 0-dim float32 tensor (float64 under a float64
default dtype), ``'square_avg'``, ``'momentum_buffer'`` if μ > 0, ``'grad_avg'`` if centered),
so a ``state_dict`` moves between torch and manualgrad in either direction. The update follows
torch's for-loop (``foreach=False``) path operation for operation.

    g_t = -grad if maximize else grad
    g_t = g_t + λ θ_{t-1}                         if λ != 0
    v_t = α v_{t-1} + (1 - α) g_t²
    ḡ_t = α ḡ_{t-1} + (1 - α) g_t                 centered
    d_t = sqrt(v_t - ḡ_t²) + ε   (centered)   or   sqrt(v_t) + ε
    b_t = μ b_{t-1} + g_t / d_t ;  θ_t = θ_{t-1} - γ b_t          if μ > 0
    θ_t = θ_{t-1} - γ g_t / d_t                                      otherwise

Reference: Hinton, Lecture 6.5 of "Neural Networks for Machine Learning" (2012); the
centered form is Graves, "Generating Sequences With Recurrent Neural Networks", arXiv:1308.0850.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._base import HandWrittenOptimizer, scalar_dtype, to_scalar

__all__ = ["RMSprop", "rmsprop_update_"]

# torch options this twin does not implement, with the defaults it accepts.
def rmsprop_update_(
    param,
    grad,
    step_t,
    square_avg,
    grad_avg,
    momentum_buffer,
    *,
    lr,
    alpha,
    eps,
    weight_decay,
    momentum,
    centered,
    maximize,
):
    """One RMSprop step of one parameter; updates param, step_t and the averages in place.

    ``grad_avg`` is used only when centered, ``momentum_buffer`` only when momentum > 0 (pass
    None otherwise). Complex parameters are updated as (real, imag) pairs, as in torch.
    """
    # g = -∇θ L if maximize else ∇θ L                          like θ
    g = -grad if maximize else grad
    # t = t + 1                                                 0-dim counter (kept for torch's state)
    step_t += 1
    if weight_decay != 0:
        # g = g + λ θ                                           like θ
        g = g.add(param, alpha=weight_decay)
    if torch.is_complex(param):
        # complex z = a + ib is optimized as the real pair (a, b)   (..., 2)
        param, g, square_avg = (torch.view_as_real(t) for t in (param, g, square_avg))
        grad_avg = torch.view_as_real(grad_avg) if centered else grad_avg
        momentum_buffer = torch.view_as_real(momentum_buffer) if momentum > 0 else momentum_buffer
    # v_t = α v_{t-1} + (1 - α) g_t²
    square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    if centered:
        # ḡ_t = α ḡ_{t-1} + (1 - α) g_t  =  lerp(ḡ_{t-1}, g_t, 1 - α)
        grad_avg.lerp_(g, 1 - alpha)
        # d = sqrt(v_t - ḡ_t²)                                 estimate of the gradient's std
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        # d = sqrt(v_t)                                         root mean square of the gradient
        avg = square_avg.sqrt()
    # d = d + ε
    avg = avg.add_(eps)
    if momentum > 0:
        # b_t = μ b_{t-1} + g_t / d
        momentum_buffer.mul_(momentum).addcdiv_(g, avg)
        # θ_t = θ_{t-1} - γ b_t
        param.add_(momentum_buffer, alpha=-lr)
    else:
        # θ_t = θ_{t-1} - γ g_t / d
        param.addcdiv_(g, avg, value=-lr)


class RMSprop(HandWrittenOptimizer):
    """RMSprop, hand-written twin of torch.optim.RMSprop.

    Args:
        params (iterable): parameters, named parameters or parameter-group dicts.
        lr (float or Tensor, optional): learning rate γ (default: 1e-2).
        alpha (float, optional): smoothing constant α (default: 0.99).
        eps (float, optional): ε added to the denominator (default: 1e-8).
        weight_decay (float, optional): L2 penalty λ (default: 0).
        momentum (float, optional): momentum factor μ (default: 0).
        centered (bool, optional): normalize by the estimated variance of the gradient
            instead of its second moment (default: False).
        maximize (bool, optional): maximize the objective instead (default: False).
        capturable, foreach, differentiable: accepted only at their defaults (False, None,
            False); anything else raises NotImplementedError.

    Example:
        >>> opt = manualgrad.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9)
        >>> opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    UNSUPPORTED = {"capturable": False, "foreach": None, "differentiable": False}
    GROUP_DEFAULTS = {"momentum": 0, "centered": False, "foreach": None, "maximize": False, "differentiable": False, "capturable": False}
    SPARSE_ERROR = "RMSprop does not support sparse gradients"

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        capturable=False,
        foreach=None,
        maximize=False,
        differentiable=False,
    ):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults)

    def _step_group(self, group, params):
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                # t = 0, v_0 = 0, b_0 = 0, ḡ_0 = 0
                state["step"] = torch.zeros((), dtype=scalar_dtype())
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["centered"]:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            rmsprop_update_(
                p,
                p.grad,
                state["step"],
                state["square_avg"],
                state["grad_avg"] if group["centered"] else None,
                state["momentum_buffer"] if group["momentum"] > 0 else None,
                lr=to_scalar(group["lr"]),
                alpha=group["alpha"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                centered=group["centered"],
                maximize=group["maximize"],
            )
