import warnings

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

# kl_div(reduction='mean') warns on every call, in torch and here; the warning has its own test.
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")

SHAPES = [(1,), (7, 13), (2, 3, 257)]
GRAD_SHAPES = [(1,), (7, 13), (2, 1, 5)]  # float64 gradchecks: small, with a size-1 dim
REDUCTIONS = ["none", "sum", "mean"]
KL_REDUCTIONS = ["none", "sum", "mean", "batchmean"]
F64 = torch.float64


def probs(shape, dtype=torch.float32, requires_grad=True):
    """Probabilities inside (0.05, 0.95): away from BCE's floors, so finite differences hold."""
    return (torch.rand(shape, dtype=dtype) * 0.9 + 0.05).requires_grad_(requires_grad)


def targets(shape, dtype=torch.float32, requires_grad=True):
    """Generic soft targets in [0, 1]."""
    return torch.rand(shape, dtype=dtype).requires_grad_(requires_grad)


def class_weight(shape, kind, dtype=torch.float32):
    """None, a full-shape weight, or one per class broadcast along the last dim."""
    if kind is None:
        return None
    w = torch.rand(shape if kind == "full" else shape[-1:], dtype=dtype) + 0.5
    return w


def inputs_unchanged(fn, *inputs, **kwargs):
    """fn's forward and backward leave every input's values as they were (in-place safety)."""
    before = [t.detach().clone() for t in inputs if isinstance(t, torch.Tensor)]
    out = fn(*inputs, **kwargs)
    out.backward(torch.randn_like(out))
    after = [t.detach() for t in inputs if isinstance(t, torch.Tensor)]
    return all(torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------------------------------
# binary_cross_entropy

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight", [None, "full", "class"])
def test_binary_cross_entropy_matches_torch_for_every_reduction_and_weight(shape, reduction, weight):
    x, t = probs(shape), targets(shape)
    assert_same_as_torch(
        F.binary_cross_entropy, TF.binary_cross_entropy, x, t, class_weight(shape, weight), reduction=reduction
    )


@pytest.mark.parametrize("shape", GRAD_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight", [None, "class"])
def test_binary_cross_entropy_gradients(shape, reduction, weight):
    check_gradients(
        F.binary_cross_entropy, probs(shape, F64), targets(shape, F64), class_weight(shape, weight, F64),
        reduction=reduction,
    )


def test_binary_cross_entropy_gradients_non_contiguous():
    x, t = noncontiguous(probs((7, 13), F64)), noncontiguous(targets((7, 13), F64))
    assert not x.is_contiguous() and not t.is_contiguous()
    check_gradients(F.binary_cross_entropy, x, t, reduction="sum")
    assert_same_as_torch(F.binary_cross_entropy, TF.binary_cross_entropy, x, t)


def test_binary_cross_entropy_floors_logs_at_minus_100_and_matches_torch_gradients_at_0_and_1():
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5], requires_grad=True)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.2], requires_grad=True)
    mg, _ = assert_same_as_torch(
        F.binary_cross_entropy, TF.binary_cross_entropy, x, t, reduction="none", grad_output=torch.ones(5)
    )
    assert mg[0][2] == 100 and mg[0][3] == 100  # log 0 floored at -100
    x.grad = t.grad = None
    F.binary_cross_entropy(x, t, reduction="sum").backward()
    # torch's gradients: dx = (x - t) / max(x (1 - x), 1e-12), dt = -logit(x) unfloored
    assert x.grad[2] == -1e12 and x.grad[3] == 1e12
    assert t.grad[2] == float("inf") and t.grad[3] == float("-inf")


def test_binary_cross_entropy_legacy_size_average_and_reduce_match_torch():
    x, t = probs((7, 13)), targets((7, 13))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation warning
        for kw in [dict(size_average=False), dict(reduce=False), dict(size_average=True, reduce=True)]:
            assert_same_as_torch(F.binary_cross_entropy, TF.binary_cross_entropy, x, t, **kw)


