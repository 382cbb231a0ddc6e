import copy

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


# float32 parity: torch's kernels reduce in a different order (Welford, blocked sums) than
# backward's var_mean / sum, so grads agree to a few ulps of the row sums, not of each element.
TOL = dict(rtol=1e-5, atol=1e-5)


# FEW_VALUES: with M <= 2 values per statistic, x_hat is 0 (M = 1) or +-1 (M = 2) whatever x is,
# so the exact dx is 0 (and dw too for M = 1); torch's kernels return rounding noise times
# rstd = 1/sqrt(var + eps), up to ~3e-5 in float32, and ours its own noise. The float32
# property tests leave those sizes out; the float64 gradchecks cover them ((4, 1) layer_norm,
# group_norm with groups = C on (4, 3)).


def _x(*shape, dtype=D):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _affine(n, affine, dtype=D):
    """(weight, bias) for affine in ('both', 'weight', 'none')."""
    w = torch.randn(n, dtype=dtype, requires_grad=True) if affine != "none" else None
    b = torch.randn(n, dtype=dtype, requires_grad=True) if affine == "both" else None
    return w, b


# ---------------------------------------------------------------------------------------------
# batch_norm


# each shape once, the affine options spread over them (gradgradcheck is the slow part)
SHAPE_AFFINE = [((4, 3), "both"), ((3, 2, 5), "none"), ((2, 3, 2, 3), "weight"), ((2, 1, 3), "both")]


@pytest.mark.parametrize("shape,affine", SHAPE_AFFINE)
def test_batch_norm_gradients_in_training(shape, affine):
    w, b = _affine(shape[1], affine)
    check_gradients(F.batch_norm, _x(*shape), None, None, w, b, True)


def test_batch_norm_gradients_in_training_with_running_stats():
    # the running stats are updated on every call (gradcheck makes many) and do not change the output
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    check_gradients(F.batch_norm, _x(2, 3, 2, 2), rm, rv, *_affine(3, "both"), True, 0.3)
    # the 2x3x4x5 size: first order only (gradgradcheck at this size takes long)
    check_gradients(F.batch_norm, _x(2, 3, 4, 5), rm, rv, *_affine(3, "both"), True, 0.3, gradgrad=False)


@pytest.mark.parametrize("shape,affine", SHAPE_AFFINE)
def test_batch_norm_gradients_in_eval(shape, affine):
    c = shape[1]
    rm, rv = torch.randn(c, dtype=D), torch.rand(c, dtype=D) + 0.5
    check_gradients(F.batch_norm, _x(*shape), rm, rv, *_affine(c, affine), False)


def test_batch_norm_gradients_non_contiguous():
    x = noncontiguous(_x(3, 2, 5))
    assert not x.is_contiguous()
    check_gradients(F.batch_norm, x, None, None, *_affine(2, "both"), True)


