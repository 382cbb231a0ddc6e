"""The rest of the pooling family: avg_pool3d, adaptive_avg_pool3d, adaptive_max_pool1d/3d
(ops/pooling.py), lp_pool1d/2d/3d, max_unpool1d/2d/3d, fractional_max_pool2d/3d (ops/pooling_more.py).

Max-type ops select values: float32 outputs, indices and gradients are compared exactly with
torch's (the upstream gradient holds multiples of 1/4, exact_dy, so overlapping windows sum
exactly whatever the order). Average-type ops are compared within float32 rounding.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients, saved_bytes
from tests.conftest import exact_dy, noncontiguous

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


def distinct(*shape, dtype=torch.float64):
    """Values without ties (a shuffled range, scaled): the argmax is unique and stays put under
    finite differences."""
    n = torch.Size(shape).numel()
    return (torch.randperm(n, dtype=dtype) / n).view(shape).requires_grad_()


def f64(*shape):
    return torch.randn(shape, dtype=torch.float64, requires_grad=True)


def f32(*shape):
    return torch.randn(shape, requires_grad=True)


def same_exactly(ours, theirs, x, *args, **kwargs):
    """Outputs (indices too) and input gradients bit for bit, for an exactly summable dy."""
    out = theirs(x.detach(), *args, **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    assert_same_as_torch(ours, theirs, x, *args, grad_output=exact_dy(y.shape), rtol=0, atol=0, **kwargs)


# ---------------------------------------------------------------------------------------------
# avg_pool3d: (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
# tiling, overlapping + padding, ceil_mode, padding not counted, divisor_override, gapped, per-dim tuples

AVG3D = [
    (2, None, 0, False, True, None),
    (3, 1, 1, False, True, None),
    (3, 2, 1, True, True, None),
    (3, 2, 1, True, False, None),
    (2, 1, 1, False, True, 3),
    (2, 3, 1, True, False, None),
    ((3, 2, 1), (2, 1, 1), (1, 0, 0), True, False, None),
]


@pytest.mark.parametrize("args", AVG3D, ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 4, 5, 3), (2, 4, 3, 5)], ids=str)
def test_avg_pool3d_gradients(shape, args):
    check_gradients(F.avg_pool3d, f64(*shape), *args)


def test_avg_pool3d_gradients_non_contiguous():
    x = noncontiguous(f64(2, 2, 3, 4, 3))
    assert not x.is_contiguous()
    check_gradients(F.avg_pool3d, x, 3, 2, 1, True, False)
    check_gradients(F.avg_pool3d, x, 2)


@pytest.mark.parametrize("args", AVG3D, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 6), (3, 5, 4, 9)], ids=str)
def test_avg_pool3d_matches_torch_divisors_at_the_borders(shape, args):
    x = f32(*shape)
    if x.dim() == 5 and shape[0] == 2:
        x = x.detach().to(memory_format=torch.channels_last_3d).requires_grad_()
    assert_same_as_torch(F.avg_pool3d, TF.avg_pool3d, x, *args)


def test_avg_pool3d_matches_torch_on_size_one_dims():
    assert_same_as_torch(F.avg_pool3d, TF.avg_pool3d, f32(1, 1, 1, 3, 7), (1, 2, 3), (1, 1, 2), (0, 1, 1), True)
    assert_same_as_torch(F.avg_pool3d, TF.avg_pool3d, f32(2, 1, 1, 1, 1), 1)


def test_avg_pool3d_gradient_spreads_dy_over_each_window_by_hand():
    # (1, 1, 3) input of depth and height 1, kernel (1, 1, 2), stride 1, padding (0, 0, 1),
    # count_include_pad=False: windows [0] / 1, [0, 1] / 2, [1, 2] / 2, [2] / 1
    x = f64(1, 1, 1, 1, 3)
    F.avg_pool3d(x, (1, 1, 2), 1, (0, 0, 1), False, False).backward(
        torch.tensor([2.0, 4.0, 6.0, 8.0], dtype=torch.float64).view(1, 1, 1, 1, 4))
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([4.0, 5.0, 11.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# adaptive_avg_pool3d / adaptive_max_pool3d: output sizes that divide the input, that do not,
# that exceed it, None entries

ADAPTIVE3D = [1, 2, (2, 3, 1), (4, None, 2), (None, 3, None), (5, 6, 4)]


@pytest.mark.parametrize("out", ADAPTIVE3D, ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 4, 5, 3), (2, 3, 4, 2)], ids=str)
def test_adaptive_pool3d_gradients(shape, out):
    check_gradients(F.adaptive_avg_pool3d, f64(*shape), out)
    check_gradients(F.adaptive_max_pool3d, distinct(*shape), out)


def test_adaptive_pool3d_gradients_non_contiguous_with_indices():
    x = noncontiguous(distinct(2, 2, 3, 5, 4))
    check_gradients(F.adaptive_avg_pool3d, x, (2, 3, 3))
    check_gradients(lambda t: F.adaptive_max_pool3d(t, (2, 3, 3), return_indices=True), x)


@pytest.mark.parametrize("out", ADAPTIVE3D, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 7, 5, 9), (3, 5, 4, 11), (1, 1, 1, 9, 2)], ids=str)
def test_adaptive_pool3d_matches_torch(shape, out):
    assert_same_as_torch(F.adaptive_avg_pool3d, TF.adaptive_avg_pool3d, f32(*shape), out)
    same_exactly(F.adaptive_max_pool3d, TF.adaptive_max_pool3d, f32(*shape), out, True)
    same_exactly(F.adaptive_max_pool3d, TF.adaptive_max_pool3d, f32(*shape), out)


def test_adaptive_pool3d_matches_torch_on_channels_last_input_and_ties():
    x = torch.randn(2, 3, 5, 4, 6).to(memory_format=torch.channels_last_3d).requires_grad_()
    assert_same_as_torch(F.adaptive_avg_pool3d, TF.adaptive_avg_pool3d, x, (2, 3, 4))
    same_exactly(F.adaptive_max_pool3d, TF.adaptive_max_pool3d, x, (2, 3, 4), True)
    # ties: every value equal, overlapping windows; the gradient goes where torch's goes
    same_exactly(F.adaptive_max_pool3d, TF.adaptive_max_pool3d, torch.ones(1, 2, 5, 5, 5, requires_grad=True), 3)


def test_adaptive_avg_pool3d_gradient_by_hand():
    # a length of 3 into 2 windows along W: [0, 1] / 2 and [1, 2] / 2; D = H = 1
    x = f64(1, 1, 1, 3)
    F.adaptive_avg_pool3d(x, (1, 1, 2)).backward(torch.tensor([2.0, 6.0], dtype=torch.float64).view(1, 1, 1, 2))
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([1.0, 4.0, 3.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# adaptive_max_pool1d

@pytest.mark.parametrize("out", [1, 3, 4, 13, 15, (5,)], ids=str)
@pytest.mark.parametrize("shape", [(2, 1, 13), (3, 12)], ids=str)
def test_adaptive_max_pool1d_gradients(shape, out):
    check_gradients(F.adaptive_max_pool1d, distinct(*shape), out)
    check_gradients(lambda t: F.adaptive_max_pool1d(t, out, return_indices=True), noncontiguous(distinct(*shape)))


@pytest.mark.parametrize("out", [1, 5, 13, 20, (4,)], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 13), (4, 257), (1, 1, 1)], ids=str)
def test_adaptive_max_pool1d_matches_torch_with_indices(shape, out):
    same_exactly(F.adaptive_max_pool1d, TF.adaptive_max_pool1d, f32(*shape), out, True)
    same_exactly(F.adaptive_max_pool1d, TF.adaptive_max_pool1d, f32(*shape), out)
    # ties
    same_exactly(F.adaptive_max_pool1d, TF.adaptive_max_pool1d, torch.ones(shape, requires_grad=True), out, True)


def test_adaptive_max_pool_jvp_gathers_the_tangent_at_the_argmax():
    x, t = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5, 6)
    for ours, theirs, out in [(F.adaptive_max_pool3d, TF.adaptive_max_pool3d, (3, 2, 4)),
                              (F.adaptive_max_pool1d, TF.adaptive_max_pool1d, 4),
                              (F.adaptive_avg_pool3d, TF.adaptive_avg_pool3d, (3, 2, 4)),
                              (F.avg_pool3d, TF.avg_pool3d, 3)]:
        xi, ti = (x, t) if ours is not F.adaptive_max_pool1d else (x.flatten(2), t.flatten(2))
        with fwAD.dual_level():
            got = fwAD.unpack_dual(ours(fwAD.make_dual(xi, ti), out)).tangent
            expected = fwAD.unpack_dual(theirs(fwAD.make_dual(xi, ti), out)).tangent
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------
# bad input: torch's exception types

@pytest.mark.parametrize("fn,th,x,args", [
    (F.avg_pool3d, TF.avg_pool3d, (1, 1, 5, 5, 5), (3, 1, 2)),  # padding > kernel / 2
    (F.avg_pool3d, TF.avg_pool3d, (1, 1, 2, 2, 2), (3,)),  # output size 0
    (F.avg_pool3d, TF.avg_pool3d, (5, 5, 5), (2,)),  # wrong number of dims
    (F.avg_pool3d, TF.avg_pool3d, (1, 1, 5, 5, 5), ((3, 3),)),  # kernel of the wrong length
    (F.avg_pool3d, TF.avg_pool3d, (1, 1, 5, 5, 5), (3, 0)),  # stride 0
    (F.avg_pool3d, TF.avg_pool3d, (1, 1, 5, 5, 5), (3, 1, 0, False, True, 0)),  # divisor_override 0
    (F.adaptive_avg_pool3d, TF.adaptive_avg_pool3d, (5, 5, 5), ((2, 2, 2),)),
    (F.adaptive_avg_pool3d, TF.adaptive_avg_pool3d, (1, 5, 5, 5), ((2, 2),)),
    (F.adaptive_max_pool3d, TF.adaptive_max_pool3d, (5, 5, 5), ((2, 2, 2),)),
    (F.adaptive_max_pool3d, TF.adaptive_max_pool3d, (1, 5, 5, 5), ((2, -1, 2),)),
    (F.adaptive_max_pool1d, TF.adaptive_max_pool1d, (5,), (2,)),
    (F.adaptive_max_pool1d, TF.adaptive_max_pool1d, (1, 1, 5), ((2, 2),)),
    (F.adaptive_max_pool1d, TF.adaptive_max_pool1d, (1, 1, 5), (-1,)),
])
def test_bad_input_raises_like_torch(fn, th, x, args):
    assert_raises_like_torch(fn, th, torch.randn(x), *args)


# ---------------------------------------------------------------------------------------------
# autocast: torch's CPU list runs the 3-d ops (and lp_pool3d's avg_pool3d), max unpooling and
# fractional max pooling in float32; the others stay in the input's dtype

AUTOCAST = {
    "avg_pool3d": (lambda m, x: m.avg_pool3d(x, 3, 2, 1), (2, 3, 5, 6, 4)),
    "adaptive_avg_pool3d": (lambda m, x: m.adaptive_avg_pool3d(x, (2, 3, 2)), (2, 3, 5, 6, 4)),
    "adaptive_max_pool1d": (lambda m, x: m.adaptive_max_pool1d(x, 4), (2, 3, 9)),
    "adaptive_max_pool3d": (lambda m, x: m.adaptive_max_pool3d(x, (2, 3, 2)), (2, 3, 5, 6, 4)),
    "lp_pool1d": (lambda m, x: m.lp_pool1d(x, 2, 3, 2), (2, 3, 9)),
    "lp_pool2d": (lambda m, x: m.lp_pool2d(x, 2, 2), (2, 3, 6, 4)),
    "lp_pool3d": (lambda m, x: m.lp_pool3d(x, 2, 2), (2, 3, 4, 6, 4)),
    "lp_pool2d_inf": (lambda m, x: m.lp_pool2d(x, float("inf"), 2), (2, 3, 6, 4)),
    "lp_pool3d_inf": (lambda m, x: m.lp_pool3d(x, -float("inf"), 2), (2, 3, 4, 6, 4)),
    "max_unpool1d": (lambda m, x: m.max_unpool1d(x, torch.tensor([[[0, 3, 5]]]), 2), (1, 1, 3)),
    "max_unpool2d": (lambda m, x: m.max_unpool2d(x, torch.tensor([[[[0, 3], [9, 10]]]]), 2), (1, 1, 2, 2)),
    "max_unpool3d": (lambda m, x: m.max_unpool3d(x, torch.tensor([[[[[0, 7]]]]]), 2), (1, 1, 1, 1, 2)),
    # (samples drawn in x's dtype, bfloat16, as torch's; each run is seeded alike)
    "fractional_max_pool2d": (lambda m, x: m.fractional_max_pool2d(x, 2, (3, 2)), (2, 3, 6, 4)),
    "fractional_max_pool3d": (lambda m, x: m.fractional_max_pool3d(x, 2, output_ratio=0.5), (2, 3, 4, 6, 4)),
}


@pytest.mark.parametrize("name", list(AUTOCAST))
def test_op_under_bfloat16_autocast_gives_torchs_dtype_and_values(name):
    call, shape = AUTOCAST[name]
    x = torch.randn(shape).bfloat16()
    results = []
    for m in (F, TF):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = call(m, leaf)
        torch.manual_seed(1)  # the same upstream gradient for both
        y.backward(exact_dy(y.shape).to(y.dtype))
        results.append((y, leaf.grad))
    (y, g), (yt, gt) = results
    assert y.dtype == yt.dtype and g.dtype == gt.dtype == torch.bfloat16
    torch.testing.assert_close(y, yt, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g, gt, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# lp_pool1d/2d/3d: (norm_type, kernel_size, stride, ceil_mode); odd and fractional p on
# positive inputs (torch's (sum)^(1/p) of a negative sum is nan), p = 1 and 2 on any sign

LP = {
    1: [(2, 2, None, False), (1, 3, 2, True), (3, 3, 1, False), (1.5, 4, 3, True)],
    2: [(2, 2, None, False), (1, (3, 2), (2, 1), True), (3, 3, 2, False), (1.5, (2, 3), 3, True)],
    3: [(2, 2, None, False), (1, (3, 2, 1), (2, 1, 1), True), (3, 2, 1, False), (1.5, (1, 2, 3), 2, True)],
}
LP_FN = {1: (F.lp_pool1d, TF.lp_pool1d), 2: (F.lp_pool2d, TF.lp_pool2d), 3: (F.lp_pool3d, TF.lp_pool3d)}
LP_SHAPES = {1: [(2, 2, 7), (3, 8)], 2: [(1, 2, 5, 6), (2, 4, 5)], 3: [(1, 2, 4, 5, 3), (2, 4, 3, 5)]}


def lp_input(x, p):
    """x, or |x| + 0.1 for a p whose power of a negative window sum is nan."""
    return x if p in (1, 2) else (x.detach().abs() + 0.1).requires_grad_()


@pytest.mark.parametrize("d,args", [(d, a) for d in LP for a in LP[d]], ids=str)
def test_lp_pool_gradients(d, args):
    for shape in LP_SHAPES[d]:
        check_gradients(LP_FN[d][0], lp_input(f64(*shape), args[0]), *args)


@pytest.mark.parametrize("d,args", [(d, a) for d in LP for a in LP[d]], ids=str)
def test_lp_pool_matches_torch(d, args):
    ours, theirs = LP_FN[d]
    shapes = {1: [(2, 3, 13), (4, 257)], 2: [(2, 3, 7, 9), (3, 13, 11)], 3: [(2, 3, 5, 7, 6), (3, 5, 4, 9)]}[d]
    for shape in shapes:
        assert_same_as_torch(ours, theirs, lp_input(f32(*shape), args[0]), *args)
    x = lp_input(noncontiguous(f32(*shapes[0])), args[0])
    assert_same_as_torch(ours, theirs, x, *args)


@pytest.mark.parametrize("d", [2, 3])
def test_lp_pool_matches_torch_on_channels_last_input(d):
    fmt = torch.channels_last if d == 2 else torch.channels_last_3d
    shape = (2, 3, 7, 9) if d == 2 else (2, 3, 5, 7, 6)
    ours, theirs = LP_FN[d]
    for args in LP[d]:
        x = lp_input(f32(*shape), args[0]).detach().to(memory_format=fmt).requires_grad_()
        assert_same_as_torch(ours, theirs, x, *args)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("p", [float("inf"), -float("inf")])
def test_lp_pool_of_infinite_norm_is_max_pooling_of_abs_like_torch(d, p):
    ours, theirs = LP_FN[d]
    shape = LP_SHAPES[d][0]
    same_exactly(ours, theirs, f32(*shape), p, 2, None, True)
    # distinct magnitudes with either sign: |x| has no ties, and x no zero
    x = (distinct(*shape).detach() + 0.1) * torch.randn(shape, dtype=torch.float64).sign()
    check_gradients(ours, x.requires_grad_(), p, 2, 1)
    # ties of |x| between x and -x, and zeros (sign 0: no gradient), where torch's pick goes
    ties = torch.randint(-2, 3, shape).float().requires_grad_()
    same_exactly(ours, theirs, ties, p, 3, 2, True)
    # jvp: sign(x) dx at the pick
    x, t = torch.randn(shape), torch.randn(shape)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x, t), p, 2, 1)).tangent
        expected = fwAD.unpack_dual(theirs(fwAD.make_dual(x, t), p, 2, 1)).tangent
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_lp_pool_by_hand_and_zero_windows_get_no_gradient():
    # p = 2, windows (3, 4) and (0, 0): y = (5, 0); dy/dx = x / y in the first, 0 in the second
    x = torch.tensor([[[3.0, 4.0, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    y = F.lp_pool1d(x, 2, 2)
    torch.testing.assert_close(y, torch.tensor([[[5.0, 0.0]]], dtype=torch.float64))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.tensor([[[0.6, 0.8, 0.0, 0.0]]], dtype=torch.float64))
    # as torch: every zero window, alone or beside others, in each d
    for d in (1, 2, 3):
        z = torch.zeros(LP_SHAPES[d][0])
        z.view(-1)[:3] = torch.tensor([1.0, -2.0, 0.5])
        assert_same_as_torch(LP_FN[d][0], LP_FN[d][1], z.requires_grad_(), 2, 2)


def test_lp_pool_jvp_matches_torchs():
    for d in (1, 2, 3):
        x, t = lp_input(f32(*LP_SHAPES[d][0]), 3).detach(), torch.randn(LP_SHAPES[d][0])
        for p, k, s, ceil in LP[d]:
            with fwAD.dual_level():
                got = fwAD.unpack_dual(LP_FN[d][0](fwAD.make_dual(x, t), p, k, s, ceil)).tangent
                expected = fwAD.unpack_dual(LP_FN[d][1](fwAD.make_dual(x, t), p, k, s, ceil)).tangent
            torch.testing.assert_close(got, expected)


def test_lp_pool_saves_only_the_input():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    ours, _ = saved_bytes(F.lp_pool2d, x, 2, 2)
    theirs, _ = saved_bytes(TF.lp_pool2d, x, 2, 2)
    assert ours == x.numel() * 4 < theirs


def _pooled_indices(d, shape):
    """max_pool's output (requires grad) and indices for max_unpool."""
    y, idx = getattr(TF, f"max_pool{d}d")(torch.randn(shape), 2, return_indices=True)
    return y.requires_grad_(), idx