def test_binary_cross_entropy_weight_gets_no_gradient_like_torch():
    x, t, w = probs((3, 4)), targets((3, 4)), torch.rand(4, requires_grad=True)
    assert_raises_like_torch(
        F.binary_cross_entropy, TF.binary_cross_entropy, x, t, w, match="not differentiable.*'weight'"
    )
    with torch.no_grad():  # no graph is built, so torch accepts it
        torch.testing.assert_close(F.binary_cross_entropy(x, t, w), TF.binary_cross_entropy(x, t, w))


@pytest.mark.parametrize(
    "x,t,match",
    [
        (torch.tensor([0.5, 1.5]), torch.tensor([0.5, 0.5]), "input should be between 0 and 1"),
        (torch.tensor([-0.1, 0.5]), torch.tensor([0.5, 0.5]), "input should be between 0 and 1"),
        (torch.tensor([float("nan"), 0.5]), torch.tensor([0.5, 0.5]), "input should be between 0 and 1"),
        (torch.tensor([0.5, 0.5]), torch.tensor([0.5, 2.0]), "target should be between 0 and 1"),
        (torch.tensor([0.5, 0.5]), torch.tensor([float("nan"), 0.5]), "target should be between 0 and 1"),
    ],
)
def test_binary_cross_entropy_rejects_values_outside_0_1_and_nan_like_torch(x, t, match):
    # torch checks both tensors' values: a NaN probability or target is an error, not a NaN loss.
    assert_raises_like_torch(F.binary_cross_entropy, TF.binary_cross_entropy, x, t, match=match)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.rand(3), torch.rand(3, 1)), {}, "target size .* different to the input size"),
        ((torch.rand(3), torch.rand(3, dtype=F64)), {}, "dtype"),
        ((torch.ones(3).long(), torch.ones(3).long()), {}, "not implemented"),
        ((torch.rand(2, 3), torch.rand(2, 3), torch.rand(3, 1)), {}, None),  # weight does not broadcast
        ((torch.rand(3), torch.rand(3), torch.rand(2, 3)), {}, "does not broadcast"),  # weight grows the loss
        ((torch.rand(3), torch.rand(3)), {"reduction": "batchmean"}, "not a valid value for reduction"),
    ],
)
def test_binary_cross_entropy_rejects_bad_arguments_like_torch(args, kwargs, match):
    assert_raises_like_torch(F.binary_cross_entropy, TF.binary_cross_entropy, *args, match=match, **kwargs)


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    reduction=st.sampled_from(REDUCTIONS),
    weight=st.sampled_from([None, "full", "class"]),
    target_grad=st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_binary_cross_entropy_matches_torch_property(shape, reduction, weight, target_grad):
    x, t = probs(shape), targets(shape, requires_grad=target_grad)
    assert_same_as_torch(
        F.binary_cross_entropy, TF.binary_cross_entropy, x, t, class_weight(shape, weight), reduction=reduction
    )


# ---------------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight", [None, "full", "class"])
@pytest.mark.parametrize("pos_weight", [None, "class"])
def test_bce_with_logits_matches_torch_for_every_reduction_weight_and_pos_weight(shape, reduction, weight, pos_weight):
    x, t = (3 * torch.randn(shape)).requires_grad_(), targets(shape)
    assert_same_as_torch(
        F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, t, class_weight(shape, weight),
        reduction=reduction, pos_weight=class_weight(shape, pos_weight),
    )


def test_bce_with_logits_pos_weight_broadcasts_over_other_dims_like_torch():
    x, t = torch.randn(2, 3, 5, requires_grad=True), targets((2, 3, 5))
    for pw in [torch.rand(3, 1) + 0.5, torch.rand(3, 5) + 0.5, torch.rand(2, 3, 5) + 0.5]:
        assert_same_as_torch(
            F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, t, pos_weight=pw
        )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("pos_weight", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_logits_is_finite_and_equals_torch_at_huge_logits(dtype, pos_weight, reduction):
    # every logit in {±1e4, ±100, 0} against targets 0, 0.3 and 1
    x = torch.tensor([1e4, -1e4, 100.0, -100.0, 0.0], dtype=dtype).repeat_interleave(3).reshape(5, 3)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=dtype).repeat(5, 1)
    pw = torch.tensor([0.5, 2.0, 3.0], dtype=dtype) if pos_weight else None
    x.requires_grad_(), t.requires_grad_()
    mg, _ = assert_same_as_torch(
        F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, t, reduction=reduction,
        pos_weight=pw, grad_output=torch.ones(() if reduction != "none" else (5, 3), dtype=dtype),
    )
    x.grad = t.grad = None
    F.binary_cross_entropy_with_logits(x, t, reduction="sum", pos_weight=pw).backward()
    assert mg[0].isfinite().all() and x.grad.isfinite().all() and t.grad.isfinite().all()


