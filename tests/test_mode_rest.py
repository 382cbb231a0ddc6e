"""manualgrad.enable() routes the torch-level entry points of the activations, distances and
dropouts of ops/activation_more.py, distance.py and dropout_more.py to their Functions, with
torch's results (the torch.nn.functional twins are routed by name: tests/test_mode.py)."""
import pytest
import torch

import manualgrad.functional as MF
from manualgrad.mode import enable, routes


def _nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        n = todo.pop()
        if n is not None and n not in seen:
            seen.add(n)
            todo.extend(f for f, _ in n.next_functions)
    return {type(n).__name__ for n in seen}


x34 = lambda: torch.randn(3, 4, requires_grad=True)  # noqa: E731

CALLS = [
    ("torch.selu", lambda x: torch.selu(x), "SELUFunctionBackward"),
    ("torch.celu", lambda x: torch.celu(x, 0.5), "CELUFunctionBackward"),
    ("torch.prelu", lambda x: torch.prelu(x, torch.full((4,), 0.25)), "PReLUFunctionBackward"),
    ("Tensor.prelu", lambda x: x.prelu(torch.full((1,), 0.25)), "PReLUFunctionBackward"),
    ("torch.hardshrink", lambda x: torch.hardshrink(x, lambd=0.3), "HardshrinkFunctionBackward"),
    ("Tensor.hardshrink", lambda x: x.hardshrink(), "HardshrinkFunctionBackward"),
    ("torch.threshold", lambda x: torch.threshold(x, 0.1, 2.0), "ThresholdFunctionBackward"),
    ("torch.rrelu", lambda x: torch.rrelu(x, training=True), "RReLUFunctionBackward"),
    ("torch.pdist", lambda x: torch.pdist(x, p=1.5), "PdistFunctionBackward"),
    ("torch.cosine_similarity", lambda x: torch.cosine_similarity(x, x.flip(0), 0), "CosineSimilarityFunctionBackward"),
    ("torch.pairwise_distance", lambda x: torch.pairwise_distance(x, x.flip(0), keepdim=True),
     "PairwiseDistanceFunctionBackward"),
    ("torch.alpha_dropout", lambda x: torch.alpha_dropout(x, 0.3, True), "AlphaDropoutFunctionBackward"),
    ("torch.feature_alpha_dropout", lambda x: torch.feature_alpha_dropout(x, 0.3, train=True),
     "FeatureAlphaDropoutFunctionBackward"),
]


@pytest.mark.parametrize("name,call,node", CALLS, ids=[c[0] for c in CALLS])
def test_torch_level_call_is_routed_and_matches_torch(name, call, node):
    x = x34()
    torch.manual_seed(0)
    expected = call(x)
    torch.manual_seed(0)
    with enable():
        y = call(x)
    assert node in _nodes(y)
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(expected, x, dy)[0])


def test_routes_include_the_torch_level_entry_points():
    table = routes()
    assert table[torch.pdist] is MF.pdist and table[torch.Tensor.prelu] is MF.prelu
    assert table[torch.alpha_dropout] is MF.alpha_dropout and table[torch.selu] is MF.selu


def test_coverage_rows_name_the_ops():
    from manualgrad.coverage import node_op

    x = torch.randn(2, 3, 4, requires_grad=True)
    calls = {"selu": MF.selu(x), "celu": MF.celu(x), "prelu": MF.prelu(x, torch.rand(3)), "rrelu": MF.rrelu(x, training=True),
             "alpha_dropout": MF.alpha_dropout(x, 0.3, True), "feature_dropout": MF.dropout1d(x, 0.3),
             "feature_alpha_dropout": MF.feature_alpha_dropout(x, 0.3, True), "cosine_similarity": MF.cosine_similarity(x, x)}
    assert {name: node_op(y.grad_fn) for name, y in calls.items()} == {name: (name, True) for name in calls}
