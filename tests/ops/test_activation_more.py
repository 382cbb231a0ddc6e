"""hardtanh, relu6, hardsigmoid, logsigmoid, softsign, tanhshrink, softshrink, hardshrink, threshold,
selu, celu, prelu, rrelu, softmin: against torch (float32, odd shapes, every option), float64
gradchecks (with double backward), in place (also on views), bad input like torch."""
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad.functional as F
from manualgrad.ops.activation_slopes import rrelu_noise
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import VIEWS, inplace_on_view, noncontiguous

SHAPES = [(1,), (7, 13), (2, 3, 257)]

# (name, options, kinks): finite differences need inputs away from the kinks
CASES = [
    ("hardtanh", {}, (-1.0, 1.0)),
    ("hardtanh", dict(min_val=-0.5, max_val=2.0), (-0.5, 2.0)),
    ("hardtanh", dict(min_val=0.3, max_val=0.3), (0.3,)),
    ("relu6", {}, (0.0, 6.0)),
    ("hardsigmoid", {}, (-3.0, 3.0)),
    ("logsigmoid", {}, ()),
    ("softsign", {}, (0.0,)),  # |x|: smooth f, but gradcheck's second derivative jumps there
    ("tanhshrink", {}, ()),
    ("softshrink", {}, (-0.5, 0.5)),
    ("softshrink", dict(lambd=1.5), (-1.5, 1.5)),
    ("softshrink", dict(lambd=0.0), (0.0,)),
    ("hardshrink", {}, (-0.5, 0.5)),
    ("hardshrink", dict(lambd=2.0), (-2.0, 2.0)),
    ("hardshrink", dict(lambd=-1.0), ()),
    ("threshold", dict(threshold=0.5, value=-2.0), (0.5,)),
    ("threshold", dict(threshold=-1.0, value=3.0), (-1.0,)),
    ("selu", {}, (0.0,)),
    ("celu", {}, (0.0,)),
    ("celu", dict(alpha=0.5), (0.0,)),
    ("celu", dict(alpha=2.5), (0.0,)),
    ("celu", dict(alpha=-0.7), (0.0,)),
    ("softmin", dict(dim=-1), ()),
    ("softmin", dict(dim=0), ()),
]
# torch has inplace= for these (celu with alpha < 0 in place raises in backward: its own test)
INPLACE = [c for c in CASES if c[0] in ("hardtanh", "relu6", "hardsigmoid", "threshold", "selu", "celu")
           and c[1].get("alpha", 1.0) > 0]


def case_id(case):
    name, kwargs, _ = case
    return "-".join([name] + [f"{k}={v}" for k, v in kwargs.items()])


def sample(shape, kinks, dtype=torch.float64):
    """Inputs spread over every piece (scale 4), none within 0.1 of a kink."""
    x = 4 * torch.randn(shape, dtype=dtype)
    for k in kinks:
        x = torch.where((x - k).abs() < 0.1, k + 0.2 * (x - k).sign().masked_fill(x == k, 1), x)
    return x.requires_grad_()


def ops(name):
    return getattr(F, name), getattr(TF, name)


def in_place(fn, **kwargs):
    return lambda t: fn(t.clone(), inplace=True, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES)
def test_activation_matches_torch(case, shape):
    name, kwargs, kinks = case
    assert_same_as_torch(*ops(name), sample(shape, kinks, torch.float32), **kwargs)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 1, 4)])
def test_activation_gradients(case, shape):
    name, kwargs, kinks = case
    check_gradients(getattr(F, name), sample(shape, kinks), **kwargs)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_activation_gradients_non_contiguous(case):
    name, kwargs, kinks = case
    x = noncontiguous(sample((4, 5), kinks))
    assert not x.is_contiguous()
    check_gradients(getattr(F, name), x, **kwargs)


@pytest.mark.parametrize("case", INPLACE, ids=case_id)
@pytest.mark.parametrize("shape", SHAPES)
def test_activation_inplace_matches_torch(case, shape):
    name, kwargs, kinks = case
    fn, torch_fn = ops(name)
    assert_same_as_torch(in_place(fn, **kwargs), in_place(torch_fn, **kwargs), sample(shape, kinks, torch.float32))


