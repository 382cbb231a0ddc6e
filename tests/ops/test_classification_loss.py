import itertools

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

# One shape per input rank: unbatched (C,), (N, C), (N, C, d1), (N, C, d1, d2).
RANKS = [(5,), (7, 5), (3, 5, 4), (2, 5, 3, 2)]
REDUCTIONS = ["none", "mean", "sum"]
SMOOTHING = [0.0, 0.25, 1.0]
# How targets meet ignore_index: none ignored (default -100), some equal to -100 (outside
# [0, C)), or ignore_index=1, a real class that some targets hold.
IGNORE = ["none", "out_of_range", "in_range"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


def n_classes(shape):
    return shape[0] if len(shape) == 1 else shape[1]


def index_target(shape, ignore="none"):
    """Class indices for input ``shape``, and the ignore_index that goes with ``ignore``."""
    t_shape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    t = torch.randint(n_classes(shape), t_shape)
    if ignore == "none":
        return t, -100
    ignore_index = -100 if ignore == "out_of_range" else min(1, n_classes(shape) - 1)
    t.view(-1)[::2] = ignore_index  # every other row (the only one when unbatched)
    return t, ignore_index


def logits(shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def probabilities(shape, dtype=torch.float32):
    # Not normalised: torch does not ask the rows to sum to 1, and the gradient must not either.
    return torch.rand(shape, dtype=dtype, requires_grad=True)


def class_weight(shape, dtype=torch.float32, requires_grad=False):
    return (torch.rand(n_classes(shape), dtype=dtype) + 0.1).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------
# parity with torch, float32: every option combination


@pytest.mark.parametrize("shape", RANKS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", IGNORE)
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_with_class_indices_matches_torch_for_every_option(
    shape, weighted, ignore, label_smoothing, reduction
):
    target, ignore_index = index_target(shape, ignore)
    weight = class_weight(shape) if weighted else None
    assert_same_as_torch(
        F.cross_entropy, TF.cross_entropy, logits(shape), target, weight,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )


@pytest.mark.parametrize("shape", RANKS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_with_class_probabilities_matches_torch_for_every_option(
    shape, weighted, label_smoothing, reduction
):
    # Gradients of the logits, the target and (torch gives one here) the weight.
    weight = class_weight(shape, requires_grad=True) if weighted else None
    assert_same_as_torch(
        F.cross_entropy, TF.cross_entropy, logits(shape), probabilities(shape), weight,
        reduction=reduction, label_smoothing=label_smoothing,
    )


@pytest.mark.parametrize("shape", RANKS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", IGNORE)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_matches_torch_for_every_option(shape, weighted, ignore, reduction):
    target, ignore_index = index_target(shape, ignore)
    weight = class_weight(shape) if weighted else None
    x = torch.randn(shape).log_softmax(min(1, len(shape) - 1)).requires_grad_()
    assert_same_as_torch(
        F.nll_loss, TF.nll_loss, x, target, weight, ignore_index=ignore_index, reduction=reduction
    )


@pytest.mark.parametrize("shape", [(64, 257), (512, 10), (1, 1), (4, 1, 3)])
def test_cross_entropy_matches_torch_at_wide_narrow_and_single_class_shapes(shape):
    target, _ = index_target(shape)
    assert_same_as_torch(F.cross_entropy, TF.cross_entropy, logits(shape), target)
    assert_same_as_torch(F.cross_entropy, TF.cross_entropy, logits(shape), target, label_smoothing=0.1)
    assert_same_as_torch(F.cross_entropy, TF.cross_entropy, logits(shape), probabilities(shape))


@pytest.mark.parametrize("shape", [(7, 13), (3, 13, 4)])
def test_cross_entropy_matches_torch_on_non_contiguous_logits(shape):
    x = noncontiguous(logits(shape))
    assert not x.is_contiguous()
    target, ignore_index = index_target(shape, "in_range")
    weight = class_weight(shape)
    assert_same_as_torch(
        F.cross_entropy, TF.cross_entropy, x, target, weight, ignore_index=ignore_index, label_smoothing=0.2
    )
    assert_same_as_torch(F.cross_entropy, TF.cross_entropy, x, noncontiguous(probabilities(shape)), weight)
    assert_same_as_torch(F.nll_loss, TF.nll_loss, x, target, weight, ignore_index=ignore_index)


def test_cross_entropy_accepts_uint8_class_indices_like_torch():
    target = torch.tensor([0, 4, 2], dtype=torch.uint8)
    assert_same_as_torch(F.cross_entropy, TF.cross_entropy, logits((3, 5)), target, label_smoothing=0.1)
    assert_same_as_torch(F.nll_loss, TF.nll_loss, logits((3, 5)), target)


def test_cross_entropy_promotes_float64_probability_targets_and_weights_like_torch():
    # torch's composite multiplies log_softmax(x) by the target: the loss takes the wider dtype.
    shape = (4, 3)
    target = probabilities(shape, torch.float64)
    weight = class_weight(shape, torch.float64, requires_grad=True)
    mg, _ = assert_same_as_torch(F.cross_entropy, TF.cross_entropy, logits(shape), target, weight)
    assert mg[0].dtype == torch.float64


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_cross_entropy_legacy_size_average_and_reduce_match_torch():
    x, (target, _) = logits((6, 4)), index_target((6, 4))
    for size_average, reduce in itertools.product([None, True, False], [None, True, False]):
        kwargs = dict(size_average=size_average, reduce=reduce)
        assert_same_as_torch(F.cross_entropy, TF.cross_entropy, x, target, **kwargs)
        assert_same_as_torch(F.nll_loss, TF.nll_loss, x, target, **kwargs)


def test_cross_entropy_reads_negative_label_smoothing_as_zero_like_torch():
    # torch only smooths when label_smoothing > 0 and never rejects a negative value.
    x, (target, _) = logits((6, 4)), index_target((6, 4))
    assert_same_as_torch(F.cross_entropy, TF.cross_entropy, x, target, label_smoothing=-0.5)
    torch.testing.assert_close(F.cross_entropy(x, target, label_smoothing=-0.5), F.cross_entropy(x, target))
    assert_same_as_torch(F.cross_entropy, TF.cross_entropy, x, probabilities((6, 4)), label_smoothing=-0.5)


def test_cross_entropy_equals_log_softmax_then_nll_loss():
    # An independent composition of our own two ops (and torch's formula for label smoothing).
    x, (target, _) = logits((7, 13)), index_target((7, 13))
    logp = x.log_softmax(1)
    torch.testing.assert_close(F.cross_entropy(x, target), F.nll_loss(logp, target))
    smoothed = 0.7 * F.nll_loss(logp, target) + 0.3 * -logp.mean(1).mean()
    torch.testing.assert_close(F.cross_entropy(x, target, label_smoothing=0.3), smoothed)


def test_loss_modules_match_torch():
    x, (target, _) = logits((7, 5)), index_target((7, 5), "in_range")
    weight = class_weight((7, 5))
    kwargs = dict(weight=weight, ignore_index=1, reduction="sum")
    assert_same_as_torch(mnn.CrossEntropyLoss(label_smoothing=0.1, **kwargs),
                         torch.nn.CrossEntropyLoss(label_smoothing=0.1, **kwargs), x, target)
    assert_same_as_torch(mnn.NLLLoss(**kwargs), torch.nn.NLLLoss(**kwargs), x, target)


# ---------------------------------------------------------------------------------------------
# ignored rows


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_mean_over_an_all_ignored_batch_is_nan_with_zero_gradient(label_smoothing, weighted):
    shape = (4, 3, 2)
    target = torch.full((4, 2), -100)
    weight = class_weight(shape) if weighted else None
    for fn, th in [(F.cross_entropy, TF.cross_entropy), (F.nll_loss, TF.nll_loss)]:
        kwargs = dict(label_smoothing=label_smoothing) if fn is F.cross_entropy else {}
        one = torch.tensor(1.0)
        (loss,), _ = assert_same_as_torch(fn, th, logits(shape), target, weight, grad_output=one, **kwargs)
        assert loss.isnan()
        x = logits(shape)
        fn(x, target, weight, **kwargs).backward()
        assert (x.grad == 0).all()
        # sum and none give zeros, not nan
        assert fn(x, target, weight, reduction="sum", **kwargs) == 0
        assert (fn(x, target, weight, reduction="none", **kwargs) == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (3, 0)])
def test_an_empty_batch_matches_torch(shape, reduction):
    # mean over no rows is nan in torch, for both target kinds
    grad_output = torch.randn((shape[0],) + shape[2:]) if reduction == "none" else torch.tensor(1.0)
    kwargs = dict(reduction=reduction, grad_output=grad_output)
    assert_same_as_torch(F.cross_entropy, TF.cross_entropy, logits(shape), probabilities(shape), **kwargs)
    if shape[1] > 0:  # (C = 0 has no valid class index)
        target = torch.zeros((0,) + shape[2:], dtype=torch.long)
        assert_same_as_torch(
            F.cross_entropy, TF.cross_entropy, logits(shape), target, label_smoothing=0.2, **kwargs
        )
        assert_same_as_torch(F.nll_loss, TF.nll_loss, logits(shape), target, **kwargs)


def test_cross_entropy_ignored_rows_get_zero_loss_and_gradient():
    x = logits((5, 4))
    target = torch.tensor([0, 2, 2, 3, 2])
    loss = F.cross_entropy(x, target, ignore_index=2, reduction="none", label_smoothing=0.2)
    loss.sum().backward()
    assert (loss[[1, 2, 4]] == 0).all() and (loss[[0, 3]] > 0).all()
    assert (x.grad[[1, 2, 4]] == 0).all() and (x.grad[[0, 3]] != 0).all()
    # mean divides by the kept rows only
    kept = F.cross_entropy(x[[0, 3]], target[[0, 3]], label_smoothing=0.2)
    torch.testing.assert_close(F.cross_entropy(x, target, ignore_index=2, label_smoothing=0.2), kept)


# ---------------------------------------------------------------------------------------------
# gradients, float64: a covering subset (each option value in some check, the others varied)

# (shape, weighted, ignore, label_smoothing, reduction)
INDEX_GRADCHECKS = [
    ((3,), False, "none", 0.0, "mean"),
    ((3,), True, "none", 1.0, "none"),
    ((4, 3), True, "out_of_range", 0.3, "none"),
    ((5, 4), False, "out_of_range", 1.0, "sum"),
    ((2, 3, 2), True, "in_range", 1.0, "mean"),
    ((2, 3, 2), False, "out_of_range", 0.0, "none"),
    ((2, 3, 2, 1), False, "in_range", 0.3, "sum"),
    ((2, 3, 1, 2), True, "in_range", 0.0, "mean"),
    ((7, 13), True, "none", 0.3, "mean"),
    ((1, 257), False, "none", 0.3, "sum"),
]


@pytest.mark.parametrize("shape,weighted,ignore,label_smoothing,reduction", INDEX_GRADCHECKS)
def test_cross_entropy_with_class_indices_gradients(shape, weighted, ignore, label_smoothing, reduction):
    target, ignore_index = index_target(shape, ignore)
    weight = class_weight(shape, torch.float64) if weighted else None
    check_gradients(
        F.cross_entropy, logits(shape, torch.float64), target, weight,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )


# (shape, weighted, label_smoothing, reduction)
PROBABILITY_GRADCHECKS = [
    ((3,), True, 0.3, "none"),
    ((4, 3), False, 0.0, "mean"),
    ((2, 3, 2), True, 1.0, "sum"),
    ((2, 3, 2, 1), False, 0.3, "mean"),
    ((5, 4), True, 0.0, "mean"),
]


@pytest.mark.parametrize("shape,weighted,label_smoothing,reduction", PROBABILITY_GRADCHECKS)
def test_cross_entropy_with_class_probabilities_gradients(shape, weighted, label_smoothing, reduction):
    # x, the target and the weight are all differentiable here.
    weight = class_weight(shape, torch.float64, requires_grad=True) if weighted else None
    check_gradients(
        F.cross_entropy, logits(shape, torch.float64), probabilities(shape, torch.float64), weight,
        reduction=reduction, label_smoothing=label_smoothing,
    )


# (shape, weighted, ignore, reduction)
NLL_GRADCHECKS = [
    ((3,), False, "none", "none"),
    ((4, 3), True, "in_range", "mean"),
    ((2, 3, 2), False, "out_of_range", "sum"),
    ((2, 3, 2, 1), True, "out_of_range", "mean"),
    ((7, 13), True, "none", "none"),
]


@pytest.mark.parametrize("shape,weighted,ignore,reduction", NLL_GRADCHECKS)
def test_nll_loss_gradients(shape, weighted, ignore, reduction):
    target, ignore_index = index_target(shape, ignore)
    weight = class_weight(shape, torch.float64) if weighted else None
    check_gradients(
        F.nll_loss, logits(shape, torch.float64), target, weight, ignore_index=ignore_index, reduction=reduction
    )


def test_cross_entropy_gradients_non_contiguous():
    x = noncontiguous(logits((6, 5), torch.float64))
    assert not x.is_contiguous()
    target, ignore_index = index_target((6, 5), "in_range")
    check_gradients(F.cross_entropy, x, target, class_weight((6, 5), torch.float64), ignore_index=ignore_index,
                    label_smoothing=0.2)
    check_gradients(F.cross_entropy, x, noncontiguous(probabilities((6, 5), torch.float64)))


def test_cross_entropy_gradient_is_softmax_minus_one_hot():
    # The textbook gradient, independent of finite differences and of torch.
    x, (target, _) = logits((7, 13), torch.float64), index_target((7, 13))
    F.cross_entropy(x, target, reduction="sum").backward()
    expected = x.detach().softmax(1) - TF.one_hot(target, 13)
    torch.testing.assert_close(x.grad, expected)


# ---------------------------------------------------------------------------------------------
# what backward keeps


def saved_for_backward(fn, *args, **kwargs):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*args, **kwargs)
    return saved


@pytest.mark.parametrize("kwargs", [{}, dict(label_smoothing=0.1, ignore_index=3)])
def test_cross_entropy_saves_the_logits_and_target_and_no_more_bytes_than_torch(kwargs):
    x, (target, _) = logits((512, 10)), index_target((512, 10))
    saved = saved_for_backward(F.cross_entropy, x, target, **kwargs)
    # x itself (an input: double backward differentiates softmax(x)), no (N, C) intermediate
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), target.data_ptr()]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert nbytes(saved) <= nbytes(saved_for_backward(TF.cross_entropy, x, target, **kwargs))


def test_nll_loss_keeps_only_the_target_for_backward():
    x, (target, _) = logits((6, 4)), index_target((6, 4))
    assert [t.data_ptr() for t in saved_for_backward(F.nll_loss, x, target)] == [target.data_ptr()]


# ---------------------------------------------------------------------------------------------
# properties over shapes and options


@st.composite
def loss_cases(draw, probability_targets=True):
    unbatched = draw(st.booleans())
    c = draw(st.integers(1, 9))
    shape = (c,) if unbatched else (draw(st.integers(1, 5)), c, *draw(st.lists(st.integers(1, 3), max_size=2)))
    kind = draw(st.sampled_from(["indices", "probabilities"] if probability_targets else ["indices"]))
    if kind == "probabilities":
        ignore = "none"
    else:
        ignore = draw(st.sampled_from(IGNORE))
    return dict(
        shape=shape,
        kind=kind,
        ignore=ignore,
        weighted=draw(st.booleans()),
        label_smoothing=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
    )


@given(case=loss_cases())
@settings(max_examples=30, deadline=None)
def test_cross_entropy_matches_torch_property(case):
    shape = case["shape"]
    if case["kind"] == "indices":
        target, ignore_index = index_target(shape, case["ignore"])
    else:
        target, ignore_index = probabilities(shape), -100
    weight = class_weight(shape) if case["weighted"] else None
    assert_same_as_torch(
        F.cross_entropy, TF.cross_entropy, logits(shape), target, weight, ignore_index=ignore_index,
        reduction=case["reduction"], label_smoothing=case["label_smoothing"],
    )


@given(case=loss_cases(probability_targets=False))
@settings(max_examples=25, deadline=None)
def test_nll_loss_matches_torch_property(case):
    shape = case["shape"]
    target, ignore_index = index_target(shape, case["ignore"])
    weight = class_weight(shape) if case["weighted"] else None
    assert_same_as_torch(F.nll_loss, TF.nll_loss, logits(shape), target, weight, ignore_index=ignore_index,
                         reduction=case["reduction"])


# ---------------------------------------------------------------------------------------------
# bad input: torch's exception types

BOTH = pytest.mark.parametrize("fn,torch_fn", [(F.cross_entropy, TF.cross_entropy), (F.nll_loss, TF.nll_loss)])


@BOTH
@pytest.mark.parametrize(
    "shape,target,ignore_index,bad",
    [
        ((3, 5), [0, 5, 1], -100, 5),
        ((3, 5), [0, -1, 1], -100, -1),
        ((3, 5), [7, 5, -100], -100, 7),  # the first bad one, as torch; -100 is ignored
        ((3, 5), [2, 5, 2], 2, 5),  # an in-range ignore_index does not excuse other targets
        ((5,), 5, -100, 5),
        ((2, 5, 3), [[0, 1, 9], [0, 0, 0]], -100, 9),
    ],
)
def test_rejects_class_index_out_of_range_like_torch(fn, torch_fn, shape, target, ignore_index, bad):
    x, target = torch.randn(shape), torch.tensor(target)
    match = f"Target {bad} is out of bounds"
    assert_raises_like_torch(fn, torch_fn, x, target, ignore_index=ignore_index, match=match)


@BOTH
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.bool])
def test_rejects_a_target_dtype_that_is_not_class_indices_like_torch(fn, torch_fn, dtype):
    target = torch.tensor([0, 1, 1]).to(dtype)
    assert_raises_like_torch(fn, torch_fn, torch.randn(3, 5), target, match="Long or Byte")