@pytest.mark.parametrize("shape", [(7, 13), (4, 13, 7), (2, 5, 7, 13)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch_output_grads_and_running_stats(shape, affine, training):
    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    w, b = _affine(c, affine, torch.float32)
    rm0, rv0 = torch.randn(c), torch.rand(c) + 0.5
    rm, rv, trm, trv = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()

    def ours(x, w, b):
        return F.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3)

    def theirs(x, w, b):
        return TF.batch_norm(x, trm, trv, w, b, training, 0.3, 1e-3)

    assert_same_as_torch(ours, theirs, x, w, b, **TOL)
    # the probe run inside assert_same_as_torch updates torch's buffers once more: compare one step
    rm, rv, trm, trv = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()
    with torch.no_grad():
        ours(x, w, b), theirs(x, w, b)
    torch.testing.assert_close(rm, trm, **TOL)
    torch.testing.assert_close(rv, trv, **TOL)
    assert training or (torch.equal(rm, rm0) and torch.equal(rv, rv0))
    assert not training or not torch.equal(rv, rv0)  # the update happened (unbiased var, momentum 0.3)


def test_batch_norm_updates_running_var_with_unbiased_variance():
    x = torch.randn(5, 3, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    xs = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(rm, xs.mean(1))
    torch.testing.assert_close(rv, xs.var(1, unbiased=True))


def test_batch_norm_only_computes_requested_gradients():
    x = torch.randn(6, 3)  # no grad
    w = torch.randn(3, requires_grad=True)
    F.batch_norm(x, None, None, w, None, True).sum().backward()
    xh = (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-5).sqrt()
    torch.testing.assert_close(w.grad, xh.sum(0))
    assert x.grad is None


@given(
    n=st.integers(2, 5),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    affine=st.sampled_from(["both", "weight", "none"]),
    training=st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_batch_norm_matches_torch_property(n, c, spatial, affine, training):
    assume(not training or n * torch.Size(spatial).numel() > 2)  # see FEW_VALUES
    x = torch.randn(n, c, *spatial, requires_grad=True)
    w, b = _affine(c, affine, torch.float32)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    assert_same_as_torch(F.batch_norm, TF.batch_norm, x, rm.clone(), rv.clone(), w, b, training, **TOL)


def test_batch_norm_rejects_a_single_value_per_channel_in_training_like_torch():
    for x in (torch.randn(1, 3), torch.randn(1, 3, 1)):
        assert_raises_like_torch(F.batch_norm, TF.batch_norm, x, None, None, training=True,
                                 match="Expected more than 1 value per channel")


def test_batch_norm_rejects_bad_arguments_like_torch():
    x = torch.randn(4, 3)
    # eval needs running stats
    assert_raises_like_torch(F.batch_norm, TF.batch_norm, x, None, None, match="running_mean must be defined")
    # eps must be positive in training
    assert_raises_like_torch(F.batch_norm, TF.batch_norm, x, None, None, training=True, eps=0.0, match="eps")
    # momentum=None is the module's business: the functional wants a float
    assert_raises_like_torch(F.batch_norm, TF.batch_norm, x, torch.zeros(3), torch.ones(3), training=True,
                             momentum=None)
    # wrong number of channels in the weight
    assert_raises_like_torch(F.batch_norm, TF.batch_norm, x, None, None, torch.ones(4), training=True)


def test_batch_norm_propagates_nan_within_its_channel():
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    y = F.batch_norm(x, None, None, training=True)
    assert y[:, 2].isnan().all() and not y[:, :2].isnan().any()


# ---------------------------------------------------------------------------------------------
# layer_norm and rms_norm


@pytest.mark.parametrize(
    "shape,k,affine",
    [((4, 3), 1, "both"), ((3, 2, 5), 1, "weight"), ((3, 2, 5), 2, "none"), ((2, 3, 2, 3), 2, "both"),
     ((5,), 1, "both"), ((4, 1), 1, "both")],
)
def test_layer_norm_gradients(shape, k, affine):
    ns = shape[-k:]
    w, b = _affine(ns, affine)
    check_gradients(F.layer_norm, _x(*shape), ns, w, b)


def test_layer_norm_gradients_non_contiguous_and_wide():
    x = noncontiguous(_x(7, 3))
    assert not x.is_contiguous()
    check_gradients(F.layer_norm, x, (3,), *_affine((3,), "both"))
    # 257 wide: first order only (gradgradcheck at this size takes long)
    check_gradients(F.layer_norm, _x(257), [257], *_affine((257,), "weight"), gradgrad=False)


@pytest.mark.parametrize("shape,k", [((7, 13), 1), ((2, 3, 257), 1), ((2, 3, 257), 2), ((13,), 1)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_matches_torch(shape, k, affine):
    ns = list(shape[-k:])
    w, b = _affine(ns, affine, torch.float32)
    x = torch.randn(shape, requires_grad=True)
    assert_same_as_torch(F.layer_norm, TF.layer_norm, x, ns, w, b, 1e-3, **TOL)


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    ns=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    affine=st.sampled_from(["both", "weight", "none"]),
)
@settings(max_examples=25, deadline=None)
def test_layer_norm_matches_torch_property(lead, ns, affine):
    assume(torch.Size(ns).numel() > 2)  # see FEW_VALUES
    w, b = _affine(ns, affine, torch.float32)
    x = torch.randn(*lead, *ns, requires_grad=True)
    assert_same_as_torch(F.layer_norm, TF.layer_norm, x, ns, w, b, **TOL)


def test_layer_norm_rejects_a_normalized_shape_mismatch_like_torch():
    assert_raises_like_torch(F.layer_norm, TF.layer_norm, torch.randn(3, 2), (3,), match="normalized_shape")
    assert_raises_like_torch(F.layer_norm, TF.layer_norm, torch.randn(3, 2), (2,), torch.ones(3))


@pytest.mark.parametrize(
    "shape,k,weight,eps",
    [((4, 3), 1, True, None), ((3, 2, 5), 2, True, 1e-3), ((2, 3, 2, 3), 1, False, None), ((3, 1), 1, True, 1e-3)],
)
def test_rms_norm_gradients(shape, k, weight, eps):
    ns = shape[-k:]
    w = torch.randn(ns, dtype=D, requires_grad=True) if weight else None
    check_gradients(F.rms_norm, _x(*shape), ns, w, eps)


@pytest.mark.parametrize("shape,k", [((7, 13), 1), ((2, 3, 257), 2), ((1, 1), 1)])
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-6, 0.5])
def test_rms_norm_matches_torch(shape, k, weight, eps):
    ns = list(shape[-k:])
    w = torch.randn(ns, requires_grad=True) if weight else None
    assert_same_as_torch(F.rms_norm, TF.rms_norm, torch.randn(shape, requires_grad=True), ns, w, eps, **TOL)


def test_rms_norm_default_eps_is_the_dtype_machine_epsilon():
    # a zero row: y = 0 * rsqrt(eps); dy/dx = rsqrt(eps) (w = 1) tells which eps was used
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(1, 4, dtype=dtype, requires_grad=True)
        F.rms_norm(x, (4,)).sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, torch.finfo(dtype).eps ** -0.5))


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    ns=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    weight=st.booleans(),
    eps=st.sampled_from([None, 1e-5]),
)
@settings(max_examples=25, deadline=None)
def test_rms_norm_matches_torch_property(lead, ns, weight, eps):
    w = torch.randn(ns, requires_grad=True) if weight else None
    x = torch.randn(*lead, *ns, requires_grad=True)
    assert_same_as_torch(F.rms_norm, TF.rms_norm, x, ns, w, eps, **TOL)


