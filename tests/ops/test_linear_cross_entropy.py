import copy

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import LinearCrossEntropyOptions as Options
from torch.utils._python_dispatch import TorchDispatchMode

import manualgrad
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

REDUCTIONS = ["mean", "sum", "none"]


def torch_lce(*args, **kwargs):
    """torch's reference path (options=None): cross_entropy(linear(...)), whatever options we test."""
    kwargs.pop("options", None)
    return TF.linear_cross_entropy(*args, **kwargs)


def head(n, hidden, classes, bias=True, dtype=torch.float32):
    x = torch.randn(n, hidden, dtype=dtype, requires_grad=True)
    w = (torch.randn(classes, hidden, dtype=dtype) / hidden**0.5).requires_grad_()
    b = torch.randn(classes, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


def targets(n, classes, ignored="none", ignore_index=-100):
    t = torch.randint(0, classes, (n,))
    if ignored == "some":
        t[::3] = ignore_index
    elif ignored == "all":
        t[:] = ignore_index
    return t


# ---------------------------------------------------------------------------------------------
# parity with torch


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [4, 5])  # 12 tokens: 4 divides them, 5 leaves a short last chunk
def test_linear_cross_entropy_matches_torch_for_every_option(reduction, ignored, label_smoothing, bias, chunk):
    x, w, b = head(12, 7, 13, bias)
    ignore_index = 3 if ignored != "none" else None
    t = targets(12, 13, ignored, ignore_index=3)
    assert_same_as_torch(F.linear_cross_entropy, torch_lce, x, w, t, linear_bias=b, reduction=reduction,
                         ignore_index=ignore_index, label_smoothing=label_smoothing,
                         options=Options(batch_chunk_size=chunk))


def test_linear_cross_entropy_all_ignored_mean_is_nan_with_zero_gradients():
    x, w, b = head(6, 5, 11)
    t = torch.full((6,), -100)
    loss = F.linear_cross_entropy(x, w, t, linear_bias=b, options=Options(batch_chunk_size=4))
    assert loss.isnan()
    loss.backward()
    for p in (x, w, b):
        assert torch.equal(p.grad, torch.zeros_like(p))
    assert torch_lce(x, w, t, linear_bias=b).isnan()  # torch agrees


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2, 1.0])
def test_linear_cross_entropy_matches_torch_with_class_weights(reduction, label_smoothing):
    x, w, b = head(13, 5, 11)
    t = targets(13, 11, "some")
    weight = torch.rand(11)
    weight[t[1]] = 0.0  # a zero class weight: s_i = 0 for that token without smoothing
    assert_same_as_torch(F.linear_cross_entropy, torch_lce, x, w, t, linear_bias=b, weight=weight,
                         reduction=reduction, label_smoothing=label_smoothing, options=Options(batch_chunk_size=4))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_scales_precomputed_gradients_by_the_upstream_gradient(reduction):
    x, w, b = head(9, 6, 17)
    t = targets(9, 17, "some")
    assert_same_as_torch(F.linear_cross_entropy, torch_lce, x, w, t, linear_bias=b, reduction=reduction,
                         grad_output=torch.tensor(2.5), options=Options(batch_chunk_size=4))


def test_linear_cross_entropy_matches_torch_at_257_classes_and_default_chunking():
    x, w, b = head(37, 16, 257)
    assert_same_as_torch(F.linear_cross_entropy, torch_lce, x, w, targets(37, 257, "some"), linear_bias=b,
                         label_smoothing=0.05)


def test_linear_cross_entropy_matches_torch_unbatched():
    x, w, b = head(1, 5, 11)
    for reduction in REDUCTIONS:
        assert_same_as_torch(F.linear_cross_entropy, torch_lce, x[0].detach().requires_grad_(), w,
                             torch.tensor(4), linear_bias=b, reduction=reduction)


def test_linear_cross_entropy_matches_torch_for_large_logits():
    # logits of a few hundred: softmax underflows for most classes; the loss is read off the
    # argmax's probability, which cannot underflow
    x, w, b = head(10, 5, 11)
    with torch.no_grad():
        x.mul_(200)
    # the logits are ~200 and the losses up to ~1000: float32 rounding of z is ~1e-5
    assert_same_as_torch(F.linear_cross_entropy, torch_lce, x, w, targets(10, 11), linear_bias=b,
                         reduction="none", atol=1e-4, options=Options(batch_chunk_size=3))


def test_linear_cross_entropy_k_dimensional_and_probability_targets_match_torch():
    x = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(6, 3, 4, requires_grad=True)  # C = 6 classes at 3 positions
    b = torch.randn(6, 3, requires_grad=True)
    t = torch.randint(0, 6, (5, 3))
    assert_same_as_torch(F.linear_cross_entropy, torch_lce, x, w, t, linear_bias=b, label_smoothing=0.1)
    probs = torch.randn(5, 6).softmax(1)
    w2 = torch.randn(6, 4, requires_grad=True)
    assert_same_as_torch(F.linear_cross_entropy, torch_lce, x, w2, probs, reduction="sum")


