"""torch.func over converted models: per-sample gradients (vmap over grad), jacrev and jvp.

What holds: ``vmap(grad(loss))`` over the parameters of a converted MLP (Linear, LayerNorm,
GELU, Dropout, ReLU, cross-entropy) and of a converted CNN (conv2d, batch norm in eval,
max pool, linear) equals a Python loop of one-sample backward passes, both through the
converted model and through the untouched torch model; ``jacrev`` and ``jvp`` of a converted
model equal those of the torch model, with respect to the input and to the parameters.
"""
import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, vmap

import manualgrad.functional as F
from tests.compat._models import cnn, converted_pair, mlp

torch.set_num_threads(1)
RTOL, ATOL = 1e-5, 1e-6


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _sample_loss(model, loss_fn):
    """loss(params, x, y) of one sample (x without its batch dim), for torch.func.grad."""

    def loss(params, x, y):
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return loss_fn(logits, y.unsqueeze(0))

    return loss


def _per_sample_grads_by_loop(model, loss_fn, x, y):
    """{name: (N, *param.shape)}: one backward per sample, the reference for vmap(grad)."""
    grads = {k: [] for k, _ in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            grads[k].append(p.grad.clone())
    return {k: torch.stack(g) for k, g in grads.items()}


def _assert_dicts_close(actual, expected, what):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{what} {k}: {m}")


CASES = {
    # name: (model, an input batch, classes); mlp in train mode with p=0 dropout and in eval
    # mode with p=0.5 dropout (inert): both must leave the gradients a plain MLP's
    "mlp_train_p0": (lambda: mlp(dropout=0.0).train(), lambda: torch.randn(5, 6), 4),
    "mlp_eval_p05": (lambda: mlp(dropout=0.5).eval(), lambda: torch.randn(5, 6), 4),
    "cnn_bn_eval": (lambda: cnn().eval(), lambda: torch.randn(5, 2, 6, 6), 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vmap_grad_per_sample_gradients_equal_a_loop_over_samples(case):
    build, make_x, n_classes = CASES[case]
    ours, theirs = converted_pair(build())
    x, y = make_x(), torch.randint(0, n_classes, (5,))

    per_sample = vmap(grad(_sample_loss(ours, F.cross_entropy)), in_dims=(None, 0, 0))(_params(ours), x, y)

    _assert_dicts_close(per_sample, _per_sample_grads_by_loop(ours, F.cross_entropy, x, y), "vs converted loop:")
    torch_loop = _per_sample_grads_by_loop(theirs, torch.nn.functional.cross_entropy, x, y)
    _assert_dicts_close(per_sample, torch_loop, "vs torch loop:")
    # the samples' gradients differ, so a broadcast of one sample's gradient would fail above
    assert not torch.allclose(torch_loop["0.weight"][0], torch_loop["0.weight"][1])


def test_vmap_grad_per_sample_gradients_equal_torch_func_on_the_torch_model():
    ours, theirs = converted_pair(mlp())
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    ps = [
        vmap(grad(_sample_loss(m, fn)), in_dims=(None, 0, 0))(_params(m), x, y)
        for m, fn in ((ours, F.cross_entropy), (theirs, torch.nn.functional.cross_entropy))
    ]
    _assert_dicts_close(ps[0], ps[1], "vs torch.func:")


@pytest.mark.parametrize("case", ["mlp_train_p0", "cnn_bn_eval"])
def test_jacrev_of_a_converted_model_equals_torchs(case):
    build, make_x, _ = CASES[case]
    ours, theirs = converted_pair(build())
    x = make_x()[:3]

    def out(model):
        return lambda params, x: functional_call(model, params, (x,))

    # d out / d (params, x): a dict of (N, K, *param.shape) and one (N, K, *x.shape)
    jac_p, jac_x = jacrev(out(ours), argnums=(0, 1))(_params(ours), x)
    ref_p, ref_x = jacrev(out(theirs), argnums=(0, 1))(_params(theirs), x)
    torch.testing.assert_close(jac_x, ref_x, rtol=RTOL, atol=ATOL)
    _assert_dicts_close(jac_p, ref_p, "jacrev d/dparam")
    # samples do not mix (batch norm in eval, layer norm per row): off-diagonal blocks are zero
    assert torch.count_nonzero(ref_x[0, :, 1]) == 0 and torch.count_nonzero(ref_x[0, :, 0]) > 0


@pytest.mark.parametrize("case", ["mlp_train_p0", "cnn_bn_eval"])
def test_jvp_of_a_converted_model_equals_torchs(case):
    build, make_x, _ = CASES[case]
    ours, theirs = converted_pair(build())
    x = make_x()
    tx = torch.randn_like(x)
    tp = {k: torch.randn_like(v) for k, v in _params(ours).items()}

    def run(model):
        f = lambda params, x: functional_call(model, params, (x,))  # noqa: E731
        return jvp(f, (_params(model), x), (tp, tx))

    (out, tangent), (ref_out, ref_tangent) = run(ours), run(theirs)
    torch.testing.assert_close(out, ref_out, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(tangent, ref_tangent, rtol=RTOL, atol=ATOL)
    # the tangent is the finite-difference direction derivative too (a check independent of torch)
    eps = 1e-3
    with torch.no_grad():
        plus = functional_call(ours, {k: v + eps * tp[k] for k, v in _params(ours).items()}, (x + eps * tx,))
        minus = functional_call(ours, {k: v - eps * tp[k] for k, v in _params(ours).items()}, (x - eps * tx,))
    torch.testing.assert_close(tangent, (plus - minus) / (2 * eps), rtol=2e-2, atol=2e-2)