# name, inputs, kwargs, bytes saved beyond the inputs (int64 indices: 8 per output; averages: none)
SAVES = [
    ("avg_pool3d", lambda: (f32(2, 3, 6, 5, 7), 3, 2, 1), {}, 0),
    ("avg_pool3d", lambda: (f32(2, 3, 6, 5, 7), 2), dict(ceil_mode=True, count_include_pad=False), 0),
    ("adaptive_avg_pool3d", lambda: (f32(2, 3, 6, 5, 7), (3, 2, 4)), {}, 0),
    ("adaptive_max_pool3d", lambda: (f32(2, 3, 6, 5, 7), (3, 2, 4)), {}, 2 * 3 * 24 * 8),
    ("adaptive_max_pool1d", lambda: (f32(2, 3, 13), 5), dict(return_indices=True), 2 * 3 * 5 * 8),
    ("fractional_max_pool2d", lambda: (f32(2, 3, 8, 9), 2), dict(output_size=(5, 6), _random_samples=torch.rand(2, 3, 2)),
     2 * 3 * 30 * 8),
    ("fractional_max_pool3d", lambda: (f32(2, 3, 6, 5, 7), 2),
     dict(output_size=(4, 3, 5), _random_samples=torch.rand(2, 3, 3)), 2 * 3 * 60 * 8),
    ("max_unpool1d", lambda: (*_pooled_indices(1, (2, 3, 12)), 2), {}, 2 * 3 * 6 * 8),
    ("max_unpool2d", lambda: (*_pooled_indices(2, (2, 3, 8, 8)), 2), {}, 2 * 3 * 16 * 8),
    ("max_unpool3d", lambda: (*_pooled_indices(3, (2, 3, 6, 4, 8)), 2), {}, 2 * 3 * 24 * 8),
]


