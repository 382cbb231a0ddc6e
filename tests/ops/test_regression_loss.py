import inspect
import warnings

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad.functional as F
from manualgrad.ops import regression_loss as ops
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

SHAPES = [(1,), (7, 13), (2, 3, 257)]
REDUCTIONS = ["none", "mean", "sum"]
NAMES = ["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"]
# (op name, options): the default beta/delta, 0.5, and beta=0 (which torch turns into l1_loss).
VARIANTS = [
    ("mse_loss", {}),
    ("l1_loss", {}),
    ("smooth_l1_loss", {"beta": 1.0}),
    ("smooth_l1_loss", {"beta": 0.5}),
    ("smooth_l1_loss", {"beta": 0.0}),
    ("huber_loss", {"delta": 1.0}),
    ("huber_loss", {"delta": 0.5}),
]
WEIGHTED = [(name, opts) for name, opts in VARIANTS if name != "smooth_l1_loss"]  # torch has no smooth_l1 weight


def ids(variant):
    name, opts = variant
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


def fns(name):
    return getattr(F, name), getattr(TF, name)


def kink(opts):
    """Where the loss's derivative is not smooth, other than d = 0."""
    return opts.get("beta", opts.get("delta"))


def pair_away_from_kinks(shape, target_shape=None, opts=None, dtype=torch.float64):
    """(input, target) with every |input - target| in [0.1, 2.1) and 0.05 away from beta/delta,
    where finite differences across a kink would break. The larger of the two shapes gets built
    from the other, so broadcast pairs work too."""
    target_shape = shape if target_shape is None else target_shape
    big = torch.broadcast_shapes(shape, target_shape)
    u = torch.rand(big, dtype=dtype) * 2 + 0.1
    k = kink(opts or {})
    if k:
        u = torch.where((u - k).abs() < 0.05, u + 0.1, u)
    d = torch.where(torch.rand(big) < 0.5, -u, u)
    if tuple(shape) == tuple(big):
        target = torch.randn(target_shape, dtype=dtype)
        input = target + d
    else:
        assert tuple(target_shape) == tuple(big), "one of the two shapes must be the broadcast shape"
        input = torch.randn(shape, dtype=dtype)
        target = input - d
    return input.requires_grad_(), target.requires_grad_()


def weighted(fn):
    """fn taking the weight positionally, so that gradcheck (which checks positional tensors only;
    check_gradients binds keyword arguments as constants) checks its gradient too."""
    return lambda input, target, weight, **kwargs: fn(input, target, weight=weight, **kwargs)


def quiet(fn):
    """fn with torch's broadcast-size warning silenced (broadcast tests check it on their own)."""
    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    return call


# --- the signature -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_functional_signature_is_torchs(name):
    ours, theirs = (inspect.signature(f) for f in fns(name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()
    ]


# --- float32 parity with torch: every reduction x weight x beta/delta x shape ---------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_loss_matches_torch_for_every_reduction(variant, reduction, shape):
    name, opts = variant
    x = torch.randn(shape, requires_grad=True)
    t = torch.randn(shape, requires_grad=True)
    assert_same_as_torch(*fns(name), x, t, reduction=reduction, **opts)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", WEIGHTED, ids=ids)
def test_weighted_loss_matches_torch_including_weight_gradient(variant, reduction, shape):
    name, opts = variant
    x = torch.randn(shape, requires_grad=True)
    t = torch.randn(shape, requires_grad=True)
    w = torch.rand(shape, requires_grad=True)
    assert_same_as_torch(*fns(name), x, t, reduction=reduction, weight=w, **opts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weighted_mean_divides_by_weight_sum_for_mse_and_l1_but_by_count_for_huber(reduction):
    x = torch.tensor([1.0, -2.0, 0.25])
    t = torch.tensor([0.0, 1.0, 0.0])
    w = torch.tensor([2.0, 0.5, 1.0])
    d = x - t
    huber = torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5)
    cases = [(F.mse_loss, d * d, w.sum()), (F.l1_loss, d.abs(), w.sum()), (F.huber_loss, huber, 3)]
    for fn, l, denominator in cases:
        expected = {"none": w * l, "sum": (w * l).sum(), "mean": (w * l).sum() / denominator}[reduction]
        torch.testing.assert_close(fn(x, t, reduction=reduction, weight=w), expected)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] != "huber_loss"], ids=ids)  # huber has none
