"""softmax and log_softmax along one dim.

    softmax:      y_i = exp(x_i - m) / sum_j exp(x_j - m)         m = max_j x_j
    log_softmax:  y_i = x_i - m - log(sum_j exp(x_j - m))

Subtracting the row max m changes nothing mathematically and keeps exp from overflowing.

Both backwards are written in terms of the output y, which is what gets saved: the output
stays connected to the graph, so double backward differentiates through it (an intermediate
such as exp(x - m) computed inside forward would be a constant there).

    softmax:      J = diag(y) - y y^T        (symmetric)   dx = y * (dy - sum(dy * y))
    log_softmax:  J = I - 1 softmax^T                      dx = dy - exp(y) * sum(dy)
                                                           jvp = dx - sum(exp(y) * dx)

A row that is all -inf has m = -inf and x - m = nan, so its output and gradient are nan,
exactly as torch's kernels give.
"""
import warnings

import torch

from ._apply import FLOAT32_ON_CUDA, apply


def _get_softmax_dim(name, ndim, stacklevel):
    """torch's legacy implicit dim (torch.nn.functional._get_softmax_dim), warning included."""
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _cast_input(x, dtype, name):
    """torch casts the input to ``dtype`` first, and computes only in floating types."""
    if dtype is not None:
        x = x.to(dtype)
    if not x.is_floating_point():
        # torch's kernels raise NotImplementedError for integer, bool and complex input.
        raise NotImplementedError(f"{name}: expected a floating point input or dtype, got {x.dtype}")
    return x


def _row_max(x, dim):
    # amax refuses an empty reduction; an empty x needs no shift, and sum checks dim the same way.
    return x.amax(dim, keepdim=True) if x.numel() else x.sum(dim, keepdim=True)


# ---------------------------------------------------------------------------------------------
# softmax

def softmax_forward(x, dim):
    # z = x - max(x)                                       (*) like x
    z = x - _row_max(x, dim)
    # y = exp(z) / sum(exp(z))                             (*) like x, in place on z
    y = z.exp_()
    return y.div_(y.sum(dim, keepdim=True))


def softmax_backward(dy, y, dim):
    # t = dy * y                                           (*) like y
    t = dy * y
    # dx = y * (dy - sum(t, dim)) = t - y * sum(t, dim)    (*) like y, fused, in place on t
    return t.addcmul_(y, t.sum(dim, keepdim=True), value=-1)


# J is symmetric, so the jvp is the same formula with the tangent dx in place of dy.
softmax_jvp = softmax_backward


class SoftmaxFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CUDA  # autocast: float32 on CUDA, input dtype on CPU (torch's lists)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim, dtype):
        return softmax_forward(_cast_input(x, dtype, "softmax"), dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dim, _ = inputs
        ctx.dim = dim
        ctx.input_dtype = x.dtype
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (y,) = ctx.saved_tensors
        # With dtype=..., y is in that dtype; the gradient goes back in the input's dtype
        # (autograd would cast it too; explicit, so the backward is right on its own).
        return softmax_backward(dy, y, ctx.dim).to(ctx.input_dtype), None, None

    @staticmethod
    def jvp(ctx, dx, _dim, _dtype):
        (y,) = ctx.saved_tensors
        return softmax_jvp(dx.to(y.dtype), y, ctx.dim)


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    """Drop-in for ``torch.nn.functional.softmax`` with a hand-written backward."""
    if dim is None:
        dim = _get_softmax_dim("softmax", input.dim(), _stacklevel)
    return apply(SoftmaxFunction, input, dim, dtype)


# ---------------------------------------------------------------------------------------------
# log_softmax

def log_softmax_forward(x, dim):
    # z = x - max(x)                                       (*) like x
    z = x - _row_max(x, dim)
    # y = z - log(sum(exp(z)))                             (*) like x, in place on z
    return z.sub_(z.exp().sum(dim, keepdim=True).log_())


def log_softmax_backward(dy, y, dim):
    # dx = dy - softmax(x) * sum(dy, dim),  softmax(x) = exp(y)      (*) like y
    # (out of place: exp saves its result for double backward, so it must stay unmodified)
    return torch.addcmul(dy, y.exp(), dy.sum(dim, keepdim=True), value=-1)


def log_softmax_jvp(dx, y, dim):
    # dy = dx - sum(softmax(x) * dx, dim)                  (*) like y
    return dx - (y.exp() * dx).sum(dim, keepdim=True)


class LogSoftmaxFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CUDA  # autocast: float32 on CUDA, input dtype on CPU (torch's lists)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim, dtype):
        return log_softmax_forward(_cast_input(x, dtype, "log_softmax"), dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dim, _ = inputs
        ctx.dim = dim
        ctx.input_dtype = x.dtype
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (y,) = ctx.saved_tensors
        return log_softmax_backward(dy, y, ctx.dim).to(ctx.input_dtype), None, None

    @staticmethod
    def jvp(ctx, dx, _dim, _dtype):
        (y,) = ctx.saved_tensors
        return log_softmax_jvp(dx.to(y.dtype), y, ctx.dim)


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """Drop-in for ``torch.nn.functional.log_softmax`` with a hand-written backward."""
    if dim is None:
        dim = _get_softmax_dim("log_softmax", input.dim(), _stacklevel)
    return apply(LogSoftmaxFunction, input, dim, dtype)
