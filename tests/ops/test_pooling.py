import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


def distinct(*shape, dtype=torch.float64):
    """Values without ties (a shuffled range, scaled): max pooling's argmax is then unique and
    stays put under finite differences."""
    n = torch.Size(shape).numel()
    return (torch.randperm(n, dtype=dtype) / n).view(shape).requires_grad_()


# ---------------------------------------------------------------------------------------------
# max_pool1d / max_pool2d
# (kernel_size, stride, padding, dilation, ceil_mode): tiling, overlapping (stride < kernel),
# padding, dilation, ceil_mode, gapped (stride > kernel), per-dim tuples

MAX2D = [
    (2, None, 0, 1, False),
    (3, 1, 1, 1, False),
    (3, 2, 1, 1, True),
    (3, 2, 0, 2, False),
    (2, 3, 1, 1, True),
    ((3, 2), (2, 1), (1, 0), (1, 2), True),
]
MAX1D = [
    (2, None, 0, 1, False),
    (3, 1, 1, 1, False),
    (3, 2, 1, 2, True),
    (4, 3, 2, 1, True),
    (1, 2, 0, 1, False),
]


@pytest.mark.parametrize("args", MAX2D)
@pytest.mark.parametrize("shape", [(2, 1, 5, 6), (1, 7, 5)])
def test_max_pool2d_gradients(shape, args):
    check_gradients(F.max_pool2d, distinct(*shape), *args)


@pytest.mark.parametrize("args", MAX1D)
@pytest.mark.parametrize("shape", [(2, 1, 13), (3, 7)])
def test_max_pool1d_gradients(shape, args):
    check_gradients(F.max_pool1d, distinct(*shape), *args)


def test_max_pool_gradients_non_contiguous_with_indices():
    x = noncontiguous(distinct(2, 2, 5, 6))
    assert not x.is_contiguous()
    check_gradients(lambda t: F.max_pool2d(t, 3, 2, 1, return_indices=True), x)
    check_gradients(lambda t: F.max_pool1d(t, 3, 1, 1, return_indices=True), noncontiguous(distinct(2, 13)))


@pytest.mark.parametrize("args", MAX2D)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (3, 13, 11), (1, 5, 257)])
def test_max_pool2d_matches_torch_with_indices(shape, args):
    assert_same_as_torch(F.max_pool2d, TF.max_pool2d, torch.randn(shape, requires_grad=True), *args, True)
    assert_same_as_torch(F.max_pool2d, TF.max_pool2d, torch.randn(shape, requires_grad=True), *args)


@pytest.mark.parametrize("args", MAX1D)
@pytest.mark.parametrize("shape", [(2, 3, 13), (4, 257)])
def test_max_pool1d_matches_torch_with_indices(shape, args):
    assert_same_as_torch(F.max_pool1d, TF.max_pool1d, torch.randn(shape, requires_grad=True), *args, True)


def test_max_pool_indices_are_not_differentiable():
    y, idx = F.max_pool2d(distinct(1, 2, 4, 4), 2, return_indices=True)
    assert y.requires_grad and not idx.requires_grad and idx.dtype == torch.int64


@pytest.mark.parametrize("fn,th,args", [
    (F.max_pool1d, TF.max_pool1d, (3, 1, 1)),
    (F.max_pool2d, TF.max_pool2d, (3, 1, 1)),
    (F.max_pool2d, TF.max_pool2d, (2, 1, 0, 2)),
    (F.adaptive_max_pool2d, TF.adaptive_max_pool2d, ((3, 2),)),
])
def test_max_pooling_ties_send_the_gradient_where_torch_does(fn, th, args):
    # values from {0, 1, 2}: most windows hold their max more than once
    x = torch.randint(0, 3, (2, 3, 6, 7) if fn is not F.max_pool1d else (2, 3, 11)).float().requires_grad_()
    assert_same_as_torch(fn, th, x, *args)
    # and so does the tangent: forward mode against torch's
    t = torch.randn(x.shape)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(fn(fwAD.make_dual(x.detach(), t), *args)).tangent
        theirs = fwAD.unpack_dual(th(fwAD.make_dual(x.detach(), t), *args)).tangent
    torch.testing.assert_close(ours, theirs)


