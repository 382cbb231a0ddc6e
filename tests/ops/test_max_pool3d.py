"""max_pool3d / MaxPool3d: the max-pooling Function (ops/pooling.py) with 3 spatial dims: torch's
forward kernel gives y and the argmax indices, dx scatters dy to them."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients, saved_bytes
from tests.conftest import noncontiguous


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


def distinct(*shape, dtype=torch.float64):
    """Values without ties: the argmax is unique and stays put under finite differences."""
    n = torch.Size(shape).numel()
    return (torch.randperm(n, dtype=dtype) / n).view(shape).requires_grad_()


# (kernel_size, stride, padding, dilation, ceil_mode): tiling, overlapping, padding, dilation,
# ceil_mode, gapped (stride > kernel), per-dim tuples
MAX3D = [
    (2, None, 0, 1, False),
    (3, 1, 1, 1, False),
    (3, 2, 1, 1, True),
    (2, 1, 0, 2, False),
    (2, 3, 1, 1, True),
    ((3, 2, 1), (2, 1, 1), (1, 0, 0), (1, 2, 1), True),
]


@pytest.mark.parametrize("args", MAX3D, ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 4, 3, 5), (1, 3, 4, 5)], ids=str)
def test_max_pool3d_gradients(shape, args):
    check_gradients(F.max_pool3d, distinct(*shape), *args)


def test_max_pool3d_gradients_non_contiguous_with_indices():
    x = noncontiguous(distinct(2, 2, 3, 4, 3))
    assert not x.is_contiguous()
    check_gradients(lambda t: F.max_pool3d(t, 2, 1, 1, return_indices=True), x)


# float32 parity: max pooling copies values, so outputs, indices and gradients are exact
PARITY = [(shape, args) for shape in [(2, 3, 5, 7, 6), (3, 5, 4, 9)] for args in MAX3D] + [
    ((1, 1, 1, 3, 7), ((1, 2, 3), (1, 1, 2), (0, 1, 1), 1, True)),  # size-1 dims
    ((2, 1, 1, 1, 1), (1, 1, 0, 1, False)),
]


@pytest.mark.parametrize("shape,args", PARITY, ids=str)
def test_max_pool3d_matches_torch_with_indices(shape, args):
    assert_same_as_torch(F.max_pool3d, TF.max_pool3d, torch.randn(shape, requires_grad=True), *args, True,
                         rtol=0, atol=0)
    assert_same_as_torch(F.max_pool3d, TF.max_pool3d, torch.randn(shape, requires_grad=True), *args,
                         rtol=0, atol=0)


def test_max_pool3d_matches_torch_on_channels_last_input_and_ties():
    x = torch.randn(2, 3, 5, 4, 6).to(memory_format=torch.channels_last_3d).requires_grad_()
    assert_same_as_torch(F.max_pool3d, TF.max_pool3d, x, 3, 2, 1, rtol=0, atol=0)
    # ties: every value equal, overlapping windows; the gradient goes where torch's goes
    x = torch.ones(1, 2, 4, 4, 4, requires_grad=True)
    assert_same_as_torch(F.max_pool3d, TF.max_pool3d, x, 2, 1, rtol=0, atol=0)


def test_max_pool3d_window_of_padding_only_gives_minus_inf_and_zero_gradient():
    # dilation 2 with padding 1 over a depth of 1: every window's taps miss the single slice;
    # torch returns -inf with out-of-range indices (its own backward is not run here). (Under
    # torch's padding rule a window of padding only leaves every window along its dim so: the
    # per-dim masks, here (1,), (2,) and (3,) outputs, combine to all of y's (1, 2, 3).)
    x = torch.randn(1, 1, 1, 4, 9, requires_grad=True)
    y = F.max_pool3d(x, 3, None, 1, 2, True)
    torch.testing.assert_close(y, TF.max_pool3d(x.detach(), 3, None, 1, 2, True))
    assert (y == float("-inf")).all()
    y.backward(torch.ones_like(y))
    assert (x.grad == 0).all()
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(F.max_pool3d(fwAD.make_dual(x.detach(), torch.ones_like(x)), 3, None, 1, 2, True))
    assert (tangent.tangent == 0).all()


@pytest.mark.parametrize("shape,args", [
    ((1, 1, 5, 5, 5), (3, 1, 2)),  # padding > kernel / 2
    ((1, 1, 2, 2, 2), (3,)),  # output size 0
    ((5, 5, 5), (2,)),  # wrong number of dims
    ((1, 1, 5, 5, 5), ((3, 3),)),  # kernel of the wrong length
    ((1, 1, 5, 5, 5), (3, 1, 0, 0)),  # dilation 0
    ((1, 1, 5, 5, 5), (3, 0)),  # stride 0
])
def test_max_pool3d_rejects_bad_input_like_torch(shape, args):
    assert_raises_like_torch(F.max_pool3d, TF.max_pool3d, torch.randn(shape), *args)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=(3, 2, 2), stride=(2, 1, 2), padding=1,
                                                             dilation=(1, 2, 1), ceil_mode=True, return_indices=True)],
                         ids=str)
def test_max_pool3d_module_matches_torch_and_convert_swaps_it(kwargs):
    ours, theirs = mnn.MaxPool3d(**kwargs), torch.nn.MaxPool3d(**kwargs)
    assert repr(ours) == repr(theirs) and isinstance(ours, torch.nn.MaxPool3d)
    assert_same_as_torch(ours, theirs, torch.randn(2, 3, 6, 5, 7, requires_grad=True), rtol=0, atol=0)
    model = mg.convert(torch.nn.Sequential(copy.deepcopy(theirs)), strict=True)
    assert type(model[0]) is mnn.MaxPool3d


def test_max_pool3d_saves_no_more_than_torch():
    # only the argmax indices (torch's node keeps the input too)
    x = torch.randn(2, 3, 6, 5, 7, requires_grad=True)
    ours, y = saved_bytes(F.max_pool3d, x, 3, 2, 1)
    theirs, _ = saved_bytes(TF.max_pool3d, x, 3, 2, 1)
    assert ours == y.numel() * 8 <= theirs  # int64 indices, one per output
