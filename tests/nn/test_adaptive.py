"""AdaptiveLogSoftmaxWithLoss against torch's: forward (output, loss), log_prob, predict, every
gradient, in training, with head/tail clusters, div_value and head_bias; convert(strict=True)."""
import copy

import pytest
import torch

import manualgrad
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = [
    dict(in_features=8, n_classes=10, cutoffs=[4]),
    dict(in_features=8, n_classes=20, cutoffs=[3, 8, 15], div_value=2.0),
    dict(in_features=6, n_classes=12, cutoffs=[5, 9], div_value=1.5, head_bias=True),
]


def _pair(config, dtype=torch.float32):
    torch.manual_seed(0)
    ref = torch.nn.AdaptiveLogSoftmaxWithLoss(**config).to(dtype)
    ours = mnn.AdaptiveLogSoftmaxWithLoss(**config).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _node_names(t):
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def _grads(module, x, outputs, dys):
    pairs = [(o, d) for o, d in zip(outputs, dys) if d is not None]
    leaves = [x, *module.parameters()]
    # (a cluster no target falls in gets no gradient: None, on both sides)
    return torch.autograd.grad([o for o, _ in pairs], leaves, [d for _, d in pairs], allow_unused=True,
                               retain_graph=True)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("batch", [17, 1])
def test_forward_output_loss_and_gradients_match_torch(config, batch):
    ours, ref = _pair(config)
    x = torch.randn(batch, config["in_features"], requires_grad=True)
    target = torch.randint(0, config["n_classes"], (batch,))
    target[0] = config["n_classes"] - 1  # the last cluster is used
    out, ref_out = ours(x, target), ref(x, target)
    # the same ops in torch's order; linear and log_softmax round differently in the last bits
    torch.testing.assert_close(out, ref_out)
    dy = torch.randn(batch)
    for dys in [(None, torch.tensor(1.0)), (dy, None)]:
        g, ref_g = _grads(ours, x, out, dys), _grads(ref, x, ref_out, dys)
        torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)
    names = _node_names(out.loss)
    assert {"LinearFunctionBackward", "LogSoftmaxFunctionBackward"} <= names
    assert not names & {"AddmmBackward0", "MmBackward0", "LogSoftmaxBackward0", "GatherBackward0"}


def test_unbatched_input_matches_torch():
    ours, ref = _pair(CONFIGS[1])
    x = torch.randn(8, requires_grad=True)
    for c in (1, 5, 19):
        target = torch.tensor(c)
        out, ref_out = ours(x, target), ref(x, target)
        assert out.output.shape == ref_out.output.shape == ()
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(_grads(ours, x, out, (None, torch.tensor(1.0))),
                                   _grads(ref, x, ref_out, (None, torch.tensor(1.0))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS)
def test_log_prob_and_its_gradients_match_torch(config):
    ours, ref = _pair(config)
    x = torch.randn(9, config["in_features"], requires_grad=True)
    lp, ref_lp = ours.log_prob(x), ref.log_prob(x)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(9))  # a distribution over all classes
    dy = torch.randn_like(lp)
    torch.testing.assert_close(_grads(ours, x, [lp], [dy]), _grads(ref, x, [ref_lp], [dy]), rtol=1e-5, atol=1e-6)
    assert "LogSoftmaxFunctionBackward" in _node_names(lp)


def test_log_prob_gradients_pass_gradcheck():
    ours, _ = _pair(CONFIGS[1], torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(ours.log_prob, (x,))
    target = torch.tensor([0, 4, 10, 19])
    torch.autograd.gradcheck(lambda t: ours(t, target).output, (x,))


@pytest.mark.parametrize("config", CONFIGS)
def test_predict_matches_torch_in_every_branch(config):
    ours, ref = _pair(config)
    x = torch.randn(40, config["in_features"])
    assert torch.equal(ours.predict(x), ref.predict(x))
    # all in the shortlist / none in it: push the head's logits
    for bias in (10.0, -10.0):
        with torch.no_grad():
            for m in (ours, ref):
                m.head.weight.zero_()
                m.head.weight[: config["cutoffs"][0]] += bias
        xs = x.abs() + 0.1
        assert torch.equal(ours.predict(xs), ref.predict(xs))
        assert torch.equal(ours.predict(xs), ours.log_prob(xs).argmax(1))


def test_trains_like_torch_after_convert_strict():
    config = CONFIGS[2]
    torch.manual_seed(1)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh())
    head = torch.nn.AdaptiveLogSoftmaxWithLoss(**config)
    ours_body, ours_head = copy.deepcopy(ref), copy.deepcopy(head)
    manualgrad.convert(ours_body, strict=True)
    manualgrad.convert(ours_head, strict=True)
    assert type(ours_head) is mnn.AdaptiveLogSoftmaxWithLoss
    params = [*ours_body.parameters(), *ours_head.parameters()]
    ref_params = [*ref.parameters(), *head.parameters()]
    opt, ref_opt = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(ref_params, lr=0.1)
    for _ in range(3):
        x, target = torch.randn(16, 5), torch.randint(0, config["n_classes"], (16,))
        for body, h, o in ((ours_body, ours_head, opt), (ref, head, ref_opt)):
            o.zero_grad()
            h(body(x), target).loss.backward()
            o.step()
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_bad_input_raises_like_torch():
    ours, ref = _pair(CONFIGS[0])
    x = torch.randn(3, 8)
    bad = [(x, torch.tensor([0, 1])), (x[None], torch.tensor([0, 1, 2])), (x, torch.tensor(1)),
           (x, torch.zeros(3, 1, dtype=torch.long)), (x, torch.tensor([0, 10, 2])), (x, torch.tensor([0, -1, 2]))]
    for args in bad:
        assert_raises_like_torch(lambda: ours(*args), lambda: ref(*args))
