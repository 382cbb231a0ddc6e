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


@pytest.mark.parametrize("kwargs,option", [(dict(max_norm=1.0), "max_norm"), (dict(sparse=True), "sparse")])
def test_embedding_unsupported_options_raise_not_implemented(kwargs, option):
    with pytest.raises(NotImplementedError, match=option):
        F.embedding(torch.tensor([1]), torch.randn(3, 2), **kwargs)


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


def test_embedding_module_with_max_norm_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="max_norm"):
        mnn.Embedding(5, 3, max_norm=1.0)(torch.tensor([1]))