@pytest.mark.parametrize("shape", GRAD_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_logits_gradients(shape, reduction):
    check_gradients(
        F.binary_cross_entropy_with_logits, torch.randn(shape, dtype=F64, requires_grad=True), targets(shape, F64),
        reduction=reduction,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight,pos_weight", [("class", None), (None, "class"), ("full", "class")])
def test_bce_with_logits_gradients_with_weights(reduction, weight, pos_weight):
    shape = (7, 13)
    check_gradients(
        F.binary_cross_entropy_with_logits, torch.randn(shape, dtype=F64, requires_grad=True), targets(shape, F64),
        class_weight(shape, weight, F64), reduction=reduction, pos_weight=class_weight(shape, pos_weight, F64),
    )


def test_bce_with_logits_gradients_non_contiguous():
    x = noncontiguous(torch.randn(7, 13, dtype=F64, requires_grad=True))
    t = noncontiguous(targets((7, 13), F64))
    assert not x.is_contiguous() and not t.is_contiguous()
    pw = torch.rand(13, dtype=F64) + 0.5
    check_gradients(F.binary_cross_entropy_with_logits, x, t, pos_weight=pw)
    assert_same_as_torch(F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, t, pos_weight=pw)


@pytest.mark.parametrize("x_dtype,t_dtype", [(torch.float32, F64), (F64, torch.float32)])
def test_bce_with_logits_mixed_dtypes_give_the_targets_dtype_like_torch(x_dtype, t_dtype):
    x, t = torch.randn(4, 5, dtype=x_dtype, requires_grad=True), targets((4, 5), t_dtype)
    mg, _ = assert_same_as_torch(
        F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, t, torch.rand(5, dtype=t_dtype)
    )
    assert mg[0].dtype == t_dtype


def test_bce_with_logits_propagates_nan():
    x = torch.tensor([[float("nan"), 0.3], [1.0, -2.0]], requires_grad=True)
    t = torch.tensor([[0.5, float("nan")], [0.2, 0.9]], requires_grad=True)
    mg, _ = assert_same_as_torch(
        F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, t, reduction="none",
        grad_output=torch.ones(2, 2),
    )
    assert mg[0][0].isnan().all() and not mg[0][1].isnan().any()


def test_bce_with_logits_weights_get_no_gradient_like_torch():
    x, t = torch.randn(3, 4, requires_grad=True), targets((3, 4))
    w = torch.rand(4, requires_grad=True)
    fn, th = F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits
    assert_raises_like_torch(fn, th, x, t, w, match="not differentiable.*'weight'")
    assert_raises_like_torch(fn, th, x, t, pos_weight=w, match="not differentiable.*'pos_weight'")


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.rand(3), torch.rand(3, 1)), {}, "Target size .* must be the same as input size"),
        ((torch.rand(2, 3), torch.rand(2, 3), torch.rand(4, 2, 3)), {}, "weight .* does not broadcast"),
        ((torch.rand(2, 3), torch.rand(2, 3)), {"pos_weight": torch.rand(4, 2, 3)}, "pos_weight .* does not broadcast"),
        ((torch.rand(2, 3), torch.rand(2, 3)), {"pos_weight": torch.rand(2)}, None),  # not the class dim
        ((torch.rand(3), torch.ones(3).long()), {}, "can't be cast"),
        ((torch.ones(3).long(), torch.ones(3)), {}, "not implemented"),
        ((torch.rand(3), torch.rand(3)), {"reduction": "avg"}, "not a valid value for reduction"),
    ],
)
def test_bce_with_logits_rejects_bad_arguments_like_torch(args, kwargs, match):
    assert_raises_like_torch(
        F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, *args, match=match, **kwargs
    )


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    reduction=st.sampled_from(REDUCTIONS),
    weight=st.sampled_from([None, "full", "class"]),
    pos_weight=st.sampled_from([None, "full", "class"]),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
)
@settings(max_examples=30, deadline=None)
def test_bce_with_logits_matches_torch_property(shape, reduction, weight, pos_weight, scale):
    x, t = (scale * torch.randn(shape)).requires_grad_(), targets(shape)
    # Loss terms reach scale * 1e4 and cancel in the sum: compare relative to that magnitude.
    assert_same_as_torch(
        F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, t, class_weight(shape, weight),
        reduction=reduction, pos_weight=class_weight(shape, pos_weight), rtol=1e-5, atol=1e-6 * scale,
    )