def test_linear_cross_entropy_computes_only_requested_gradients():
    x, w, _ = head(8, 5, 11, bias=False)
    x.requires_grad_(False)
    t = targets(8, 11)
    F.linear_cross_entropy(x, w, t, options=Options(batch_chunk_size=3)).backward()
    ref = w.detach().clone().requires_grad_()
    torch_lce(x, ref, t).backward()
    torch.testing.assert_close(w.grad, ref.grad)
    assert x.grad is None


def test_linear_cross_entropy_allows_a_second_backward_with_retain_graph():
    for reduction in REDUCTIONS:
        x, w, b = head(7, 5, 11)
        t = targets(7, 11)
        loss = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, options=Options(batch_chunk_size=3))
        loss.sum().backward(retain_graph=True)
        first = w.grad.clone()
        loss.sum().backward()
        torch.testing.assert_close(w.grad, 2 * first)


# ---------------------------------------------------------------------------------------------
# memory: chunked logits, no copy of the precomputed gradients


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and not o.is_meta:  # meta: shape checks, no memory
                self.numel = max(self.numel, o.numel())
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_never_materialises_the_whole_logits(reduction):
    n, hidden, classes, chunk = 64, 8, 100, 8
    x, w, b = head(n, hidden, classes)
    t = targets(n, classes, "some")
    with _LargestOutput() as largest:
        F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                               options=Options(batch_chunk_size=chunk)).sum().backward()
    # the largest tensor is a chunk of logits or a gradient, far below the N x C logits
    assert largest.numel <= max(chunk * classes, classes * hidden, n * hidden) < n * classes


def test_linear_cross_entropy_hands_the_precomputed_gradients_to_grad_without_a_copy():
    x, w, b = head(10, 6, 23)
    saved = set()

    def pack(t):
        saved.add(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.linear_cross_entropy(x, w, targets(10, 23), linear_bias=b, options=Options(batch_chunk_size=4))
    loss.backward()
    assert {x.grad.data_ptr(), w.grad.data_ptr(), b.grad.data_ptr()} <= saved


# ---------------------------------------------------------------------------------------------
# gradients (float64: gradcheck, gradgradcheck, forward AD, batched)


def test_linear_cross_entropy_gradients_at_seven_tokens_hidden_five_eleven_classes_chunk_three():
    x, w, b = head(7, 5, 11, dtype=torch.float64)
    t = targets(7, 11, "some", ignore_index=2)
    check_gradients(F.linear_cross_entropy, x, w, t, linear_bias=b, reduction="none", ignore_index=2,
                    label_smoothing=0.1, options=Options(batch_chunk_size=3))


# Smaller heads for the option grid (gradgradcheck's cost grows with the square of the inputs):
# 4 tokens in chunks of 3 and 1.
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing,ignored,bias", [(0.0, "none", True), (0.3, "some", False)])
def test_linear_cross_entropy_gradients(reduction, label_smoothing, ignored, bias):
    x, w, b = head(4, 2, 3, bias, dtype=torch.float64)
    t = torch.tensor([0, 2, 1, 2]) if ignored == "none" else torch.tensor([0, 2, -100, 1])
    check_gradients(F.linear_cross_entropy, x, w, t, linear_bias=b, reduction=reduction,
                    label_smoothing=label_smoothing, options=Options(batch_chunk_size=3))


def test_linear_cross_entropy_gradients_with_class_weights_non_contiguous_and_size_one():
    x, w, b = head(5, 2, 4, dtype=torch.float64)
    x = noncontiguous(x)
    w = torch.randn(2, 4, dtype=torch.float64).t().requires_grad_()
    assert not x.is_contiguous() and not w.is_contiguous()
    weight = torch.rand(4, dtype=torch.float64)
    check_gradients(F.linear_cross_entropy, x, w, targets(5, 4, "some"), linear_bias=b, weight=weight,
                    label_smoothing=0.2, options=Options(batch_chunk_size=3))
    x1, w1, b1 = head(1, 1, 1, dtype=torch.float64)
    check_gradients(F.linear_cross_entropy, x1, w1, torch.zeros(1, dtype=torch.long), linear_bias=b1,
                    reduction="none")


# ---------------------------------------------------------------------------------------------
# half precision


def test_linear_cross_entropy_bfloat16_loss_and_gradients_are_float32_accurate():
    x, w, b = head(33, 64, 300, dtype=torch.bfloat16)
    t = targets(33, 300)
    loss = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none", options=Options(batch_chunk_size=8))
    assert loss.dtype == torch.bfloat16
    xd, wd, bd = (p.detach().double().requires_grad_() for p in (x, w, b))
    ref = torch_lce(xd, wd, t, linear_bias=bd, reduction="none")
    # float32 math, one rounding to bfloat16 at the end: within one bfloat16 ulp (2^-7 relative)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2**-7, atol=0)
    g = torch.randn(33)
    loss.backward(g.bfloat16())
    ref.backward(g.bfloat16().double())
    for p, pd in ((x, xd), (w, wd), (b, bd)):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.double(), pd.grad, rtol=2**-7, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# property test


@given(
    n=st.integers(0, 9),
    hidden=st.integers(1, 6),
    classes=st.integers(1, 9),
    chunk=st.integers(1, 10),
    reduction=st.sampled_from(REDUCTIONS),
    label_smoothing=st.sampled_from([0.0, 0.3]),
    bias=st.booleans(),
    ignore=st.booleans(),
)
@settings(max_examples=30, deadline=None)
def test_linear_cross_entropy_matches_torch_property(n, hidden, classes, chunk, reduction, label_smoothing, bias,
                                                     ignore):
    x, w, b = head(n, hidden, classes, bias)
    t = targets(n, classes, "some" if ignore else "none")
    assert_same_as_torch(F.linear_cross_entropy, torch_lce, x, w, t, linear_bias=b, reduction=reduction,
                         label_smoothing=label_smoothing, options=Options(batch_chunk_size=chunk))


# ---------------------------------------------------------------------------------------------
# options, bad input, NaN


def test_linear_cross_entropy_rejects_an_accumulation_dtype_it_does_not_use():
    x, w, _ = head(4, 3, 5, bias=False)
    with pytest.raises(NotImplementedError, match="acc_dtype"):
        F.linear_cross_entropy(x, w, targets(4, 5), options=Options(acc_dtype=torch.bfloat16))


def test_linear_cross_entropy_honours_chunking_method():
    x, w, b = head(40, 4, 50)
    assert_same_as_torch(F.linear_cross_entropy, torch_lce, x, w, targets(40, 50), linear_bias=b,
                         options=Options(chunking_method="aspect_ratio:2"))


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)), {}, "dimensionality 1 or 2"),
        ((torch.randn(3, 4), torch.randn(4), torch.zeros(3, dtype=torch.long)), {}, "at least 2"),
        ((torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long)), {}, "in_features"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)), dict(linear_bias=torch.randn(4)),
         "linear_bias shape"),
        ((torch.randn(4), torch.randn(5, 2, 4), torch.zeros(2, dtype=torch.long)), {}, "requires batched input"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.rand(3, 5)), dict(ignore_index=1), "probabilities"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 7, 1])), {}, "out of bounds"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)), dict(label_smoothing=1.5),
         "label_smoothing"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)), dict(reduction="avg"),
         "not a valid value"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long)), {}, "batch_size"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3)), {}, "dtype"),
        ((torch.randn(3, 4), torch.randn(5, 4).double(), torch.zeros(3, dtype=torch.long)), {}, "dtype"),
    ],
)
def test_linear_cross_entropy_rejects_bad_input_like_torch(args, kwargs, match):
    assert_raises_like_torch(F.linear_cross_entropy, TF.linear_cross_entropy, *args, match=match, **kwargs)