@pytest.mark.parametrize("name,make,kwargs,expected", SAVES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SAVES)])
def test_pooling_saves_no_more_than_torch(name, make, kwargs, expected):
    args = make()
    ours, _ = saved_bytes(getattr(F, name), *args, exclude=args[:1], **kwargs)
    theirs, _ = saved_bytes(getattr(TF, name), *args, exclude=args[:1], **kwargs)
    assert ours == expected <= theirs


@pytest.mark.parametrize("fn,th,x,args", [
    (F.lp_pool1d, TF.lp_pool1d, (1, 2, 7), (2, (3,))),  # a sequence as lp_pool1d's kernel
    (F.lp_pool1d, TF.lp_pool1d, (1, 2, 7), (2, 3, 0)),  # stride 0
    (F.lp_pool2d, TF.lp_pool2d, (1, 2, 7), (2, 3)),  # output size 0
    (F.lp_pool2d, TF.lp_pool2d, (1, 1, 5, 5), (0, 3)),  # norm_type 0: 1 / 0
    (F.lp_pool3d, TF.lp_pool3d, (5, 5, 5), (2, 2)),  # wrong number of dims
    (F.lp_pool3d, TF.lp_pool3d, (1, 1, 5, 5, 5), (2, (2, 2))),  # kernel of the wrong length
    (F.lp_pool2d, TF.lp_pool2d, (1, 1, 5, 5), (2, (2,))),
])
def test_lp_pool_bad_input_raises_like_torch(fn, th, x, args):
    assert_raises_like_torch(fn, th, torch.randn(x), *args)


