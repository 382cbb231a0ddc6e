"""Adam and AdamW, written out by hand.

Drop-in twins of ``torch.optim.Adam`` and ``torch.optim.AdamW`` (torch 2.13): same
constructors, defaults, validation, ``param_groups`` keys and ``state`` (``'step'`` a 0-dim
float32 CPU tensor (float64 under a float64 default dtype), ``'exp_avg'``, ``'exp_avg_sq'``,
``'max_exp_avg_sq'`` with amsgrad), so a ``state_dict`` moves between torch and manualgrad in
either direction. The update follows torch's for-loop (``foreach=False``) path operation for
operation, so results agree bit for bit.

    g_t = -grad if maximize else grad
    θ   = θ (1 - γ λ)                      AdamW (decoupled weight decay)
    g_t = g_t + λ θ_{t-1}                  Adam with λ != 0 (L2 penalty)
    m_t = β1 m_{t-1} + (1 - β1) g_t
    v_t = β2 v_{t-1} + (1 - β2) g_t²
    v_t^max = max(v_{t-1}^max, v_t)        amsgrad (then v_t^max replaces v_t below)
    θ_t = θ_{t-1} - γ/(1 - β1^t) · m_t / (sqrt(v_t)/sqrt(1 - β2^t) + ε)

Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980;
Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv:1711.05101.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._base import HandWrittenOptimizer, scalar_dtype, to_scalar

__all__ = ["Adam", "AdamW", "adam_update_"]

# torch options these twins do not implement, with the defaults they accept.
def adam_update_(
    param,
    grad,
    step_t,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    amsgrad,
    maximize,
    decoupled_weight_decay,
):
    """One Adam/AdamW step of one parameter; updates param, step_t and the moments in place.

    ``max_exp_avg_sq`` is used only with amsgrad (pass None otherwise). Hyper-parameters may be
    floats or 0-dim tensors; complex parameters are updated as (real, imag) pairs, as in torch.
    """
    # g = -∇θ L if maximize else ∇θ L                          like θ
    g = -grad if maximize else grad
    # t = t + 1                                                 0-dim, on the CPU
    step_t += 1
    if weight_decay != 0:
        if decoupled_weight_decay:
            # θ = θ (1 - γ λ)                                   decay the weights, not the gradient
            param.mul_(1 - lr * weight_decay)
        else:
            # g = g + λ θ                                       like θ
            g = g.add(param, alpha=weight_decay)
    if torch.is_complex(param):
        # complex z = a + ib is optimized as the real pair (a, b)   (..., 2)
        param, g, exp_avg, exp_avg_sq = (torch.view_as_real(t) for t in (param, g, exp_avg, exp_avg_sq))
        if amsgrad:
            max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
    # (1 - β1) as the lerp weight; a tensor β1 is first moved to θ's device and dtype
    weight1 = 1 - (beta1.to(device=param.device, dtype=param.dtype) if isinstance(beta1, Tensor) else beta1)
    # m_t = β1 m_{t-1} + (1 - β1) g_t  =  lerp(m_{t-1}, g_t, 1 - β1)
    exp_avg.lerp_(g, weight1)
    # v_t = β2 v_{t-1} + (1 - β2) g_t²
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # t as a Python number (torch reads the CPU counter with .item() on this path)
    t = step_t.item()
    # 1 - β1^t
    bias_correction1 = 1 - beta1**t
    # 1 - β2^t
    bias_correction2 = 1 - beta2**t
    # γ / (1 - β1^t)
    step_size = lr / bias_correction1
    # sqrt(1 - β2^t)
    bias_correction2_sqrt = bias_correction2**0.5
    if amsgrad:
        # v_t^max = max(v_{t-1}^max, v_t)                      in place
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    else:
        v = exp_avg_sq
    # denom = sqrt(v_t) / sqrt(1 - β2^t) + ε  =  sqrt(v̂_t) + ε     like θ
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    # θ_t = θ_{t-1} - γ/(1 - β1^t) · m_t / denom  =  θ_{t-1} - γ m̂_t / (sqrt(v̂_t) + ε)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class Adam(HandWrittenOptimizer):
    """Adam (optionally AMSGrad, optionally decoupled weight decay), twin of torch.optim.Adam.

    Args:
        params (iterable): parameters, named parameters or parameter-group dicts.
        lr (float or Tensor, optional): learning rate γ (default: 1e-3).
        betas (tuple of two floats or two Tensors, optional): β1, β2 (default: (0.9, 0.999)).
        eps (float, optional): ε added to the denominator (default: 1e-8).
        weight_decay (float, optional): weight decay λ (default: 0).
        amsgrad (bool, optional): use the running maximum of v_t (default: False).
        maximize (bool, optional): maximize the objective instead (default: False).
        decoupled_weight_decay (bool, optional): AdamW's θ (1 - γ λ) instead of the L2
            penalty (default: False).
        foreach, capturable, differentiable, fused: accepted only at their defaults (None,
            False, False, None); anything else raises NotImplementedError.

    Example:
        >>> opt = manualgrad.optim.Adam(model.parameters(), lr=3e-4)
        >>> opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    UNSUPPORTED = {"foreach": None, "capturable": False, "differentiable": False, "fused": None}
    GROUP_DEFAULTS = {
        "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
        "differentiable": False, "decoupled_weight_decay": False, "fused": None,
    }
    SPARSE_ERROR = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        *,
        foreach=None,
        maximize=False,
        capturable=False,
        differentiable=False,
        fused=None,
        decoupled_weight_decay=False,
    ):
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor):
                if not capturable and foreach:
                    raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        betas = tuple(to_scalar(beta) for beta in betas)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

    def _step_group(self, group, params):
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                # t = 0, m_0 = 0, v_0 = 0, v_0^max = 0; the counter stays on the CPU
                state["step"] = torch.tensor(0.0, dtype=scalar_dtype(), device="cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            adam_update_(
                p,
                p.grad,
                state["step"],
                state["exp_avg"],
                state["exp_avg_sq"],
                state.get("max_exp_avg_sq"),
                lr=to_scalar(group["lr"]),
                beta1=to_scalar(beta1),
                beta2=to_scalar(beta2),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
            )


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay θ (1 - γ λ), twin of torch.optim.AdamW.

    Same arguments as :class:`Adam` without ``decoupled_weight_decay`` (always True), and
    ``weight_decay`` defaults to 1e-2.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        *,
        maximize=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        fused=None,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        # a state_dict loaded into AdamW always decays decoupled, as in torch
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
