"""GradientMonitor names where the first non-finite value is born: planted faults, each with
the exact origin (module, kind, step) worked out by hand, on torch and manualgrad models."""
import math
import warnings

import pytest
import torch

import manualgrad.nn as mnn
from manualgrad.monitor import GradientMonitor, NonFiniteError


class NullWriter:
    def add_custom_scalars(self, layout):
        pass

    def add_scalar(self, *args, **kwargs):
        pass

    def add_histogram_raw(self, *args, **kwargs):
        pass

    def flush(self):
        pass


class Sqrt(torch.nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


def issue_mlp(nn, extra=None):
    # the issue's 64-128-128-10 MLP, narrower: '0' Linear, '1' ReLU, '2' Linear, '3' ReLU,
    # ['4' extra], then the last Linear
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()]
    if extra is not None:
        layers.append(extra)
    layers.append(nn.Linear(16, 4))
    return torch.nn.Sequential(*layers)


def run(model, steps, every=1, before_step=None, x=None, loss=None, opt=None, lr=0.1, **kw):
    """SGD steps on a fixed batch under a monitor that raises; returns (monitor, error or None)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g) if x is None else x
    y = torch.randint(0, 4, (32,), generator=g)
    loss = loss or torch.nn.functional.cross_entropy
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr)
    mon = GradientMonitor(model, NullWriter(), optimizer=opt, every=every, hist_every=0, on_nonfinite="raise", **kw)
    err = None
    with mon:
        try:
            for step in range(steps):
                xs = x
                if before_step is not None:
                    xs = before_step(step, model, x) or x
                opt.zero_grad()
                loss(model(xs), y).backward()
                opt.step()
        except NonFiniteError as e:
            err = e
    return mon, err


NNS = pytest.mark.parametrize("nn", [torch.nn, mnn], ids=["torch", "manualgrad"])


@NNS
def test_nan_weight_of_module_2_is_named_as_a_parameter_origin(nn):
    # the issue's first example: the weight of module '2' set to NaN before step 3
    def poison(step, model, x):
        if step == 3:
            with torch.no_grad():
                model[2].weight[1, 5] = math.nan

    mon, err = run(issue_mlp(nn), 5, before_step=poison)
    assert err is not None
    origin = mon.first_nonfinite
    assert origin[:3] == ("2", "parameter", 3)
    assert "module '2'" in str(err) and "parameter" in str(err) and "step 3" in str(err)
    assert "weight[1, 5]" in str(err)  # the offending index


@NNS
def test_sqrt_after_relu_is_named_as_a_backward_origin(nn):
    # the issue's second example: sqrt(relu(h)) is finite, but d sqrt/dh = 1/(2 sqrt(h)) is
    # infinite where relu(h) = 0: an Inf born in the backward of the Sqrt module '4' (torch's
    # ReLU backward then selects 0 there; manualgrad's multiplies, inf * 0: NaN gradients
    # for '2' and '0', which the old report named)
    mon, err = run(issue_mlp(nn, extra=Sqrt()), 3, origin="every_step")
    origin = mon.first_nonfinite
    assert origin[:3] == ("4", "backward", 0)
    assert "backward" in str(err) and "module '4'" in str(err) and "= inf" in str(err)
