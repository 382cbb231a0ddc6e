"""instance_norm / InstanceNorm1d/2d/3d against torch: gradients (float64), outputs and running
stats bit for bit where running stats are used or updated (the same batch_norm kernel runs on the
same (1, N*C, *) view on both sides), outputs to float32 rounding without them (the statistics are
computed in ops/instance_norm.py then), gradients to float32 rounding, every option, unbatched
inputs, torch's exceptions."""
import pytest
import torch
import torch.nn.functional as TF

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients, saved_bytes
from tests.conftest import exact_dy, noncontiguous

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py

D = torch.float64
# gradients: torch sums the repeated w's gradient and reduces each plane in its own order; ours
# are sums of the same few terms in another order: a few float32 ulps of the plane sums
TOL = dict(rtol=1e-5, atol=1e-5)
EPS = torch.finfo(torch.float32).eps


def assert_output_close(a, e):
    # without running stats y = (x - mean) r w + b with the statistics ours: mean and r each a few
    # roundings from torch's, y a few more; all relative to |y|'s scale (|x_hat| <= sqrt(D))
    torch.testing.assert_close(a, e, rtol=0, atol=16 * EPS * max(1.0, float(e.detach().abs().max()) if e.numel() else 1.0))


def _x(*shape, dtype=D):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _affine(c, affine, dtype=D):
    w = torch.randn(c, dtype=dtype, requires_grad=True) if affine != "none" else None
    b = torch.randn(c, dtype=dtype, requires_grad=True) if affine == "both" else None
    return w, b


def _stats(c, dtype=torch.float32):
    return torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5


# ---------------------------------------------------------------------------------------------
# float64 gradients (gradcheck, gradgradcheck, forward AD, batched)

@pytest.mark.parametrize("shape,affine", [((2, 3, 4), "both"), ((1, 2, 3, 2), "weight"), ((2, 1, 2, 1, 3), "none")])
def test_instance_norm_gradients_with_input_stats(shape, affine):
    check_gradients(F.instance_norm, _x(*shape), None, None, *_affine(shape[1], affine))


def test_instance_norm_gradients_while_updating_running_stats():
    # the running stats change on every call gradcheck makes; the output does not depend on them
    rm, rv = _stats(3, D)
    check_gradients(F.instance_norm, _x(2, 3, 4), rm, rv, *_affine(3, "both"), True, 0.3)


@pytest.mark.parametrize("affine", ["both", "none"])
def test_instance_norm_gradients_with_running_stats(affine):
    rm, rv = _stats(3, D)
    check_gradients(F.instance_norm, _x(2, 3, 4), rm, rv, *_affine(3, affine), False)


def test_instance_norm_gradients_non_contiguous():
    x = noncontiguous(_x(2, 3, 4))
    assert not x.is_contiguous()
    check_gradients(F.instance_norm, x, None, None, *_affine(3, "both"))


# ---------------------------------------------------------------------------------------------
# float32 parity with torch

def _run(fn, x, rm, rv, w, b, use_input_stats, momentum, eps, dy):
    x = x.detach().clone().requires_grad_()
    w, b = [None if t is None else t.detach().clone().requires_grad_() for t in (w, b)]
    rm, rv = [None if t is None else t.clone() for t in (rm, rv)]
    y = fn(x, rm, rv, w, b, use_input_stats, momentum, eps)
    y.backward(dy)
    return y, rm, rv, x.grad, None if w is None else w.grad, None if b is None else b.grad


def _assert_like_torch(x, c, affine, stats, use_input_stats, momentum=0.1, eps=1e-5):
    rm, rv = _stats(c) if stats else (None, None)
    w, b = _affine(c, affine, torch.float32)
    dy = exact_dy(x.shape)
    ours = _run(F.instance_norm, x, rm, rv, w, b, use_input_stats, momentum, eps, dy)
    theirs = _run(TF.instance_norm, x, rm, rv, w, b, use_input_stats, momentum, eps, dy)
    # output and running stats: torch's batch_norm kernel on the same view, the same averaging;
    # without running stats in training, our statistics: the output to float32 rounding
    for what, a, e in zip(("output", "running_mean", "running_var"), ours[:3], theirs[:3]):
        assert (a is None) == (e is None), what
        if what == "output" and use_input_stats and not stats:
            assert_output_close(a, e)
        else:
            assert a is None or torch.equal(a, e), f"{what} differs from torch's"
    for what, a, e in zip(("dx", "dw", "db"), ours[3:], theirs[3:]):
        assert (a is None) == (e is None), what
        if a is not None:
            torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"{what}: {m}")
    return ours, theirs


