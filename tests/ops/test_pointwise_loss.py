import functools
import inspect
import math

import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(1,), (7, 13), (2, 3, 17)]
REDUCTIONS = ["none", "mean", "sum"]


def fns(name):
    return getattr(F, name), getattr(TF, name)


def leaf(t):
    return t.detach().requires_grad_()


def away_from(t, point, gap=0.05):
    """t with every value at least gap from point (finite differences across a kink break)."""
    return torch.where((t - point).abs() < gap, t + 2 * gap, t)


# name -> (inputs(shape, dtype, opts) -> positional tensors, [option dicts]); the inputs keep every
# value 0.05 away from where the loss is not smooth, so gradcheck's finite differences hold.
def _poisson(shape, dtype, opts=None):
    x = torch.rand(shape, dtype=dtype) * 2 + 0.1  # > 0: log_input=False takes log(x + eps)
    t = away_from(torch.rand(shape, dtype=dtype) * 3, 1.0)  # the Stirling term starts at t > 1
    return leaf(x), leaf(t)


def _gaussian(shape, dtype, opts=None):
    return leaf(torch.randn(shape, dtype=dtype)), leaf(torch.randn(shape, dtype=dtype)), \
        leaf(torch.rand(shape, dtype=dtype) + 0.1)  # var >= 0.1: none clamped by eps


def _signs(shape, dtype):
    return torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).to(dtype)


def _ranking(shape, dtype, opts):
    # u = margin - y (x1 - x2) at least 0.05 from 0: where it is closer, x1 moves by 0.2 sign(y)
    x1, x2 = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    y = _signs(shape, dtype) * (torch.rand(shape, dtype=dtype) + 0.5)
    u = opts.get("margin", 0) - y * (x1 - x2)
    x1 = torch.where(u.abs() < 0.05, x1 - 0.2 * y.sign(), x1)
    return leaf(x1), leaf(x2), leaf(y)


def _hinge(shape, dtype, opts):
    # y in {-1, 1} and, as torch allows, other values (both terms then count); x away from margin
    x = away_from(torch.randn(shape, dtype=dtype), opts.get("margin", 1.0))
    y = torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.5], dtype=dtype).repeat(math.prod(shape))[:math.prod(shape)]
    return leaf(x), y.view(shape)


def _soft_margin(shape, dtype, opts):
    return leaf(torch.randn(shape, dtype=dtype) * 3), _signs(shape, dtype)


CASES = {
    "poisson_nll_loss": (_poisson, [
        {}, dict(log_input=False), dict(full=True), dict(log_input=False, full=True, eps=0.5)]),
    "gaussian_nll_loss": (_gaussian, [{}, dict(full=True), dict(eps=0.05)]),
    "margin_ranking_loss": (_ranking, [{}, dict(margin=0.5)]),
    "hinge_embedding_loss": (_hinge, [{}, dict(margin=0.3)]),
    "soft_margin_loss": (_soft_margin, [{}]),
}
VARIANTS = [(name, opts) for name, (_, options) in CASES.items() for opts in options]


