import copy
import inspect

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradgradcheck

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

# (index tensor, num_embeddings, dim): repeated indices, a scalar index, size-1 and odd dims
CASES = {
    "repeats": (torch.tensor([[1, 2, 1], [0, 4, 1]]), 5, 3),
    "scalar": (torch.tensor(3), 4, 1),
    "odd": (torch.randint(0, 13, (7, 13)), 13, 7),
    "wide-257": (torch.randint(0, 11, (2, 3, 5)), 11, 257),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("padding_idx", [None, 1, -1])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_matches_torch(case, padding_idx, scale_grad_by_freq):
    idx, num, dim = case
    w = torch.randn(num, dim, requires_grad=True)
    assert_same_as_torch(F.embedding, TF.embedding, idx, w, padding_idx=padding_idx,
                         scale_grad_by_freq=scale_grad_by_freq)


@pytest.mark.parametrize("idx", [torch.tensor([[1, 2, 1], [0, 4, 1]]), torch.tensor(3), torch.tensor([[4]])])
def test_embedding_gradients(idx):
    check_gradients(F.embedding, idx, torch.randn(5, 3, dtype=torch.float64, requires_grad=True))


def test_embedding_gradients_non_contiguous_int32_indices():
    w = noncontiguous(torch.randn(5, 3, dtype=torch.float64, requires_grad=True))
    assert not w.is_contiguous()
    check_gradients(F.embedding, torch.tensor([[1, 2], [1, 0]], dtype=torch.int32), w)


@pytest.mark.parametrize("padding_idx", [1, -4])
def test_embedding_gradients_with_padding_idx(padding_idx):
    # The padding row gets no gradient (not the derivative of the lookup): check the other rows
    # against finite differences with the padding row held at a constant.
    idx = torch.tensor([[1, 2, 1], [0, 4, 1]])
    row = torch.zeros(5, 1, dtype=torch.bool)
    row[padding_idx] = True
    check_gradients(lambda w: F.embedding(idx, torch.where(row, 0.5, w), padding_idx=padding_idx),
                    torch.randn(5, 3, dtype=torch.float64, requires_grad=True))


def test_embedding_padding_row_gets_zero_gradient_and_others_sum():
    idx = torch.tensor([[1, 2, 1], [0, 4, 1]])
    w = torch.randn(5, 3, requires_grad=True)
    dy = torch.randn(2, 3, 3)
    F.embedding(idx, w, padding_idx=2).backward(dy)
    expected = torch.zeros(5, 3)
    for i, j in enumerate(idx.flatten().tolist()):
        expected[j] += dy.reshape(-1, 3)[i]
    expected[2] = 0
    torch.testing.assert_close(w.grad, expected)


def test_embedding_scale_grad_by_freq_divides_by_the_count():
    idx = torch.tensor([1, 1, 1, 3])
    w = torch.randn(4, 2, requires_grad=True)
    F.embedding(idx, w, scale_grad_by_freq=True).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))


def test_embedding_scale_grad_by_freq_gradients():
    # unique indices: the scaled gradient is the derivative; repeated ones: double backward of
    # the (linear) backward still holds.
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    check_gradients(F.embedding, torch.tensor([3, 0, 2]), w, scale_grad_by_freq=True, padding_idx=None)
    idx = torch.tensor([[1, 2, 1], [0, 4, 1]])
    assert gradgradcheck(lambda w: F.embedding(idx, w, padding_idx=4, scale_grad_by_freq=True), (w,),
                         check_fwd_over_rev=True)


def test_embedding_matches_torch_under_vmap_and_grad():
    idx = torch.tensor([[1, 2, 1], [0, 4, 1]])
    ws = torch.randn(3, 5, 4, dtype=torch.float64)

    def run(emb):
        loss = lambda w: emb(idx, w, padding_idx=0).sin().sum()  # noqa: E731
        return torch.func.vmap(lambda w: emb(idx, w))(ws), torch.func.vmap(torch.func.grad(loss))(ws)

    for a, b in zip(run(F.embedding), run(TF.embedding)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "idx,w,kwargs",
    [
        (torch.tensor([1.0, 2.0]), torch.randn(5, 3), {}),
        (torch.tensor([1, 2], dtype=torch.int16), torch.randn(5, 3), {}),
        (torch.tensor([1, 5]), torch.randn(5, 3), {}),
        (torch.tensor([1, -1]), torch.randn(5, 3), {}),
        (torch.tensor([1, 2]), torch.randn(5), {}),
        (torch.tensor([1, 2]), torch.randn(5, 3, 2), {}),
        (torch.tensor([1, 2]), torch.randn(5, 3), dict(padding_idx=5)),
        (torch.tensor([1, 2]), torch.randn(5, 3), dict(padding_idx=-6)),
    ],
    ids=["float-idx", "int16-idx", "idx-too-big", "negative-idx", "1-d-weight", "3-d-weight", "pad-big", "pad-small"],
)
def test_embedding_rejects_bad_input_like_torch(idx, w, kwargs):
    assert_raises_like_torch(F.embedding, TF.embedding, idx, w, **kwargs)


