"""The checking helpers must be able to fail: a wrong backward, jvp or output is caught."""
import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients


def _square(wrong_backward=False, wrong_jvp=False):
    class Square(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def backward(ctx, dy):
            (x,) = ctx.saved_tensors
            return dy * x * (3 if wrong_backward else 2)

        @staticmethod
        def jvp(ctx, dx):
            (x,) = ctx.saved_tensors
            return dx * x * (3 if wrong_jvp else 2)

    return Square.apply


def test_check_gradients_accepts_a_correct_function():
    assert check_gradients(_square(), torch.randn(3, 4, requires_grad=True))


def test_check_gradients_catches_a_wrong_backward():
    with pytest.raises(GradcheckError):
        check_gradients(_square(wrong_backward=True), torch.randn(3, 4, requires_grad=True))


def test_check_gradients_catches_a_wrong_jvp():
    with pytest.raises(GradcheckError):
        check_gradients(_square(wrong_jvp=True), torch.randn(3, 4, requires_grad=True))


def test_check_gradients_catches_a_double_backward_through_a_constant():
    class CubeSavingIntermediate(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(3 * inputs[0] ** 2)  # an intermediate: a constant for double backward
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def backward(ctx, dy):
            (d,) = ctx.saved_tensors
            return dy * d

        @staticmethod
        def jvp(ctx, dx):
            (x,) = ctx.saved_tensors
            return dx * 3 * x**2

    with pytest.raises(GradcheckError):
        check_gradients(CubeSavingIntermediate.apply, torch.randn(3, 4, requires_grad=True))


def test_assert_same_as_torch_catches_a_wrong_gradient():
    with pytest.raises(AssertionError, match="gradient of input 0"):
        assert_same_as_torch(_square(wrong_backward=True), torch.square, torch.randn(3, requires_grad=True))
    assert_same_as_torch(_square(), torch.square, torch.randn(3, requires_grad=True))


def test_assert_same_as_torch_catches_a_wrong_output():
    with pytest.raises(AssertionError, match="output 0"):
        assert_same_as_torch(lambda x: x * x + 1e-3, torch.square, torch.randn(3, requires_grad=True))


def test_assert_raises_like_torch_catches_a_different_exception_type():
    def raises_value_error(x):
        raise ValueError("wrong")

    with pytest.raises(AssertionError, match="torch raises RuntimeError"):
        assert_raises_like_torch(raises_value_error, torch.mm, torch.randn(2, 3), torch.randn(4, 5))


def _scaled(wrong_weight_grad=False):
    """y = x * w with a hand-written backward whose weight gradient can be made wrong."""

    class Scaled(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x, w):
            return x * w

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)
            ctx.save_for_forward(*inputs)

        @staticmethod
        def backward(ctx, dy):
            x, w = ctx.saved_tensors
            return dy * w, dy * x * (2 if wrong_weight_grad else 1)

        @staticmethod
        def jvp(ctx, dx, dw):
            x, w = ctx.saved_tensors
            return dx * w + x * dw * (2 if wrong_weight_grad else 1)

    return lambda x, weight: Scaled.apply(x, weight)


def test_check_gradients_checks_tensors_passed_by_keyword():
    x = torch.randn(3, requires_grad=True)
    check_gradients(_scaled(), x, weight=torch.randn(3, requires_grad=True))
    with pytest.raises(GradcheckError):
        check_gradients(_scaled(wrong_weight_grad=True), x, weight=torch.randn(3, requires_grad=True))


def test_assert_same_as_torch_compares_gradients_of_keyword_tensors():
    x = torch.randn(3, requires_grad=True)
    reference = lambda x, weight: x * weight  # noqa: E731
    assert_same_as_torch(_scaled(), reference, x, weight=torch.randn(3, requires_grad=True))
    with pytest.raises(AssertionError, match="gradient of weight="):
        assert_same_as_torch(_scaled(wrong_weight_grad=True), reference, x, weight=torch.randn(3, requires_grad=True))
