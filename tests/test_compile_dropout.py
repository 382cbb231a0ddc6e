"""torch.compile(fullgraph=True) over every manualgrad dropout: no graph break, and what torch gives.

What a compiled dropout has to give is what torch's own compiled dropout gives where that is
torch's eager result. Under ``aot_eager`` (the graph run by ATen's kernels) torch's compiled
F.dropout draws from the global generator as eager does: same mask, same generator state after.
So there the compiled manualgrad ops must give torch's eager outputs and gradients bit for bit.
Inductor replaces torch's dropout draw with its own counter-based RNG (philox: another mask than
eager under the same seed), so there the requirement is a correct dropout: about p dropped, the
kept values scaled by torch's 1 / (1 - p), and the gradient dy * scale exactly where the output
kept, 0 elsewhere. (manualgrad's compiled dropout in fact keeps eager's mask under inductor too:
its bernoulli_ on bools stays ATen's kernel there. torch's compiled bfloat16 dropout backward
also scales by the unrounded 1 / (1 - p), unlike its eager one; manualgrad keeps the eager rounding.)
"""
import random

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import manualgrad as mg
import manualgrad.functional as MF
from manualgrad.ops.dropout import dropout_scale
from manualgrad.ops.dropout_more import alpha_dropout_coefficients

P = 0.3


def _inplace_on_a_view(F, x, p):
    h = x * 1
    F.dropout(h[:, 1:], p, inplace=True)  # writes into h through the view
    return h[:, 1:]


# name -> (op(F, x, p) with F torch's or manualgrad's functional, input shape, the part of x the
# output covers, alpha dropout)
OPS = {
    "dropout": (lambda F, x, p: F.dropout(x, p), (8, 16, 15), ..., False),
    "dropout_inplace": (lambda F, x, p: F.dropout(x * 1, p, inplace=True), (8, 16, 15), ..., False),
    "dropout_inplace_on_a_view": (_inplace_on_a_view, (8, 17, 15), (slice(None), slice(1, None)), False),
    # (the draws follow the input's memory order: compiled too)
    "dropout_transposed": (lambda F, x, p: F.dropout(x.transpose(0, 2), p).transpose(0, 2), (8, 16, 15), ..., False),
    "alpha_dropout": (lambda F, x, p: F.alpha_dropout(x, p, True), (8, 16, 15), ..., True),
    "alpha_dropout_transposed": (lambda F, x, p: F.alpha_dropout(x.transpose(0, 2), p, True).transpose(0, 2),
                                 (8, 16, 15), ..., True),
    "feature_alpha_dropout": (lambda F, x, p: F.feature_alpha_dropout(x, p, True), (8, 16, 5, 3), ..., True),
    "dropout1d": (lambda F, x, p: F.dropout1d(x, p), (8, 16, 15), ..., False),
    "dropout2d": (lambda F, x, p: F.dropout2d(x, p), (8, 16, 5, 3), ..., False),
    "dropout3d": (lambda F, x, p: F.dropout3d(x, p), (8, 16, 5, 3, 1), ..., False),
}


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)  # fullgraph: a graph break raises