# ---------------------------------------------------------------------------------------------
# max_norm: the rows read are rescaled in place first, exactly as torch.embedding_renorm_

def _after_call(fn, idx, w, dy, **kwargs):
    """(output, weight after the call, weight gradient) of fn on a copy of w."""
    w = w.detach().clone().requires_grad_()
    y = fn(idx, w, **kwargs)
    y.backward(dy)
    return y, w.detach(), w.grad


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, float("inf")])
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_embedding_max_norm_rescales_the_rows_read_like_torch(case, norm_type, padding_idx):
    idx, num, dim = case
    # rows of norms on both sides of max_norm (and one row never read, left alone)
    w = torch.randn(num, dim) * torch.linspace(0.1, 3, num).unsqueeze(1)
    max_norm = float(w.norm(norm_type, dim=1).median())
    dy = torch.randn(*idx.shape, dim)
    ours = _after_call(F.embedding, idx, w, dy, max_norm=max_norm, norm_type=norm_type, padding_idx=padding_idx)
    theirs = _after_call(TF.embedding, idx, w, dy, max_norm=max_norm, norm_type=norm_type, padding_idx=padding_idx)
    for a, b, what in zip(ours, theirs, ("output", "weight after the call", "gradient")):
        assert torch.equal(a, b), what  # the same float32 operations: bit for bit
    assert not torch.equal(ours[1], w), "no row was rescaled: the test would not see a wrong scale"


def test_embedding_max_norm_takes_int32_indices_like_torch():
    w = torch.randn(5, 3) * 3
    ours, theirs = w.clone(), w.clone()
    F.embedding(torch.tensor([[4, 0], [0, 2]], dtype=torch.int32), ours, max_norm=1.0)
    TF.embedding(torch.tensor([[4, 0], [0, 2]], dtype=torch.int32), theirs, max_norm=1.0)
    assert torch.equal(ours, theirs) and not torch.equal(ours, w)


def test_embedding_max_norm_by_hand():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [6.0, 8.0]])
    F.embedding(torch.tensor([0, 1, 0]), w, max_norm=1.0)
    # row 0 (norm 5) -> 5 / (5 + 1e-7) of unit length; row 1 (norm 0.5) and row 2 (not read) unchanged
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.8], [0.3, 0.4], [6.0, 8.0]]), rtol=0, atol=1e-7)


def test_embedding_max_norm_module_matches_torch_and_converts_strictly():
    th = torch.nn.Embedding(7, 5, max_norm=1.5, norm_type=3.0)
    ours = copy.deepcopy(th)
    mg.convert(ours, strict=True)
    assert type(ours) is mnn.Embedding
    idx = torch.tensor([[0, 2, 2], [6, 1, 2]])
    for _ in range(2):  # the second call reads rows already within max_norm
        assert_same_as_torch(ours, th, idx, rtol=0, atol=0)
        assert torch.equal(ours.weight, th.weight)


# ---------------------------------------------------------------------------------------------
# sparse=True: the weight gradient is a sparse COO tensor like torch's


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_embedding_sparse_gradient_is_torchs(case, padding_idx):
    idx, num, dim = case
    if idx.dim() == 0 and padding_idx is not None:
        pytest.skip("torch 2.13 raises IndexError here (its mask indexing of a 0-d index): see the test below")
    w = torch.randn(num, dim)
    dy = torch.randn(*idx.shape, dim)
    (_, _, ours), (_, _, theirs) = (_after_call(fn, idx, w, dy, sparse=True, padding_idx=padding_idx)
                                    for fn in (F.embedding, TF.embedding))
    assert ours.is_sparse and ours.shape == theirs.shape and ours.dtype == theirs.dtype
    # the same terms in the same order (uncoalesced), hence the same after coalesce
    assert torch.equal(ours._indices(), theirs._indices()) and torch.equal(ours._values(), theirs._values())
    ours, theirs = ours.coalesce(), theirs.coalesce()
    assert torch.equal(ours.indices(), theirs.indices()) and torch.equal(ours.values(), theirs.values())
    # and its dense form is the dense gradient
    _, _, dense = _after_call(F.embedding, idx, w, dy, padding_idx=padding_idx)
    torch.testing.assert_close(ours.to_dense(), dense)