def test_max_pool_nan_wins_its_windows_like_torch():
    x = torch.randn(1, 2, 5, 5)
    x[0, 1, 2, 3] = float("nan")
    assert_same_as_torch(F.max_pool2d, TF.max_pool2d, x.requires_grad_(), 3, 1, 1, 1, False, True)


@pytest.mark.parametrize("args", MAX2D)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_pool2d_channels_last_route_gives_torchs_values_and_indices_bit_for_bit(monkeypatch, args, dtype):
    """8+ channels, contiguous NCHW: the forward pools channels-last copies of a few samples at a
    time. Small chunks here (three samples), ties (ReLU zeros, repeated values) and NaNs, against
    torch's own NCHW kernel."""
    from manualgrad.ops import pooling

    monkeypatch.setattr(pooling, "_CL_CHUNK", 3 * 9 * 7 * 6)
    x = torch.randn(7, 9, 7, 6, dtype=dtype).relu_()
    x[1, :, 2:4] = 0.5  # a block of equal values
    x[2, 3, 1, 1] = x[4, 8].view(-1)[::4] = float("nan")
    assert pooling._pool_channels_last(x)
    ours_y, ours_i = F.max_pool2d(x, *args, return_indices=True)
    their_y, their_i = TF.max_pool2d(x, *args, return_indices=True)
    assert torch.equal(ours_i, their_i)
    assert torch.equal(ours_y.isnan(), their_y.isnan())
    assert torch.equal(ours_y.nan_to_num(), their_y.nan_to_num())
    assert ours_y.is_contiguous() and ours_i.is_contiguous()  # laid out as torch's NCHW outputs
    # and the gradient goes where torch sends it
    dy = torch.randn(their_y.shape, dtype=dtype)
    xg, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.max_pool2d(xg, *args).backward(dy)
    TF.max_pool2d(xt, *args).backward(dy)
    assert torch.equal(xg.grad, xt.grad)


def test_max_pool_window_of_padding_only_gives_minus_inf_and_zero_gradient():
    # dilation 2 with padding 1 over a height of 1: every window's taps miss the single row.
    # torch returns -inf with out-of-range indices (6, 7), and its own backward writes out of
    # bounds, so it is not run here: the gradient of a constant is zero.
    x = torch.randn(1, 1, 1, 5, requires_grad=True)
    y, idx = F.max_pool2d(x, 3, None, 1, 2, True, return_indices=True)
    torch.testing.assert_close(y, TF.max_pool2d(x.detach(), 3, None, 1, 2, True))
    assert (y == float("-inf")).all()
    y.backward(torch.ones_like(y))
    assert (x.grad == 0).all()
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(F.max_pool2d(fwAD.make_dual(x.detach(), torch.ones_like(x)), 3, None, 1, 2, True))
    assert (tangent.tangent == 0).all()


# ---------------------------------------------------------------------------------------------
# avg_pool1d / avg_pool2d
# (kernel_size, stride, padding, ceil_mode, count_include_pad[, divisor_override])

AVG2D = [
    (2, None, 0, False, True, None),
    (3, 1, 1, False, True, None),
    (3, 2, 1, True, True, None),
    (3, 2, 1, True, False, None),
    ((3, 2), (2, 3), (1, 1), True, False, None),
    (3, 2, 1, False, True, 5),
    (2, None, 1, True, False, 3),
    (2, 3, 0, False, True, None),
]
AVG1D = [
    (2, None, 0, False, True),
    (3, 1, 1, False, True),
    (3, 2, 1, True, True),
    (4, 3, 2, True, False),
    (2, 3, 1, False, False),
]


