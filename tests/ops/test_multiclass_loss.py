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
NAMES = ["multilabel_soft_margin_loss", "multilabel_margin_loss", "multi_margin_loss"]


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


# --- multilabel_margin_loss ----------------------------------------------------------------------

def multilabel_targets(n, c, repeat=False):
    """(n, c) int64: each row a few distinct classes (one repeated, if asked), then -1, then
    entries that must be ignored (any class, or -1)."""
    rows = []
    for _ in range(n):
        k = int(torch.randint(0, c + 1, ()))
        row = torch.randperm(c)[:k]
        if repeat and k >= 2:
            row[1] = row[0]
        if k < c:
            tail = torch.randint(-1, c, (c - k - 1,))
            row = torch.cat([row, torch.tensor([-1]), tail])
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 64), (2, 5)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multilabel_margin_matches_torch(reduction, shape):
    x = leaf(torch.randn(shape))
    t = multilabel_targets(*shape, repeat=True)
    assert_same_as_torch(*fns("multilabel_margin_loss"), x, t, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(), (1,), (6,)])
def test_multilabel_margin_of_a_vector_or_scalar_matches_torch(shape, reduction):
    x = leaf(torch.randn(shape))
    t = multilabel_targets(1, max(1, x.numel())).reshape(shape)
    assert_same_as_torch(*fns("multilabel_margin_loss"), x, t, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multilabel_margin_gradients(reduction):
    x = leaf(torch.randn(4, 5, dtype=torch.float64))
    t = multilabel_targets(4, 5, repeat=True)
    check_gradients(F.multilabel_margin_loss, x, t, reduction=reduction)


def test_multilabel_margin_by_hand():
    # targets {3, 0} (then -1: the 1 after it is ignored); non-targets 1, 2
    x = leaf(torch.tensor([0.1, 0.2, 0.4, 0.8]))
    t = torch.tensor([3, 0, -1, 1])
    hinge = lambda j, i: max(0.0, 1 - x[j].item() + x[i].item())  # noqa: E731
    expected = sum(hinge(j, i) for j in (3, 0) for i in (1, 2)) / 4
    loss = F.multilabel_margin_loss(x, t)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # every pair is active: dx_i = (number of targets) / 4 for non-targets, -(number of others) / 4 for targets
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, 0.5, 0.5, -0.5]))


def test_multilabel_margin_gives_no_gradient_at_the_kink_like_torch():
    x = leaf(torch.tensor([[0.0, 1.0, 0.0]]))  # z = 1 - 1 + 0 = 0 for both non-targets
    assert_same_as_torch(*fns("multilabel_margin_loss"), x, torch.tensor([[1, -1, 0]]), grad_output=torch.tensor(1.0))


@pytest.mark.parametrize("case", [
    ("3-d input", lambda: (torch.randn(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long)), {}),
    ("rows without classes", lambda: (torch.randn(2, 0), torch.zeros(2, 0, dtype=torch.long)), {}),
    ("target shape", lambda: (torch.randn(2, 3), torch.zeros(3, dtype=torch.long)), {}),
    ("vector target size", lambda: (torch.randn(3), torch.zeros(2, dtype=torch.long)), {}),
    ("int32 target", lambda: (torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.int32)), {}),
    ("class too large", lambda: (torch.randn(1, 3), torch.tensor([[3, -1, 0]])), {}),
    ("below -1", lambda: (torch.randn(1, 3), torch.tensor([[-2, -1, 0]])), {}),
    ("bad reduction", lambda: (torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long)), dict(reduction="max")),
], ids=lambda c: c[0])
def test_multilabel_margin_bad_input_raises_like_torch(case):
    _, make, kwargs = case
    assert_raises_like_torch(*fns("multilabel_margin_loss"), *make(), **kwargs)


# --- multi_margin_loss ---------------------------------------------------------------------------

MULTI_MARGIN_OPTIONS = [{}, dict(p=2), dict(margin=0.3), dict(p=2, margin=2.0), dict(weight=True),
                        dict(p=2, weight=True)]


def _options(opts, c, dtype=torch.float32):
    opts = dict(opts)
    if opts.get("weight"):
        opts["weight"] = torch.rand(c, dtype=dtype) + 0.1
    return opts


def _opts_id(opts):
    return "-".join(f"{k}={v}" for k, v in opts.items()) or "default"


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 100)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", MULTI_MARGIN_OPTIONS, ids=_opts_id)
def test_multi_margin_matches_torch(opts, reduction, shape):
    x = leaf(torch.randn(shape))
    y = torch.randint(0, shape[1], shape[:1])
    assert_same_as_torch(*fns("multi_margin_loss"), x, y, reduction=reduction, **_options(opts, shape[1]))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", [((), ()), ((5,), ()), ((5,), (1,))])
def test_multi_margin_of_a_vector_or_scalar_matches_torch(shapes, reduction):
    x = leaf(torch.randn(shapes[0]))
    y = torch.randint(0, max(1, x.numel()), shapes[1])
    assert_same_as_torch(*fns("multi_margin_loss"), x, y, p=2, reduction=reduction)