def test_embedding_sparse_gradient_of_a_scalar_index_with_padding_idx():
    # torch's sparse backward masks the 0-d index with a 1-d mask and raises IndexError
    w = torch.randn(4, 2, requires_grad=True)
    F.embedding(torch.tensor(3), w, sparse=True, padding_idx=1).backward(torch.tensor([1.5, -2.0]))
    assert w.grad._indices().tolist() == [[3]] and w.grad._values().tolist() == [[1.5, -2.0]]


def test_embedding_sparse_gradient_of_only_padding_is_empty_like_torchs():
    w = torch.randn(5, 3)
    dy = torch.randn(2, 3)
    for fn in (F.embedding, TF.embedding):
        _, _, g = _after_call(fn, torch.tensor([2, 2]), w, dy, sparse=True, padding_idx=2)
        assert g.is_sparse and g._nnz() == 0 and g.shape == (5, 3) and g._indices().shape == (1, 0)


def test_embedding_sparse_with_scale_grad_by_freq_raises_in_backward_like_torch():
    def run(fn):
        w = torch.randn(3, 2, requires_grad=True)
        fn(torch.tensor([1, 1]), w, sparse=True, scale_grad_by_freq=True).sum().backward()

    assert_raises_like_torch(lambda: run(F.embedding), lambda: run(TF.embedding), match="scale_grad_by_freq")


def test_embedding_sparse_module_trains_like_torch_with_sparse_sgd():
    th = torch.nn.Embedding(9, 4, sparse=True, padding_idx=0)
    ours = copy.deepcopy(th)
    mg.convert(ours, strict=True)
    assert type(ours) is mnn.Embedding
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, th)]
    for step in range(3):
        idx = torch.randint(0, 9, (4, 5))
        dy = torch.randn(4, 5, 4)
        for m, opt in zip((ours, th), opts):
            opt.zero_grad()
            m(idx).backward(dy)
            assert m.weight.grad.is_sparse
            opt.step()
        assert torch.equal(ours.weight, th.weight)


def test_embedding_propagates_nan():
    w = torch.randn(4, 2)
    w[2, 1] = float("nan")
    y = F.embedding(torch.tensor([2, 0]), w)
    assert y.isnan().tolist() == [[False, True], [False, False]]


def test_embedding_signature_matches_torch():
    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(F.embedding) == params(TF.embedding)


@given(
    shape=st.lists(st.integers(0, 4), max_size=3).map(tuple), num=st.integers(1, 6), dim=st.integers(1, 5),
    padding=st.booleans(), freq=st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_embedding_matches_torch_property(shape, num, dim, padding, freq):
    idx = torch.randint(0, num, shape)
    w = torch.randn(num, dim, requires_grad=True)
    assert_same_as_torch(F.embedding, TF.embedding, idx, w, padding_idx=(num - 1 if padding else None),
                         scale_grad_by_freq=freq)


# ---------------------------------------------------------------------------------------------
# the module

@pytest.mark.parametrize("kwargs", [{}, dict(padding_idx=2), dict(scale_grad_by_freq=True)])
def test_embedding_module_is_a_drop_in(kwargs):
    th = torch.nn.Embedding(7, 4, **kwargs)
    ours = mnn.Embedding(7, 4, **kwargs)
    ours.load_state_dict(th.state_dict())
    assert isinstance(ours, torch.nn.Embedding) and repr(ours) == repr(th)
    th.load_state_dict(ours.state_dict())
    idx = torch.tensor([[0, 2, 2], [6, 1, 2]])
    assert_same_as_torch(ours, th, idx)
    model = torch.nn.Sequential(copy.deepcopy(th))
    mg.convert(model)
    assert type(model[0]) is mnn.Embedding


def test_embedding_from_pretrained_matches_torch():
    table = torch.randn(5, 3)
    ours = mnn.Embedding.from_pretrained(table, freeze=False, padding_idx=0)
    th = torch.nn.Embedding.from_pretrained(table, freeze=False, padding_idx=0)
    assert type(ours) is mnn.Embedding
    assert_same_as_torch(ours, th, torch.tensor([0, 3, 3, 1]))