def test_deprecated_size_average_and_reduce_match_torch(variant):
    name, opts = variant
    x, t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    for size_average, reduce in [(False, None), (None, False), (True, True), (False, True)]:
        with pytest.warns(UserWarning, match="size_average and reduce"):
            assert_same_as_torch(*fns(name), x, t, size_average=size_average, reduce=reduce, **opts)


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_elementwise_mean_is_a_deprecated_mean_like_torch(variant):
    name, opts = variant
    x, t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        assert_same_as_torch(*fns(name), x, t, reduction="elementwise_mean", **opts)


# --- gradients: gradcheck + gradgradcheck + forward AD + batched -----------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_loss_gradients_for_every_option(variant, reduction):
    name, opts = variant
    x, t = pair_away_from_kinks((2, 1, 5), opts=opts)
    check_gradients(getattr(F, name), x, t, reduction=reduction, **opts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", WEIGHTED, ids=ids)
def test_weighted_loss_gradients_for_every_option(variant, reduction):
    name, opts = variant
    x, t = pair_away_from_kinks((2, 1, 5), opts=opts)
    w = torch.rand(2, 1, 5, dtype=torch.float64, requires_grad=True)
    check_gradients(weighted(getattr(F, name)), x, t, w, reduction=reduction, **opts)


@pytest.mark.parametrize("shape", [(1,), (7, 13)])
@pytest.mark.parametrize("variant", WEIGHTED + [("smooth_l1_loss", {"beta": 0.5})], ids=ids)
def test_loss_gradients_on_odd_shapes(variant, shape):
    name, opts = variant
    x, t = pair_away_from_kinks(shape, opts=opts)
    if name == "smooth_l1_loss":
        check_gradients(F.smooth_l1_loss, x, t, **opts)
    else:
        w = torch.rand(shape, dtype=torch.float64, requires_grad=True)
        check_gradients(weighted(getattr(F, name)), x, t, w, **opts)


def test_huber_loss_gradients_on_257_wide_input():
    x, t = pair_away_from_kinks((1, 257), opts={"delta": 0.5})
    check_gradients(F.huber_loss, x, t, reduction="sum", delta=0.5)


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_loss_gradients_non_contiguous(variant):
    name, opts = variant
    x, t = pair_away_from_kinks((5, 7), opts=opts)
    x, t = noncontiguous(x), noncontiguous(t)
    assert not x.is_contiguous() and not t.is_contiguous()
    if name == "smooth_l1_loss":
        check_gradients(F.smooth_l1_loss, x, t, **opts)
    else:
        w = noncontiguous(torch.rand(5, 7, dtype=torch.float64, requires_grad=True))
        check_gradients(weighted(getattr(F, name)), x, t, w, **opts)


@pytest.mark.parametrize("variant", WEIGHTED + [("smooth_l1_loss", {"beta": 0.5})], ids=ids)
def test_loss_matches_torch_on_non_contiguous_inputs(variant):
    name, opts = variant
    x = noncontiguous(torch.randn(7, 13, requires_grad=True))
    t = noncontiguous(torch.randn(7, 13, requires_grad=True))
    kwargs = dict(opts)
    if name != "smooth_l1_loss":
        kwargs["weight"] = noncontiguous(torch.rand(7, 13, requires_grad=True))
    for reduction in REDUCTIONS:
        assert_same_as_torch(*fns(name), x, t, reduction=reduction, **kwargs)


# --- broadcasting target against input --------------------------------------------------------------

BROADCASTS = [((7, 13), (13,)), ((7, 1), (7, 13)), ((2, 1, 5), (3, 1)), ((), (4,)), ((4, 3), ())]


@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_broadcast_target_matches_torch_with_reduced_gradients(variant, shapes):
    name, opts = variant
    x = torch.randn(shapes[0], requires_grad=True)
    t = torch.randn(shapes[1], requires_grad=True)
    for reduction in REDUCTIONS:
        assert_same_as_torch(*map(quiet, fns(name)), x, t, reduction=reduction, **opts)
        if name != "smooth_l1_loss":
            w = torch.rand(shapes[0], requires_grad=True)
            # A 0-dim weight cancels out of a weighted mean: its gradient is 0 analytically, and
            # both sides return float32 rounding noise (~1e-5 against a loss of ~10).
            atol = 1e-4 if shapes[0] == () and reduction == "mean" else 1e-6
            assert_same_as_torch(*map(quiet, fns(name)), x, t, reduction=reduction, weight=w, atol=atol, **opts)


@pytest.mark.parametrize("shapes", [((3, 5), (5,)), ((3, 1), (3, 4))], ids=str)
@pytest.mark.parametrize("variant", WEIGHTED + [("smooth_l1_loss", {"beta": 0.5})], ids=ids)
def test_broadcast_target_gradients(variant, shapes):
    name, opts = variant
    x, t = pair_away_from_kinks(shapes[0], shapes[1], opts=opts)
    if name == "smooth_l1_loss":
        check_gradients(quiet(F.smooth_l1_loss), x, t, reduction="none", **opts)
    else:
        w = torch.rand(shapes[0], dtype=torch.float64, requires_grad=True)
        check_gradients(weighted(quiet(getattr(F, name))), x, t, w, reduction="none", **opts)


@pytest.mark.parametrize("name", NAMES)
def test_broadcast_target_warns_like_torch_and_same_size_does_not(name):
    ours, theirs = fns(name)
    x, t = torch.randn(3, 4), torch.randn(4)
    with pytest.warns(UserWarning, match=r"target size \(torch.Size\(\[4\]\)\) that is different to the input"):
        ours(x, t)
    with pytest.warns(UserWarning, match="different to the input size"):
        theirs(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x, torch.randn(3, 4))


@pytest.mark.parametrize("name", NAMES)
def test_target_gradient_is_minus_input_gradient_summed_over_broadcast_dims(name):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, dtype=torch.float64, requires_grad=True)
    quiet(getattr(F, name))(x, t, reduction="sum").backward()
    torch.testing.assert_close(t.grad, -x.grad.sum(0))