@pytest.mark.parametrize("case", INPLACE, ids=case_id)
def test_activation_inplace_overwrites_and_returns_its_input(case):
    name, kwargs, kinks = case
    fn, torch_fn = ops(name)
    h = sample((5, 7), kinks, torch.float32).detach()
    expected = torch_fn(h.clone(), **kwargs)
    assert fn(h, inplace=True, **kwargs) is h
    torch.testing.assert_close(h, expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", INPLACE, ids=case_id)
@pytest.mark.parametrize("non_contiguous", [False, True])
def test_activation_inplace_gradients(case, non_contiguous):
    name, kwargs, kinks = case
    x = sample((3, 5), kinks)
    if non_contiguous:
        x = noncontiguous(x)
    # torch's batched forward-AD check cannot see an in-place tangent update (see testing.py)
    check_gradients(in_place(getattr(F, name), **kwargs), x, batched_forward_grad=False)


@pytest.mark.parametrize("name,kwargs", [("hardtanh_", {}), ("threshold_", dict(threshold=0.1, value=2.0)),
                                         ("selu_", {}), ("celu_", dict(alpha=0.5)), ("rrelu_", {})])
def test_underscore_variants_match_torch(name, kwargs):
    fn, torch_fn = ops(name)
    x = sample((6, 7), (), torch.float32)

    def run(f):
        torch.manual_seed(0)
        return f(x * 1, **kwargs)
    assert_same_as_torch(lambda t: run(fn), lambda t: run(torch_fn), x)


INPLACE_ON_VIEWS = {
    "hardtanh": dict(min_val=-0.5, max_val=1.0), "relu6": {}, "hardsigmoid": {},
    "threshold": dict(threshold=0.2, value=3.0), "selu": {}, "celu": dict(alpha=0.7),
}


@pytest.mark.parametrize("view", VIEWS.values(), ids=VIEWS.keys())
@pytest.mark.parametrize("name", INPLACE_ON_VIEWS)
def test_inplace_on_a_view_matches_torch(name, view):
    fn, torch_fn = ops(name)
    kwargs = INPLACE_ON_VIEWS[name]
    leaf, w, v = (torch.randn(4, 6, dtype=torch.float64) * 2 for _ in range(3))
    ours = inplace_on_view(lambda t: fn(t, inplace=True, **kwargs), view, leaf, w, v)
    theirs = inplace_on_view(lambda t: torch_fn(t, inplace=True, **kwargs), view, leaf, w, v)
    for what in theirs:
        torch.testing.assert_close(ours[what], theirs[what], msg=lambda m, what=what: f"{what}: {m}")


def test_threshold_inplace_with_value_above_threshold_keeps_the_input():
    # y = 3 > threshold where x was below it: y alone would pass dy there; torch gives 0
    x = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    (g,) = torch.autograd.grad(F.threshold(x * 1, 0.0, 3.0, inplace=True).sum(), x)
    assert g.tolist() == [0.0, 1.0, 1.0]


def test_celu_inplace_with_negative_alpha_raises_in_backward_like_torch():
    x = torch.randn(4, 5, requires_grad=True)
    assert_raises_like_torch(lambda t: F.celu(t * 1, -0.5, True).sum().backward(),
                             lambda t: TF.celu(t * 1, -0.5, True).sum().backward(), x, match="negative")


def test_hardsigmoid_derivative_a_few_ulp_below_3_is_torchs():
    # x + 3 rounds to 6 there: y = 1 already, but f'(x) = 1/6 (hence x, not y, is kept)
    x = torch.tensor([3.0 - 2**-22, 3.0 - 2**-21, -3.0 + 2**-22], requires_grad=True)
    assert_same_as_torch(F.hardsigmoid, TF.hardsigmoid, x)
    assert_same_as_torch(in_place(F.hardsigmoid), in_place(TF.hardsigmoid), x)


# ---------------------------------------------------------------------------------------------
# prelu

PRELU = [((5,), 1), ((3, 4), 1), ((3, 4), 4), ((2, 3, 5), 3), ((2, 3, 4, 5), 3), ((2, 1, 7), 1), ((), 1)]


@pytest.mark.parametrize("shape,params", PRELU)
def test_prelu_matches_torch(shape, params):
    x = sample(shape, (0.0,), torch.float32)
    w = (torch.rand(params) * 0.5).requires_grad_()
    assert_same_as_torch(F.prelu, TF.prelu, x, w)


@pytest.mark.parametrize("shape,params", PRELU)
def test_prelu_gradients(shape, params):
    x = sample(shape, (0.0,))
    w = torch.rand(params, dtype=torch.float64).requires_grad_()
    check_gradients(F.prelu, x, w)


def test_prelu_zero_dim_weight_matches_torch():
    assert_same_as_torch(F.prelu, TF.prelu, torch.randn(3, 4, requires_grad=True), torch.tensor(0.3, requires_grad=True))


@pytest.mark.parametrize("x,w", [(torch.randn(3), torch.randn(3)), (torch.randn(2, 3), torch.randn(2, 3)),
                                 (torch.randn(2, 3, 4), torch.randn(4)), (torch.randn(2, 3), torch.randn(1, 1)),
                                 (torch.randn(()), torch.randn(2))],
                         ids=["1d-many", "2d-weight", "wrong-channels", "2d-one", "scalar-input"])
def test_prelu_rejects_bad_weights_like_torch(x, w):
    assert_raises_like_torch(F.prelu, TF.prelu, x, w)


def test_prelu_gradient_at_nan_inf_and_zero_is_torchs():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.0, -2.0]] * 2).T.contiguous()
    w = torch.tensor([0.25, -1.5], requires_grad=True)
    assert_same_as_torch(F.prelu, TF.prelu, x.requires_grad_(), w, grad_output=torch.ones(7, 2))