def _run(fn, x, dy, seed=0):
    """fn(x) from RNG state ``seed``: output, input gradient, the generator's state after forward."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = fn(x)
    state = torch.default_generator.get_state()
    y.backward(dy)
    return y.detach(), x.grad, state


def _inputs(shape, dtype=torch.float32):
    """x > 0, so that the output shows the mask: dropout keeps x s > 0 and drops to 0; alpha
    dropout keeps a x + alpha' a p > 0 and drops to alpha' a (p - 1) < 0. dy random."""
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _noise_scale(p, alpha, dtype):
    """torch's noise where kept, in dtype: a for alpha dropout, else 1 / (1 - p) (torch's own rounding)."""
    one = torch.ones((), dtype=dtype)
    if p == 1:
        return one * 0  # nothing kept
    return one.mul_(alpha_dropout_coefficients(p)[0]) if alpha else one.div_(1 - p)


def _assert_a_dropout_by_its_own_mask(name, p, x, y, dx, dy):
    """The output's own mask (kept: y > 0): about p dropped; y = x s where kept (dropout); the
    gradient dy s exactly where kept, 0 elsewhere (also outside the part of x the output covers)."""
    _, _, region, alpha = OPS[name]
    kept = y > 0
    dropped = 1 - kept.double().mean().item()
    assert abs(dropped - p) <= (0.15 if 0 < p < 1 else 0), (name, dropped)
    s = _noise_scale(p, alpha, x.dtype)
    if not alpha:
        assert torch.equal(y, torch.where(kept, x[region] * s, 0)), name
    expected = torch.zeros_like(dx)
    expected[region] = torch.where(kept, dy[region] * s, 0)
    assert torch.equal(dx, expected), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dropout_scale_is_torchs_rounding_worked_out_without_reading_a_tensor(dtype):
    # Under FakeTensorMode a read of a tensor's value raises, as it does while Dynamo traces.
    rng = random.Random(0)
    ps = [rng.random() for _ in range(2000)] + [2.0 ** -k for k in range(1, 60, 3)]
    ps += [1 - 2.0 ** -k for k in range(1, 54)] + [1 - 1 / 65504, 1 - 1 / 65519.9, 1 - 1 / 65520]  # float16's inf edge
    expected = [torch.ones((), dtype=dtype).div_(1 - p).item() for p in ps]  # torch's noise.div_(1 - p)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        scales = [dropout_scale(p, dtype) for p in ps]
    assert scales == expected


@pytest.mark.parametrize("p", [P, 0.0, 1.0])
@pytest.mark.parametrize("name", OPS)
def test_compiled_dropout_gives_torchs_eager_output_and_gradient_bit_for_bit(name, p):
    op, shape, _, _ = OPS[name]
    x, dy = _inputs(shape)
    dy_out = dy[OPS[name][2]]
    y, dx, state = _run(_compiled(lambda t: op(MF, t, p)), x, dy_out)
    ty, tdx, tstate = _run(lambda t: op(TF, t, p), x, dy_out)
    assert torch.equal(y, ty) and torch.equal(dx, tdx)
    assert torch.equal(state, tstate)  # the same draws, and nothing more
    _assert_a_dropout_by_its_own_mask(name, p, x, y, dx, dy)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dropout", "dropout_inplace"])
def test_compiled_dropout_scales_by_torchs_rounding_in_every_dtype(name, dtype):
    op, shape, _, _ = OPS[name]
    x, dy = _inputs(shape, dtype)
    y, dx, _ = _run(_compiled(lambda t: op(MF, t, P)), x, dy)
    ty, tdx, _ = _run(lambda t: op(TF, t, P), x, dy)  # torch eager (its compiled bfloat16 backward rounds otherwise)
    assert torch.equal(y, ty) and torch.equal(dx, tdx)
    _assert_a_dropout_by_its_own_mask(name, P, x, y, dx, dy)


@pytest.mark.parametrize("name", OPS)
def test_compiled_dropout_under_lean_gives_the_gradients_compiled_without_it(name):
    op, shape, region, _ = OPS[name]
    # more than 8 x 5056 elements: eager lean() would keep the generator state, not the mask
    x, dy = _inputs((shape[0], 24 * shape[1], *shape[2:]))
    dy_out = dy[region]
    compiled = _compiled(lambda t: op(MF, t, P))
    y, dx, _ = _run(compiled, x, dy_out)
    with mg.lean():
        y_lean, dx_lean, _ = _run(compiled, x, dy_out)
    assert torch.equal(y_lean, y) and torch.equal(dx_lean, dx)
    _assert_a_dropout_by_its_own_mask(name, P, x, y, dx, dy)


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention's dropout

def _attention_inputs(dtype=torch.float64):
    """q, k (2, 2, 16, 4) and V = I (2, 2, 16, 16): then O = P D, the dropped probabilities, so the
    output shows the mask (P > 0 everywhere)."""
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 2, 16, 4, generator=g, dtype=dtype) for _ in range(2))
    v = torch.eye(16, dtype=dtype).expand(2, 2, 16, 16).contiguous()
    do = torch.randn(2, 2, 16, 16, generator=g, dtype=dtype)
    return q, k, v, do


def _attention_run(fn, q, k, v, do, seed=0):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    o = fn(q, k, v)
    state = torch.default_generator.get_state()
    o.backward(do)
    return o.detach(), (q.grad, k.grad, v.grad), state


def _assert_attention_by_its_own_mask(p, q, k, v, do, o, grads, rtol):
    """O = (P * keep / (1 - p)) V with keep = O != 0 (V = I), and the gradients of that function
    by torch's autograd on plain ops (another order of operations: ``rtol`` a few dozen roundings
    of the dtype, 1e-12 for float64, 1e-5 for float32)."""
    kept = o != 0
    dropped = 1 - kept.double().mean().item()
    assert abs(dropped - p) <= (0.1 if 0 < p < 1 else 0), dropped
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-2, -1) / 2, -1)  # scale 1 / sqrt(4)
    d = kept.to(q.dtype) / (1 - p) if p < 1 else torch.zeros_like(probs)
    expected = (probs * d) @ v
    torch.testing.assert_close(o, expected, rtol=rtol, atol=0)
    for got, want in zip(grads, torch.autograd.grad(expected, (q, k, v), do)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


@pytest.mark.parametrize("p", [P, 0.0, 1.0])
def test_compiled_sdpa_dropout_gives_eagers_mask_and_its_gradient(p):
    q, k, v, do = _attention_inputs()
    fn = lambda a, b, c: MF.scaled_dot_product_attention(a, b, c, dropout_p=p)
    o, grads, state = _attention_run(_compiled(fn), q, k, v, do)
    eager_o, eager_grads, _ = _attention_run(fn, q, k, v, do)
    _, _, torch_state = _attention_run(lambda a, b, c: TF.scaled_dot_product_attention(a, b, c, dropout_p=p), q, k, v, do)
    # the same mask as eager manualgrad (torch's: tests/ops/test_attention.py), the same draws as torch
    assert torch.equal(o, eager_o) and torch.equal(grads[2], eager_grads[2])
    assert torch.equal(state, torch_state)
    # dQ, dK: the compiled backward recomputes P with the rounding of its own graph (as without dropout)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    _assert_attention_by_its_own_mask(p, q, k, v, do, o, grads, rtol=1e-12)


def test_compiled_sdpa_dropout_under_lean_gives_the_gradients_compiled_without_it():
    q, k, v, do = _attention_inputs(torch.float32)
    compiled = _compiled(lambda a, b, c: MF.scaled_dot_product_attention(a, b, c, dropout_p=P))
    o, grads, _ = _attention_run(compiled, q, k, v, do)
    with mg.lean():
        o_lean, grads_lean, _ = _attention_run(compiled, q, k, v, do)
    assert torch.equal(o_lean, o) and all(torch.equal(a, b) for a, b in zip(grads_lean, grads))
    _assert_attention_by_its_own_mask(P, q, k, v, do, o, grads, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# inductor: its own code for everything around the draws

def test_inductor_compiled_dropouts_are_dropouts_by_their_own_masks():
    names = list(OPS)
    inputs = [_inputs(OPS[n][1]) for n in names]
    q, k, v, do = _attention_inputs(torch.float32)

    def all_ops(xs, q, k, v):
        return [OPS[n][0](MF, x, P) for n, x in zip(names, xs)], MF.scaled_dot_product_attention(q, k, v, dropout_p=P)

    xs = [x.clone().requires_grad_() for x, _ in inputs]
    qkv = [t.clone().requires_grad_() for t in (q, k, v)]
    ys, o = _compiled(all_ops, backend="inductor")(xs, *qkv)
    torch.autograd.backward([*ys, o], [dy[OPS[n][2]] for n, (_, dy) in zip(names, inputs)] + [do])
    for n, x, y, (_, dy) in zip(names, xs, ys, inputs):
        _assert_a_dropout_by_its_own_mask(n, P, x.detach(), y.detach(), x.grad, dy)
        if OPS[n][3]:  # alpha dropout: y = a x + alpha' a p where kept, alpha' a (p - 1) elsewhere
            a, b0, b1 = alpha_dropout_coefficients(P)
            expected = torch.where(y > 0, a * x.detach().double() + b1, b0)
            # torch's formula rounds 5 times in float32 (noise, b in 3 steps, x noise + b), |y| < 4
            eps = torch.finfo(torch.float32).eps
            torch.testing.assert_close(y.detach().double(), expected, rtol=0, atol=5 * 4 * eps)
    _assert_attention_by_its_own_mask(P, q, k, v, do, o.detach(), [t.grad for t in qkv], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# a model: a pre-norm (GPT-style) transformer layer with attention and feed-forward dropout

def _layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.2, activation="gelu",
                                       batch_first=True, norm_first=True)
    x = torch.randn(3, 7, 16)
    return layer, x


def _grads(layer, x, lean=False, compiled=None):
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with mg.lean() if lean else torch.enable_grad():
        loss = (layer if compiled is None else compiled)(x).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("lean", [False, True])
def test_transformer_layer_with_dropout_compiles_without_graph_breaks(lean):
    layer, x = _layer()
    model = mg.convert(layer, strict=True)
    torch._dynamo.reset()
    with mg.lean() if lean else torch.enable_grad():
        explanation = torch._dynamo.explain(lambda t: model(t).square().mean())(x)
    assert explanation.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_transformer_layer_with_dropout_gives_torchs_eager_loss_and_gradients():
    layer, x = _layer()
    model = mg.convert(_layer()[0], strict=True)
    loss, grads = _grads(model, x, compiled=_compiled(model))
    torch_loss, torch_grads = _grads(layer, x)  # the same masks under the same seed
    torch.testing.assert_close(loss, torch_loss, rtol=1e-5, atol=1e-6)
    for g, tg in zip(grads, torch_grads):
        torch.testing.assert_close(g, tg, rtol=1e-4, atol=1e-5)


def test_compiled_transformer_layer_with_dropout_under_lean_gives_the_gradients_compiled_without_it():
    model = mg.convert(_layer()[0], strict=True)
    x = _layer()[1]
    compiled = _compiled(model)
    loss, grads = _grads(model, x, compiled=compiled)
    loss_lean, grads_lean = _grads(model, x, lean=True, compiled=compiled)
    assert torch.equal(loss_lean, loss)
    assert all(torch.equal(a, b) for a, b in zip(grads_lean, grads))