# --- which gradients get computed --------------------------------------------------------------------

def test_loss_only_computes_requested_gradients(monkeypatch):
    calls = []
    fwd, bwd = ops.LOSSES["mse"]
    monkeypatch.setitem(
        ops.LOSSES, "mse", (lambda d: calls.append("l") or fwd(d), lambda dl, d: calls.append("dd") or bwd(dl, d))
    )
    x, t, w = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3), torch.rand(4, 3, requires_grad=True)
    F.mse_loss(x, t.requires_grad_(False), weight=w.detach()).backward()
    assert calls == ["l", "dd"] and t.grad is None  # forward's l, then dd only: no weight gradient
    calls.clear()
    F.mse_loss(x.detach(), t, weight=w).backward()
    assert calls == ["l", "l"] and w.grad is not None  # l again for dweight, dd never
    torch.testing.assert_close(w.grad, ((x - t) ** 2 - F.mse_loss(x, t, weight=w)).detach() / w.sum().detach())


# --- kinks, NaN, empty --------------------------------------------------------------------------------

def derivatives(fn, x, t, **kwargs):
    """Loss, first derivatives wrt (x, t), and second derivatives of a weighted sum of dx."""
    x, t = x.clone().requires_grad_(), t.clone().requires_grad_()
    y = fn(x, t, reduction="sum", **kwargs)
    dx, dt = torch.autograd.grad(y, (x, t), create_graph=True)
    weights = torch.arange(1.0, x.numel() + 1, dtype=x.dtype)
    ddx = torch.autograd.grad((dx * weights).sum(), (x, t), allow_unused=True, materialize_grads=True)
    return (y, dx, dt, *ddx)


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_first_and_second_derivatives_match_torch_at_the_kinks(variant):
    name, opts = variant
    k = kink(opts) or 1.0
    # |d| exactly 0, beta/delta (both signs), and values either side.
    d = torch.tensor([0.0, k, -k, k / 2, -k / 2, 2 * k, -3 * k, 1.0, -1.0], dtype=torch.float64)
    t = torch.randn(d.shape, dtype=torch.float64).round()  # exact in float64: x - t == d
    x = t + d
    ours, theirs = derivatives(getattr(F, name), x, t, **opts), derivatives(getattr(TF, name), x, t, **opts)
    for what, a, b in zip(["loss", "dx", "dt", "ddx/dx", "ddx/dt"], ours, theirs):
        torch.testing.assert_close(a, b, msg=lambda m, what=what: f"{what}: {m}")