# ---------------------------------------------------------------------------------------------
# max_unpool1d/2d/3d: indices from max pooling with (kernel_size, stride, padding); the unpooled
# size is the default or the pooled input's (output_size). Gradchecks need one input per index:
# windows that do not overlap (overlapping windows can share an argmax, whose one output the
# finite difference sees once; torch's and this backward give each input its gradient there)

UNPOOL = {  # d: (shape, kernel_size, stride, padding, output_size given?)
    1: [((2, 3, 8), 2, None, 0, False), ((2, 3, 9), 2, 3, 1, True), ((3, 11), 3, 2, 1, True)],
    2: [((2, 3, 6, 4), 2, None, 0, False), ((2, 3, 7, 9), (2, 1), (3, 2), (1, 0), True), ((3, 7, 9), 3, 2, 1, True)],
    3: [((1, 2, 4, 6, 4), 2, None, 0, False), ((1, 2, 5, 7, 4), (2, 1, 2), (3, 2, 2), (1, 0, 1), True),
        ((2, 5, 4, 7), 3, 2, 1, True)],
}
POOL = {1: TF.max_pool1d, 2: TF.max_pool2d, 3: TF.max_pool3d}
UNPOOL_FN = {1: (F.max_unpool1d, TF.max_unpool1d), 2: (F.max_unpool2d, TF.max_unpool2d),
             3: (F.max_unpool3d, TF.max_unpool3d)}