@pytest.mark.parametrize("opts", MULTI_MARGIN_OPTIONS, ids=_opts_id)
def test_multi_margin_gradients(opts):
    x = leaf(torch.randn(4, 5, dtype=torch.float64))
    y = torch.tensor([0, 4, 2, 2])
    fn = functools.partial(F.multi_margin_loss, **_options(opts, 5, torch.float64))
    check_gradients(fn, x, y, reduction="none")
    check_gradients(fn, x, y, reduction="mean")


def test_multi_margin_by_hand():
    x = leaf(torch.tensor([[0.5, 1.0, -2.0]]))
    w = torch.tensor([1.0, 3.0, 1.0])
    # y = 1: z = 1 - 1 + x_i = [0.5, -, -2.0]: only i = 0 active; p = 2: w[1] 0.5^2 / 3
    loss = F.multi_margin_loss(x, torch.tensor([1]), p=2, weight=w)
    assert loss.item() == pytest.approx(3 * 0.25 / 3)
    loss.backward()
    # dx_0 = w[1] 2 z / C = 3 * 1 / 3 = 1, dx_1 = -1
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, -1.0, 0.0]]))


def test_multi_margin_gives_no_gradient_at_the_kink_like_torch():
    x = leaf(torch.tensor([[0.0, 1.0, 0.0]]))
    assert_same_as_torch(*fns("multi_margin_loss"), x, torch.tensor([1]), grad_output=torch.tensor(1.0))


@pytest.mark.parametrize("case", [
    ("p=3", lambda: (torch.randn(2, 3), torch.tensor([0, 1])), dict(p=3)),
    ("2-d weight", lambda: (torch.randn(2, 3), torch.tensor([0, 1])), dict(weight=torch.ones(1, 3))),
    ("weight size", lambda: (torch.randn(2, 3), torch.tensor([0, 1])), dict(weight=torch.ones(2))),
    ("weight dtype", lambda: (torch.randn(2, 3), torch.tensor([0, 1])), dict(weight=torch.ones(3).double())),
    ("weight requires grad", lambda: (torch.randn(2, 3), torch.tensor([0, 1])), dict(weight=leaf(torch.ones(3)))),
    ("3-d input", lambda: (torch.randn(2, 3, 4), torch.tensor([0, 1])), {}),
    ("rows without classes", lambda: (torch.randn(2, 0), torch.tensor([0, 1])), {}),
    ("target size", lambda: (torch.randn(2, 3), torch.tensor([0, 1, 2])), {}),
    ("2-d target", lambda: (torch.randn(2, 3), torch.tensor([[0], [1]])), {}),
    ("float target", lambda: (torch.randn(2, 3), torch.tensor([0.0, 1.0])), {}),
    ("class too large", lambda: (torch.randn(2, 3), torch.tensor([0, 3])), {}),
    ("negative class", lambda: (torch.randn(2, 3), torch.tensor([-1, 0])), {}),
    ("bad reduction", lambda: (torch.randn(2, 3), torch.tensor([0, 1])), dict(reduction="max")),
], ids=lambda c: c[0])
def test_multi_margin_bad_input_raises_like_torch(case):
    _, make, kwargs = case
    assert_raises_like_torch(*fns("multi_margin_loss"), *make(), **kwargs)


# --- autocast ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, make, kwargs", [
    ("multilabel_soft_margin_loss", lambda: (torch.randn(4, 5).bfloat16(), torch.rand(4, 5)), {}),
    ("multilabel_margin_loss", lambda: (torch.randn(4, 5).bfloat16(), multilabel_targets(4, 5)), {}),
    ("multi_margin_loss", lambda: (torch.randn(4, 5).bfloat16(), torch.randint(0, 5, (4,))), dict(p=2)),
    # a float32 weight with a bfloat16 input: torch's autocast casts both to float32 first
    ("multi_margin_loss", lambda: (torch.randn(4, 5).bfloat16(), torch.randint(0, 5, (4,))),
     dict(weight=torch.rand(5))),
], ids=["multilabel_soft_margin_loss", "multilabel_margin_loss", "multi_margin_loss", "multi_margin_loss-weight"])
def test_under_bfloat16_autocast_dtype_and_value_are_torchs(name, make, kwargs):
    args = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = getattr(F, name)(*args, **kwargs), getattr(TF, name)(*args, **kwargs)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs)  # the same float32 (or bfloat16) computation


@pytest.mark.parametrize("name, make, kwargs", [
    ("multilabel_margin_loss", lambda d: (torch.randn(4, 3, device=d), torch.zeros(4, 3, dtype=torch.long, device=d)),
     dict(reduction="none")),
    ("multi_margin_loss", lambda d: (torch.randn(4, 3, device=d), torch.zeros(4, dtype=torch.long, device=d)),
     dict(p=2, weight=torch.rand(3))),
], ids=["multilabel_margin_loss", "multi_margin_loss"])
def test_forward_and_backward_run_on_the_meta_device_where_torchs_kernels_do_not(name, make, kwargs):
    # (tests/compat/test_devices.py skips these: torch's backward kernels have no meta version)
    shapes = {}
    for device in ("cpu", "meta"):
        x, t = make(device)
        x.requires_grad_()
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = getattr(F, name)(x, t, **kw)
        (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        shapes[device] = (out.shape, out.dtype, dx.shape, dx.device.type)
    assert shapes["meta"][:3] == shapes["cpu"][:3] and shapes["meta"][3] == "meta"
