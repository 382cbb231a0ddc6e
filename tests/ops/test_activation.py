import inspect
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import VIEWS, inplace_on_view, noncontiguous

SHAPES = [(1,), (7, 13), (2, 3, 257)]


def away_from_kinks(shape, dtype=torch.float64):
    """Inputs at least 0.05 away from 0, where finite differences of relu-like ops break."""
    x = torch.randn(shape, dtype=dtype)
    return (x + 0.1 * x.sign()).requires_grad_()


@pytest.mark.parametrize("shape", SHAPES)
def test_relu_matches_torch(shape):
    assert_same_as_torch(F.relu, TF.relu, torch.randn(shape, requires_grad=True))


@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 1, 5)])
def test_relu_gradients(shape):
    check_gradients(F.relu, away_from_kinks(shape))


def test_relu_gradients_non_contiguous():
    check_gradients(F.relu, noncontiguous(away_from_kinks((7, 13))))


def test_relu_inplace_matches_torch_and_overwrites_input():
    x = torch.randn(7, 13, requires_grad=True)
    # In-place needs a non-leaf: apply it to x * 1 on both sides.
    assert_same_as_torch(lambda t: F.relu(t * 1, inplace=True), lambda t: TF.relu(t * 1, inplace=True), x)
    h = torch.randn(5)
    out = F.relu(h, inplace=True)
    assert out is h and (h >= 0).all()


def test_relu_inplace_gradients():
    # torch's batched forward-AD check cannot see an in-place tangent update (see testing.py).
    check_gradients(lambda t: F.relu(t.clone(), inplace=True), away_from_kinks((7, 13)), batched_forward_grad=False)


def test_relu_propagates_nan():
    x = torch.tensor([float("nan"), -1.0, 2.0])
    torch.testing.assert_close(F.relu(x), TF.relu(x), equal_nan=True)


# ---------------------------------------------------------------------------------------------
# leaky_relu, elu, gelu, silu, tanh, sigmoid, softplus
#
# A case is (op name, options, kink): finite differences need inputs away from the kink, where
# the derivative jumps (0 for leaky_relu / elu; threshold / beta for softplus, whose value jumps
# there too). None: the op is smooth.

OUT_OF_PLACE = [
    ("leaky_relu", {}, 0.0),
    ("leaky_relu", dict(negative_slope=0.0), 0.0),
    ("leaky_relu", dict(negative_slope=0.2), 0.0),
    ("leaky_relu", dict(negative_slope=-0.3), 0.0),
    ("leaky_relu", dict(negative_slope=1.5), 0.0),
    ("elu", {}, 0.0),
    ("elu", dict(alpha=0.0), 0.0),
    ("elu", dict(alpha=0.5), 0.0),
    ("elu", dict(alpha=-0.7), 0.0),
    ("elu", dict(alpha=2.0), 0.0),
    ("gelu", {}, None),
    ("gelu", dict(approximate="tanh"), None),
    ("silu", {}, None),
    ("tanh", {}, None),
    ("sigmoid", {}, None),
    ("softplus", {}, 20.0),
    ("softplus", dict(beta=2.5, threshold=1.0), 0.4),
    ("softplus", dict(beta=0.5, threshold=3.0), 6.0),
    ("softplus", dict(beta=-1.0, threshold=2.0), -2.0),
]
# In-place: leaky_relu / elu with a negative slope have their own tests (backward raises).
IN_PLACE = [
    ("leaky_relu", {}, 0.0),
    ("leaky_relu", dict(negative_slope=0.0), 0.0),
    ("leaky_relu", dict(negative_slope=0.2), 0.0),
    ("leaky_relu", dict(negative_slope=1.5), 0.0),
    ("elu", {}, 0.0),
    ("elu", dict(alpha=0.0), 0.0),
    ("elu", dict(alpha=0.5), 0.0),
    ("elu", dict(alpha=2.0), 0.0),
    ("silu", {}, None),
]


def case_id(case):
    name, kwargs, _ = case
    return "-".join([name] + [f"{k}={v}" for k, v in kwargs.items()])