def pooled(d, shape, k, s, p, dtype=torch.float32):
    """(y, idx) of max pooling a random x, and the unpooling's output_size for the given x."""
    y, idx = POOL[d](torch.randn(shape), k, s, p, return_indices=True)
    return y.to(dtype).requires_grad_(), idx, list(shape[-d:])


def _seq(v, d):
    return (v,) * d if isinstance(v, int) else tuple(v)


def _overlapping(d, case):
    _, k, s, _, _ = case
    return s is not None and any(a < b for a, b in zip(_seq(s, d), _seq(k, d)))


@pytest.mark.parametrize("d,case", [(d, c) for d in UNPOOL for c in UNPOOL[d] if not _overlapping(d, c)], ids=str)
def test_max_unpool_gradients(d, case):
    shape, k, s, p, sized = case
    y, idx, size = pooled(d, shape, k, s, p, torch.float64)
    out = size if sized else None
    check_gradients(lambda t: UNPOOL_FN[d][0](t, idx, k, s, p, out), y)


@pytest.mark.parametrize("d,case", [(d, c) for d in UNPOOL for c in UNPOOL[d]], ids=str)
def test_max_unpool_matches_torch_exactly(d, case):
    shape, k, s, p, sized = case
    ours, theirs = UNPOOL_FN[d]
    y, idx, size = pooled(d, shape, k, s, p)
    out = size if sized else None
    same_exactly(lambda t: ours(t, idx, k, s, p, out), lambda t: theirs(t, idx, k, s, p, out), y)
    # output_size with the batch and channel dims in front, and a non-contiguous input
    if sized and len(shape) == d + 2:
        full = list(shape)
        same_exactly(lambda t: ours(t, idx, k, s, p, full), lambda t: theirs(t, idx, k, s, p, full), noncontiguous(y))


