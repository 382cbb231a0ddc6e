"""The activation modules of ops/activation_more.py: drop-ins for torch's (isinstance, repr,
state_dict, convert) that give torch's outputs and gradients, parameters included (PReLU)."""
import pytest
import torch

import manualgrad as mg
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch

MODULES = [
    ("Hardtanh", {}), ("Hardtanh", dict(min_val=-0.5, max_val=2.0, inplace=True)), ("ReLU6", {}),
    ("ReLU6", dict(inplace=True)), ("Hardsigmoid", {}), ("Hardsigmoid", dict(inplace=True)), ("LogSigmoid", {}),
    ("Softsign", {}), ("Tanhshrink", {}), ("Softshrink", dict(lambd=0.3)), ("Hardshrink", dict(lambd=0.7)),
    ("Threshold", dict(threshold=0.1, value=-3.0)), ("Threshold", dict(threshold=0.1, value=3.0, inplace=True)),
    ("SELU", {}), ("SELU", dict(inplace=True)), ("CELU", dict(alpha=0.5)), ("CELU", dict(alpha=2.0, inplace=True)),
    ("PReLU", {}), ("PReLU", dict(num_parameters=3, init=0.1)), ("RReLU", {}), ("RReLU", dict(lower=0.2, upper=0.4)),
    ("RReLU", dict(inplace=True)), ("Softmin", dict(dim=1)), ("Softmax2d", {}),
]


def _id(case):
    return "-".join([case[0]] + [f"{k}={v}" for k, v in case[1].items()])


@pytest.mark.parametrize("case", MODULES, ids=_id)
@pytest.mark.parametrize("train", [True, False])
def test_module_is_a_drop_in_for_torchs(case, train):
    name, kwargs = case
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(**kwargs).train(train)
    ours = getattr(mnn, name)(**kwargs).train(train)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = (3 * torch.randn(2, 3, 4, 5)).requires_grad_()

    def run(module):
        def f(t):
            torch.manual_seed(1)  # RReLU's slopes
            return module(t * 1)
        return f
    assert_same_as_torch(run(ours), run(theirs), x)
    for p, q in zip(ours.parameters(), theirs.parameters()):  # PReLU's weight
        torch.testing.assert_close(p.grad, q.grad)
    model = mg.convert(torch.nn.Sequential(getattr(torch.nn, name)(**kwargs)), strict=True)
    assert type(model[0]) is getattr(mnn, name)


def test_prelu_weight_gradient_matches_torch():
    torch.manual_seed(0)
    theirs = torch.nn.PReLU(4, init=0.2)
    ours = mnn.PReLU(4, init=0.2)
    with torch.no_grad():
        theirs.weight.uniform_(-0.5, 0.5)
        ours.weight.copy_(theirs.weight)
    x = torch.randn(3, 4, 7)
    dy = torch.randn(3, 4, 7)
    ours(x).backward(dy)
    theirs(x).backward(dy)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5, 6)])
def test_softmax2d_rejects_other_ranks_like_torch(shape):
    assert_raises_like_torch(mnn.Softmax2d(), torch.nn.Softmax2d(), torch.randn(shape), match="3D or 4D")


def test_softmax2d_on_unbatched_input_matches_torch():
    assert_same_as_torch(mnn.Softmax2d(), torch.nn.Softmax2d(), torch.randn(3, 4, 5, requires_grad=True))
