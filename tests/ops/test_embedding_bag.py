import copy
import inspect

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradgradcheck

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.ops.embedding_bag import bag_sum_forward, bag_sum_forward_fast
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")

# (input, offsets, include_last_offset): repeated indices, empty bags (first, middle, last),
# a 2-D input, a single bag, a last offset before the end (trailing indices belong to no bag)
CASES = {
    "1-d": (torch.tensor([1, 2, 4, 5, 4, 3, 2, 0, 1]), torch.tensor([0, 3, 3, 7]), False),
    "empty-first-and-last": (torch.tensor([1, 2, 4, 5, 4]), torch.tensor([0, 0, 2, 5]), False),
    "include-last": (torch.tensor([1, 2, 4, 5, 4, 3, 2]), torch.tensor([0, 3, 3, 7]), True),
    "2-d": (torch.tensor([[1, 2, 4], [5, 4, 3], [0, 0, 5]]), None, False),
    "one-bag-int32": (torch.tensor([3, 3, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), False),
}


def _call(fn, case, w, **kwargs):
    x, offsets, ilo = case
    return lambda w, **kw: fn(x, w, offsets, include_last_offset=ilo, **kwargs, **kw)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 4, -1])
@pytest.mark.parametrize("dim", [1, 7, 257])
def test_embedding_bag_matches_torch(case, mode, padding_idx, dim):
    w = torch.randn(6, dim, requires_grad=True)
    x, offsets, ilo = case
    # (the default rtol 1e-5: torch's kernel may add a bag's rows in another order)
    assert_same_as_torch(F.embedding_bag, TF.embedding_bag, x, w, offsets, mode=mode, padding_idx=padding_idx,
                         include_last_offset=ilo)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_bag_per_sample_weights_match_torch(case, padding_idx):
    x, offsets, ilo = case
    w = torch.randn(6, 5, requires_grad=True)
    p = torch.randn(x.shape, requires_grad=True)
    assert_same_as_torch(F.embedding_bag, TF.embedding_bag, x, w, offsets, mode="sum",
                         per_sample_weights=p, include_last_offset=ilo, padding_idx=padding_idx)


