"""Every manualgrad module is a drop-in for its torch.nn twin: same constructor, parameters,
state_dict, repr and isinstance, and the same outputs and gradients."""
import copy

import pytest
import torch

import manualgrad as mg
import manualgrad.nn as mnn

N, C = 7, 5


def _index_target():
    return torch.randint(0, C, (N,))


def _prob_target():
    return torch.rand(N, C)


def _logprob_input():
    return torch.randn(N, C).log_softmax(-1).requires_grad_()


def _logits():
    return torch.randn(N, C, requires_grad=True)


def _probs():
    return torch.rand(N, C).clamp(0.05, 0.95).requires_grad_()


# (module name, constructor kwargs, input factory). The same kwargs build both twins.
MODULES = [
    ("Linear", dict(in_features=13, out_features=5), lambda: (torch.randn(N, 13, requires_grad=True),)),
    ("Linear", dict(in_features=13, out_features=5, bias=False), lambda: (torch.randn(2, 3, 13, requires_grad=True),)),
    ("ReLU", {}, lambda: (_logits(),)),
    ("LeakyReLU", dict(negative_slope=0.2), lambda: (_logits(),)),
    ("ELU", dict(alpha=0.5), lambda: (_logits(),)),
    ("GELU", dict(approximate="tanh"), lambda: (_logits(),)),
    ("GELU", {}, lambda: (_logits(),)),
    ("SiLU", {}, lambda: (_logits(),)),
    ("Tanh", {}, lambda: (_logits(),)),
    ("Sigmoid", {}, lambda: (_logits(),)),
    ("Softplus", dict(beta=2.0, threshold=3.0), lambda: (_logits(),)),
    ("Softmax", dict(dim=0), lambda: (_logits(),)),
    ("LogSoftmax", dict(dim=1), lambda: (_logits(),)),
    ("MSELoss", dict(reduction="sum"), lambda: (_logits(), torch.randn(N, C))),
    ("L1Loss", {}, lambda: (_logits(), torch.randn(N, C))),
    ("SmoothL1Loss", dict(beta=0.5), lambda: (_logits(), torch.randn(N, C))),
    ("HuberLoss", dict(delta=0.5, reduction="none"), lambda: (_logits(), torch.randn(N, C))),
    ("CrossEntropyLoss", dict(weight=torch.rand(C), label_smoothing=0.1), lambda: (_logits(), _index_target())),
    ("CrossEntropyLoss", dict(ignore_index=2, reduction="sum"), lambda: (_logits(), _index_target())),
    ("CrossEntropyLoss", {}, lambda: (_logits(), _prob_target().softmax(-1))),
    ("NLLLoss", dict(weight=torch.rand(C), ignore_index=1), lambda: (_logprob_input(), _index_target())),
    ("BCELoss", dict(weight=torch.rand(C)), lambda: (_probs(), torch.rand(N, C))),
    ("BCEWithLogitsLoss", dict(pos_weight=torch.rand(C) + 0.5), lambda: (_logits(), torch.rand(N, C))),
    ("KLDivLoss", dict(reduction="batchmean", log_target=True), lambda: (_logprob_input(), _logprob_input().detach())),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(MODULES)]


def _pair(name, kwargs):
    torch_mod = getattr(torch.nn, name)(**copy.deepcopy(kwargs))
    mg_mod = getattr(mnn, name)(**copy.deepcopy(kwargs))
    mg_mod.load_state_dict(torch_mod.state_dict())
    return mg_mod, torch_mod


def test_every_module_class_subclasses_its_torch_twin():
    for name in mnn.__all__:
        cls = getattr(mnn, name)
        assert issubclass(cls, getattr(torch.nn, name)), name
        assert cls.__name__ == name


@pytest.mark.parametrize("name,kwargs,make_inputs", MODULES, ids=IDS)
def test_module_matches_torch_module(name, kwargs, make_inputs):
    mg_mod, torch_mod = _pair(name, kwargs)
    mg.testing.assert_same_as_torch(mg_mod, torch_mod, *make_inputs())


@pytest.mark.parametrize("name,kwargs,make_inputs", MODULES, ids=IDS)
def test_module_repr_and_isinstance_are_torch_ones(name, kwargs, make_inputs):
    mg_mod, torch_mod = _pair(name, kwargs)
    assert repr(mg_mod) == repr(torch_mod)
    assert isinstance(mg_mod, type(torch_mod))


@pytest.mark.parametrize("name,kwargs,make_inputs", MODULES, ids=IDS)
def test_state_dict_round_trips_between_torch_and_manualgrad(name, kwargs, make_inputs):
    mg_mod, torch_mod = _pair(name, kwargs)
    # A fresh torch module of the same kind loads what the manualgrad one saved.
    for p in mg_mod.parameters():
        torch.nn.init.normal_(p)
    back = getattr(torch.nn, name)(**copy.deepcopy(kwargs))
    back.load_state_dict(mg_mod.state_dict())
    sd_back, sd_mg = back.state_dict(), mg_mod.state_dict()
    assert sd_back.keys() == sd_mg.keys()
    for k in sd_mg:
        torch.testing.assert_close(sd_back[k], sd_mg[k], rtol=0, atol=0)


def test_linear_parameters_are_named_and_initialised_like_torch():
    torch.manual_seed(3)
    t = torch.nn.Linear(13, 5)
    torch.manual_seed(3)
    m = mnn.Linear(13, 5)
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    torch.testing.assert_close(m.weight, t.weight, rtol=0, atol=0)
    torch.testing.assert_close(m.bias, t.bias, rtol=0, atol=0)
    m.reset_parameters()  # torch's own, inherited
    assert not torch.equal(m.weight, t.weight)


def test_modules_run_manualgrad_backward():
    """The gradient comes from a manualgrad Function, not from torch's own kernels."""
    m = mnn.Linear(3, 2)
    y = m(torch.randn(4, 3))
    assert type(y.grad_fn).__name__ == "LinearFunctionBackward"
    y = mnn.ReLU()(torch.randn(4, 3, requires_grad=True))
    assert type(y.grad_fn).__name__ == "ReLUFunctionBackward"
