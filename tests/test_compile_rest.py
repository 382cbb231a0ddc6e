"""torch.compile over the activations, distances and dropouts of ops/activation_more.py,
distance.py and dropout_more.py: no graph break, and the eager values and gradients.

Known breaks, left as they are: rrelu in training (its draw count depends on the data, as the
CPU kernel's), the in-place variants that keep a copy of their input (hardsigmoid, threshold:
their check for a gradient-tracking transform, as silu's), and dropout2d/3d's warnings."""
import torch

import manualgrad.functional as F


def _chain(x, w):
    h = F.hardtanh(x, -2.0, 2.0) + F.relu6(x) + F.hardsigmoid(x) + F.logsigmoid(x) + F.softsign(x)
    h = h + F.tanhshrink(x) + F.softshrink(x, 0.3) + F.hardshrink(x, 0.3) + F.threshold(x, 0.1, -1.0)
    h = F.selu(h) + F.celu(h, 0.5) + F.prelu(h, w) + F.rrelu(h) + F.softmin(h, 1)
    z = F.normalize(h, dim=-1)
    return (F.cosine_similarity(z, x, dim=-1).sum() + F.pairwise_distance(z, x, p=1.5).sum()
            + F.pdist(z.flatten(1)).sum())


def _dropouts(x):
    return (F.alpha_dropout(x, 0.3, True) + F.feature_alpha_dropout(x, 0.3, True) + F.dropout1d(x, 0.3)
            + F.dropout3d(x[..., None, None], 0.3)[..., 0, 0]).sum()


def _inputs():
    torch.manual_seed(0)
    return torch.randn(3, 4, 5, requires_grad=True), torch.rand(4, requires_grad=True)


def test_no_graph_breaks():
    x, w = _inputs()
    for fn, args in ((_chain, (x, w)), (_dropouts, (x,))):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]


def test_compiled_gives_eager_values_and_gradients():
    x, w = _inputs()
    loss = _chain(x, w)
    grads = torch.autograd.grad(loss, (x, w))
    torch._dynamo.reset()
    compiled = torch.compile(_chain, backend="aot_eager", fullgraph=True)
    loss_c = compiled(x, w)
    grads_c = torch.autograd.grad(loss_c, (x, w))
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