def test_l1_loss_gradient_is_sign_zero_where_input_equals_target():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    t = torch.tensor([1.0, 0.0, 5.0], requires_grad=True)
    F.l1_loss(x, t, reduction="sum").backward()
    assert x.grad.tolist() == [0.0, 1.0, -1.0] and t.grad.tolist() == [0.0, -1.0, 1.0]


def test_smooth_l1_loss_with_beta_zero_is_l1_loss():
    x, t = torch.randn(5, 6, requires_grad=True), torch.randn(5, 6)
    t[0, :3] = x[0, :3].detach()
    torch.testing.assert_close(F.smooth_l1_loss(x, t, beta=0.0), F.l1_loss(x, t))
    assert_same_as_torch(F.smooth_l1_loss, TF.smooth_l1_loss, x, t, reduction="none", beta=0.0)


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_nan_input_stays_nan_in_loss_and_gradient_like_torch(variant):
    name, opts = variant
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        x[1, 2] = float("nan")
    for reduction in REDUCTIONS:
        ours, _ = assert_same_as_torch(*fns(name), x, t, reduction=reduction, **opts)
        loss = ours[0]
        assert loss.isnan().any() and (reduction != "none" or loss.isnan().sum() == 1)
    y = getattr(F, name)(x, t, reduction="sum", **opts)
    (dx,) = torch.autograd.grad(y, x)
    # l1 (and smooth_l1 with beta=0) give sgn(NaN) = 0 as torch does; the others give NaN.
    assert dx[1, 2].isnan() == (kink(opts) not in (None, 0.0) or name == "mse_loss")
    assert not dx[[0, 2]].isnan().any()


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_empty_input_gives_torchs_nan_mean_and_zero_sum(variant):
    name, opts = variant
    for reduction in REDUCTIONS:
        x, t = torch.randn(0, 3, requires_grad=True), torch.randn(0, 3)
        assert_same_as_torch(*fns(name), x, t, reduction=reduction, **opts)


# --- dtypes -------------------------------------------------------------------------------------------

DTYPE_PAIRS = [
    (torch.float32, (4, 3), torch.float64, (4, 3)),
    (torch.float64, (4, 3), torch.float32, (4, 3)),
    (torch.float32, (4, 3), torch.float64, ()),  # torch broadcasts first: the 0-dim target promotes
    (torch.float16, (4, 3), torch.float32, (4, 3)),
    (torch.float32, (4, 3), torch.int64, (4, 3)),
]


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_mixed_dtypes_give_torchs_output_dtype_and_values(variant, pair):
    name, opts = variant
    x = torch.randn(pair[1]).to(pair[0])
    t = (torch.randn(pair[3]) * 3).to(pair[2])
    for reduction in REDUCTIONS:
        ours, theirs = (quiet(f)(x, t, reduction=reduction, **opts) for f in fns(name))
        assert ours.dtype == theirs.dtype
        # float16 inputs round differently in our several passes than in torch's one kernel.
        tol = dict(rtol=2e-3, atol=2e-3) if torch.float16 in (x.dtype, t.dtype) else {}
        torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] != "huber_loss"], ids=ids)
def test_mixed_dtype_gradients_match_torch(variant):
    name, opts = variant
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert_same_as_torch(*fns(name), x, t, **opts)
    assert_same_as_torch(*fns(name), t, x, **opts)