def test_rms_norm_rejects_a_normalized_shape_mismatch_like_torch():
    assert_raises_like_torch(F.rms_norm, TF.rms_norm, torch.randn(3, 2), (3,), match="normalized_shape")


def test_layer_norm_and_rms_norm_propagate_nan_within_their_row():
    x = torch.randn(3, 5)
    x[1, 2] = float("nan")
    for y in (F.layer_norm(x, (5,)), F.rms_norm(x, (5,))):
        assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


# ---------------------------------------------------------------------------------------------
# group_norm


@pytest.mark.parametrize(
    "shape,groups,affine",
    [((4, 3), 3, "both"), ((4, 3), 1, "none"), ((2, 4, 5), 1, "both"), ((2, 4, 5), 2, "none"), ((2, 4, 5), 4, "both"),
     ((2, 4, 2, 3), 2, "both")],
)
def test_group_norm_gradients(shape, groups, affine):
    check_gradients(F.group_norm, _x(*shape), groups, *_affine(shape[1], affine))


def test_group_norm_gradients_non_contiguous_weight_only():
    x = noncontiguous(_x(3, 4, 3))
    assert not x.is_contiguous()
    check_gradients(F.group_norm, x, 2, *_affine(4, "weight"))


@pytest.mark.parametrize(
    "shape, groups",
    [(shape, groups) for shape in [(7, 12), (2, 6, 13), (3, 6, 7, 5)] for groups in [1, 2, 3, 6]
     if shape[1] // groups * torch.Size(shape[2:]).numel() > 2],  # see FEW_VALUES: (7, 12) in 6 groups is out
)
@pytest.mark.parametrize("affine", ["both", "none"])
def test_group_norm_matches_torch(shape, groups, affine):
    w, b = _affine(shape[1], affine, torch.float32)
    x = torch.randn(shape, requires_grad=True)
    assert_same_as_torch(F.group_norm, TF.group_norm, x, groups, w, b, 1e-3, **TOL)


@given(
    n=st.integers(1, 3),
    groups=st.integers(1, 3),
    per_group=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    affine=st.sampled_from(["both", "weight", "none"]),
)
@settings(max_examples=25, deadline=None)
def test_group_norm_matches_torch_property(n, groups, per_group, spatial, affine):
    c = groups * per_group
    assume(per_group * torch.Size(spatial).numel() > 2)  # see FEW_VALUES
    w, b = _affine(c, affine, torch.float32)
    x = torch.randn(n, c, *spatial, requires_grad=True)
    assert_same_as_torch(F.group_norm, TF.group_norm, x, groups, w, b, **TOL)


def test_group_norm_rejects_bad_num_groups_like_torch():
    x = torch.randn(2, 4, 3)
    assert_raises_like_torch(F.group_norm, TF.group_norm, x, 3, match="divisible by num_groups")
    assert_raises_like_torch(F.group_norm, TF.group_norm, torch.randn(1, 1), 1, match="more than 1 value")
    assert_raises_like_torch(F.group_norm, TF.group_norm, torch.randn(4), 2, match="at least 2 dimensions")


# ---------------------------------------------------------------------------------------------
# modules

BATCH_NORMS = [
    ("BatchNorm1d", (6, 3), {}),
    ("BatchNorm1d", (5, 3, 7), dict(momentum=None)),
    ("BatchNorm1d", (5, 3, 7), dict(affine=False, track_running_stats=False)),
    ("BatchNorm2d", (4, 3, 5, 5), dict(momentum=0.5, eps=1e-3)),
    ("BatchNorm2d", (4, 3, 5, 5), dict(momentum=None, affine=False)),
    ("BatchNorm2d", (4, 3, 2, 3), dict(track_running_stats=False, bias=False)),
    ("BatchNorm3d", (2, 3, 2, 3, 4), dict(momentum=None)),
]


def _twins(name, kwargs):
    th = getattr(torch.nn, name)(**kwargs)
    with torch.no_grad():
        for p in th.parameters():
            p.normal_()
    ours = getattr(mnn, name)(**kwargs)
    ours.load_state_dict(th.state_dict())
    return ours, th


def _assert_same_state(ours, th):
    a, b = ours.state_dict(), th.state_dict()
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


def _assert_same_step(ours, th, x):
    """One forward + backward of each module (assert_same_as_torch would run torch's twice, and
    a training step changes the buffers): output, input grad and parameter grads agree."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    for m in (ours, th):
        m.zero_grad()
    ya, yb = ours(xa), th(xb)
    dy = torch.randn_like(yb)
    ya.backward(dy), yb.backward(dy)
    torch.testing.assert_close(ya, yb, **TOL)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    pa, pb = dict(ours.named_parameters()), dict(th.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pb:
        torch.testing.assert_close(pa[k].grad, pb[k].grad, **TOL)


@pytest.mark.parametrize("name,shape,kwargs", BATCH_NORMS)
def test_batch_norm_module_trains_and_evaluates_like_torch(name, shape, kwargs):
    ours, th = _twins(name, dict(num_features=3, **kwargs))
    for _ in range(3):  # training steps: output, input and parameter grads, then the buffers
        _assert_same_step(ours, th, torch.randn(shape) * 2 + 1)
    _assert_same_state(ours, th)
    if th.track_running_stats:
        assert int(ours.num_batches_tracked) == 3
    ours.eval(), th.eval()
    _assert_same_step(ours, th, torch.randn(shape))
    _assert_same_state(ours, th)


def test_batch_norm_module_with_momentum_none_keeps_the_cumulative_average():
    m = mnn.BatchNorm1d(2, momentum=None)
    xs = [torch.randn(8, 2) for _ in range(4)]
    for x in xs:
        m(x)
    torch.testing.assert_close(m.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    torch.testing.assert_close(m.running_var, torch.stack([x.var(0) for x in xs]).mean(0))


def test_batch_norm_module_rejects_bad_input_like_torch():
    assert_raises_like_torch(mnn.BatchNorm1d(3), torch.nn.BatchNorm1d(3), torch.randn(1, 3),
                             match="Expected more than 1 value per channel")
    assert_raises_like_torch(mnn.BatchNorm2d(3), torch.nn.BatchNorm2d(3), torch.randn(2, 3, 4), match="expected 4D")
    assert_raises_like_torch(mnn.BatchNorm1d(3), torch.nn.BatchNorm1d(3), torch.randn(2, 3, 4, 4), match="expected 2D")


OTHER_MODULES = [
    ("LayerNorm", dict(normalized_shape=7), (3, 5, 7)),
    ("LayerNorm", dict(normalized_shape=(5, 7), bias=False), (3, 5, 7)),
    ("LayerNorm", dict(normalized_shape=[7], elementwise_affine=False), (3, 7)),
    ("RMSNorm", dict(normalized_shape=7), (3, 5, 7)),
    ("RMSNorm", dict(normalized_shape=(5, 7), eps=1e-3), (3, 5, 7)),
    ("RMSNorm", dict(normalized_shape=7, elementwise_affine=False), (3, 7)),
    ("GroupNorm", dict(num_groups=2, num_channels=6), (3, 6, 5)),
    ("GroupNorm", dict(num_groups=3, num_channels=6, affine=False), (3, 6, 2, 2)),
]
ALL_MODULES = [(name, dict(num_features=3, **kw), shape) for name, shape, kw in BATCH_NORMS] + OTHER_MODULES


@pytest.mark.parametrize("name,kwargs,shape", OTHER_MODULES)
def test_normalization_module_matches_torch(name, kwargs, shape):
    ours, th = _twins(name, kwargs)
    assert_same_as_torch(ours, th, torch.randn(shape, requires_grad=True), **TOL)


@pytest.mark.parametrize("name,kwargs,shape", ALL_MODULES)
def test_normalization_module_is_a_drop_in(name, kwargs, shape):
    ours, th = _twins(name, kwargs)
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(th)
    # state_dict both ways: buffers (num_batches_tracked too) and parameters
    ours.train()(torch.randn(shape))
    th.load_state_dict(ours.state_dict())
    _assert_same_state(ours, th)
    th.train()(torch.randn(shape))
    ours.load_state_dict(th.state_dict())
    _assert_same_state(ours, th)


def test_convert_swaps_torch_normalization_modules():
    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(3), torch.nn.BatchNorm2d(3), torch.nn.BatchNorm3d(3), torch.nn.LayerNorm(4),
        torch.nn.RMSNorm(4), torch.nn.GroupNorm(1, 3),
    )
    ref = copy.deepcopy(model)
    mg.convert(model)
    kinds = [mnn.BatchNorm1d, mnn.BatchNorm2d, mnn.BatchNorm3d, mnn.LayerNorm, mnn.RMSNorm, mnn.GroupNorm]
    assert [type(m) for m in model] == kinds
    x = torch.randn(2, 3, 4, requires_grad=True)
    assert_same_as_torch(model[5], ref[5], x, **TOL)
    assert_same_as_torch(model[0], ref[0], x, **TOL)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_plain_backward_matches_torch_across_row_blocks(affine):
    # 2 ** 18 // 257 rows per block in the plain (no create_graph) backward: several blocks, the
    # last one short, and dw / db summed over all of them (2100 float32 terms, summed in another
    # order than torch's: atol 1e-4)
    x = torch.randn(3, 700, 257, requires_grad=True)
    w, b = (torch.randn(257, requires_grad=True), torch.randn(257, requires_grad=True)) if affine else (None, None)
    assert_same_as_torch(F.layer_norm, TF.layer_norm, x, (257,), w, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_plain_backward_matches_torch_on_an_offset_input(affine):
    # The plain backward (no graph) centres x before every reduction and writes dx as
    # (r w) dy + a (x - mean) + b per channel: on values with a mean 100x their spread it must
    # still agree with torch's kernel (an E[x^2] - mean^2 variance would lose ~4 digits here).
    x = (torch.randn(4, 5, 6, 7) * 0.5 + 50).requires_grad_()
    w = torch.randn(5, requires_grad=True) if affine else None
    b = torch.randn(5, requires_grad=True) if affine else None
    assert_same_as_torch(F.batch_norm, TF.batch_norm, x, None, None, w, b, True, rtol=1e-4, atol=1e-4)


def _bn_grad_error(fn, x, w, b, dy, dtype):
    """Largest |grad - exact| / max |exact| over (dx, dw, db) of fn's training batch_norm run in
    ``dtype``, against torch's kernel in float64 on the same values."""
    def grads(f, dt):
        xs, ws, bs = (t.detach().to(dt).requires_grad_() for t in (x, w, b))
        f(xs, None, None, ws, bs, True).backward(dy.to(dt))
        return xs.grad, ws.grad, bs.grad
    exact = grads(TF.batch_norm, torch.float64)
    return max(((g.double() - e).abs().max() / e.abs().max()).item() for g, e in zip(grads(fn, dtype), exact))


def test_batch_norm_plain_backward_with_forwards_stats_is_as_accurate_as_torch_far_from_zero():
    # The plain backward takes forward's per-channel mean and 1/std and sums dy (x - mean) from the
    # centred product. Input: mean 1000 x its spread; upstream gradient: a mean of its own (1), so
    # that sum(x dy) - mean sum(dy) would cancel to noise (errors ~100x torch's). Ours must be
    # within 2x of torch's own float32 error against the float64 result.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 9, 11, generator=g) * 0.05 + 50
    dy = torch.randn(x.shape, generator=g) + 1
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    ours = _bn_grad_error(F.batch_norm, x, w, b, dy, torch.float32)
    theirs = _bn_grad_error(TF.batch_norm, x, w, b, dy, torch.float32)
    assert ours <= 2 * theirs + 1e-6, (ours, theirs)


def test_batch_norm_plain_backward_in_bfloat16_matches_torch():
    # bfloat16: forward's stats are rounded to bfloat16 by torch's CPU kernel, so backward (in
    # float32) recomputes them from x instead; the result agrees with torch's to bfloat16 precision
    x = (torch.randn(6, 4, 5, 7) + 3).bfloat16().requires_grad_()
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    assert_same_as_torch(F.batch_norm, TF.batch_norm, x, None, None, w, b, True, rtol=2e-2, atol=2e-2)


def test_batch_norm_backward_without_forwards_stats_matches_with_them():
    # the two plain-backward branches (stats from forward / recomputed) give the same gradients
    from manualgrad.ops.normalization import _batch_norm_backward_plain
    x, dy, w = torch.randn(5, 3, 4, 6) * 2 + 7, torch.randn(5, 3, 4, 6) + 0.5, torch.randn(3)
    _, mean, r = torch.native_batch_norm(x, w, None, None, None, True, 0.1, 1e-5)
    with_stats = _batch_norm_backward_plain(dy, x, w, 1e-5, (True, True, True), mean, r)
    recomputed = _batch_norm_backward_plain(dy, x, w, 1e-5, (True, True, True))
    for a, e in zip(with_stats, recomputed):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_batch_norm_double_backward_recomputes_the_stats_far_from_zero():
    # with create_graph the saved batch stats would be constants (wrong second derivatives): the
    # graph path recomputes them from x. Hessian-vector product against torch's, on an offset input.
    x = (torch.randn(4, 3, 5, dtype=D) + 20).requires_grad_()
    w = torch.randn(3, dtype=D, requires_grad=True)
    dy, v = torch.randn(4, 3, 5, dtype=D), torch.randn(4, 3, 5, dtype=D)

    def hvp(f):
        (gx,) = torch.autograd.grad(f(x, None, None, w, None, True), x, dy, create_graph=True)
        return torch.autograd.grad(gx, (x, w), v)

    for a, e in zip(hvp(F.batch_norm), hvp(TF.batch_norm)):
        torch.testing.assert_close(a, e)