@pytest.mark.parametrize("shape", [(3, 4, 7), (2, 3, 5, 6), (2, 2, 3, 4, 5), (1, 1, 2), (5, 1, 3, 1)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("stats,use_input_stats", [(False, True), (True, True), (True, False)])
def test_instance_norm_matches_torch_output_running_stats_and_gradients(shape, affine, stats, use_input_stats):
    _assert_like_torch(torch.randn(shape), shape[1], affine, stats, use_input_stats)


@pytest.mark.parametrize("momentum,eps", [(0.0, 1e-5), (1.0, 1e-3), (0.37, 0.5)])
def test_instance_norm_momentum_and_eps_as_torch(momentum, eps):
    _assert_like_torch(torch.randn(4, 3, 6) * 3 + 2, 3, "both", True, True, momentum, eps)


def test_instance_norm_running_stats_are_the_mean_over_samples_of_each_planes_update():
    # momentum 1: running_mean = mean_N mean_L x, running_var = mean_N var_L(x, unbiased)
    x = torch.randn(4, 3, 6, dtype=D)
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    F.instance_norm(x, rm, rv, momentum=1.0)
    torch.testing.assert_close(rm, x.mean(2).mean(0))
    torch.testing.assert_close(rv, x.var(2, unbiased=True).mean(0))


def test_instance_norm_plain_backward_matches_the_graph_path_far_from_zero():
    # the in-place backward on (N, C, D) rows (forward's stats, or recomputed for float16/bfloat16)
    # against the differentiable path that double backward takes (batch_norm's on the (1, N*C, D)
    # planes, stats recomputed), in float64 on planes offset by 1000 std from zero
    from manualgrad.ops.instance_norm import _instance_norm_backward_plain, instance_norm_backward
    x = torch.randn(3, 4, 5, 6, dtype=D) + 1000
    dy, w = torch.randn(3, 4, 5, 6, dtype=D) + 0.5, torch.randn(4, dtype=D)
    _, mean, r = torch.native_batch_norm(x.view(1, 12, 30), None, None, None, None, True, 0.1, 1e-5)
    with torch.enable_grad():  # a graph being recorded: the differentiable path
        expected = instance_norm_backward(dy, x, w, None, None, True, 1e-5)
    for stats in ((mean, r), (None, None)):
        for a, e in zip(_instance_norm_backward_plain(dy, x, w, 1e-5, (True, True, True), *stats), expected):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
    # w None: dx = r (dy - ...) alone
    dx, _, _ = _instance_norm_backward_plain(dy, x, None, 1e-5, (True, False, False), mean, r)
    with torch.enable_grad():
        torch.testing.assert_close(dx, instance_norm_backward(dy, x, None, None, None, True, 1e-5)[0], rtol=1e-9, atol=1e-9)


def test_instance_norm_channels_last_and_non_contiguous_inputs():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    _assert_like_torch(x, 3, "both", True, True)
    _assert_like_torch(torch.randn(5, 4, 3).transpose(0, 2), 4, "both", True, True)


def test_instance_norm_keeps_float64_and_runs_in_float32_for_bfloat16():
    x = torch.randn(2, 3, 5, dtype=D, requires_grad=True)
    assert_same_as_torch(F.instance_norm, TF.instance_norm, x, rtol=1e-12, atol=1e-12)
    xb = torch.randn(2, 3, 8).bfloat16().requires_grad_()
    w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    assert_same_as_torch(F.instance_norm, TF.instance_norm, xb, weight=w, bias=b, rtol=2e-2, atol=2e-2)


def test_instance_norm_under_autocast_runs_in_the_input_dtype_like_torch():
    x = torch.randn(2, 3, 8).bfloat16()
    w, b = torch.randn(3), torch.randn(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = F.instance_norm(x, weight=w, bias=b), TF.instance_norm(x, weight=w, bias=b)
        ours32, theirs32 = F.instance_norm(x.float()), TF.instance_norm(x.float())
    assert ours.dtype == theirs.dtype and ours32.dtype == theirs32.dtype == torch.float32
    assert torch.equal(ours, theirs)  # bfloat16: torch's kernel on both sides
    assert_output_close(ours32, theirs32)


def test_instance_norm_routes_to_the_function_under_enable():
    x = torch.randn(2, 3, 4, requires_grad=True)
    with mg.enable():
        y1 = TF.instance_norm(x)
        y2 = torch.instance_norm(x, None, None, None, None, True, 0.1, 1e-5, False)
    assert type(y1.grad_fn).__name__ == type(y2.grad_fn).__name__ == "InstanceNormFunctionBackward"
    assert_output_close(y1, TF.instance_norm(x))


@pytest.mark.parametrize("case", ["one spatial element", "no spatial dims", "eval without running stats",
                                  "running stats of the wrong size", "weight of the wrong size", "1 dim in eval"])
def test_instance_norm_bad_input_raises_like_torch(case):
    x = torch.randn(2, 3, 4)
    args = {
        "one spatial element": ((torch.randn(2, 3, 1),), {}),
        "no spatial dims": ((torch.randn(2, 3),), {}),
        "eval without running stats": ((x,), dict(use_input_stats=False)),
        "running stats of the wrong size": ((x, torch.zeros(4), torch.ones(4)), {}),
        "weight of the wrong size": ((x,), dict(weight=torch.ones(4))),
        "1 dim in eval": ((torch.randn(3), torch.zeros(3), torch.ones(3)), dict(use_input_stats=False)),
    }[case]
    assert_raises_like_torch(F.instance_norm, TF.instance_norm, *args[0], **args[1])


# ---------------------------------------------------------------------------------------------
# modules

MODULES = [(mnn.InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 4, 7)),
           (mnn.InstanceNorm2d, torch.nn.InstanceNorm2d, (2, 4, 3, 5)),
           (mnn.InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 4, 3, 2, 3))]


@pytest.mark.parametrize("ours,theirs,shape", MODULES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("momentum", [0.2, None])
@pytest.mark.parametrize("batched", [True, False])
def test_instance_norm_module_matches_torch_in_training_then_eval(ours, theirs, shape, affine, track, momentum,
                                                                  batched):
    kw = dict(affine=affine, track_running_stats=track, momentum=momentum)
    m, t = ours(4, **kw), theirs(4, **kw)
    if affine:
        with torch.no_grad():
            t.weight.normal_(), t.bias.normal_()
    m.load_state_dict(t.state_dict())
    shape = shape if batched else shape[1:]
    for training in (True, True, False):
        m.train(training), t.train(training)
        # from the same state (assert_same_as_torch runs torch's module once more, as a probe)
        m.load_state_dict(t.state_dict())
        x = torch.randn(shape) * 2 + 1
        assert_same_as_torch(m, t, x.requires_grad_(), grad_output=exact_dy(shape), **TOL)
        # one step of each from the same state: buffers identical, bit for bit
        m.load_state_dict(t.state_dict())
        before = {k: v.clone() for k, v in t.state_dict().items()}
        with torch.no_grad():
            if track:  # torch's kernel on both sides (running stats used or updated)
                assert torch.equal(m(x), t(x))
            else:
                assert_output_close(m(x), t(x))
        for (name, a), (_, e) in zip(m.named_buffers(), t.named_buffers()):
            assert torch.equal(a, e), name
            # (the running stats change in training only; InstanceNorm never counts batches, and
            #  momentum=None is momentum 0 to torch's InstanceNorm: no cumulative average)
            changes = training and track and momentum is not None and name != "num_batches_tracked"
            assert torch.equal(a, before[name]) != changes, name


@pytest.mark.parametrize("ours,theirs,shape", MODULES)
def test_instance_norm_module_rejects_what_torch_rejects(ours, theirs, shape):
    # wrong number of dims: ValueError from torch's _check_input_dim
    assert_raises_like_torch(ours(4), theirs(4), torch.randn(*shape, 2))
    # affine with the wrong channel count: ValueError from torch's forward
    bad = torch.randn(shape[0], 5, *shape[2:])
    assert_raises_like_torch(ours(4, affine=True), theirs(4, affine=True), bad)


@pytest.mark.parametrize("ours,theirs,shape", MODULES)
def test_convert_swaps_instance_norm(ours, theirs, shape):
    model = torch.nn.Sequential(theirs(4, affine=True, track_running_stats=True))
    mg.convert(model, strict=True)
    assert type(model[0]) is ours
    y = model(torch.randn(shape, requires_grad=True))
    assert type(y.grad_fn).__name__ == "InstanceNormFunctionBackward"


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_saves_no_more_than_torch(use_input_stats):
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    rm, rv = _stats(8)
    ours, _ = saved_bytes(F.instance_norm, x, rm.clone(), rv.clone(), w, b, use_input_stats, exclude=(w, b))
    theirs, _ = saved_bytes(TF.instance_norm, x, rm.clone(), rv.clone(), w, b, use_input_stats, exclude=(w, b))
    # x and 2 N C statistics (training) or the 2 N C repeated running stats (eval), as torch;
    # torch also keeps its repeated weight
    assert x.numel() * 4 <= ours <= theirs