@pytest.mark.parametrize("d", [2, 3])
def test_max_unpool_matches_torch_exactly_on_channels_last_input(d):
    fmt = torch.channels_last if d == 2 else torch.channels_last_3d
    shape, k, s, p, _ = UNPOOL[d][1]  # strided, padded windows
    ours, theirs = UNPOOL_FN[d]
    y, idx, size = pooled(d, shape, k, s, p)
    y = y.detach().to(memory_format=fmt).requires_grad_()
    same_exactly(lambda t: ours(t, idx, k, s, p, size), lambda t: theirs(t, idx, k, s, p, size), y)


def test_max_unpool_gradient_by_hand():
    # y = (0, 5, 0, 0, 7, 0) from x = (5, 7) at indices (1, 4): dx = (dy[1], dy[4])
    x = torch.tensor([[[5.0, 7.0]]], dtype=torch.float64, requires_grad=True)
    y = F.max_unpool1d(x, torch.tensor([[[1, 4]]]), 3)
    torch.testing.assert_close(y, torch.tensor([[[0.0, 5.0, 0.0, 0.0, 7.0, 0.0]]], dtype=torch.float64))
    y.backward(torch.arange(6.0, dtype=torch.float64).view(1, 1, 6))
    torch.testing.assert_close(x.grad, torch.tensor([[[1.0, 4.0]]], dtype=torch.float64))


def test_max_unpool_jvp_matches_torchs():
    for d in UNPOOL:
        shape, k, s, p, sized = UNPOOL[d][1]
        y, idx, size = pooled(d, shape, k, s, p)
        t = torch.randn(y.shape)
        ours, theirs = UNPOOL_FN[d]
        with fwAD.dual_level():
            got = fwAD.unpack_dual(ours(fwAD.make_dual(y.detach(), t), idx, k, s, p, size)).tangent
            expected = fwAD.unpack_dual(theirs(fwAD.make_dual(y.detach(), t), idx, k, s, p, size)).tangent
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _indices(shape, high, dtype=torch.int64):
    return torch.randint(0, high, shape, dtype=dtype)


