"""Lazy modules: converted before or after materialization, or used directly, they end up as the
manualgrad class, with torch's parameters (same seed: same initialization), outputs, gradients
and buffers."""
import pytest
import torch

import manualgrad as mg
import manualgrad.nn as mnn
from manualgrad.testing import assert_same_as_torch
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny modules: see tests/conftest.py

TOL = dict(rtol=1e-5, atol=1e-5)

# (name, constructor arguments, input shape, manualgrad's eager class it becomes)
CASES = [
    ("LazyLinear", (5,), (3, 4), mnn.Linear),
    ("LazyConv1d", (4, 3), (2, 3, 7), mnn.Conv1d),
    ("LazyConv2d", (4, 3), (2, 3, 6, 5), mnn.Conv2d),
    ("LazyConv3d", (2, 2), (2, 3, 4, 3, 3), mnn.Conv3d),
    ("LazyConvTranspose1d", (4, 3), (2, 3, 5), mnn.ConvTranspose1d),
    ("LazyConvTranspose2d", (4, 3), (2, 3, 4, 3), mnn.ConvTranspose2d),
    ("LazyConvTranspose3d", (2, 2), (2, 3, 3, 2, 3), mnn.ConvTranspose3d),
    ("LazyBatchNorm1d", (), (4, 3, 5), mnn.BatchNorm1d),
    ("LazyBatchNorm2d", (), (4, 3, 2, 3), mnn.BatchNorm2d),
    ("LazyBatchNorm3d", (), (2, 3, 2, 2, 3), mnn.BatchNorm3d),
    ("LazyInstanceNorm1d", (), (2, 3, 5), mnn.InstanceNorm1d),
    ("LazyInstanceNorm2d", (), (2, 3, 4, 3), mnn.InstanceNorm2d),
    ("LazyInstanceNorm3d", (), (2, 3, 2, 3, 2), mnn.InstanceNorm3d),
]
IDS = [c[0] for c in CASES]


def _make(cls, args, name):
    kw = dict(affine=True, track_running_stats=True) if "InstanceNorm" in name else {}
    torch.manual_seed(1)  # the same parameters for every copy (made at the first forward)
    return cls(*args, **kw)


def _first_forward(module, shape):
    torch.manual_seed(1)  # the first forward initializes the parameters: the same draws
    return module(torch.randn(shape))


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _assert_like_torch(ours, theirs, shape):
    """From the same state, one more training step of each: outputs, gradients, buffers."""
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, requires_grad=True)
    assert_same_as_torch(ours, theirs, x, grad_output=exact_dy(theirs(x.detach()).shape), **TOL)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        ours(x), theirs(x)
    _assert_same_state(ours, theirs)


@pytest.mark.parametrize("name,args,shape,becomes", CASES, ids=IDS)
def test_converted_before_materialization_becomes_the_manualgrad_class(name, args, shape, becomes):
    torch_cls = getattr(torch.nn, name)
    theirs, ours = _make(torch_cls, args, name), _make(torch_cls, args, name)
    model = mg.convert(torch.nn.Sequential(ours), strict=True)
    assert type(ours) is getattr(mnn, name)
    y = _first_forward(model, shape)
    assert type(ours) is becomes
    # a manualgrad Function's node (torch's are ConvolutionBackward0, AddmmBackward0, ...)
    assert type(y.grad_fn).__name__.endswith("FunctionBackward"), type(y.grad_fn).__name__
    expected = _first_forward(theirs, shape)
    assert type(theirs) is torch_cls.cls_to_become
    torch.testing.assert_close(y, expected, **TOL)
    _assert_same_state(ours, theirs)  # same initialization, same running-stat update
    _assert_like_torch(ours, theirs, shape)


@pytest.mark.parametrize("name,args,shape,becomes", CASES, ids=IDS)
def test_converted_after_materialization_becomes_the_manualgrad_class(name, args, shape, becomes):
    torch_cls = getattr(torch.nn, name)
    theirs, ours = _make(torch_cls, args, name), _make(torch_cls, args, name)
    _first_forward(theirs, shape), _first_forward(ours, shape)
    assert type(ours) is torch_cls.cls_to_become  # torch's eager class now
    mg.convert(ours, strict=True)
    assert type(ours) is becomes
    _assert_like_torch(ours, theirs, shape)


@pytest.mark.parametrize("name,args,shape,becomes", CASES, ids=IDS)
def test_manualgrad_lazy_module_used_directly_matches_torchs(name, args, shape, becomes):
    theirs, ours = _make(getattr(torch.nn, name), args, name), _make(getattr(mnn, name), args, name)
    assert isinstance(ours, getattr(torch.nn, name)) and ours.has_uninitialized_params()
    y, expected = _first_forward(ours, shape), _first_forward(theirs, shape)
    assert type(ours) is becomes
    assert not any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in ours.parameters())
    torch.testing.assert_close(y, expected, **TOL)
    _assert_same_state(ours, theirs)


def test_lazy_twin_loads_a_state_dict_before_its_first_forward():
    source = torch.nn.Conv2d(3, 4, 3)
    ours = mnn.LazyConv2d(4, 3)
    ours.load_state_dict(source.state_dict())
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(ours(x), source(x), **TOL)
    assert type(ours) is mnn.Conv2d


def test_lazy_conv_transpose_takes_output_size_on_its_first_forward():
    theirs, ours = _make(torch.nn.LazyConvTranspose2d, (4, 3, 2), ""), _make(mnn.LazyConvTranspose2d, (4, 3, 2), "")
    x = torch.randn(2, 3, 4, 3)
    torch.manual_seed(1)
    y = ours(x, output_size=(10, 8))
    torch.manual_seed(1)
    assert torch.equal(y, theirs(x, output_size=(10, 8))) and y.shape[-2:] == (10, 8)


def test_lazy_model_converts_and_trains_like_torch():
    def make():
        torch.manual_seed(2)
        return torch.nn.Sequential(torch.nn.LazyConv2d(4, 3), torch.nn.LazyBatchNorm2d(), torch.nn.ReLU(),
                                   torch.nn.LazyInstanceNorm2d(affine=True), torch.nn.Flatten(), torch.nn.LazyLinear(3))

    theirs, ours = make(), mg.convert(make(), strict=True)
    x = torch.randn(4, 2, 6, 6)
    torch.manual_seed(3)
    yt = theirs(x)
    torch.manual_seed(3)
    y = ours(x)
    assert [type(m) for m in ours] == [mnn.Conv2d, mnn.BatchNorm2d, mnn.ReLU, mnn.InstanceNorm2d, mnn.Flatten,
                                       mnn.Linear]
    torch.testing.assert_close(y, yt, **TOL)
    dy = exact_dy(y.shape)
    y.backward(dy), yt.backward(dy)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m: f"{name}: {m}")
    _assert_same_state(ours, theirs)