@pytest.mark.parametrize("name", ["prelu", "hardtanh", "selu", "softmin", "logsigmoid", "softshrink"])
def test_bfloat16_autocast_gives_torchs_dtypes_and_values(name):
    # prelu is on torch's lower-precision lists (a float32 weight is cast down); the others keep
    # the input's dtype
    x0, w0 = torch.randn(4, 6), torch.full((6,), 0.2)

    def run(f):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = x.bfloat16() * 2
            y = f.prelu(h, w) if name == "prelu" else f.softmin(h, 1) if name == "softmin" else getattr(f, name)(h)
        y.float().sum().backward()
        return y, x.grad, w.grad

    ours, theirs = run(F), run(TF)
    assert [t.dtype for t in ours if t is not None] == [t.dtype for t in theirs if t is not None]
    for a, b in zip(ours, theirs):
        if b is not None:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# rrelu

def seeded(fn, seed=0, **kwargs):
    def run(t):
        torch.manual_seed(seed)
        return fn(t, **kwargs)
    return run


@pytest.mark.parametrize("lower,upper", [(1 / 8, 1 / 3), (0.1, 0.3), (-0.5, 2.0), (0.2, 0.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rrelu_training_draws_torchs_slopes_under_the_same_seed(shape, dtype, lower, upper):
    x = torch.randn(shape, dtype=dtype)
    kw = dict(lower=lower, upper=upper, training=True)
    # bit for bit: the same slopes, the same products
    torch.testing.assert_close(seeded(F.rrelu, **kw)(x), seeded(TF.rrelu, **kw)(x), rtol=0, atol=0)
    assert_same_as_torch(seeded(F.rrelu, **kw), seeded(TF.rrelu, **kw), x.requires_grad_(), rtol=0, atol=0)


def test_rrelu_draws_in_row_major_order_for_non_contiguous_input_and_skips_nan():
    x = noncontiguous(torch.randn(5, 9))
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), 0.0, -0.0
    kw = dict(training=True)
    torch.testing.assert_close(seeded(F.rrelu, **kw)(x), seeded(TF.rrelu, **kw)(x), rtol=0, atol=0, equal_nan=True)
    # and the generator is left where torch leaves it
    seeded(F.rrelu, **kw)(x)
    ours = torch.rand(3)
    seeded(TF.rrelu, **kw)(x)
    assert torch.equal(ours, torch.rand(3))


def test_rrelu_slopes_are_uniform_in_the_range():
    torch.manual_seed(0)
    a = rrelu_noise(-torch.ones(20000, dtype=torch.float64), 0.1, 0.3)
    assert a.min() >= 0.1 and a.max() < 0.3
    assert abs(a.mean().item() - 0.2) < 1e-3 and abs(a.var().item() - 0.2**2 / 12) < 1e-4


@pytest.mark.parametrize("inplace", [False, True])
def test_rrelu_inplace_training_matches_torch(inplace):
    x = torch.randn(7, 13, requires_grad=True)
    kw = dict(training=True, inplace=inplace)
    assert_same_as_torch(lambda t: seeded(F.rrelu, **kw)(t * 1), lambda t: seeded(TF.rrelu, **kw)(t * 1), x, rtol=0, atol=0)


@pytest.mark.parametrize("view", VIEWS.values(), ids=VIEWS.keys())
def test_rrelu_inplace_on_a_view_matches_torch(view):
    # backward only: torch's rrelu_ has neither forward AD nor a vmap rule (inplace_on_view's other runs)
    leaf, w = torch.randn(4, 6, dtype=torch.float64) * 2, torch.randn(4, 6, dtype=torch.float64)

    def run(f):
        leaf_ = leaf.clone().requires_grad_()
        x = leaf_ * 1
        v = view(x)
        torch.manual_seed(0)
        out = f(v, training=True, inplace=True)
        assert out is v
        (x * w).sum().backward()
        return out.detach(), x.detach(), leaf_.grad

    for ours, theirs in zip(run(F.rrelu), run(TF.rrelu)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("inplace", [False, True])
def test_rrelu_eval_is_leaky_relu_with_the_mean_slope(inplace):
    x = sample((7, 13), (0.0,), torch.float32)
    fn = (lambda f: lambda t: f(t * 1, 0.1, 0.4, False, True)) if inplace else (lambda f: lambda t: f(t, 0.1, 0.4))
    assert_same_as_torch(fn(F.rrelu), fn(TF.rrelu), x)
    torch.testing.assert_close(F.rrelu(x, 0.1, 0.4), torch.where(x > 0, x, 0.25 * x))


def test_rrelu_training_gradients():
    # the same seed on every call: the same slopes for gradcheck's perturbed inputs
    check_gradients(seeded(F.rrelu, training=True), sample((3, 5), (0.0,)), batched_forward_grad=False)


def test_rrelu_function_with_given_slopes_under_vmap_and_jvp():
    from manualgrad.ops._apply import apply
    from manualgrad.ops.activation_slopes import RReLUFunction

    x, a, t = torch.randn(4, 5, dtype=torch.float64), torch.rand(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    f = lambda x, a: apply(RReLUFunction, x, a, False)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(f, in_dims=(1, 1))(x, a), (x * a).T)
    torch.testing.assert_close(torch.func.vmap(f, in_dims=(None, 0))(x[0], a), x[0] * a)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(lambda x, a: f(x, a).sin().sum()))(x, a), (x * a).cos() * a)
    torch.testing.assert_close(torch.func.jvp(lambda x: f(x, a), (x,), (t,))[1], t * a)


def test_rrelu_rejects_bad_input_like_torch():
    assert_raises_like_torch(F.rrelu, TF.rrelu, torch.randn(3), 0.5, 0.1, True, match="Lower bound")
    assert_raises_like_torch(F.rrelu, TF.rrelu, torch.arange(3), training=True)
    with pytest.raises(RuntimeError):  # as torch's: no vmap rule for a data-dependent draw
        torch.func.vmap(lambda t: F.rrelu(t, training=True), randomness="different")(torch.randn(3, 4))


# ---------------------------------------------------------------------------------------------
# softmin

def test_softmin_dtype_and_implicit_dim_match_torch():
    x = torch.randn(3, 4, 5, requires_grad=True)
    assert_same_as_torch(F.softmin, TF.softmin, x, dim=1, dtype=torch.float64)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        y = F.softmin(x.detach())
    with pytest.warns(UserWarning):
        torch.testing.assert_close(y, TF.softmin(x.detach()))


# ---------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("call", [
    lambda f: f.hardtanh(torch.randn(3), 2.0, 1.0),
    lambda f: f.softshrink(torch.randn(3), -1.0),
    lambda f: f.celu(torch.randn(3), 0.0),
    lambda f: f.hardsigmoid(torch.arange(3)),
    lambda f: f.logsigmoid(torch.arange(3)),
    lambda f: f.softshrink(torch.arange(3)),
    lambda f: f.selu(torch.arange(3)),
    lambda f: f.celu(torch.arange(3)),
    lambda f: f.softmin(torch.arange(6).view(2, 3), 1),
    lambda f: f.softmin(torch.randn(2, 3), 2),
    lambda f: f.hardtanh(torch.randn(3, requires_grad=True), inplace=True),
    lambda f: f.threshold(torch.randn(3, requires_grad=True), 0.0, 1.0, True),
], ids=["hardtanh-min>max", "softshrink-negative", "celu-alpha0", "hardsigmoid-int", "logsigmoid-int",
        "softshrink-int", "selu-int", "celu-int", "softmin-int", "softmin-dim", "hardtanh-leaf", "threshold-leaf"])
def test_bad_input_raises_like_torch(call):
    assert_raises_like_torch(lambda: call(F), lambda: call(TF))


@pytest.mark.parametrize("name", ["hardtanh", "relu6", "softsign", "tanhshrink", "threshold"])
def test_integer_input_gives_torchs_result(name):
    fn, torch_fn = ops(name)
    args = (1, 5) if name == "threshold" else ()
    x = torch.arange(-3, 4)
    y, expected = fn(x, *args), torch_fn(x, *args)
    assert y.dtype == expected.dtype
    torch.testing.assert_close(y, expected)


# Property test: random shapes (size-1 and empty dims too), options and in place, float32 parity with torch.

_shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)


@given(shape=_shapes, case=st.sampled_from([c for c in CASES if c[0] != "softmin"]), inplace=st.booleans())
@settings(max_examples=40, deadline=None)
def test_activation_matches_torch_property(shape, case, inplace):
    name, kwargs, kinks = case
    fn, torch_fn = ops(name)
    if inplace and case in INPLACE:
        fn, torch_fn, kwargs = in_place(fn, **kwargs), in_place(torch_fn, **kwargs), {}
    assert_same_as_torch(fn, torch_fn, sample(shape, kinks, torch.float32), **kwargs)