def sample(shape, kink, dtype=torch.float64):
    """Random inputs on both sides of the kink, none closer to it than 0.1 * spread."""
    z = torch.randn(shape, dtype=dtype)
    if kink is None:
        return z.requires_grad_()
    spread = max(1.0, abs(kink))
    return (kink + spread * (z + 0.1 * z.sign())).requires_grad_()


def ops(name):
    return getattr(F, name), getattr(TF, name)


def in_place(fn, **kwargs):
    """fn in place on a copy: in-place ops need a non-leaf, and must not clobber the test input."""
    return lambda t: fn(t.clone(), inplace=True, **kwargs)


@pytest.mark.parametrize("case", OUT_OF_PLACE, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES)
def test_activation_matches_torch(case, shape):
    name, kwargs, kink = case
    assert_same_as_torch(*ops(name), sample(shape, kink, torch.float32), **kwargs)


@pytest.mark.parametrize("case", OUT_OF_PLACE, ids=case_id)
@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 1, 5)])
def test_activation_gradients(case, shape):
    name, kwargs, kink = case
    check_gradients(getattr(F, name), sample(shape, kink), **kwargs)


@pytest.mark.parametrize("case", OUT_OF_PLACE, ids=case_id)
def test_activation_gradients_non_contiguous(case):
    name, kwargs, kink = case
    x = noncontiguous(sample((7, 13), kink))
    assert not x.is_contiguous()
    check_gradients(getattr(F, name), x, **kwargs)


@pytest.mark.parametrize("case", IN_PLACE, ids=case_id)
@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 3, 257)])
def test_activation_inplace_matches_torch(case, shape):
    name, kwargs, kink = case
    fn, torch_fn = ops(name)
    assert_same_as_torch(in_place(fn, **kwargs), in_place(torch_fn, **kwargs), sample(shape, kink, torch.float32))