@pytest.mark.parametrize("args", AVG2D)
@pytest.mark.parametrize("shape", [(2, 1, 5, 6), (1, 7, 5)])
def test_avg_pool2d_gradients(shape, args):
    check_gradients(F.avg_pool2d, torch.randn(shape, dtype=torch.float64, requires_grad=True), *args)


@pytest.mark.parametrize("args", AVG1D)
@pytest.mark.parametrize("shape", [(2, 1, 13), (3, 7)])
def test_avg_pool1d_gradients(shape, args):
    check_gradients(F.avg_pool1d, torch.randn(shape, dtype=torch.float64, requires_grad=True), *args)


def test_avg_pool_gradients_non_contiguous():
    x = noncontiguous(torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True))
    assert not x.is_contiguous()
    check_gradients(F.avg_pool2d, x, 3, 2, 1, True, False)
    check_gradients(F.avg_pool2d, x, 3)
    check_gradients(F.avg_pool1d, noncontiguous(torch.randn(2, 13, dtype=torch.float64, requires_grad=True)), 3, 2, 1)


@pytest.mark.parametrize("args", AVG2D)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (3, 13, 11), (1, 5, 257)])
def test_avg_pool2d_matches_torch_divisors_at_the_borders(shape, args):
    assert_same_as_torch(F.avg_pool2d, TF.avg_pool2d, torch.randn(shape, requires_grad=True), *args)


@pytest.mark.parametrize("args", AVG1D)
@pytest.mark.parametrize("shape", [(2, 3, 13), (4, 257)])
def test_avg_pool1d_matches_torch_divisors_at_the_borders(shape, args):
    assert_same_as_torch(F.avg_pool1d, TF.avg_pool1d, torch.randn(shape, requires_grad=True), *args)


