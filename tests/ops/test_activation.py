import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.testing import assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

SHAPES = [(1,), (7, 13), (2, 3, 257)]


def away_from_kinks(shape, dtype=torch.float64):
    """Inputs at least 0.05 away from 0, where finite differences of relu-like ops break."""
    x = torch.randn(shape, dtype=dtype)
    return (x + 0.1 * x.sign()).requires_grad_()


@pytest.mark.parametrize("shape", SHAPES)
def test_relu_matches_torch(shape):
    assert_same_as_torch(F.relu, TF.relu, torch.randn(shape, requires_grad=True))


@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 1, 5)])
def test_relu_gradients(shape):
    check_gradients(F.relu, away_from_kinks(shape))


def test_relu_gradients_non_contiguous():
    check_gradients(F.relu, noncontiguous(away_from_kinks((7, 13))))


def test_relu_inplace_matches_torch_and_overwrites_input():
    x = torch.randn(7, 13, requires_grad=True)
    # In-place needs a non-leaf: apply it to x * 1 on both sides.
    assert_same_as_torch(lambda t: F.relu(t * 1, inplace=True), lambda t: TF.relu(t * 1, inplace=True), x)
    h = torch.randn(5)
    out = F.relu(h, inplace=True)
    assert out is h and (h >= 0).all()


def test_relu_inplace_gradients():
    # torch's batched forward-AD check cannot see an in-place tangent update (see testing.py).
    check_gradients(lambda t: F.relu(t.clone(), inplace=True), away_from_kinks((7, 13)), batched_forward_grad=False)


def test_relu_propagates_nan():
    x = torch.tensor([float("nan"), -1.0, 2.0])
    torch.testing.assert_close(F.relu(x), TF.relu(x), equal_nan=True)
