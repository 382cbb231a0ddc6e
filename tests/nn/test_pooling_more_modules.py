"""The rest of the pooling modules (nn/pooling_more.py): each subclasses its torch class, has
torch's repr and state, gives torch's outputs and gradients, and convert(strict=True) swaps it."""
import copy

import pytest
import torch

import manualgrad as mg
import manualgrad.nn as mnn
from manualgrad.testing import assert_same_as_torch
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")

# (ours, theirs, constructor kwargs, input shape, exact: max-type modules select values)
MODULES = [
    (mnn.AvgPool3d, torch.nn.AvgPool3d, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                             count_include_pad=False), (2, 3, 5, 7, 6), False),
    (mnn.AvgPool3d, torch.nn.AvgPool3d, dict(kernel_size=(2, 3, 1), divisor_override=4), (3, 4, 6, 5), False),
    (mnn.AdaptiveAvgPool3d, torch.nn.AdaptiveAvgPool3d, dict(output_size=(None, 4, 3)), (2, 3, 5, 7, 6), False),
    (mnn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool1d, dict(output_size=5), (2, 3, 13), True),
    (mnn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool1d, dict(output_size=4, return_indices=True), (3, 13), True),
    (mnn.AdaptiveMaxPool3d, torch.nn.AdaptiveMaxPool3d, dict(output_size=(2, None, 3), return_indices=True),
     (2, 3, 5, 7, 6), True),
    (mnn.LPPool1d, torch.nn.LPPool1d, dict(norm_type=2, kernel_size=3, stride=2, ceil_mode=True), (2, 3, 13), False),
    (mnn.LPPool2d, torch.nn.LPPool2d, dict(norm_type=1, kernel_size=(3, 2)), (2, 3, 7, 9), False),
    (mnn.LPPool2d, torch.nn.LPPool2d, dict(norm_type=float("inf"), kernel_size=2), (3, 7, 9), True),
    (mnn.LPPool3d, torch.nn.LPPool3d, dict(norm_type=2, kernel_size=2, stride=(1, 2, 1)), (2, 3, 5, 7, 6), False),
]


@pytest.mark.parametrize("ours,theirs,kwargs,shape,exact", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_module_matches_torch_and_convert_swaps_it(ours, theirs, kwargs, shape, exact):
    m, t = ours(**kwargs), theirs(**kwargs)
    assert isinstance(m, theirs) and repr(m) == repr(t)
    x = torch.randn(shape, requires_grad=True)
    out = t(x.detach())
    y = out[0] if isinstance(out, tuple) else out
    tol = dict(rtol=0, atol=0) if exact else {}
    assert_same_as_torch(m, t, x, grad_output=exact_dy(y.shape), **tol)
    model = mg.convert(torch.nn.Sequential(copy.deepcopy(t)), strict=True)
    assert type(model[0]) is ours


@pytest.mark.parametrize("d", [1, 2, 3])
def test_max_unpool_module_inverts_max_pool_like_torch_and_convert_swaps_it(d):
    ours, theirs = (mnn.MaxUnpool1d, mnn.MaxUnpool2d, mnn.MaxUnpool3d)[d - 1], getattr(torch.nn, f"MaxUnpool{d}d")
    pool = getattr(torch.nn, f"MaxPool{d}d")(3, stride=2, padding=1, return_indices=True)
    shape = (2, 3) + (7, 5, 9)[:d]  # odd sizes: the default unpooled size is the input's
    y, idx = pool(torch.randn(shape))
    m, t = ours(3, stride=2, padding=1), theirs(3, stride=2, padding=1)
    assert isinstance(m, theirs) and repr(m) == repr(t)
    for size in (None, list(shape[-d:])):
        x = y.detach().requires_grad_()
        out = t(x.detach(), idx, size)
        assert_same_as_torch(lambda v: m(v, idx, size), lambda v: t(v, idx, size), x,
                             grad_output=exact_dy(out.shape), rtol=0, atol=0)
    model = mg.convert(torch.nn.Sequential(copy.deepcopy(t)), strict=True)
    assert type(model[0]) is ours


@pytest.mark.parametrize("d", [2, 3])
def test_fractional_max_pool_module_matches_torch_under_the_same_seed_and_convert_swaps_it(d):
    ours = (mnn.FractionalMaxPool2d, mnn.FractionalMaxPool3d)[d - 2]
    theirs = getattr(torch.nn, f"FractionalMaxPool{d}d")
    x = torch.randn((2, 3) + (9, 8, 7)[:d])
    for kwargs in (dict(kernel_size=2, output_ratio=0.5, return_indices=True), dict(kernel_size=3, output_size=4),
                   dict(kernel_size=2, output_size=3, _random_samples=torch.rand(2, 3, d))):
        m, t = ours(**kwargs), theirs(**kwargs)
        assert isinstance(m, theirs) and repr(m) == repr(t)
        grads = []
        for module in (m, t):
            leaf = x.clone().requires_grad_()
            torch.manual_seed(5)
            out = module(leaf)
            y = out[0] if isinstance(out, tuple) else out
            y.backward(exact_dy(y.shape))
            grads.append((out, leaf.grad))
        (out, g), (tout, tg) = grads
        torch.testing.assert_close(out, tout, rtol=0, atol=0)
        torch.testing.assert_close(g, tg, rtol=0, atol=0)
    model = mg.convert(torch.nn.Sequential(copy.deepcopy(t)), strict=True)
    assert type(model[0]) is ours