def test_huber_loss_mixed_dtype_gradient_where_torch_backward_fails():
    # torch's huber_loss_backward raises "Found dtype Double but expected Float" here; ours
    # gives the gradients of the float32 loss (the target's cast up to float64).
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="dtype"):
        TF.huber_loss(x, t.detach().requires_grad_()).backward()
    y = F.huber_loss(x, t, delta=0.5)
    assert y.dtype == torch.float32
    y.backward()
    x32, t32 = x.detach().requires_grad_(), t.detach().float().requires_grad_()
    TF.huber_loss(x32, t32, delta=0.5).backward()
    assert x.grad.dtype == torch.float32 and t.grad.dtype == torch.float64
    torch.testing.assert_close(x.grad, x32.grad)
    torch.testing.assert_close(t.grad, t32.grad.double())


def test_l1_loss_on_integers_does_what_torch_does():
    x, t = torch.randint(0, 9, (4, 3)), torch.randint(0, 9, (4, 3))
    for reduction in ["none", "sum"]:
        ours, theirs = F.l1_loss(x, t, reduction=reduction), TF.l1_loss(x, t, reduction=reduction)
        assert ours.dtype == theirs.dtype == torch.int64 and torch.equal(ours, theirs)
    assert_raises_like_torch(F.l1_loss, TF.l1_loss, x, t)  # mean of integers


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_l1_loss_on_complex_matches_torch(reduction):
    x = torch.randn(3, 4, dtype=torch.complex64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.complex64, requires_grad=True)
    assert_same_as_torch(F.l1_loss, TF.l1_loss, x, t, reduction=reduction)
    assert_same_as_torch(F.l1_loss, TF.l1_loss, x.real.detach().requires_grad_(), t, reduction=reduction)


def test_l1_loss_complex_gradients():
    x = torch.randn(3, 4, dtype=torch.complex128, requires_grad=True)
    t = torch.randn(4, dtype=torch.float64, requires_grad=True)
    check_gradients(quiet(F.l1_loss), x, t, reduction="none")


# --- bad input raises like torch -----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_bad_reduction_raises_value_error_like_torch(name):
    x = torch.randn(3, 4)
    assert_raises_like_torch(*fns(name), x, x, reduction="average", match="average")


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss"])
def test_bad_reduction_with_weight_raises_value_error_like_torch(name):
    x, w = torch.randn(3, 4), torch.rand(3, 4)
    assert_raises_like_torch(*fns(name), x, x, reduction="average", weight=w, match="average")
    # with a weight torch no longer accepts the deprecated spelling of "mean"
    assert_raises_like_torch(*fns(name), x, x, reduction="elementwise_mean", weight=w, match="elementwise_mean")


@pytest.mark.parametrize("name", NAMES)
def test_shapes_that_cannot_broadcast_raise_like_torch(name):
    x, t = torch.randn(3, 4), torch.randn(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_raises_like_torch(*fns(name), x, t, match="[Mm]ismatch")
        # the shape error comes first, as in torch, even with a bad reduction too
        assert_raises_like_torch(*fns(name), x, t, reduction="average", match="[Mm]ismatch")


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss"])
def test_weight_of_another_shape_raises_value_error_like_torch(name):
    x = torch.randn(3, 4)
    assert_raises_like_torch(*fns(name), x, x, weight=torch.rand(4), match="same size")
    assert_raises_like_torch(*fns(name), x, x, weight=torch.rand(1, 3, 4), match="same size")


def test_negative_beta_and_non_positive_delta_raise_like_torch():
    x = torch.randn(3, 4)
    for beta in [-1.0, float("nan")]:
        assert_raises_like_torch(F.smooth_l1_loss, TF.smooth_l1_loss, x, x, beta=beta, match="beta")
    for delta in [0.0, -0.5, float("nan")]:
        assert_raises_like_torch(F.huber_loss, TF.huber_loss, x, x, delta=delta, match="delta")
        # before the bad reduction too, as in torch
        assert_raises_like_torch(*fns("huber_loss"), x, x, delta=delta, weight=x, reduction="x", match="delta")


@pytest.mark.parametrize("name", ["mse_loss", "smooth_l1_loss", "huber_loss"])
def test_integer_and_bool_inputs_raise_not_implemented_like_torch(name):
    i = torch.randint(0, 5, (3, 4))
    assert_raises_like_torch(*fns(name), i, i, match="must be floating")
    assert_raises_like_torch(*fns(name), i > 2, i > 1, match="must be floating")
    assert_raises_like_torch(*fns(name), i.to(torch.complex64), i.to(torch.complex64), match="must be floating")


def test_huber_loss_integer_input_with_float_target_raises_like_torch():
    assert_raises_like_torch(F.huber_loss, TF.huber_loss, torch.randint(0, 5, (3,)), torch.randn(3), match="cast")


def test_weighted_mse_on_integers_does_what_torch_does():
    # With a weight torch computes mse by hand, so integers work there (unlike without one).
    x, t, w = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4)), torch.randint(0, 3, (3, 4))
    for reduction in REDUCTIONS:
        ours, theirs = (f(x, t, reduction=reduction, weight=w) for f in fns("mse_loss"))
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs)


