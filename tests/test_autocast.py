"""torch.autocast("cpu", dtype=torch.bfloat16): every manualgrad op gives torch's output dtype,
values within bfloat16 tolerance of torch's under the same autocast, and float32 gradients on
float32 leaves (backward runs outside the region, as torch recommends).

Every Function declares ``autocast`` (ops/_apply.py): LOWER ops (linear, conv, matmul family,
attention) compute in bfloat16, FLOAT32 ops (the losses) in float32, the rest in the dtype
their input arrives in, exactly like torch's CPU autocast lists.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import manualgrad
import manualgrad.functional as MF
from manualgrad.ops import _apply
from benchmarks.models import gpt_small, resnet_small

torch.set_num_threads(1)

BF16 = dict(rtol=2e-2, atol=2e-2)  # bfloat16 keeps 8 significant bits: ~4e-3 relative per rounding


def _leaf(*shape, low=None):
    t = torch.randn(*shape)
    if low is not None:
        t = t.abs() + low
    return t.requires_grad_()


def _case(name):
    """(manualgrad call, torch call, leaves): both calls take the same leaves."""
    x3 = _leaf(4, 6, 8)
    w, b = _leaf(5, 8), _leaf(5)
    t = torch.randint(0, 6, (4, 8))
    tp = torch.rand(4, 6, 8)
    cases = {
        "linear": (lambda m, x, w, b: m.linear(x, w, b), [x3, w, b]),
        "conv2d": (lambda m, x, w: m.conv2d(x, w, padding=1), [_leaf(2, 3, 7, 7), _leaf(4, 3, 3, 3)]),
        "conv1d": (lambda m, x, w: m.conv1d(x, w, stride=2), [_leaf(2, 3, 13), _leaf(4, 3, 3)]),
        # conv3d and the transposed convolutions (one block)
        "conv3d": (lambda m, x, w: m.conv3d(x, w, padding=1), [_leaf(2, 3, 5, 4, 3), _leaf(4, 3, 3, 3, 3)]),
        "conv_transpose2d": (lambda m, x, w, b: m.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
                             [_leaf(2, 4, 5, 6), _leaf(4, 3, 3, 3), _leaf(3)]),
        "conv_transpose3d": (lambda m, x, w: m.conv_transpose3d(x, w, stride=2),
                             [_leaf(2, 3, 3, 2, 3), _leaf(3, 2, 2, 2, 2)]),
        # (on torch's CPU float32 list: bfloat16 from the conv3d, float32 out)
        "max_pool3d": (lambda m, x, k: m.max_pool3d(m.conv3d(x, k), 2), [_leaf(2, 3, 6, 5, 6), _leaf(4, 3, 3, 2, 3)]),
        # end of conv3d and the transposed convolutions
        "sdpa": (lambda m, q, k, v: m.scaled_dot_product_attention(q, k, v, is_causal=True),
                 [_leaf(2, 3, 5, 8), _leaf(2, 3, 5, 8), _leaf(2, 3, 5, 8)]),
        "matmul": (lambda m, a, b: (MF.matmul if m is MF else torch.matmul)(a, b), [x3, _leaf(8, 7)]),
        "bmm": (lambda m, a, b: (MF.bmm if m is MF else torch.bmm)(a, b), [x3, _leaf(4, 8, 3)]),
        "addmm": (lambda m, c, a, b: (MF.addmm if m is MF else torch.addmm)(c, a, b, beta=0.5),
                  [_leaf(7), _leaf(5, 8), _leaf(8, 7)]),
        "relu": (lambda m, x: m.relu(m.linear(x, w)), [x3]),  # bfloat16 input from the linear
        "relu_fp32": (lambda m, x: m.relu(x), [x3]),  # float32 input stays float32
        "gelu": (lambda m, x: m.gelu(m.linear(x, w), approximate="tanh"), [x3]),
        "silu": (lambda m, x: m.silu(x), [x3]),
        "softplus": (lambda m, x: m.softplus(m.linear(x, w)), [x3]),
        "softmax": (lambda m, x: m.softmax(m.linear(x, w), dim=-1), [x3]),
        "log_softmax": (lambda m, x: m.log_softmax(x, dim=1), [x3]),
        "layer_norm": (lambda m, x, g, b: m.layer_norm(m.linear(x, w), (5,), g, b), [x3, _leaf(5), _leaf(5)]),
        "rms_norm": (lambda m, x, g: m.rms_norm(m.linear(x, w), (5,), g), [x3, _leaf(5)]),
        "group_norm": (lambda m, x, g, b: m.group_norm(x, 2, g, b), [x3, _leaf(6), _leaf(6)]),
        "batch_norm": (lambda m, x, g, b: m.batch_norm(m.linear(x, w).transpose(1, 2), torch.zeros(5),
                                                      torch.ones(5), g, b, training=True), [x3, _leaf(5), _leaf(5)]),
        "max_pool2d": (lambda m, x, k: m.max_pool2d(m.conv2d(x, k), 2), [_leaf(2, 3, 8, 8), _leaf(4, 3, 3, 3)]),
        "avg_pool2d": (lambda m, x: m.avg_pool2d(x, 3, stride=2), [_leaf(2, 3, 9, 9)]),
        "adaptive_avg_pool2d": (lambda m, x: m.adaptive_avg_pool2d(x, 3), [_leaf(2, 3, 7, 7)]),
        "embedding": (lambda m, e: m.embedding(t, e), [_leaf(6, 5)]),
        # embedding bags (one block): on no autocast list; a bfloat16 table from a linear stays bfloat16
        "embedding_bag": (lambda m, e: m.embedding_bag(t[:, :3], e, mode="max"), [_leaf(6, 5)]),
        "embedding_bag_bf16": (lambda m, e, p: m.embedding_bag(t[:, :3], m.linear(e, w[:, :5]), mode="sum",
                                                               per_sample_weights=m.linear(p, w[:3, :5])),
                               [_leaf(6, 5), _leaf(4, 5)]),
        # end of embedding bags
        # weight normalization (one block): on no autocast list, float32 stays float32
        "weight_norm": (lambda m, v, g: (MF.weight_norm if m is MF else torch._weight_norm)(v, g, 0),
                        [_leaf(4, 3, 5), _leaf(4, 1, 1)]),
        "mse_loss": (lambda m, x, y: m.mse_loss(m.linear(x, w), y), [x3, _leaf(4, 6, 5)]),
        "l1_loss": (lambda m, x, y: m.l1_loss(m.linear(x, w), y), [x3, _leaf(4, 6, 5)]),
        "huber_loss": (lambda m, x, y: m.huber_loss(m.linear(x, w), y, delta=0.5), [x3, _leaf(4, 6, 5)]),
        "cross_entropy": (lambda m, x: m.cross_entropy(m.linear(x, w).transpose(1, 2), t.clamp(max=4)[:, :6],
                                                       label_smoothing=0.1), [x3]),
        "cross_entropy_probs": (lambda m, x: m.cross_entropy(x, tp), [x3]),
        "nll_loss": (lambda m, x: m.nll_loss(m.log_softmax(m.linear(x, w), 1).transpose(1, 2), t[:, :6] % 5), [x3]),
        "binary_cross_entropy": (lambda m, x: m.binary_cross_entropy(torch.sigmoid(m.linear(x, w)), tp[..., :5]), [x3]),
        "bce_with_logits": (lambda m, x: m.binary_cross_entropy_with_logits(m.linear(x, w), tp[..., :5]), [x3]),
        "kl_div": (lambda m, x: m.kl_div(m.log_softmax(m.linear(x, w), -1), tp[..., :5], reduction="batchmean"), [x3]),
        "linear_cross_entropy": (lambda m, x, w: m.linear_cross_entropy(x, w, t.reshape(-1)[:12] % 5),
                                 [_leaf(12, 8), _leaf(5, 8)]),
    }
    return cases[name]


OPS = [
    "linear", "conv2d", "conv1d", "conv3d", "conv_transpose2d", "conv_transpose3d", "max_pool3d", "sdpa", "matmul", "bmm", "addmm", "relu", "relu_fp32", "gelu", "silu",
    "softplus", "softmax", "log_softmax", "layer_norm", "rms_norm", "group_norm", "batch_norm", "max_pool2d",
    "avg_pool2d", "adaptive_avg_pool2d", "embedding", "mse_loss", "l1_loss", "huber_loss", "cross_entropy",
    "cross_entropy_probs", "nll_loss", "binary_cross_entropy", "bce_with_logits", "kl_div", "linear_cross_entropy",
    "embedding_bag", "embedding_bag_bf16",  # embedding bags (one block)
    "weight_norm",  # weight normalization (one block)
]


def _run(module, call, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(module, *leaves)
    # backward outside the region, with an upstream gradient fixed by the seed
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("name", OPS)
def test_op_under_bfloat16_autocast_matches_torch(name):
    call, leaves = _case(name)
    out, grads = _run(MF, call, leaves)
    expected, expected_grads = _run(F, call, leaves)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), **BF16)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == e.dtype == torch.float32  # float32 leaves get float32 gradients
        # bfloat16 rounding of a gradient chain: compared on the scale of the whole gradient,
        # so an element that cancels to near zero does not count its few-ulp error as 100%
        torch.testing.assert_close(g, e, rtol=BF16["rtol"], atol=3e-2 * e.abs().max().item())


def test_autocast_really_runs_the_lower_precision_kernel():
    # Within bfloat16 tolerance of torch, but NOT equal to the float32 result: the cast happened.
    x, w = torch.randn(64, 256), torch.randn(64, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = MF.linear(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.bfloat16(), w.bfloat16()), rtol=0, atol=0)


def test_no_cast_inside_the_function_and_none_outside_the_region():
    # A float32 loss on bfloat16 logits: computed in float32 from the upcast logits (torch's rule).
    logits, target = torch.randn(9, 5).bfloat16(), torch.randint(0, 5, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MF.cross_entropy(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), target), rtol=1e-6, atol=1e-6)
    assert MF.linear(torch.randn(3, 4), torch.randn(2, 4)).dtype == torch.float32  # region closed


def test_every_function_declares_its_autocast_policy():
    functions = [f for f in _apply._subclasses(torch.autograd.Function)
                 if f.__module__.startswith("manualgrad.ops.")]
    assert len(functions) > 30
    policies = {_apply.INPUT, _apply.LOWER, _apply.FLOAT32, _apply.FLOAT32_ON_CUDA, _apply.FLOAT32_ON_CPU}
    undeclared = [f.__qualname__ for f in functions if getattr(f, "autocast", None) not in policies]
    assert not undeclared


def _model_case(name):
    if name == "gpt":
        model = gpt_small(vocab=64, d=32, heads=4, layers=2, ctx=16)
        x, y = torch.randint(0, 64, (3, 13)), torch.randint(0, 64, (3, 13))
        return model, (lambda m: m(x, y))
    model = resnet_small()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    return model, (lambda m: F.cross_entropy(m(x), y))


@pytest.mark.parametrize("name", ["gpt", "resnet"])
def test_converted_model_under_autocast_matches_torch_under_autocast(name):
    model, loss_fn = _model_case(name)
    converted = manualgrad.convert(copy.deepcopy(model), strict=True)
    losses = []
    for m in (model, converted):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(m)
        loss.backward()
        losses.append(loss)
    assert losses[1].dtype == losses[0].dtype == torch.float32
    torch.testing.assert_close(losses[1], losses[0], **BF16)
    for (n, p), (_, q) in zip(model.named_parameters(), converted.named_parameters()):
        assert q.grad.dtype == torch.float32
        # gradients of a whole bfloat16 network: compare on the scale of each tensor's gradient
        scale = p.grad.abs().max().item() + 1e-6
        torch.testing.assert_close(q.grad / scale, p.grad / scale, rtol=0, atol=5e-2, msg=n)