def test_embedding_bag_sum_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    p = torch.tensor([1.0, 2.0, -1.0, 0.5], requires_grad=True)
    # bags [0, 2] and [1, 1]: y0 = 1 W0 + 2 W2 = [11, 14], y1 = -W1 + 0.5 W1 = [-1.5, -2]
    y = F.embedding_bag(torch.tensor([0, 2, 1, 1]), w, torch.tensor([0, 2]), mode="sum", per_sample_weights=p)
    assert y.tolist() == [[11.0, 14.0], [-1.5, -2.0]]
    y.backward(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # dW0 = 1 [1, 0], dW2 = 2 [1, 0], dW1 = (-1 + 0.5) [0, 1]; dp_i = dy[bag_i] . W[idx_i]
    assert w.grad.tolist() == [[1.0, 0.0], [0.0, -0.5], [2.0, 0.0]]
    assert p.grad.tolist() == [1.0, 5.0, 4.0, 4.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("offsets,ilo", [([0, 3, 3, 6], True), ([0, 3, 3, 9], True), ([0, 0, 3], False), ([0], True),
                                         ([], False)], ids=str)
def test_embedding_bag_fast_forward_is_the_plain_formula(dtype, mode, weighted, padding_idx, offsets, ilo):
    # torch's kernel (the fast form) against the formula it stands for; [0, 3, 3, 6] with
    # include_last_offset leaves entries 6..8 in no bag, which torch's float64 kernel adds to the last
    x, offsets = torch.tensor([1, 2, 4, 5, 4, 3, 2, 0, 1]), torch.tensor(offsets, dtype=torch.long)
    w = torch.randn(6, 5, dtype=dtype)
    p = torch.randn(9, dtype=dtype) if weighted else None
    args = (x, offsets, w, p, mode == "mean", ilo, padding_idx)
    torch.testing.assert_close(bag_sum_forward_fast(*args), bag_sum_forward(*args))


def test_embedding_bag_max_sends_the_gradient_to_the_first_maximum_row_per_feature():
    w = torch.tensor([[1.0, 2.0], [1.0, 3.0], [0.0, 2.0]], requires_grad=True)
    y = F.embedding_bag(torch.tensor([0, 1, 2, 2, 1, 0]), w, torch.tensor([0, 3]), mode="max")
    assert y.tolist() == [[1.0, 3.0], [1.0, 3.0]]
    y.backward(torch.tensor([[1.0, 10.0], [100.0, 1000.0]]))
    # feature 0: rows 0 and 1 tie at 1, bag 0 reads row 0 (first), bag 1 row 1 (first there)
    assert w.grad.tolist() == [[1.0, 0.0], [100.0, 1010.0], [0.0, 0.0]]


NAN_BAGS = [([0, 1, 2], [0]), ([1, 0, 2], [0]), ([1], [0]), ([3, 3], [0]), ([4, 1, 0], [0, 1]),
            ([2, 1, 3, 0], [0, 0, 2]), ([4], [0])]


@pytest.mark.parametrize("bags", NAN_BAGS, ids=str)
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_embedding_bag_max_treats_nan_and_inf_like_torch(bags, padding_idx):
    # torch's running max: a NaN first in its bag is the maximum, a NaN later is passed over
    nan = float("nan")
    w = torch.tensor([[1.0, 2.0], [nan, 0.0], [3.0, -1.0], [nan, nan], [-float("inf"), 5.0]])
    idx, offsets = torch.tensor(bags[0]), torch.tensor(bags[1])
    assert_same_as_torch(F.embedding_bag, TF.embedding_bag, idx, w.requires_grad_(), offsets, mode="max",
                         padding_idx=padding_idx, grad_output=exact_dy((len(bags[1]), 2)), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_scale_grad_by_freq_divides_by_the_count_in_the_input(mode):
    # torch 2.13's CPU kernel divides row 2 by row 1's count here (pytorch/pytorch#190063):
    # the reference is torch's embedding (whose counts are right) reduced per bag by hand
    x, offsets = torch.tensor([1, 2, 1, 5, 1]), torch.tensor([0, 2])
    w = torch.randn(6, 3, requires_grad=True)
    dy = exact_dy((2, 3))
    F.embedding_bag(x, w, offsets, mode=mode, scale_grad_by_freq=True).backward(dy)
    w2 = w.detach().clone().requires_grad_()
    rows = TF.embedding(x, w2, scale_grad_by_freq=True)
    y = torch.stack([rows[:2].sum(0), rows[2:].sum(0)])
    if mode == "mean":
        y = y / torch.tensor([[2.0], [3.0]])
    y.backward(dy)
    torch.testing.assert_close(w.grad, w2.grad)


def test_embedding_bag_scale_grad_by_freq_matches_torch_where_torch_counts_right():
    # (every index once or every index equally often: torch's miscount reads a right count)
    x = torch.tensor([[3, 0, 2], [4, 1, 5]])
    w = torch.randn(6, 4, requires_grad=True)
    assert_same_as_torch(F.embedding_bag, TF.embedding_bag, x, w, mode="mean", scale_grad_by_freq=True)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_gradients(mode):
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    x, offsets = torch.tensor([1, 2, 4, 5, 4, 3, 2, 0, 1]), torch.tensor([0, 3, 3, 7])
    check_gradients(lambda w: F.embedding_bag(x, w, offsets, mode=mode, padding_idx=3), w)
    check_gradients(lambda w: F.embedding_bag(x.view(3, 3), w, mode=mode), w)


def test_embedding_bag_gradients_with_per_sample_weights():
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    p = torch.randn(9, dtype=torch.float64, requires_grad=True)
    x, offsets = torch.tensor([1, 2, 4, 5, 4, 3, 2, 0, 1]), torch.tensor([0, 3, 3, 6])
    check_gradients(lambda w, p: F.embedding_bag(x, w, offsets, mode="sum", per_sample_weights=p, padding_idx=4,
                                                 include_last_offset=True), w, p)


def test_embedding_bag_scale_grad_by_freq_double_backward():
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([1, 2, 1, 5, 1])
    assert gradgradcheck(lambda w: F.embedding_bag(x, w, torch.tensor([0, 2]), mode="mean", scale_grad_by_freq=True),
                         (w,), check_fwd_over_rev=True)


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_embedding_bag_matches_torch_under_vmap_and_grad(mode):
    x, offsets = torch.tensor([1, 2, 4, 5, 4, 3, 2]), torch.tensor([0, 3, 3])
    ws = torch.randn(3, 6, 4, dtype=torch.float64)

    def run(fn):
        loss = lambda w: fn(x, w, offsets, mode=mode).sin().sum()  # noqa: E731
        return (torch.func.vmap(lambda w: fn(x, w, offsets, mode=mode))(ws),
                torch.func.vmap(torch.func.grad(loss))(ws))

    for a, b in zip(run(F.embedding_bag), run(TF.embedding_bag)):
        torch.testing.assert_close(a, b)


def _bad(**kw):
    base = dict(input=torch.tensor([1, 2, 4, 5]), weight=torch.randn(6, 3), offsets=torch.tensor([0, 2]))
    base.update(kw)
    return base


BAD = {
    "offsets-not-starting-at-0": _bad(offsets=torch.tensor([1, 2])),
    "last-offset-past-the-end": _bad(offsets=torch.tensor([0, 5])),
    "per-sample-weights-with-mean": _bad(mode="mean", per_sample_weights=torch.ones(4)),
    "per-sample-weights-with-max": _bad(mode="max", per_sample_weights=torch.ones(4)),
    "per-sample-weights-shape": _bad(mode="sum", per_sample_weights=torch.ones(3)),
    "per-sample-weights-dtype": _bad(mode="sum", per_sample_weights=torch.ones(4, dtype=torch.float64)),
    "bad-mode": _bad(mode="min"),
    "max-with-freq": _bad(mode="max", scale_grad_by_freq=True),
    "max-with-sparse": _bad(mode="max", sparse=True),
    "float-input": _bad(input=torch.tensor([1.0, 2.0])),
    "float-offsets": _bad(offsets=torch.tensor([0.0, 2.0])),
    "index-too-big": _bad(input=torch.tensor([1, 6, 0, 0])),
    "negative-index": _bad(input=torch.tensor([1, -1, 0, 0])),
    "2-d-with-offsets": _bad(input=torch.tensor([[1, 2], [4, 5]])),
    "2-d-without-columns": _bad(input=torch.zeros(2, 0, dtype=torch.long), offsets=None),
    "3-d-input": _bad(input=torch.zeros(2, 2, 1, dtype=torch.long), offsets=None),
    "1-d-without-offsets": _bad(offsets=None),
    "2-d-offsets": _bad(offsets=torch.tensor([[0, 2]])),
    "1-d-weight": _bad(weight=torch.randn(6)),
    "padding-too-big": _bad(padding_idx=6),
    "padding-too-small": _bad(padding_idx=-7),
    "include-last-without-offsets": _bad(offsets=torch.tensor([], dtype=torch.long), include_last_offset=True),
}


@pytest.mark.parametrize("kwargs", BAD.values(), ids=BAD.keys())
def test_embedding_bag_rejects_bad_input_like_torch(kwargs):
    assert_raises_like_torch(F.embedding_bag, TF.embedding_bag, **kwargs)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_rejects_decreasing_offsets(mode):
    # torch raises RuntimeError for some decreasing offsets only (depending on mode and thread
    # count it reads [0, 5, 3] as bags it cannot index, or as an empty one): manualgrad for any
    with pytest.raises(RuntimeError, match="non-decreasing"):
        F.embedding_bag(torch.tensor([1, 2, 4, 5, 4, 3, 2, 0]), torch.randn(6, 3), torch.tensor([0, 5, 3]), mode=mode)


def _after_call(fn, x, w, offsets, dy, **kwargs):
    """(output, weight after the call, weight gradient) of fn on a copy of w."""
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, offsets, **kwargs)
    y.backward(dy)
    return y, w.detach(), w.grad


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, float("inf")])
def test_embedding_bag_max_norm_rescales_the_rows_read_like_torch(case, mode, norm_type):
    x, offsets, ilo = case
    w = torch.randn(6, 7) * torch.linspace(0.1, 3, 6).unsqueeze(1)
    max_norm = float(w.norm(norm_type, dim=1).median())
    dy = torch.randn(offsets.numel() - ilo if offsets is not None else x.shape[0], 7)
    kw = dict(mode=mode, max_norm=max_norm, norm_type=norm_type, include_last_offset=ilo)
    (y, w_after, g), (y_t, w_after_t, g_t) = (_after_call(fn, x, w, offsets, dy, **kw)
                                              for fn in (F.embedding_bag, TF.embedding_bag))
    assert torch.equal(w_after, w_after_t)  # the same float32 operations: bit for bit
    assert not torch.equal(w_after, w), "no row was rescaled: the test would not see a wrong scale"
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(g, g_t)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("padding_idx", [None, 4])
def test_embedding_bag_sparse_gradient_is_torchs(case, mode, padding_idx, weighted):
    x, offsets, ilo = case
    w = torch.randn(6, 5)
    p = torch.randn(x.shape) if weighted else None
    dy = torch.randn(offsets.numel() - ilo if offsets is not None else x.shape[0], 5)
    kw = dict(mode=mode, sparse=True, padding_idx=padding_idx, include_last_offset=ilo, per_sample_weights=p)
    (y, _, g), (y_t, _, g_t) = (_after_call(fn, x, w, offsets, dy, **kw) for fn in (F.embedding_bag, TF.embedding_bag))
    torch.testing.assert_close(y, y_t)
    assert g.is_sparse and g.shape == g_t.shape and g.dtype == g_t.dtype
    # the same terms in the same order (uncoalesced), and the same after coalesce
    assert torch.equal(g._indices(), g_t._indices())
    torch.testing.assert_close(g._values(), g_t._values())
    g, g_t = g.coalesce(), g_t.coalesce()
    assert torch.equal(g.indices(), g_t.indices())
    torch.testing.assert_close(g.values(), g_t.values())