def test_avg_pool_gradient_spreads_dy_over_each_window_by_hand():
    # length 5, kernel 3, stride 2, padding 1, count_include_pad=False: windows [0,1] / 2, [1,3] / 3, [3,4] / 2
    x = torch.randn(1, 1, 5, dtype=torch.float64, requires_grad=True)
    F.avg_pool1d(x, 3, 2, 1, False, False).backward(torch.tensor([[[2.0, 3.0, 4.0]]], dtype=torch.float64))
    torch.testing.assert_close(x.grad[0, 0], torch.tensor([1.0, 2.0, 1.0, 3.0, 2.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# adaptive_avg_pool1d / adaptive_avg_pool2d / adaptive_max_pool2d
# output sizes that divide the input, that do not, that exceed it, and None entries

ADAPTIVE2D = [1, 3, (2, 4), (5, None), (None, 4), (7, 9), (9, 10)]


@pytest.mark.parametrize("out", ADAPTIVE2D)
@pytest.mark.parametrize("shape", [(2, 1, 7, 9), (1, 5, 4)])
def test_adaptive_pool2d_gradients(shape, out):
    check_gradients(F.adaptive_avg_pool2d, torch.randn(shape, dtype=torch.float64, requires_grad=True), out)
    check_gradients(F.adaptive_max_pool2d, distinct(*shape), out)


@pytest.mark.parametrize("out", [1, 3, 4, 13, 15])
@pytest.mark.parametrize("shape", [(2, 1, 13), (3, 12)])
def test_adaptive_avg_pool1d_gradients(shape, out):
    check_gradients(F.adaptive_avg_pool1d, torch.randn(shape, dtype=torch.float64, requires_grad=True), out)


def test_adaptive_pool_gradients_non_contiguous_with_indices():
    x = noncontiguous(distinct(2, 2, 5, 6))
    check_gradients(F.adaptive_avg_pool2d, x, (3, 4))
    check_gradients(lambda t: F.adaptive_max_pool2d(t, (3, 4), return_indices=True), x)
    x1 = noncontiguous(torch.randn(2, 13, dtype=torch.float64, requires_grad=True))
    check_gradients(F.adaptive_avg_pool1d, x1, 5)


@pytest.mark.parametrize("out", ADAPTIVE2D)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (3, 13, 11), (1, 5, 257)])
def test_adaptive_pool2d_matches_torch(shape, out):
    assert_same_as_torch(F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, torch.randn(shape, requires_grad=True), out)
    x = torch.randn(shape, requires_grad=True)
    assert_same_as_torch(F.adaptive_max_pool2d, TF.adaptive_max_pool2d, x, out, True)


@pytest.mark.parametrize("out", [1, 5, 13, 20, (4,)])
@pytest.mark.parametrize("shape", [(2, 3, 13), (4, 257)])
def test_adaptive_avg_pool1d_matches_torch(shape, out):
    assert_same_as_torch(F.adaptive_avg_pool1d, TF.adaptive_avg_pool1d, torch.randn(shape, requires_grad=True), out)


@pytest.mark.parametrize("fn,th", [(F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d),
                                   (F.adaptive_max_pool2d, TF.adaptive_max_pool2d)])
def test_adaptive_pool2d_to_an_empty_output_has_a_zero_gradient(fn, th):
    # torch's forward accepts an output size of 0 and returns an empty tensor, but its backward
    # then raises RuntimeError ("Expected grad_output to have non-zero size"); ours gives the
    # gradient of an empty output: zeros.
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    y = fn(x, (0, 3))
    torch.testing.assert_close(y, th(x.detach(), (0, 3)))
    with pytest.raises(RuntimeError, match="non-zero size"):
        th(x, (0, 3)).sum().backward()
    x.grad = None
    y.sum().backward()
    assert x.grad.shape == x.shape and (x.grad == 0).all()


# ---------------------------------------------------------------------------------------------
# properties over shapes and options

@st.composite
def pooling_case(draw, d):
    k = draw(st.integers(1, 4))
    s = draw(st.integers(1, 4))
    p = draw(st.integers(0, k // 2))
    lead = draw(st.sampled_from([(), (1,), (2,)]))
    sizes = tuple(draw(st.integers(k, 9)) for _ in range(d))
    return lead + (draw(st.integers(1, 3)),) + sizes, k, s, p, draw(st.booleans())


@given(case=pooling_case(2), dilation=st.integers(1, 2), count_include_pad=st.booleans(),
       divisor_override=st.sampled_from([None, 2]))
@settings(max_examples=25, deadline=None)
def test_pool2d_matches_torch_property(case, dilation, count_include_pad, divisor_override):
    shape, k, s, p, ceil_mode = case
    x = torch.randn(shape, requires_grad=True)
    assert_same_as_torch(F.avg_pool2d, TF.avg_pool2d, x, k, s, p, ceil_mode, count_include_pad, divisor_override)
    if (k - 1) * dilation + 1 <= min(shape[-2:]) + 2 * p:
        assert_same_as_torch(F.max_pool2d, TF.max_pool2d, x, k, s, p, dilation, ceil_mode, True)


@given(case=pooling_case(1), dilation=st.integers(1, 2), count_include_pad=st.booleans())
@settings(max_examples=25, deadline=None)
def test_pool1d_matches_torch_property(case, dilation, count_include_pad):
    shape, k, s, p, ceil_mode = case
    x = torch.randn(shape, requires_grad=True)
    assert_same_as_torch(F.avg_pool1d, TF.avg_pool1d, x, k, s, p, ceil_mode, count_include_pad)
    if (k - 1) * dilation + 1 <= shape[-1] + 2 * p:
        assert_same_as_torch(F.max_pool1d, TF.max_pool1d, x, k, s, p, dilation, ceil_mode, True)


@given(h=st.integers(1, 9), w=st.integers(1, 9), oh=st.integers(1, 10), ow=st.one_of(st.none(), st.integers(1, 10)))
@settings(max_examples=25, deadline=None)
def test_adaptive_pool_matches_torch_property(h, w, oh, ow):
    x = torch.randn(2, 3, h, w, requires_grad=True)
    assert_same_as_torch(F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, x, (oh, ow))
    assert_same_as_torch(F.adaptive_max_pool2d, TF.adaptive_max_pool2d, x, (oh, ow), True)
    assert_same_as_torch(F.adaptive_avg_pool1d, TF.adaptive_avg_pool1d, x[0], oh)


# ---------------------------------------------------------------------------------------------
# bad input and NaN

@pytest.mark.parametrize("fn,th,x,args", [
    (F.max_pool2d, TF.max_pool2d, (1, 1, 5, 5), (3, 1, 2)),  # padding > kernel / 2
    (F.max_pool1d, TF.max_pool1d, (1, 1, 5), (3, 1, 2)),
    (F.avg_pool2d, TF.avg_pool2d, (1, 1, 5, 5), (3, 1, 2)),
    (F.avg_pool1d, TF.avg_pool1d, (1, 1, 5), (3, 1, 2)),
    (F.max_pool2d, TF.max_pool2d, (1, 1, 2, 2), (3,)),  # output size 0
    (F.avg_pool2d, TF.avg_pool2d, (1, 1, 2, 2), (3,)),
    (F.max_pool1d, TF.max_pool1d, (1, 1, 2), (3,)),
    (F.avg_pool1d, TF.avg_pool1d, (1, 1, 2), (3,)),
    (F.max_pool1d, TF.max_pool1d, (1, 1, 1, 5), (2,)),  # wrong number of dims
    (F.avg_pool1d, TF.avg_pool1d, (1, 1, 1, 5), (2,)),
    (F.max_pool2d, TF.max_pool2d, (5, 5), (2,)),
    (F.avg_pool2d, TF.avg_pool2d, (1, 1, 1, 5, 5), (2,)),
    (F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, (5, 5), ((2, 2),)),
    (F.adaptive_avg_pool1d, TF.adaptive_avg_pool1d, (5,), (2,)),
    (F.adaptive_max_pool2d, TF.adaptive_max_pool2d, (5, 5), ((2, 2),)),
    (F.max_pool2d, TF.max_pool2d, (1, 1, 5, 5), ((3, 3, 3),)),  # kernel of the wrong length
    (F.max_pool2d, TF.max_pool2d, (1, 1, 5, 5), (3, 1, 0, 0)),  # dilation 0
    (F.max_pool2d, TF.max_pool2d, (1, 1, 5, 5), (3, 0)),  # stride 0
    (F.avg_pool2d, TF.avg_pool2d, (1, 1, 5, 5), (3, 1, 0, False, True, 0)),  # divisor_override 0
])
def test_bad_input_raises_like_torch(fn, th, x, args):
    assert_raises_like_torch(fn, th, torch.randn(x), *args)


def test_pooling_propagates_nan():
    x = torch.randn(1, 1, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    for fn in (lambda t: F.avg_pool2d(t, 2), lambda t: F.max_pool2d(t, 2), lambda t: F.adaptive_avg_pool2d(t, 2),
               lambda t: F.adaptive_max_pool2d(t, 2)):
        y = fn(x)
        assert y[0, 0, 0, 0].isnan() and not y[0, 0, 1:].isnan().any() and not y[0, 0, :, 1:].isnan().any()


def test_pooling_works_under_vmap_of_grad():
    x = torch.randn(4, 3, 7, 9)
    for ours, theirs in [(F.max_pool2d, TF.max_pool2d), (F.avg_pool2d, TF.avg_pool2d)]:
        g = torch.func.vmap(torch.func.grad(lambda t: ours(t, 3, 2, 1).square().sum()))(x)
        ref = torch.func.vmap(torch.func.grad(lambda t: theirs(t, 3, 2, 1).square().sum()))(x)
        torch.testing.assert_close(g, ref)


# ---------------------------------------------------------------------------------------------
# modules

MODULES = [
    (mnn.MaxPool1d, torch.nn.MaxPool1d, dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True),
     (2, 3, 13)),
    (mnn.MaxPool2d, torch.nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1, return_indices=True), (2, 3, 7, 9)),
    (mnn.AvgPool1d, torch.nn.AvgPool1d, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                             count_include_pad=False), (2, 3, 13)),
    (mnn.AvgPool2d, torch.nn.AvgPool2d, dict(kernel_size=3, stride=2, padding=1, divisor_override=4), (2, 3, 7, 9)),
    (mnn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool1d, dict(output_size=5), (2, 3, 13)),
    (mnn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool2d, dict(output_size=(None, 4)), (2, 3, 7, 9)),
    (mnn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool2d, dict(output_size=(3, 4), return_indices=True), (2, 3, 7, 9)),
    (mnn.Flatten, torch.nn.Flatten, dict(start_dim=1, end_dim=2), (2, 3, 7, 9)),
    (mnn.Unflatten, torch.nn.Unflatten, dict(dim=1, unflattened_size=(3, 1)), (2, 3, 7)),
]


@pytest.mark.parametrize("ours,theirs,kwargs,shape", MODULES)
def test_pooling_modules_match_torch(ours, theirs, kwargs, shape):
    m, t = ours(**kwargs), theirs(**kwargs)
    assert isinstance(m, theirs) and repr(m) == repr(t)
    m.load_state_dict(t.state_dict())
    t.load_state_dict(m.state_dict())
    assert_same_as_torch(m, t, torch.randn(shape, requires_grad=True))


def test_convert_swaps_pooling_and_flatten_modules():
    model = torch.nn.Sequential(
        torch.nn.MaxPool2d(2), torch.nn.AvgPool2d(3, 1, 1),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(), torch.nn.Unflatten(1, (3, 1)), torch.nn.Flatten(),
        torch.nn.Unflatten(1, (1, 3)), torch.nn.MaxPool1d(1), torch.nn.AvgPool1d(1), torch.nn.AdaptiveAvgPool1d(2),
    )
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    expected = model(x)
    mg.convert(model, strict=True)
    assert [type(m).__module__ for m in model] == ["manualgrad.nn.pooling"] * len(model)
    torch.testing.assert_close(model(x), expected)
    assert model[0].forward.__func__ is mnn.MaxPool2d.forward


def test_max_pool_plain_and_graph_backwards_sum_overlapping_windows_like_torch():
    # Plain backward (no graph) scatters dy into its fresh zeros in place; with create_graph it
    # scatters out of place. A constant input: every window's max is its first cell, and with
    # kernel 3 stride 1 most cells are that first cell of several windows, whose dy must add up.
    x = torch.ones(2, 3, 6, 7, requires_grad=True)
    dy = torch.randn(2, 3, 6, 7)
    (theirs,) = torch.autograd.grad(TF.max_pool2d(x, 3, 1, 1), x, dy)
    (plain,) = torch.autograd.grad(F.max_pool2d(x, 3, 1, 1), x, dy)
    (graph,) = torch.autograd.grad(F.max_pool2d(x, 3, 1, 1), x, dy, create_graph=True)
    assert theirs.abs().max() > dy.abs().max()  # some cells collect more than one window's dy
    torch.testing.assert_close(plain, theirs)
    torch.testing.assert_close(graph.detach(), theirs)


def test_max_pool_plain_backward_of_tiling_windows_matches_torch():
    # the ResNet stem's pooling: kernel 2 = stride, windows tile the input (no accumulation)
    x = torch.randn(4, 5, 8, 10, requires_grad=True)
    assert_same_as_torch(F.max_pool2d, TF.max_pool2d, x, 2)