@pytest.mark.parametrize("case", IN_PLACE, ids=case_id)
def test_activation_inplace_overwrites_and_returns_its_input(case):
    name, kwargs, kink = case
    fn, torch_fn = ops(name)
    h = sample((5, 7), kink, torch.float32).detach()
    expected = torch_fn(h.clone(), **kwargs)
    out = fn(h, inplace=True, **kwargs)
    assert out is h
    torch.testing.assert_close(h, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", IN_PLACE, ids=case_id)
@pytest.mark.parametrize("non_contiguous", [False, True])
def test_activation_inplace_gradients(case, non_contiguous):
    name, kwargs, kink = case
    x = sample((7, 13), kink)
    if non_contiguous:
        x = noncontiguous(x)  # t.clone() keeps the strides, so the op runs in place on a strided tensor
    # torch's batched forward-AD check cannot see an in-place tangent update (see testing.py).
    check_gradients(in_place(getattr(F, name), **kwargs), x, batched_forward_grad=False)


INPLACE_ON_VIEWS = {
    "relu": {}, "leaky_relu": dict(negative_slope=0.1), "elu": dict(alpha=0.5), "silu": {}, "hardswish": {}, "mish": {},
}


@pytest.mark.parametrize("view", VIEWS.values(), ids=VIEWS.keys())
@pytest.mark.parametrize("name", INPLACE_ON_VIEWS)
def test_inplace_on_a_view_matches_torch(name, view):
    # silu, hardswish and mish gave the view's gradient but lost the rest of the base's
    fn, torch_fn = ops(name)
    kwargs = INPLACE_ON_VIEWS[name]
    leaf, w, v = (torch.randn(4, 6, dtype=torch.float64) * 2 for _ in range(3))
    ours = inplace_on_view(lambda t: fn(t, inplace=True, **kwargs), view, leaf, w, v)
    theirs = inplace_on_view(lambda t: torch_fn(t, inplace=True, **kwargs), view, leaf, w, v)
    for what in theirs:
        torch.testing.assert_close(ours[what], theirs[what], msg=lambda m, what=what: f"{what}: {m}")


def test_inplace_ops_reject_a_leaf_that_requires_grad_like_torch():
    for name in ["leaky_relu", "elu", "silu"]:
        fn, torch_fn = ops(name)
        x = torch.randn(3, requires_grad=True)
        assert_raises_like_torch(fn, torch_fn, x, inplace=True, match="leaf")


@pytest.mark.parametrize("name,option", [("leaky_relu", "negative_slope"), ("elu", "alpha")])
def test_inplace_with_negative_slope_runs_forward_but_raises_in_backward_like_torch(name, option):
    fn, torch_fn = ops(name)
    kwargs = {option: -0.5, "inplace": True}
    x = torch.randn(4, 5, requires_grad=True)
    # forward is fine and gives torch's values
    torch.testing.assert_close(fn(x * 1, **kwargs), torch_fn(x * 1, **kwargs))
    # backward is not
    assert_raises_like_torch(
        lambda t: fn(t * 1, **kwargs).sum().backward(),
        lambda t: torch_fn(t * 1, **kwargs).sum().backward(),
        x,
        match=f"negative {option}",
    )

    # neither is forward-mode AD, which torch runs (and fails) during the forward
    def forward_ad(f):
        def run(t):
            with fwAD.dual_level():
                return f(fwAD.make_dual(t, torch.ones_like(t)) * 1, **kwargs)

        return run

    assert_raises_like_torch(forward_ad(fn), forward_ad(torch_fn), x.detach(), match=f"negative {option}")


def test_silu_inplace_matches_torch_under_torch_func_transforms():
    x = torch.randn(4, 5, dtype=torch.float64)
    v = torch.randn(4, 5, dtype=torch.float64)

    def run(silu):
        f = lambda t: silu(t.clone(), inplace=True)  # noqa: E731
        loss = lambda t: f(t).sin().sum()  # noqa: E731
        return (
            torch.func.vmap(f, in_dims=1)(x),
            torch.func.grad(loss)(x),
            torch.func.jvp(f, (x,), (v,))[1],
            torch.func.vmap(torch.func.grad(loss))(x),
            torch.func.hessian(loss)(x[0]),
        )

    for ours, theirs in zip(run(F.silu), run(TF.silu)):
        torch.testing.assert_close(ours, theirs)


def test_silu_inplace_without_grad_keeps_no_graph():
    x = torch.randn(6, requires_grad=True)
    with torch.no_grad():
        h = x * 1
        out = F.silu(h, inplace=True)
    assert out is h and out.grad_fn is None
    torch.testing.assert_close(out, TF.silu(x.detach()))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_second_derivative_matches_closed_form(approximate):
    # Independent of our backward: d2y/dx2 written out (Phi'' = -x phi), vs autograd through it twice.
    x = torch.linspace(-4, 4, 41, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.gelu(x, approximate=approximate).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    x = x.detach()
    if approximate == "none":
        phi = torch.exp(-0.5 * x**2) / (2 * torch.pi) ** 0.5
        expected = phi * (2 - x**2)
    else:
        k, c = (2 / torch.pi) ** 0.5, 0.044715
        t = torch.tanh(k * (x + c * x**3))
        du, d2u = k * (1 + 3 * c * x**2), k * 6 * c * x
        # y = x (1 + t) / 2;  t' = (1 - t^2) u';  t'' = (1 - t^2) (u'' - 2 t u'^2)
        t1, t2 = (1 - t**2) * du, (1 - t**2) * (d2u - 2 * t * du**2)
        expected = t1 + 0.5 * x * t2
    torch.testing.assert_close(gg, expected)


@pytest.mark.parametrize("beta,threshold", [(1.0, 20.0), (2.5, 1.0), (0.5, 3.0)])
def test_softplus_is_identity_above_threshold_and_log1p_exp_below(beta, threshold):
    kink = threshold / beta
    x = torch.tensor([kink - 3, kink - 0.5, kink - 0.01, kink + 0.01, kink + 0.5, kink + 3], dtype=torch.float64)
    x.requires_grad_()
    y = F.softplus(x, beta, threshold)
    (dx,) = torch.autograd.grad(y.sum(), x)
    below, xd = x.detach() * beta <= threshold, x.detach()
    assert below.any() and (~below).any()
    expected = torch.where(below, torch.log1p(torch.exp(beta * xd)) / beta, xd)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(dx, torch.where(below, torch.sigmoid(beta * xd), torch.ones_like(xd)))
    assert_same_as_torch(F.softplus, TF.softplus, x, beta=beta, threshold=threshold)


def test_softplus_gradient_stays_finite_where_exp_overflows():
    # With a threshold above exp's range, torch's backward z / (z + 1), z = exp(beta x), gives
    # inf / inf = nan; sigmoid(beta x) is 1 there.
    x = torch.tensor([44.0, 50.0, 100.0], requires_grad=True)
    (dx,) = torch.autograd.grad(F.softplus(x, beta=2.0, threshold=1000.0).sum(), x)
    torch.testing.assert_close(dx, torch.ones(3))


def test_elu_second_derivative_stays_finite_for_large_inputs():
    # exp(x) overflows float32 for x > 88; the unused x <= 0 branch must not turn 0 * inf into nan.
    x = torch.tensor([-3.0, 100.0, 1e4], requires_grad=True)
    (g,) = torch.autograd.grad(F.elu(x, 0.5).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(gg, torch.tensor([0.5 * torch.exp(torch.tensor(-3.0)).item(), 0.0, 0.0]))


@pytest.mark.parametrize("case", OUT_OF_PLACE + [("relu", {}, 0.0)], ids=case_id)
def test_activation_propagates_nan(case):
    name, kwargs, _ = case
    fn, torch_fn = ops(name)
    x = torch.tensor([float("nan"), -1.0, 2.0, float("nan")])
    y = fn(x, **kwargs)
    assert y.isnan().tolist() == [True, False, False, True]
    torch.testing.assert_close(y, torch_fn(x, **kwargs), equal_nan=True)


SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.0, -3.0, 2.5, -2.0, 1e4]


def _special_cases():
    cases = [(name, kwargs, False) for name, kwargs, _ in OUT_OF_PLACE + [("relu", {}, 0.0)]]
    cases += [(name, kwargs, True) for name, kwargs, _ in IN_PLACE + [("relu", {}, 0.0)]]
    cases += [(name, {}, inplace) for name in ("hardswish", "mish") for inplace in (False, True)]
    cases += [(name, kwargs, False) for name, kwargs in MORE_SPECIAL]
    cases += [(name, kwargs, True) for name, kwargs in MORE_SPECIAL if name in MORE_INPLACE]
    return cases


# ops/activation_more.py, with options whose kinks are among SPECIAL's values
MORE_SPECIAL = [
    ("hardtanh", {}), ("hardtanh", dict(min_val=-2.0, max_val=2.5)), ("relu6", {}), ("hardsigmoid", {}),
    ("logsigmoid", {}), ("softsign", {}), ("tanhshrink", {}), ("softshrink", dict(lambd=2.0)),
    ("softshrink", dict(lambd=0.0)), ("hardshrink", dict(lambd=3.0)), ("hardshrink", dict(lambd=0.0)),
    ("threshold", dict(threshold=2.5, value=-1.0)), ("threshold", dict(threshold=0.0, value=4.0)),
    ("selu", {}), ("celu", dict(alpha=0.5)), ("celu", dict(alpha=-2.0)), ("rrelu", dict(lower=0.1, upper=0.3)),
]
MORE_INPLACE = ("hardtanh", "relu6", "hardsigmoid", "threshold", "selu")  # (rrelu_: torch has no forward AD)


@pytest.mark.parametrize("case", _special_cases(), ids=lambda c: case_id(c[:2] + (None,)) + ("-inplace" if c[2] else ""))
@pytest.mark.parametrize("mode", ["plain", "graph", "forward"])
def test_activation_gradient_at_nan_inf_and_kinks_is_torchs(case, mode):
    """nan, +-inf, signed zeros and the kinks: the gradient (a plain backward, one with a graph for
    double backward) and the tangent are torch's, nan where torch's is nan and finite where it is
    finite (torch's piecewise rules send a nan down one branch: relu and elu pass dy, hardswish 1)."""
    name, kwargs, inplace = case
    fn, torch_fn = ops(name)
    if inplace:
        kwargs = dict(kwargs, inplace=True)
    x0 = torch.tensor(SPECIAL, requires_grad=True)
    dy = torch.arange(1.0, len(SPECIAL) + 1)
    if mode == "forward":
        with fwAD.dual_level():
            outs = [fwAD.unpack_dual(f(fwAD.make_dual(x0.detach().clone(), dy), **kwargs)).tangent
                    for f in (fn, torch_fn)]
    else:
        outs = [torch.autograd.grad(f(x0 * 1, **kwargs), x0, dy, create_graph=mode == "graph")[0]
                for f in (fn, torch_fn)]
    ours, theirs = outs
    assert torch.equal(ours.isnan(), theirs.isnan()), f"nan pattern: ours {ours.tolist()}, torch {theirs.tolist()}"
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("approximate", ["exact", "TANH", ""])
def test_gelu_rejects_unknown_approximation_like_torch(approximate):
    assert_raises_like_torch(F.gelu, TF.gelu, torch.randn(3), approximate=approximate, match="none or tanh")


def test_gelu_rejects_non_string_approximation_like_torch():
    assert_raises_like_torch(F.gelu, TF.gelu, torch.randn(3), approximate=None)


@pytest.mark.parametrize("name", ["leaky_relu", "elu", "gelu", "silu", "softplus"])
def test_activation_rejects_integer_input_like_torch(name):
    assert_raises_like_torch(*ops(name), torch.arange(3), match="not implemented for 'Long'")


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_tanh_and_sigmoid_promote_integer_input_like_torch(name):
    fn, torch_fn = ops(name)
    y, expected = fn(torch.arange(3)), torch_fn(torch.arange(3))
    assert y.dtype == expected.dtype == torch.get_default_dtype()
    torch.testing.assert_close(y, expected)


def _parameters(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "elu", "silu", "tanh", "sigmoid"])
def test_activation_signature_matches_torch(name):
    fn, torch_fn = ops(name)
    assert _parameters(fn) == _parameters(torch_fn)


def test_gelu_and_softplus_signatures_match_torch_docs():
    # torch's are C builtins without an inspectable signature: their docstrings give it.
    P = inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert TF.gelu.__doc__.strip().startswith("gelu(input, approximate = 'none')")
    assert _parameters(F.gelu) == [("input", inspect.Parameter.empty, P), ("approximate", "none", P)]
    assert TF.softplus.__doc__.strip().startswith("softplus(input, beta=1, threshold=20)")
    assert _parameters(F.softplus) == [("input", inspect.Parameter.empty, P), ("beta", 1.0, P), ("threshold", 20.0, P)]
    # and both accept the options positionally, as torch does
    x = torch.randn(5)
    torch.testing.assert_close(F.softplus(x, 2.0, 0.5), TF.softplus(x, 2.0, 0.5))
    torch.testing.assert_close(F.gelu(x, "tanh"), TF.gelu(x, approximate="tanh"))


# Property tests: random shapes (incl. size-1 and empty dims) and options, float32 parity with torch.

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
slopes = st.floats(-2.0, 2.0, allow_nan=False, width=32)


def _check_property(name, shape, kwargs, inplace=False):
    fn, torch_fn = ops(name)
    x = torch.randn(shape, requires_grad=True)
    if inplace:
        fn, torch_fn = in_place(fn, **kwargs), in_place(torch_fn, **kwargs)
        kwargs = {}
    assert_same_as_torch(fn, torch_fn, x, **kwargs)


@given(shape=shapes, negative_slope=slopes, inplace=st.booleans())
@settings(max_examples=25, deadline=None)
def test_leaky_relu_matches_torch_property(shape, negative_slope, inplace):
    # in-place backward needs a slope >= 0 (torch's and ours raise otherwise: tested above)
    slope = abs(negative_slope) if inplace else negative_slope
    _check_property("leaky_relu", shape, dict(negative_slope=slope), inplace)


@given(shape=shapes, alpha=slopes, inplace=st.booleans())
@settings(max_examples=25, deadline=None)
def test_elu_matches_torch_property(shape, alpha, inplace):
    _check_property("elu", shape, dict(alpha=abs(alpha) if inplace else alpha), inplace)


@given(shape=shapes, approximate=st.sampled_from(["none", "tanh"]))
@settings(max_examples=25, deadline=None)
def test_gelu_matches_torch_property(shape, approximate):
    _check_property("gelu", shape, dict(approximate=approximate))


@given(shape=shapes, inplace=st.booleans())
@settings(max_examples=25, deadline=None)
def test_silu_matches_torch_property(shape, inplace):
    _check_property("silu", shape, {}, inplace)


@given(shape=shapes, name=st.sampled_from(["tanh", "sigmoid"]))
@settings(max_examples=25, deadline=None)
def test_tanh_and_sigmoid_match_torch_property(shape, name):
    _check_property(name, shape, {})


@given(
    shape=shapes,
    beta=st.floats(0.25, 4.0, width=32) | st.floats(-4.0, -0.25, width=32),
    threshold=st.floats(-3.0, 20.0, width=32),
)
@settings(max_examples=25, deadline=None)
def test_softplus_matches_torch_property(shape, beta, threshold):
    _check_property("softplus", shape, dict(beta=beta, threshold=threshold))


# ---------------------------------------------------------------------------------------------
# hardswish, mish, glu


def hardswish_sample(shape, dtype=torch.float64):
    """Inputs spread over all three pieces (x < -3, |x| <= 3, x > 3), none within 0.1 of a kink."""
    x = 4 * torch.randn(shape, dtype=dtype)
    for kink in (-3.0, 3.0):
        near = (x - kink).abs() < 0.1
        x = torch.where(near, x + 0.25, x)
    return x.requires_grad_()


def swish_sample(name, shape, dtype=torch.float64):
    return hardswish_sample(shape, dtype) if name == "hardswish" else torch.randn(shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("name", ["hardswish", "mish"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_hardswish_and_mish_match_torch(name, shape, inplace):
    fn, torch_fn = ops(name)
    if inplace:
        fn, torch_fn = in_place(fn), in_place(torch_fn)
    assert_same_as_torch(fn, torch_fn, swish_sample(name, shape, torch.float32))


@pytest.mark.parametrize("name", ["hardswish", "mish"])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 1, 5)])
def test_hardswish_and_mish_gradients(name, shape):
    check_gradients(getattr(F, name), swish_sample(name, shape))


@pytest.mark.parametrize("name", ["hardswish", "mish"])
@pytest.mark.parametrize("non_contiguous", [False, True])
def test_hardswish_and_mish_inplace_gradients(name, non_contiguous):
    x = swish_sample(name, (7, 13))
    if non_contiguous:
        x = noncontiguous(x)
    check_gradients(in_place(getattr(F, name)), x, batched_forward_grad=False)


@pytest.mark.parametrize("name", ["hardswish", "mish"])
def test_hardswish_and_mish_inplace_overwrite_and_return_their_input(name):
    fn, torch_fn = ops(name)
    h = swish_sample(name, (5, 7), torch.float32).detach()
    expected = torch_fn(h.clone())
    assert fn(h, inplace=True) is h
    torch.testing.assert_close(h, expected, rtol=0, atol=0)


def test_hardswish_derivative_at_its_kinks_is_torchs():
    x = torch.tensor([-3.0, 3.0, -4.0, 0.0, 4.0], requires_grad=True)
    assert_same_as_torch(F.hardswish, TF.hardswish, x)


def test_mish_second_derivative_matches_torch():
    x = torch.linspace(-6, 6, 25, dtype=torch.float64, requires_grad=True)

    def gg(fn):
        (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        return torch.autograd.grad(g.sum(), x)[0]

    torch.testing.assert_close(gg(F.mish), gg(TF.mish))


GLU_CASES = [((2,), -1), ((7, 14), -1), ((6, 13), 0), ((2, 4, 257), 1), ((1, 2, 1), 1)]


@pytest.mark.parametrize("shape,dim", GLU_CASES)
def test_glu_matches_torch(shape, dim):
    assert_same_as_torch(F.glu, TF.glu, torch.randn(shape, requires_grad=True), dim)


@pytest.mark.parametrize("shape,dim", [((2,), -1), ((3, 4), -1), ((6, 3), 0), ((1, 2, 1), 1)])
def test_glu_gradients(shape, dim):
    check_gradients(F.glu, torch.randn(shape, dtype=torch.float64, requires_grad=True), dim)


def test_glu_gradients_non_contiguous():
    x = noncontiguous(torch.randn(4, 6, dtype=torch.float64, requires_grad=True))
    assert not x.is_contiguous()
    check_gradients(F.glu, x, 0)


@pytest.mark.parametrize("x,dim", [(torch.randn(3, 5), -1), (torch.tensor(1.0), -1), (torch.randn(4), 1),
                                   (torch.arange(4), 0)], ids=["odd", "scalar", "bad-dim", "integer"])
def test_glu_rejects_bad_input_like_torch(x, dim):
    assert_raises_like_torch(F.glu, TF.glu, x, dim)


@pytest.mark.parametrize("name", ["hardswish", "mish", "glu"])
def test_new_activations_propagate_nan_and_match_signatures(name):
    fn, torch_fn = ops(name)
    x = torch.tensor([float("nan"), -1.0, 2.0, float("nan")])
    torch.testing.assert_close(fn(x), torch_fn(x), equal_nan=True)
    assert fn(x).isnan().any()
    assert _parameters(fn) == _parameters(torch_fn)


@pytest.mark.parametrize("name", ["hardswish", "mish"])
def test_hardswish_and_mish_reject_integer_input_like_torch(name):
    assert_raises_like_torch(*ops(name), torch.arange(3), match="not implemented for 'Long'")


@given(shape=shapes, name=st.sampled_from(["hardswish", "mish"]), inplace=st.booleans())
@settings(max_examples=25, deadline=None)
def test_hardswish_and_mish_match_torch_property(shape, name, inplace):
    _check_property(name, shape, {}, inplace)


@given(lead=st.lists(st.integers(1, 3), max_size=2), half=st.integers(1, 4), data=st.data())
@settings(max_examples=25, deadline=None)
def test_glu_matches_torch_property(lead, half, data):
    shape = (*lead, 2 * half)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1).filter(lambda d: shape[d] % 2 == 0))
    assert_same_as_torch(F.glu, TF.glu, torch.randn(shape, requires_grad=True), dim)


