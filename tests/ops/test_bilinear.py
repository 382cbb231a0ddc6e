import inspect

import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")


def leaf(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("batch", [(1,), (7,), (2, 3), ()])
@pytest.mark.parametrize("sizes", [(1, 1, 1), (5, 3, 7), (13, 17, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bilinear_matches_torch(with_bias, sizes, batch):
    i, j, o = sizes
    bias = leaf(o) if with_bias else None
    # atol 1e-5: sums of up to 13 x 17 = 221 float32 products of unit-scale values round differently
    # in torch's _trilinear order than in these matrix products (a few ulps of sums of size ~15)
    assert_same_as_torch(F.bilinear, TF.bilinear, leaf(*batch, i), leaf(*batch, j), leaf(o, i, j), bias,
                         rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_bilinear_gradients_and_double_backward(with_bias):
    d = torch.float64
    bias = leaf(2, dtype=d) if with_bias else None
    check_gradients(F.bilinear, leaf(3, 4, dtype=d), leaf(3, 5, dtype=d), leaf(2, 4, 5, dtype=d), bias)
    check_gradients(F.bilinear, leaf(2, 2, 3, dtype=d), leaf(2, 2, 2, dtype=d), leaf(3, 3, 2, dtype=d),
                    leaf(3, dtype=d) if with_bias else None)


def test_bilinear_by_hand():
    # one output: x1^T A x2 + b with A = [[1, 2], [3, 4]]
    x1, x2 = torch.tensor([[1.0, 2.0]], requires_grad=True), torch.tensor([[3.0, -1.0]], requires_grad=True)
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)
    y = F.bilinear(x1, x2, a, torch.tensor([0.5]))
    # x1^T A = [7, 10]; . x2 = 21 - 10 = 11
    assert y.item() == 11.5
    y.backward()
    torch.testing.assert_close(x1.grad, torch.tensor([[1.0, 5.0]]))  # A x2
    torch.testing.assert_close(x2.grad, torch.tensor([[7.0, 10.0]]))  # A^T x1
    torch.testing.assert_close(a.grad, torch.tensor([[[3.0, -1.0], [6.0, -2.0]]]))  # x1 x2^T


def test_bilinear_signature_is_torchs():
    assert list(inspect.signature(F.bilinear).parameters) == ["input1", "input2", "weight", "bias"]


@pytest.mark.parametrize("case", [
    ("ranks differ", lambda: (torch.randn(3, 4), torch.randn(5), torch.randn(2, 4, 5), torch.randn(2))),
    ("batch differs", lambda: (torch.randn(3, 4), torch.randn(2, 5), torch.randn(2, 4, 5), torch.randn(2))),
    ("input1 size", lambda: (torch.randn(3, 3), torch.randn(3, 5), torch.randn(2, 4, 5), torch.randn(2))),
    ("input2 size", lambda: (torch.randn(3, 4), torch.randn(3, 6), torch.randn(2, 4, 5), torch.randn(2))),
    ("bias size", lambda: (torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 4, 5), torch.randn(3))),
    ("2-d bias", lambda: (torch.randn(3, 4), torch.randn(3, 5), torch.randn(2, 4, 5), torch.randn(1, 2))),
    ("2-d weight", lambda: (torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 5), torch.randn(2))),
    ("0-dim inputs", lambda: (torch.randn(()), torch.randn(()), torch.randn(2, 4, 5), torch.randn(2))),
    ("dtypes differ", lambda: (torch.randn(3, 4).double(), torch.randn(3, 5), torch.randn(2, 4, 5), torch.randn(2))),
    ("no features", lambda: (torch.randn(3, 0), torch.randn(3, 5), torch.randn(2, 0, 5), torch.randn(2))),
], ids=lambda c: c[0])
def test_bilinear_bad_input_raises_like_torch(case):
    _, make = case
    assert_raises_like_torch(F.bilinear, TF.bilinear, *make())


@pytest.mark.parametrize("bias", [True, False])
def test_bilinear_module_matches_torch_and_converts(bias):
    torch.manual_seed(1)
    theirs = torch.nn.Bilinear(5, 3, 4, bias=bias)
    torch.manual_seed(1)
    ours = mnn.Bilinear(5, 3, 4, bias=bias)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():  # torch's initialisation, same seed
        assert torch.equal(ours.state_dict()[k], v)
    x1, x2 = leaf(6, 5), leaf(6, 3)
    assert_same_as_torch(ours, theirs, x1, x2, grad_output=exact_dy((6, 4)), rtol=1e-5, atol=1e-5)
    import manualgrad as mg

    model = torch.nn.ModuleDict({"b": theirs})
    mg.convert(model, strict=True)
    assert type(model["b"]) is mnn.Bilinear
    assert type(model["b"](x1, x2).grad_fn).__name__ == "BilinearFunctionBackward"


def test_bilinear_under_bfloat16_autocast_stays_in_the_inputs_dtype_like_torch():
    # torch's bilinear is on no autocast list: a float32 result. (Inside, its _trilinear's matrix
    # products do get autocast to bfloat16; manualgrad's stay float32, the result outside autocast.)
    args = (torch.randn(4, 3), torch.randn(4, 2), torch.randn(5, 3, 2), torch.randn(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = F.bilinear(*args), TF.bilinear(*args)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, TF.bilinear(*args))
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=5e-2)  # torch's bfloat16 products
