import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

SHAPES = [((5,), 3), ((1, 1), 1), ((7, 13), 5), ((2, 3, 17), 4), ((2, 1, 3, 7), 13)]


@pytest.mark.parametrize("x_shape,out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(x_shape, out, bias):
    x = torch.randn(x_shape, requires_grad=True)
    w = torch.randn(out, x_shape[-1], requires_grad=True)
    b = torch.randn(out, requires_grad=True) if bias else None
    assert_same_as_torch(F.linear, TF.linear, x, w, b)


def test_linear_matches_torch_at_the_seed_mlp_width():
    x = torch.randn(64, 257, requires_grad=True)
    w = torch.randn(1024, 257, requires_grad=True)
    b = torch.randn(1024, requires_grad=True)
    assert_same_as_torch(F.linear, TF.linear, x, w, b, rtol=1e-5, atol=1e-5)


def test_linear_3d_with_bias_is_torchs_fused_product_bit_for_bit():
    # torch folds a contiguous (N, T, in) input into one addmm with the bias; so do we: the
    # same kernel on the same numbers gives the same bits (matmul then + b rounds twice)
    # (in = 512: the product's blocking over in is where the two roundings part)
    x, w, b = torch.randn(4, 33, 512), torch.randn(50, 512), torch.randn(50)
    assert torch.equal(F.linear(x, w, b), TF.linear(x, w, b))

@pytest.mark.parametrize("x_shape,out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(x_shape, out, bias):
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, x_shape[-1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(out, dtype=torch.float64, requires_grad=True) if bias else None
    check_gradients(F.linear, x, w, b)


def test_linear_gradients_non_contiguous():
    x = noncontiguous(torch.randn(7, 13, dtype=torch.float64, requires_grad=True))
    w = torch.randn(13, 5, dtype=torch.float64).t().requires_grad_()
    assert not x.is_contiguous() and not w.is_contiguous()
    check_gradients(F.linear, x, w, torch.randn(5, dtype=torch.float64, requires_grad=True))


def test_linear_only_computes_requested_gradients():
    x = torch.randn(4, 3)  # no grad: the first layer's input
    w = torch.randn(2, 3, requires_grad=True)
    F.linear(x, w).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(4, 2).t() @ x)
    assert x.grad is None


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    n_in=st.integers(1, 9),
    n_out=st.integers(1, 9),
    bias=st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_linear_matches_torch_property(lead, n_in, n_out, bias):
    x = torch.randn(*lead, n_in, requires_grad=True)
    w = torch.randn(n_out, n_in, requires_grad=True)
    b = torch.randn(n_out, requires_grad=True) if bias else None
    assert_same_as_torch(F.linear, TF.linear, x, w, b)


def test_linear_rejects_mismatched_shapes_like_torch():
    assert_raises_like_torch(F.linear, TF.linear, torch.randn(3, 5), torch.randn(4, 6), match="cannot be multiplied")


def test_linear_rejects_mismatched_bias_like_torch():
    assert_raises_like_torch(F.linear, TF.linear, torch.randn(3, 5), torch.randn(4, 5), torch.randn(3))


def test_linear_propagates_nan():
    x = torch.randn(3, 5)
    x[1, 2] = float("nan")
    y = F.linear(x, torch.randn(4, 5), torch.randn(4))
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