# --- torch.func ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", WEIGHTED + [("smooth_l1_loss", {"beta": 0.5})], ids=ids)
def test_vmap_and_hessian_match_torch(variant):
    name, opts = variant
    ours, theirs = fns(name)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    t = torch.randn(4, 3, 5, dtype=torch.float64)
    kwargs = dict(opts)
    if name != "smooth_l1_loss":
        kwargs["weight"] = torch.rand(3, 5, dtype=torch.float64)
    for reduction in REDUCTIONS:
        a, b = (torch.func.vmap(lambda u, v, f=f: f(u, v, reduction=reduction, **kwargs))(x, t) for f in fns(name))
        torch.testing.assert_close(a, b)
    a, b = (torch.func.hessian(lambda u, f=f: f(u, t[0], **kwargs))(x[0]) for f in (ours, theirs))
    torch.testing.assert_close(a, b)


# --- property ------------------------------------------------------------------------------------------

@st.composite
def loss_case(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    # target: input's shape, or with some dims set to 1 and/or leading dims dropped
    target_shape = [1 if draw(st.booleans()) else s for s in shape][draw(st.integers(0, len(shape))):]
    if draw(st.booleans()):
        shape, target_shape = target_shape, shape
    return tuple(shape), tuple(target_shape), draw(st.sampled_from(REDUCTIONS)), draw(st.booleans())


def _property(name, case, opts):
    shape, target_shape, reduction, weighted = case
    x = torch.randn(shape, requires_grad=True)
    t = torch.randn(target_shape, requires_grad=True)
    kwargs = dict(opts)
    if weighted and name != "smooth_l1_loss":
        kwargs["weight"] = torch.rand(shape, requires_grad=True)
    # A weight smaller than the broadcast loss can cancel out of a weighted mean (a 0-dim one
    # does): its gradient is then rounding noise on both sides (see the broadcast test).
    cancels = weighted and reduction == "mean" and torch.broadcast_shapes(shape, target_shape) != tuple(shape)
    assert_same_as_torch(*map(quiet, fns(name)), x, t, reduction=reduction, atol=1e-4 if cancels else 1e-6, **kwargs)


@given(case=loss_case())
@settings(max_examples=25, deadline=None)
def test_mse_loss_matches_torch_property(case):
    _property("mse_loss", case, {})


@given(case=loss_case())
@settings(max_examples=25, deadline=None)
def test_l1_loss_matches_torch_property(case):
    _property("l1_loss", case, {})


@given(case=loss_case(), beta=st.sampled_from([0.0, 0.3, 1.0, 2.5]))
@settings(max_examples=25, deadline=None)
def test_smooth_l1_loss_matches_torch_property(case, beta):
    _property("smooth_l1_loss", case, {"beta": beta})


@given(case=loss_case(), delta=st.sampled_from([0.3, 0.5, 1.0, 2.5]))
@settings(max_examples=25, deadline=None)
def test_huber_loss_matches_torch_property(case, delta):
    _property("huber_loss", case, {"delta": delta})
