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


def test_model_of_every_new_layer_trains_like_torch():
    # every new activation, distance and dropout layer in one model, converted with strict=True:
    # three SGD steps under the same seeds give torch's losses and parameters (the random layers'
    # draws included)
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.Hardtanh(-2, 2), torch.nn.PReLU(8), torch.nn.SELU(),
            torch.nn.AlphaDropout(0.2), torch.nn.Linear(8, 8), torch.nn.RReLU(), torch.nn.CELU(0.7),
            torch.nn.Softsign(), torch.nn.Unflatten(1, (4, 2)), torch.nn.Dropout1d(0.3),
            torch.nn.FeatureAlphaDropout(0.2), torch.nn.Flatten(), torch.nn.Hardsigmoid(), torch.nn.Tanhshrink(),
            torch.nn.Softshrink(0.1), torch.nn.Hardshrink(0.05), torch.nn.Threshold(0.01, -1.0), torch.nn.ReLU6(),
            torch.nn.LogSigmoid(), torch.nn.Linear(8, 3), torch.nn.Softmin(1),
        )

    theirs, ours = make(), mg.convert(make(), strict=True)
    x, target = torch.randn(16, 6), torch.randn(16, 3)
    distance = torch.nn.PairwiseDistance()
    for model, dist in ((ours, mnn.PairwiseDistance()), (theirs, distance)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for step in range(3):
            torch.manual_seed(step)
            loss = dist(model(x), target).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.losses = losses
    assert ours.losses == pytest.approx(theirs.losses, rel=1e-5)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert type(ours[2]) is mnn.PReLU and type(ours[-1]) is mnn.Softmin
