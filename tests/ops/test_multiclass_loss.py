import functools
import inspect

import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")

REDUCTIONS = ["none", "mean", "sum"]
NAMES = ["multilabel_soft_margin_loss"]


def fns(name):
    return getattr(F, name), getattr(TF, name)


def leaf(t):
    return t.detach().requires_grad_()


@pytest.mark.parametrize("name", NAMES)
def test_functional_signature_is_torchs(name):
    ours, theirs = (inspect.signature(f) for f in fns(name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()]


# --- multilabel_soft_margin_loss -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 257), (5,), (2, 3, 5)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_multilabel_soft_margin_matches_torch(weighted, reduction, shape):
    x, t = leaf(torch.randn(shape)), leaf(torch.rand(shape))
    w = leaf(torch.rand(shape[-1])) if weighted else None
    assert_same_as_torch(*fns("multilabel_soft_margin_loss"), x, t, weight=w, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multilabel_soft_margin_gradients(reduction):
    x, t = leaf(torch.randn(3, 4, dtype=torch.float64)), leaf(torch.rand(3, 4, dtype=torch.float64))
    w = leaf(torch.rand(4, dtype=torch.float64))
    check_gradients(F.multilabel_soft_margin_loss, x, t, reduction=reduction)
    check_gradients(F.multilabel_soft_margin_loss, x, t, weight=w, reduction=reduction)


def test_multilabel_soft_margin_by_hand():
    # one row, C = 2: (softplus(-x0) + softplus(x1)) / 2 for t = [1, 0]
    x = torch.tensor([[2.0, -1.0]])
    t = torch.tensor([[1.0, 0.0]])
    expected = (TF.softplus(torch.tensor(-2.0)) + TF.softplus(torch.tensor(-1.0))) / 2
    torch.testing.assert_close(F.multilabel_soft_margin_loss(x, t), expected)


@pytest.mark.parametrize("shapes", [((3, 4), (4,), (3, 1)), ((4,), (3, 4), None), ((3, 4), (3, 4), (3, 4))])
def test_multilabel_soft_margin_broadcasts_like_torch(shapes):
    xs, ts, ws = shapes
    x, t = leaf(torch.randn(xs)), leaf(torch.rand(ts))
    w = None if ws is None else leaf(torch.rand(ws))
    assert_same_as_torch(*fns("multilabel_soft_margin_loss"), x, t, weight=w, reduction="none",
                         grad_output=exact_dy(TF.multilabel_soft_margin_loss(x, t, w, reduction="none").shape))


@pytest.mark.parametrize("case", [
    ("0-dim input", lambda: (torch.tensor(1.0), torch.tensor(1.0)), {}),
    ("shapes that do not broadcast", lambda: (torch.randn(3, 4), torch.rand(3, 5)), {}),
    ("bad reduction", lambda: (torch.randn(3, 4), torch.rand(3, 4)), dict(reduction="max")),
], ids=lambda c: c[0])
def test_multilabel_soft_margin_bad_input_raises_like_torch(case):
    _, make, kwargs = case
    assert_raises_like_torch(*fns("multilabel_soft_margin_loss"), *make(), **kwargs)