@pytest.mark.parametrize("fn,th,x,idx,args", [
    (F.max_unpool2d, TF.max_unpool2d, (1, 2, 3, 3), _indices((1, 2, 3, 3), 36) + 36, (2,)),  # index out of range
    (F.max_unpool2d, TF.max_unpool2d, (1, 2, 3, 3), _indices((1, 2, 3, 3), 36, torch.int32), (2,)),  # int32
    (F.max_unpool2d, TF.max_unpool2d, (1, 2, 3, 3), _indices((1, 2, 1, 3), 36), (2,)),  # shape unlike x's
    (F.max_unpool1d, TF.max_unpool1d, (1, 2, 3), _indices((1, 2, 3), 6), (2, None, 0, (9,))),  # size out of range
    (F.max_unpool3d, TF.max_unpool3d, (1, 2, 3, 3, 3), _indices((1, 2, 3, 3, 3), 216), (2, None, 0, (6, 6))),
    (F.max_unpool3d, TF.max_unpool3d, (1, 2, 3, 3, 3), _indices((1, 2, 3, 3, 3), 216) - 216, (2,)),  # negative (every one)
    (F.max_unpool3d, TF.max_unpool3d, (2, 3, 3), _indices((2, 3, 3), 36), (2,)),  # too few dims
])
def test_max_unpool_bad_input_raises_like_torch(fn, th, x, idx, args):
    assert_raises_like_torch(fn, th, torch.randn(x), idx, *args)


# ---------------------------------------------------------------------------------------------
# fractional_max_pool2d/3d: (kernel_size, output_size, output_ratio)

FRACTIONAL = {
    2: [(2, (3, 4), None), (3, 4, None), ((2, 3), None, (0.5, 0.6)), (1, (5, 7), None)],
    3: [(2, (2, 3, 2), None), ((2, 1, 3), 3, None), (2, None, (0.5, 0.6, 0.7)), (2, None, 0.5)],
}
FRACTIONAL_FN = {2: (F.fractional_max_pool2d, TF.fractional_max_pool2d),
                 3: (F.fractional_max_pool3d, TF.fractional_max_pool3d)}


def _same_draws(ours, theirs, x, *args, seed=3, **kwargs):
    """Both under the same seed, each on its own copy of x: outputs (indices too), input
    gradients for an exactly summable dy, and the generator's state after the call."""
    results = []
    for fn in (ours, theirs):
        leaf = x.detach().clone().requires_grad_()
        torch.manual_seed(seed)
        out = fn(leaf, *args, **kwargs)
        after = torch.rand(4)  # the generator moved on by the same draw
        outs = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(seed + 1)
        outs[0].backward(exact_dy(outs[0].shape))
        results.append((outs, leaf.grad, after))
    (outs, grad, after), (touts, tgrad, tafter) = results
    assert len(outs) == len(touts)
    for a, b in zip(outs, touts):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(grad, tgrad, rtol=0, atol=0)
    torch.testing.assert_close(after, tafter, rtol=0, atol=0)


@pytest.mark.parametrize("d,args", [(d, a) for d in FRACTIONAL for a in FRACTIONAL[d]], ids=str)
def test_fractional_max_pool_gradients(d, args):
    k, out, ratio = args
    for shape in {2: [(2, 2, 6, 7), (3, 6, 8)], 3: [(1, 2, 5, 5, 6), (2, 5, 5, 6)]}[d]:
        n = 1 if len(shape) == d + 1 else shape[0]
        samples = torch.rand(n, shape[-d - 1], d, dtype=torch.float64)
        check_gradients(lambda t: FRACTIONAL_FN[d][0](t, k, out, ratio, True, samples), distinct(*shape))


@pytest.mark.parametrize("d,args", [(d, a) for d in FRACTIONAL for a in FRACTIONAL[d]], ids=str)
def test_fractional_max_pool_draws_torchs_windows_under_the_same_seed(d, args):
    ours, theirs = FRACTIONAL_FN[d]
    k, out, ratio = args
    for shape in {2: [(2, 3, 9, 11), (3, 10, 7)], 3: [(2, 3, 6, 7, 9), (3, 8, 5, 6)]}[d]:
        _same_draws(ours, theirs, torch.randn(shape), k, out, ratio, True)
        _same_draws(ours, theirs, torch.randn(shape), k, output_size=out, output_ratio=ratio)
    x = torch.randn({2: (2, 3, 9, 11), 3: (2, 3, 6, 7, 9)}[d])
    # non-contiguous and channels-last inputs
    _same_draws(ours, theirs, noncontiguous(x), k, out, ratio, True)
    _same_draws(ours, theirs, x.contiguous(memory_format=torch.channels_last if d == 2 else torch.channels_last_3d),
                k, out, ratio, True)