def ids(variant):
    name, opts = variant
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("name", sorted(CASES))
def test_functional_signature_is_torchs(name):
    ours, theirs = (inspect.signature(f) for f in fns(name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_loss_matches_torch_in_float32(variant, reduction, shape):
    name, opts = variant
    inputs = CASES[name][0](shape, torch.float32, opts)
    assert_same_as_torch(*fns(name), *inputs, reduction=reduction, **opts)


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_gradients_and_double_backward(variant):
    name, opts = variant
    # options bound first: check_gradients has an eps of its own (the finite-difference step)
    fn = functools.partial(getattr(F, name), **opts)
    check_gradients(fn, *CASES[name][0]((3, 4), torch.float64, opts), reduction="none")
    check_gradients(fn, *CASES[name][0]((5,), torch.float64, opts), reduction="mean")


# --- poisson_nll_loss ----------------------------------------------------------------------------

def test_poisson_full_adds_stirling_where_target_is_above_one_only():
    x = torch.tensor([0.5, 0.5, 0.5])
    t = torch.tensor([0.0, 1.0, 4.0])
    stirling = 4 * math.log(4) - 4 + 0.5 * math.log(2 * math.pi * 4)
    expected = torch.exp(x) - t * x + torch.tensor([0.0, 0.0, stirling])
    torch.testing.assert_close(F.poisson_nll_loss(x, t, full=True, reduction="none"), expected)


@pytest.mark.parametrize("shapes", [((3, 1), (1, 4)), ((4,), (3, 4)), ((3, 4), (4,))])
def test_poisson_broadcasts_like_torch(shapes):
    x, t = leaf(torch.randn(shapes[0])), leaf(torch.rand(shapes[1]) * 3)
    assert_same_as_torch(*fns("poisson_nll_loss"), x, t, full=True, reduction="sum")


def test_poisson_target_zero_has_finite_gradients_with_full():
    # log(0) sits in the masked branch of the Stirling term: neither nan nor inf may leak
    x = leaf(torch.randn(4, dtype=torch.float64))
    t = leaf(torch.tensor([0.0, 0.5, 2.0, 0.0], dtype=torch.float64))
    check_gradients(F.poisson_nll_loss, x, t, full=True, reduction="sum")


def test_poisson_legacy_size_average_and_reduce_like_torch():
    x, t = _poisson((3, 4), torch.float32)
    assert_same_as_torch(*fns("poisson_nll_loss"), x, t, size_average=False)
    assert_same_as_torch(*fns("poisson_nll_loss"), x, t, reduce=False)


# --- gaussian_nll_loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("var_shape", [(4, 3), (4,), (4, 1), (1, 3)])
def test_gaussian_var_shapes_like_torch(var_shape):
    x, t = leaf(torch.randn(4, 3)), leaf(torch.randn(4, 3))
    var = leaf(torch.rand(var_shape) + 0.1)
    assert_same_as_torch(*fns("gaussian_nll_loss"), x, t, var, reduction="none")
    check_gradients(F.gaussian_nll_loss, x, t, var, reduction="sum")


def test_gaussian_var_as_a_float_like_torch():
    x, t = leaf(torch.randn(4, 3)), leaf(torch.randn(4, 3))
    assert_same_as_torch(*fns("gaussian_nll_loss"), x, t, 0.5)


def test_gaussian_var_below_eps_is_clamped_and_its_gradient_passes_the_clamp_like_torch():
    x, t = leaf(torch.randn(6)), leaf(torch.randn(6))
    var = leaf(torch.tensor([0.0, 1e-8, 0.05, 0.3, 1.0, 2.0]))
    mg, _ = assert_same_as_torch(*fns("gaussian_nll_loss"), x, t, var, eps=0.1, reduction="none",
                                 grad_output=exact_dy((6,)))
    # by hand at var = 0: v = eps = 0.1
    d = (x[0] - t[0]).item()
    assert mg[0][0].item() == pytest.approx(0.5 * (math.log(0.1) + d * d / 0.1), rel=1e-5)


@pytest.mark.parametrize("case", [
    ("negative var", lambda: (torch.randn(3), torch.randn(3), torch.tensor([1.0, -1.0, 1.0])), {}),
    ("negative float var", lambda: (torch.randn(3), torch.randn(3), -1.0), {}),
    ("bad var shape", lambda: (torch.randn(4, 3), torch.randn(4, 3), torch.rand(3, 4)), {}),
    ("bad reduction", lambda: (torch.randn(3), torch.randn(3), torch.rand(3)), dict(reduction="max")),
], ids=lambda c: c[0])
def test_gaussian_bad_input_raises_like_torch(case):
    _, make, kwargs = case
    assert_raises_like_torch(*fns("gaussian_nll_loss"), *make(), **kwargs)


@pytest.mark.parametrize("case", [
    ("bad reduction", lambda: (torch.randn(3), torch.rand(3)), dict(reduction="max")),
    ("shapes that do not broadcast", lambda: (torch.randn(3), torch.rand(4)), {}),
], ids=lambda c: c[0])
def test_poisson_bad_input_raises_like_torch(case):
    _, make, kwargs = case
    assert_raises_like_torch(*fns("poisson_nll_loss"), *make(), **kwargs)


# --- margin_ranking_loss, hinge_embedding_loss, soft_margin_loss ---------------------------------

def test_margin_ranking_and_hinge_pass_the_gradient_at_the_kink_like_torch():
    # u = 0 exactly: torch's clamp_min backward counts it as active
    x1, x2, y = leaf(torch.tensor([1.0, 0.5])), leaf(torch.tensor([1.0, 0.0])), leaf(torch.tensor([1.0, -1.0]))
    mg, _ = assert_same_as_torch(*fns("margin_ranking_loss"), x1, x2, y, margin=0.0, reduction="sum",
                                 grad_output=torch.tensor(1.0))
    x = leaf(torch.tensor([1.0, 0.5, 2.0]))
    y = torch.tensor([-1.0, -1.0, 1.0])
    assert_same_as_torch(*fns("hinge_embedding_loss"), x, y, grad_output=torch.tensor(1.0))
    x.grad = None
    F.hinge_embedding_loss(x, y, reduction="sum").backward()
    assert x.grad.tolist() == [-1.0, -1.0, 1.0]  # by hand: d max(0, 1 - x) = -1 at x = 1 too, d x = 1


@pytest.mark.parametrize("shapes", [((3, 1), (1, 4), (3, 4)), ((3, 4), (1, 4), (3, 1))])
def test_margin_ranking_broadcasts_like_torch(shapes):
    x1, x2, y = (leaf(torch.randn(s)) for s in shapes)
    assert_same_as_torch(*fns("margin_ranking_loss"), x1, x2, y, margin=0.2, reduction="sum")


def test_hinge_target_gets_no_gradient_like_torch():
    x, y = leaf(torch.randn(4)), leaf(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert_same_as_torch(*fns("hinge_embedding_loss"), x, y)  # compares y's gradient: None in both


@pytest.mark.parametrize("shapes", [((3, 4), (4,)), ((4,), (3, 4))])
def test_hinge_broadcasts_like_torch(shapes):
    x, y = leaf(torch.randn(shapes[0])), _signs(shapes[1], torch.float32)
    assert_same_as_torch(*fns("hinge_embedding_loss"), x, y, reduction="none")


def test_soft_margin_stays_finite_where_torchs_overflows():
    x = leaf(torch.tensor([-100.0, 0.0, 100.0]))
    y = torch.ones(3)
    assert torch.isinf(TF.soft_margin_loss(x, y, reduction="none")[0])  # torch: log1p(exp(100)) = inf
    loss = F.soft_margin_loss(x, y, reduction="none")
    torch.testing.assert_close(loss, torch.tensor([100.0, math.log(2.0), 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-1.0, -0.5, 0.0]))  # -y sigmoid(-y x)


def test_soft_margin_target_broadcasts_to_input_like_torch():
    x, y = leaf(torch.randn(3, 4)), _signs((4,), torch.float32)
    assert_same_as_torch(*fns("soft_margin_loss"), x, y, reduction="none")


@pytest.mark.parametrize("case", [
    ("margin_ranking_loss", "dims differ", lambda: (torch.randn(3, 4), torch.randn(4), torch.randn(3, 4)), {}),
    ("margin_ranking_loss", "bad reduction", lambda: (torch.randn(3), torch.randn(3), torch.randn(3)),
     dict(reduction="max")),
    ("hinge_embedding_loss", "shapes that do not broadcast", lambda: (torch.randn(3), torch.randn(4)), {}),
    ("hinge_embedding_loss", "bad reduction", lambda: (torch.randn(3), torch.randn(3)), dict(reduction="max")),
    ("soft_margin_loss", "target larger than input", lambda: (torch.randn(4), torch.randn(3, 4)), {}),
    ("soft_margin_loss", "target requires grad", lambda: (torch.randn(3), leaf(torch.randn(3))), {}),
    ("soft_margin_loss", "bad reduction", lambda: (torch.randn(3), torch.randn(3)), dict(reduction="max")),
], ids=lambda c: f"{c[0]}-{c[1]}")
def test_margin_losses_bad_input_raise_like_torch(case):
    name, _, make, kwargs = case
    assert_raises_like_torch(*fns(name), *make(), **kwargs)


@pytest.mark.parametrize("name, make", [
    ("poisson_nll_loss", lambda: (torch.randn(4, 5).bfloat16(), torch.rand(4, 5) * 3)),
    ("gaussian_nll_loss", lambda: (torch.randn(4, 5).bfloat16(), torch.randn(4, 5).bfloat16(),
                                   (torch.rand(4, 5) + 0.1).bfloat16())),
    ("margin_ranking_loss", lambda: (torch.randn(4).bfloat16(), torch.randn(4).bfloat16(), torch.randn(4).sign())),
    ("hinge_embedding_loss", lambda: (torch.randn(4, 5).bfloat16(), torch.randn(4, 5).sign())),
    ("soft_margin_loss", lambda: (torch.randn(4, 5).bfloat16(), torch.randn(4, 5).sign().bfloat16())),
], ids=lambda v: v if isinstance(v, str) else "")
def test_under_bfloat16_autocast_dtype_and_value_are_torchs(name, make):
    # float32 for the losses on torch's autocast list, the inputs' bfloat16 for gaussian_nll_loss
    args = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = getattr(F, name)(*args), getattr(TF, name)(*args)
    assert ours.dtype == theirs.dtype
    # bfloat16 gaussian: the sums of bfloat16 terms round in a different order (a few bfloat16 ulps)
    tol = dict(rtol=2e-2, atol=2e-2) if ours.dtype == torch.bfloat16 else {}
    torch.testing.assert_close(ours, theirs, **tol)


def test_gaussian_runs_on_the_meta_device_where_torchs_does_not():
    # torch's gaussian_nll_loss reads var's values (its negativity check) and fails on meta; the
    # value check needs values, so it is skipped there, as for other non-inspectable tensors
    x, t, var = (torch.randn(4, 3, device="meta", requires_grad=True) for _ in range(3))
    out = F.gaussian_nll_loss(x, t, var[:, 0], reduction="none")
    grads = torch.autograd.grad(out, (x, t, var), torch.ones_like(out))
    assert out.shape == (4, 3) and [g.shape for g in grads] == [(4, 3)] * 3
    assert {g.device.type for g in grads} == {"meta"}