# ---------------------------------------------------------------------------------------------
# kl_div

def kl_target(shape, log_target, dtype=torch.float32, requires_grad=True):
    """Log-probabilities for log_target, else probabilities away from 0 (where t log t has no
    derivative and torch's target gradient is NaN; that point has its own test)."""
    t = torch.randn(shape, dtype=dtype) if log_target else torch.rand(shape, dtype=dtype) * 0.95 + 0.05
    return t.requires_grad_(requires_grad)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("target_grad", [False, True])
def test_kl_div_matches_torch_for_every_reduction_and_log_target(shape, reduction, log_target, target_grad):
    x, t = torch.randn(shape, requires_grad=True), kl_target(shape, log_target, requires_grad=target_grad)
    assert_same_as_torch(F.kl_div, TF.kl_div, x, t, reduction=reduction, log_target=log_target)


@pytest.mark.parametrize("shape", GRAD_SHAPES)
@pytest.mark.parametrize("reduction", KL_REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_gradients(shape, reduction, log_target):
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    check_gradients(F.kl_div, x, kl_target(shape, log_target, F64), reduction=reduction, log_target=log_target)


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_gradients_with_a_constant_target(log_target):
    # log_target keeps the forward's exp(t) for backward when t is a constant: double backward
    # and forward-over-reverse must still see the right second derivatives.
    x = torch.randn(7, 13, dtype=F64, requires_grad=True)
    check_gradients(F.kl_div, x, kl_target((7, 13), log_target, F64, requires_grad=False), reduction="batchmean",
                    log_target=log_target)


def test_kl_div_gradients_non_contiguous():
    x = noncontiguous(torch.randn(7, 13, dtype=F64, requires_grad=True))
    t = noncontiguous(kl_target((7, 13), False, F64))
    assert not x.is_contiguous() and not t.is_contiguous()
    check_gradients(F.kl_div, x, t, reduction="batchmean")
    assert_same_as_torch(F.kl_div, TF.kl_div, x, t, reduction="batchmean")


@pytest.mark.parametrize("x_shape,t_shape", [((3,), (2, 3)), ((2, 3), (3,)), ((2, 1), (1, 3))])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_broadcasts_input_and_target_like_torch(x_shape, t_shape, reduction, log_target):
    # torch divides batchmean by input.size(0), even when the target broadcasts the loss larger
    x, t = torch.randn(x_shape, requires_grad=True), kl_target(t_shape, log_target)
    assert_same_as_torch(F.kl_div, TF.kl_div, x, t, reduction=reduction, log_target=log_target)


def test_kl_div_broadcast_gradients():
    x = torch.randn(3, dtype=F64, requires_grad=True)
    check_gradients(F.kl_div, x, kl_target((2, 3), False, F64), reduction="batchmean")


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_batchmean_of_a_0_dim_input_is_the_sum_and_of_1_dim_divides_by_its_length(log_target):
    x0, t0 = torch.tensor(-0.7, requires_grad=True), kl_target((), log_target)
    mg, _ = assert_same_as_torch(F.kl_div, TF.kl_div, x0, t0, reduction="batchmean", log_target=log_target)
    torch.testing.assert_close(mg[0], F.kl_div(x0, t0, reduction="sum", log_target=log_target))
    x1, t1 = torch.randn(5, requires_grad=True), kl_target((5,), log_target)
    mg, _ = assert_same_as_torch(F.kl_div, TF.kl_div, x1, t1, reduction="batchmean", log_target=log_target)
    torch.testing.assert_close(mg[0], F.kl_div(x1, t1, reduction="sum", log_target=log_target) / 5)


def test_kl_div_batchmean_divides_by_the_batch_even_under_legacy_arguments_like_torch():
    x, t = torch.randn(4, 3, requires_grad=True), kl_target((4, 3), False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation warning
        for kw in [dict(reduce=False), dict(size_average=True), dict(size_average=False)]:
            mg, _ = assert_same_as_torch(F.kl_div, TF.kl_div, x, t, reduction="batchmean", **kw)
        legacy_none = F.kl_div(x, t, reduce=False, reduction="batchmean")
    torch.testing.assert_close(legacy_none, F.kl_div(x, t, reduction="none") / 4)


def test_kl_div_zero_target_contributes_zero_loss_and_nan_target_gradient_like_torch():
    x = torch.randn(4, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0, 0.0], requires_grad=True)
    mg, _ = assert_same_as_torch(F.kl_div, TF.kl_div, x, t, reduction="none", grad_output=torch.ones(4))
    assert mg[0][0] == 0 and mg[0][3] == 0  # 0 log 0 = 0, and 0 * x = 0
    x.grad = t.grad = None
    F.kl_div(x, t, reduction="sum").backward()
    # torch's target gradient is xlogy's: log t + t / t - x, NaN (0 / 0) at t = 0
    assert t.grad[[0, 3]].isnan().all() and t.grad[[1, 2]].isfinite().all()
    torch.testing.assert_close(t.grad[1:3], torch.log(t[1:3]).detach() + 1 - x[1:3].detach())
    assert x.grad.isfinite().all()


def test_kl_div_mean_warns_like_torch_and_batchmean_does_not():
    x, t = torch.randn(3), torch.rand(3)
    with pytest.warns(UserWarning, match="'batchmean' divides only by the batch size"):
        F.kl_div(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.kl_div(x, t, reduction="batchmean")


def test_kl_div_propagates_nan():
    x = torch.tensor([float("nan"), 0.3, -1.0], requires_grad=True)
    t = torch.tensor([0.2, float("nan"), 0.5], requires_grad=True)
    for log_target in [False, True]:
        mg, _ = assert_same_as_torch(F.kl_div, TF.kl_div, x, t, reduction="none", log_target=log_target)
        assert mg[0][:2].isnan().all() and not mg[0][2].isnan()


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.rand(3), torch.ones(3).long()), {}, "Integral inputs not supported"),
        ((torch.ones(3).long(), torch.rand(3)), {}, "Integral inputs not supported"),
        ((torch.rand(3), torch.rand(3, dtype=torch.cfloat)), {}, "Complex inputs not supported"),
        ((torch.rand(2, 3), torch.rand(2, 4)), {}, None),  # not broadcastable
        ((torch.rand(3), torch.rand(3)), {"reduction": "avg"}, "not a valid value for reduction"),
    ],
)
def test_kl_div_rejects_bad_arguments_like_torch(args, kwargs, match):
    assert_raises_like_torch(F.kl_div, TF.kl_div, *args, match=match, **kwargs)


