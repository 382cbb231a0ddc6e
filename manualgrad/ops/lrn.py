"""Local response normalization: each channel divided by a power of the sum of squares of the
channels in a window around it.

    x (N, C, *)      s = A x^2 (over channels),  A (C, C) the 0/1 window matrix
    d = k + (alpha / size) s,   y = x d^(-beta)                           like x

    local_response_norm  A[c, j] = 1 for c - size//2 <= j <= c + (size-1)//2    (torch's zero-padded
                         average over a window of size channels)
    CrossMapLRN2d        A[c, j] = 1 for |j - c| <= p - 1,  p = (size-1)//2 + 1, and A[c, 0] = 1 for c >= p
                         (torch's module, torch/nn/modules/_functions.py: a running window sum whose
                         removal of channel 0 is one step late and never happens, so channel 0 stays
                         in every later window; reproduced, since its outputs are what its users trained on)

Backward (d_c depends on x_j for A[c, j] = 1):

    dy_c/dx_i = delta_ci d_c^(-beta) - beta x_c d_c^(-beta-1) (alpha / size) A[c, i] 2 x_i
    dx = dy d^(-beta) - (2 alpha beta / size) x A^T (dy y / d)          (x_c d_c^(-beta-1) = y_c / d_c)

torch's CrossMapLRN2d.backward is not the gradient of its forward (its window is off by one
channel and assumes no channel 0 artifact; gradcheck fails on it for C > 1, and it raises for
size 1): here the gradient is that of the forward above, checked by finite differences.
"""
import math

import torch

from ._apply import FLOAT32, FLOAT32_ON_CUDA, INPUT, apply


def local_response_window(c, size, like):
    """A (C, C): A[c, j] = 1 for c - size//2 <= j <= c + (size-1)//2, in like's dtype and device."""
    i = torch.arange(c, device=like.device)
    # off[c, j] = j - c
    off = i.view(1, -1) - i.view(-1, 1)
    return ((off >= -(size // 2)) & (off <= (size - 1) // 2)).to(like.dtype)


def cross_map_window(c, size, like):
    """A (C, C) of torch's CrossMapLRN2d: |j - c| <= p - 1, and channel 0 in every window from c = p on."""
    p = (size - 1) // 2 + 1
    i = torch.arange(c, device=like.device)
    off = i.view(1, -1) - i.view(-1, 1)
    a = off.abs() <= p - 1
    a[p:, :1] = True  # (:1, not 0: C may be 0)
    return a.to(like.dtype)


def _denominator(x, a, size, alpha, k):
    # x as (N, C, M): s = A x^2,  d = k + (alpha / size) s                (N, C, M)
    x3 = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))  # (not -1: x may have no elements)
    return (a @ x3.square()).mul(alpha / size).add(k), x3


def lrn_forward(x, a, size, alpha, beta, k):
    """y = x d^(-beta), d = k + (alpha / size) A x^2 over channels."""
    d, x3 = _denominator(x, a, size, alpha, k)
    # y = x d^(-beta)                                         like x
    return (x3 * d.pow(-beta)).view(x.shape)


def lrn_backward(dy, x, a, size, alpha, beta, k):
    d, x3 = _denominator(x, a, size, alpha, k)
    dy3 = dy.reshape(x3.shape)
    # p = d^(-beta)                                           (N, C, M)
    p = d.pow(-beta)
    # q = dy x d^(-beta-1) = dy y / d                          (N, C, M)
    q = dy3 * x3 * p / d
    # dx = dy d^(-beta) - (2 alpha beta / size) x A^T q        (N, C, M) -> like x
    return (dy3 * p - (2 * alpha * beta / size) * x3 * (a.t() @ q)).view(x.shape)


def lrn_jvp(dx, x, a, size, alpha, beta, k):
    d, x3 = _denominator(x, a, size, alpha, k)
    dx3 = dx.reshape(x3.shape)
    p = d.pow(-beta)
    # dd = (alpha / size) A (2 x dx)                            (N, C, M)
    dd = (a @ (2 * x3 * dx3)).mul(alpha / size)
    # dy = dx d^(-beta) - beta x d^(-beta-1) dd                 like x
    return (dx3 * p - beta * x3 * p / d * dd).view(x.shape)


class LRNFunction(torch.autograd.Function):
    """apply(x, window, size, alpha, beta, k); window(C, size, like) -> A. The pair above, A built in
    forward, backward and jvp from x's channel count."""
    # autocast (local_response_norm of 3-d inputs): torch's composite runs avg_pool2d in the input
    # dtype on CPU; on CUDA its pow is on the float32 list
    autocast = FLOAT32_ON_CUDA
    generate_vmap_rule = True

    @staticmethod
    def forward(x, window, size, alpha, beta, k):
        return lrn_forward(x, window(x.shape[1], size, x), size, alpha, beta, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, window, size, alpha, beta, k = inputs
        ctx.args = (window, size, alpha, beta, k)
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        window, size, alpha, beta, k = ctx.args
        return lrn_backward(dy, x, window(x.shape[1], size, x), size, alpha, beta, k), None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        (x,) = ctx.saved_tensors
        window, size, alpha, beta, k = ctx.args
        return lrn_jvp(dx, x, window(x.shape[1], size, x), size, alpha, beta, k)


class LRNPool3dFunction(LRNFunction):
    # autocast (local_response_norm of 4-d and larger inputs): torch's composite runs avg_pool3d,
    # on torch's CPU float32 list (so its output is float32), and pow on the CUDA one
    autocast = FLOAT32


class CrossMapLRN2dFunction(LRNFunction):
    autocast = INPUT  # autocast: torch's CrossMapLRN2d is a Python Function of out= ops, never cast


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """Drop-in for ``torch.nn.functional.local_response_norm`` with a hand-written backward.

    y = x / (k + alpha / size * sum of x^2 over the size channels around each)^beta, the window
    taking size//2 channels before and (size-1)//2 after (zeros past the ends).
    """
    dim = input.dim()
    if dim < 3:
        raise ValueError(f"Expected 3D or higher dimensionality input (got {dim} dimensions)")
    if not isinstance(size, int):
        raise TypeError(f"local_response_norm: size must be an int, got {type(size).__name__}")
    if size <= 0:
        raise RuntimeError(f"local_response_norm: kernel size should be greater than zero, but got size {size}")
    fn = LRNFunction if dim == 3 else LRNPool3dFunction
    return apply(fn, input, local_response_window, size, alpha, beta, k)


def cross_map_lrn2d(input, size, alpha=1e-4, beta=0.75, k=1):
    """torch.nn.CrossMapLRN2d's computation (x (N, C, H, W); see the window above) with the
    gradient of that computation."""
    if input.dim() != 4:
        raise ValueError(f"CrossMapLRN2d: Expected input to be 4D, got {input.dim()}D instead.")
    if size == 0:
        raise ZeroDivisionError("CrossMapLRN2d: size 0 (alpha / size)")  # torch's own error for it
    if not isinstance(size, int) or size < 0:
        # (torch computes something for these; nothing meaningful)
        raise ValueError(f"CrossMapLRN2d: size must be a positive int, got {size!r}")
    return apply(CrossMapLRN2dFunction, input, cross_map_window, size, alpha, beta, k)
