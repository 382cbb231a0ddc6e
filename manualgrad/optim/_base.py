"""What manualgrad's optimizers share: rejecting torch options they do not implement, the
upgrade of older state_dicts, and the step loop over parameter groups. Each optimizer adds
its constructor, its per-parameter update (written out by hand) and ``_step_group``."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer


def scalar_dtype():
    # dtype of the 'step' counter: float64 if that is the default dtype, else float32.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def to_scalar(x):
    # A 1-element tensor hyper-parameter becomes 0-dim (torch.optim.optimizer._to_scalar).
    return x.squeeze() if isinstance(x, Tensor) and x.dim() != 0 else x


class HandWrittenOptimizer(Optimizer):
    # torch options not implemented here -> the default value that is accepted
    UNSUPPORTED: dict = {}
    # group keys an older state_dict may lack -> torch's default for them
    GROUP_DEFAULTS: dict = {}
    # the RuntimeError message for sparse gradients, or None where they are allowed
    SPARSE_ERROR: str | None = None

    def _check_supported(self, group):
        name = type(self).__name__
        for option, default in self.UNSUPPORTED.items():
            if group.get(option, default):
                raise NotImplementedError(
                    f"manualgrad.optim.{name}: {option}={group[option]!r} is not implemented; leave it at {default}"
                )
        for key, value in group.items():
            values = value if key == "betas" else (value,)
            if any(isinstance(v, Tensor) and v.requires_grad for v in values):
                raise NotImplementedError(
                    f"manualgrad.optim.{name}: a {key} tensor that requires grad (differentiable optimizer) "
                    "is not implemented"
                )

    def add_param_group(self, param_group):
        self._check_supported({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def __setstate__(self, state):
        for group in state.get("param_groups", []):
            self._check_supported({k: v for k, v in group.items() if k != "params"})
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in self.GROUP_DEFAULTS.items():
                group.setdefault(key, default)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    # old checkpoints keep 'step' as a number
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=scalar_dtype())

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._check_supported({k: v for k, v in group.items() if k != "params"})
            params = [p for p in group["params"] if p.grad is not None]  # no gradient: no update, no state
            if self.SPARSE_ERROR is not None and any(p.grad.is_sparse for p in params):
                raise RuntimeError(self.SPARSE_ERROR)
            self._step_group(group, params)
        return loss

    def _step_group(self, group, params):
        raise NotImplementedError