@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    reduction=st.sampled_from(KL_REDUCTIONS),
    log_target=st.booleans(),
    target_grad=st.booleans(),
)
@settings(max_examples=30, deadline=None)
def test_kl_div_matches_torch_property(shape, reduction, log_target, target_grad):
    x, t = torch.randn(shape, requires_grad=True), kl_target(shape, log_target, requires_grad=target_grad)
    assert_same_as_torch(F.kl_div, TF.kl_div, x, t, reduction=reduction, log_target=log_target)


# ---------------------------------------------------------------------------------------------
# all three: in-place work on fresh tensors only, and vmap over every argument

# name: (ours, torch's, make the positional arguments, keyword arguments)
CASES = {
    "bce": (
        F.binary_cross_entropy, TF.binary_cross_entropy,
        lambda: (probs((7, 13)), targets((7, 13)), torch.rand(13)), {},
    ),
    "bce_logits": (
        F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits,
        lambda: (torch.randn(7, 13, requires_grad=True), targets((7, 13)), torch.rand(13)),
        {"pos_weight": torch.rand(13)},
    ),
    "kl_div": (
        F.kl_div, TF.kl_div,
        lambda: (torch.randn(7, 13, requires_grad=True), kl_target((7, 13), False)), {},
    ),
    "kl_div_log": (
        F.kl_div, TF.kl_div,
        lambda: (torch.randn(7, 13, requires_grad=True), kl_target((7, 13), True, requires_grad=False)),
        {"log_target": True},
    ),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_losses_leave_their_inputs_unchanged(name, reduction):
    fn, _, make, kwargs = CASES[name]
    assert inputs_unchanged(fn, *make(), reduction=reduction, **kwargs)


@pytest.mark.parametrize("name", CASES)
def test_losses_under_vmap_over_every_argument_match_torch_per_sample(name):
    fn, th, make, kwargs = CASES[name]
    samples = [make() for _ in range(3)]
    stacked = [torch.stack([s[i].detach() for s in samples]) for i in range(len(samples[0]))]
    out = torch.func.vmap(lambda *a: fn(*a, reduction="none", **kwargs))(*stacked)
    expected = torch.stack([th(*[a.detach() for a in s], reduction="none", **kwargs) for s in samples])
    torch.testing.assert_close(out, expected)


def test_bce_with_logits_under_vmap_over_pos_weight_only_matches_torch_per_sample():
    # Only pos_weight is batched: the forward must not write it into an unbatched fresh tensor.
    x, t, pws = torch.randn(7, 13), targets((7, 13), requires_grad=False), torch.rand(3, 13) + 0.5
    out = torch.func.vmap(lambda pw: F.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none"))(pws)
    expected = torch.stack([TF.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none") for pw in pws])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["bce", "bce_logits", "kl_div", "kl_div_log"])
def test_losses_second_derivatives_under_torch_func_match_torch(name):
    # d/dt of d loss / dx (forward over reverse) and the Hessian in x, through torch.func
    fn, th, make, kwargs = CASES[name]
    x, t = (a.detach().double() for a in make()[:2])
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    results = []
    for f in (fn, th):
        loss = lambda a, b: f(a, b, reduction="sum", **kwargs)  # noqa: E731
        mixed = torch.func.jacfwd(torch.func.grad(loss, argnums=0), argnums=1)(x, t)
        results.append((mixed, torch.func.hessian(loss, argnums=0)(x, t)))
    torch.testing.assert_close(results[0], results[1])


def test_kl_div_log_target_keeps_exp_only_for_a_constant_target():
    # A target carrying a forward-mode tangent is not a constant: the gradient's tangent must
    # include d exp(t) (forward over reverse with plain autograd), as torch's does.
    x, t = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    tangents = []
    for f in (F.kl_div, TF.kl_div):
        xr = x.clone().requires_grad_()
        with torch.autograd.forward_ad.dual_level():
            td = torch.autograd.forward_ad.make_dual(t, torch.ones_like(t))
            (g,) = torch.autograd.grad(f(xr, td, reduction="sum", log_target=True), xr, create_graph=True)
            tangents.append(torch.autograd.forward_ad.unpack_dual(g).tangent)
    torch.testing.assert_close(tangents[0], tangents[1])
    torch.testing.assert_close(tangents[0], -t.exp())


def test_binary_cross_entropy_target_of_another_dtype_raises_like_torch():
    assert_raises_like_torch(
        F.binary_cross_entropy, TF.binary_cross_entropy,
        probs((4, 3)), targets((4, 3), dtype=torch.float64), match="target dtype torch.float64 differs",
    )