@pytest.mark.parametrize("name,kwargs", [("Hardswish", {}), ("Mish", {}), ("GLU", dict(dim=0)), ("Hardswish", dict(inplace=True))])
def test_new_activation_modules_are_drop_ins(name, kwargs):
    import manualgrad as mg
    import manualgrad.nn as mnn

    th, ours = getattr(torch.nn, name)(**kwargs), getattr(mnn, name)(**kwargs)
    assert isinstance(ours, type(th)) and repr(ours) == repr(th)
    assert ours.state_dict().keys() == th.state_dict().keys()
    x = torch.randn(4, 6, requires_grad=True)
    assert_same_as_torch(lambda t: ours(t * 1), lambda t: th(t * 1), x)
    model = mg.convert(torch.nn.Sequential(getattr(torch.nn, name)(**kwargs)))
    assert type(model[0]) is getattr(mnn, name)


@pytest.mark.parametrize(
    "name, kwargs",
    [("gelu", {}), ("gelu", {"approximate": "tanh"}), ("silu", {}), ("elu", {"alpha": 0.7}),
     ("leaky_relu", {"negative_slope": 0.2}), ("softplus", {"beta": 2.0, "threshold": 1.0})],
)
def test_plain_backward_matches_torch_across_chunks(name, kwargs):
    # 2 ** 17 + 5 elements per row block: the plain (no create_graph) backward runs in several
    # chunks of a scratch buffer, the last one short; a non-contiguous input is flattened first
    x = torch.randn(3, 2**17 + 5, requires_grad=True)
    assert_same_as_torch(getattr(F, name), getattr(TF, name), x, **kwargs)
    assert_same_as_torch(getattr(F, name), getattr(TF, name), noncontiguous(torch.randn(5, 30001)).requires_grad_(), **kwargs)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_per_sample_gradients_under_vmap_need_no_per_sample_fallback(approximate):
    # torch warns when an op inside vmap has no batching rule and falls back to a loop
    x = torch.randn(5, 7, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = torch.func.vmap(torch.func.grad(lambda t: F.gelu(t, approximate=approximate).sum()))(x)
    expected = torch.func.vmap(torch.func.grad(lambda t: TF.gelu(t, approximate=approximate).sum()))(x)
    torch.testing.assert_close(ours, expected)