@pytest.mark.parametrize("d", [2, 3])
def test_fractional_max_pool_with_given_samples_and_ties_matches_torch(d):
    ours, theirs = FRACTIONAL_FN[d]
    shape = (2, 3) + (9, 7, 8)[:d]
    samples = torch.rand(2, 3, d)
    same_exactly(ours, theirs, f32(*shape), 3, 4, None, True, samples)
    same_exactly(ours, theirs, f32(*shape), 2, None, (0.5,) * d, _random_samples=samples)
    same_exactly(ours, theirs, torch.ones(shape, requires_grad=True), 3, 4, _random_samples=samples)  # ties


def test_fractional_max_pool_jvp_gathers_the_tangent_at_the_argmax():
    for d in (2, 3):
        x, t = torch.randn((2, 3) + (9, 7, 8)[:d]), torch.randn((2, 3) + (9, 7, 8)[:d])
        samples = torch.rand(2, 3, d)
        ours, theirs = FRACTIONAL_FN[d]
        with fwAD.dual_level():
            got = fwAD.unpack_dual(ours(fwAD.make_dual(x, t), 3, 4, _random_samples=samples)).tangent
            expected = fwAD.unpack_dual(theirs(fwAD.make_dual(x, t), 3, 4, _random_samples=samples)).tangent
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("fn,th,x,args,kwargs", [
    (F.fractional_max_pool2d, TF.fractional_max_pool2d, (1, 2, 7, 7), (2,), {}),  # no output size or ratio
    (F.fractional_max_pool2d, TF.fractional_max_pool2d, (1, 2, 7, 7), (2,), dict(output_ratio=(0.5, 0.5, 0.5))),
    (F.fractional_max_pool2d, TF.fractional_max_pool2d, (1, 2, 7, 7), (2,), dict(output_ratio=0.5)),  # TypeError
    (F.fractional_max_pool2d, TF.fractional_max_pool2d, (1, 2, 7, 7), (3, 6), {}),  # output + kernel > input
    (F.fractional_max_pool2d, TF.fractional_max_pool2d, (1, 2, 7, 7), (2, 3),
     dict(_random_samples=torch.rand(1, 3, 2))),  # samples of the wrong shape
    (F.fractional_max_pool3d, TF.fractional_max_pool3d, (1, 2, 5, 5, 5), (2,), {}),
    (F.fractional_max_pool3d, TF.fractional_max_pool3d, (1, 2, 5, 5, 5), (2, (2, 2, 5)), {}),
    (F.fractional_max_pool3d, TF.fractional_max_pool3d, (2, 5, 5), (2, 2), {}),  # too few dims
])
def test_fractional_max_pool_bad_input_raises_like_torch(fn, th, x, args, kwargs):
    assert_raises_like_torch(fn, th, torch.randn(x), *args, **kwargs)


def test_fractional_max_pool3d_runs_on_meta_where_torchs_backward_does_not():
    # (tests/compat/test_devices.py skips it: torch's fractional_max_pool3d_backward has no meta
    # kernel; the forward's shapes are torch's, the scatter backward runs on meta)
    x = torch.randn(2, 3, 5, 4, 6, device="meta", requires_grad=True)
    samples = torch.rand(2, 3, 3, device="meta")
    y, idx = F.fractional_max_pool3d(x, 2, output_ratio=0.5, return_indices=True, _random_samples=samples)
    ty, tidx = TF.fractional_max_pool3d(x.detach(), 2, output_ratio=0.5, return_indices=True, _random_samples=samples)
    assert (y.shape, idx.shape, y.dtype, idx.dtype) == (ty.shape, tidx.shape, ty.dtype, tidx.dtype)
    y.backward(torch.ones_like(y))
    assert (x.grad.device.type, x.grad.shape) == ("meta", x.shape)


def test_new_poolings_work_under_vmap_of_grad():
    # torch.func: the generated vmap rules, per-sample gradients against torch's
    x = torch.randn(4, 3, 6, 5, 7)
    y, idx = TF.max_pool2d(x[:, 0], 2, return_indices=True)
    samples = torch.rand(1, 3, 3)  # each sample: (C, D, H, W) = (3, 6, 5, 7), unbatched
    cases = [
        (lambda m, t: m.avg_pool3d(t, 3, 2, 1, True, False)),
        (lambda m, t: m.adaptive_avg_pool3d(t, (2, 3, 4))),
        (lambda m, t: m.adaptive_max_pool3d(t, (2, 3, 4))),
        (lambda m, t: m.lp_pool3d(t.abs() + 0.1, 3, 2)),
        (lambda m, t: m.fractional_max_pool3d(t, 2, 3, _random_samples=samples)),
        (lambda m, t: m.max_unpool2d(t[0, :, :2, :3], idx[0], 2, output_size=(5, 7))),
    ]
    for call in cases:
        g = torch.func.vmap(torch.func.grad(lambda t: call(F, t).square().sum()))(x)
        ref = torch.func.vmap(torch.func.grad(lambda t: call(TF, t).square().sum()))(x)
        torch.testing.assert_close(g, ref)