def test_linear_cross_entropy_propagates_nan():
    x, w, b = head(6, 4, 9)
    x = x.detach().clone()
    x[2, 1] = float("nan")
    loss = F.linear_cross_entropy(x, w, targets(6, 9), linear_bias=b, reduction="none",
                                  options=Options(batch_chunk_size=4))
    assert loss[2].isnan() and not loss[[0, 1, 3, 4, 5]].isnan().any()


# ---------------------------------------------------------------------------------------------
# module


MODULE_CONFIGS = [
    dict(bias=False),
    dict(bias=True, reduction="sum", ignore_index=1, label_smoothing=0.1, weight=torch.rand(11)),
    dict(bias=True, reduction="none", options=Options(batch_chunk_size=3)),
    dict(bias=True, out_features=(2,)),
]


@pytest.mark.parametrize("config", MODULE_CONFIGS)
def test_linear_cross_entropy_loss_module_matches_torch(config):
    th = torch.nn.LinearCrossEntropyLoss(5, 11, **copy.deepcopy(config))
    mg = mnn.LinearCrossEntropyLoss(5, 11, **copy.deepcopy(config))
    mg.load_state_dict(th.state_dict())
    th.load_state_dict(mg.state_dict())
    assert repr(mg) == repr(th)
    assert isinstance(mg, torch.nn.LinearCrossEntropyLoss)
    x = torch.randn(7, 5, requires_grad=True)
    t = torch.randint(0, 11, (7,) + tuple(config.get("out_features", ())))
    assert_same_as_torch(mg, th, x, t)


def test_convert_swaps_linear_cross_entropy_loss():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LinearCrossEntropyLoss(5, 11, bias=True))
    ref = copy.deepcopy(model)
    manualgrad.convert(model)
    assert type(model[1]) is mnn.LinearCrossEntropyLoss
    x, t = torch.randn(4, 3), torch.randint(0, 11, (4,))

    mg = model[1](model[0](x), t)
    th = ref[1](ref[0](x), t)
    torch.testing.assert_close(mg, th)
    mg.backward()
    th.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