def test_embedding_bag_sparse_with_scale_grad_by_freq_raises_in_backward_like_torch():
    def run(fn):
        w = torch.randn(3, 2, requires_grad=True)
        y = fn(torch.tensor([1, 1]), w, torch.tensor([0]), mode="sum", sparse=True, scale_grad_by_freq=True)
        y.sum().backward()

    assert_raises_like_torch(lambda: run(F.embedding_bag), lambda: run(TF.embedding_bag), match="scale_grad_by_freq")


def test_embedding_bag_signature_matches_torch():
    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(F.embedding_bag) == params(TF.embedding_bag)


# ---------------------------------------------------------------------------------------------
# the module

@pytest.mark.parametrize("kwargs", [{}, dict(mode="sum", padding_idx=2), dict(mode="max", include_last_offset=True),
                                    dict(mode="mean", scale_grad_by_freq=True)])
def test_embedding_bag_module_is_a_drop_in(kwargs):
    th = torch.nn.EmbeddingBag(7, 4, **kwargs)
    ours = mnn.EmbeddingBag(7, 4, **kwargs)
    ours.load_state_dict(th.state_dict())
    assert isinstance(ours, torch.nn.EmbeddingBag) and repr(ours) == repr(th)
    x, offsets = torch.tensor([0, 2, 3, 6, 1, 5]), torch.tensor([0, 3, 6])  # each index once: torch counts right
    assert_same_as_torch(ours, th, x, offsets)
    model = torch.nn.Sequential(copy.deepcopy(th))
    mg.convert(model, strict=True)
    assert type(model[0]) is mnn.EmbeddingBag