@BOTH
def test_rejects_mismatched_batch_size_like_torch(fn, torch_fn):
    assert_raises_like_torch(
        fn, torch_fn, torch.randn(3, 5), torch.tensor([0, 1, 2, 3]),
        match=r"Expected input batch_size \(3\) to match target batch_size \(4\)\.",
    )


@BOTH
@pytest.mark.parametrize(
    "shape,target_shape,match",
    [
        ((3, 5), (3, 2), "multi-target"),
        ((2, 5, 4), (2,), r"Expected target size \[2, 4\], got \[2\]"),
        ((2, 5, 4, 3), (2, 4), r"Expected target size \[2, 4, 3\]"),
        ((2, 5, 4, 3), (2, 4, 2), r"Expected target size \[2, 4, 3\], got \[2, 4, 2\]"),
        ((2, 5, 4, 3, 2), (2, 4, 3, 3), r"Expected target size"),
        ((5,), (2,), "1D target must have size 1"),
    ],
)
def test_rejects_a_target_with_the_wrong_dims_like_torch(fn, torch_fn, shape, target_shape, match):
    target = torch.zeros(target_shape, dtype=torch.long)
    assert_raises_like_torch(fn, torch_fn, torch.randn(shape), target, match=match)


@BOTH
def test_rejects_a_0_dim_input_like_torch(fn, torch_fn):
    assert_raises_like_torch(fn, torch_fn, torch.tensor(1.0), torch.tensor([0]))


@pytest.mark.parametrize("target", [torch.tensor(0), torch.tensor(0.5)])
def test_cross_entropy_rejects_a_0_dim_input_with_a_0_dim_target_like_torch(target):
    # same shapes: read as probabilities, so a long target fails on its dtype first
    assert_raises_like_torch(F.cross_entropy, TF.cross_entropy, torch.tensor(1.0), target)


@BOTH
@pytest.mark.parametrize("weight", [torch.ones(4), torch.ones(5, 1)])
def test_rejects_a_weight_of_the_wrong_size_like_torch(fn, torch_fn, weight):
    x, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    assert_raises_like_torch(fn, torch_fn, x, target, weight, match="for all 5 classes or no classes")


@BOTH
def test_rejects_a_weight_of_another_dtype_like_torch(fn, torch_fn):
    x, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    assert_raises_like_torch(fn, torch_fn, x, target, torch.ones(5, dtype=torch.float64), match="Double")


@BOTH
def test_rejects_a_weight_that_requires_grad_with_class_indices_like_torch(fn, torch_fn):
    x, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    assert_raises_like_torch(fn, torch_fn, x, target, torch.ones(5, requires_grad=True), match="'weight'")


@BOTH
def test_rejects_integer_logits_like_torch(fn, torch_fn):
    assert_raises_like_torch(fn, torch_fn, torch.ones(3, 5, dtype=torch.long), torch.tensor([0, 1, 2]))