def test_embedding_bag_module_takes_per_sample_weights():
    th = torch.nn.EmbeddingBag(7, 4, mode="sum")
    ours = mnn.EmbeddingBag(7, 4, mode="sum")
    ours.load_state_dict(th.state_dict())
    p = torch.randn(6, requires_grad=True)
    assert_same_as_torch(ours, th, torch.tensor([0, 2, 2, 6, 1, 5]), torch.tensor([0, 2]), p)


def test_embedding_bag_from_pretrained_matches_torch():
    table = torch.randn(5, 3)
    ours = mnn.EmbeddingBag.from_pretrained(table, freeze=False, mode="max", padding_idx=0)
    th = torch.nn.EmbeddingBag.from_pretrained(table, freeze=False, mode="max", padding_idx=0)
    assert type(ours) is mnn.EmbeddingBag
    assert_same_as_torch(ours, th, torch.tensor([[0, 3, 3], [1, 0, 4]]))


@pytest.mark.parametrize("kwargs", [dict(sparse=True, mode="sum", padding_idx=0), dict(max_norm=1.0, mode="max")])
def test_embedding_bag_module_with_sparse_or_max_norm_trains_like_torch(kwargs):
    th = torch.nn.EmbeddingBag(9, 4, **kwargs)
    ours = copy.deepcopy(th)
    mg.convert(ours, strict=True)
    assert type(ours) is mnn.EmbeddingBag
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, th)]
    for step in range(3):
        x = torch.randint(0, 9, (4, 5))
        dy = exact_dy((4, 4))
        for m, opt in zip((ours, th), opts):
            opt.zero_grad()
            m(x).backward(dy)
            assert m.weight.grad.is_sparse == th.sparse
            opt.step()
        torch.testing.assert_close(ours.weight, th.weight, rtol=0, atol=0)


def test_embedding_bag_is_routed_under_enable():
    w = torch.randn(5, 3, requires_grad=True)
    with mg.enable():
        y = TF.embedding_bag(torch.tensor([1, 2, 4]), w, torch.tensor([0, 1]), mode="sum")
    assert type(y.grad_fn).__name__ == "EmbeddingBagSumFunctionBackward"