@BOTH
def test_rejects_an_unknown_reduction_like_torch(fn, torch_fn):
    x, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    assert_raises_like_torch(fn, torch_fn, x, target, reduction="avg", match="avg is not a valid value")


@pytest.mark.parametrize("target", [torch.tensor([0, 1, 2]), torch.rand(3, 5)])
def test_cross_entropy_rejects_label_smoothing_above_one_like_torch(target):
    assert_raises_like_torch(F.cross_entropy, TF.cross_entropy, torch.randn(3, 5), target, label_smoothing=1.5,
                             match="between 0.0 and 1.0")


def test_cross_entropy_rejects_bad_probability_targets_like_torch():
    x = torch.randn(3, 5)
    assert_raises_like_torch(F.cross_entropy, TF.cross_entropy, x, torch.ones(3, 5, dtype=torch.long),
                             match="floating point type for target with class probabilities")
    # a (C,) input with a (1,) index target has the input's shape when C = 1: probabilities
    assert_raises_like_torch(F.cross_entropy, TF.cross_entropy, torch.randn(1), torch.tensor([0]),
                             match="floating point type")
    assert_raises_like_torch(F.cross_entropy, TF.cross_entropy, x, torch.rand(3, 5), ignore_index=0,
                             match="ignore_index is not supported")
    assert_raises_like_torch(F.cross_entropy, TF.cross_entropy, x, torch.rand(3, 5), torch.ones(4),
                             match="cross_entropy: weight tensor should be defined")


# ---------------------------------------------------------------------------------------------
# NaN


@pytest.mark.parametrize("target", [torch.tensor([0, 1, 3]), torch.rand(3, 4)])
def test_cross_entropy_propagates_nan_to_its_row_only(target):
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    loss = F.cross_entropy(x, target, reduction="none")
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()
    assert F.cross_entropy(x, target).isnan()
    assert_same_as_torch(F.cross_entropy, TF.cross_entropy, x.requires_grad_(), target, reduction="none")


def test_nll_loss_propagates_nan_only_from_the_target_class():
    x = torch.randn(3, 4)
    x[1, 2] = x[2, 0] = float("nan")
    loss = F.nll_loss(x, torch.tensor([0, 2, 1]), reduction="none")
    assert loss[1].isnan() and not loss[[0, 2]].isnan().any()
