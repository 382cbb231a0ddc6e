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

from ._apply import FLOAT32_ON_CUDA, INPUT, apply


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


# ---------------------------------------------------------------------------------------------
# gumbel_softmax: y = softmax((x + g) / tau), g = -log(e), e ~ Exponential(1) (g ~ Gumbel(0, 1))
#
# The noise g is drawn outside the Function, exactly as torch draws it, so the same seed gives
# torch's samples; inside, it is a constant. With z = (x + g) / tau, dz/dx = I / tau, so the
# backward is softmax's, divided by tau. hard=True: the output is the one-hot y_hard of the
# argmax, formed as torch's y_hard - y_soft + y_soft (straight through: the gradient is y_soft's).

def gumbel_softmax_forward(x, g, tau, dim):
    # z = (x + g) / tau                                    (*) like x
    # y = softmax(z)                                       (*) like x
    # (torch's softmax kernel, as torch's gumbel_softmax calls it: the same samples to the bit)
    return ((x + g) / tau).softmax(dim)


def gumbel_softmax_backward(dy, y, tau, dim):
    # dz = y * (dy - sum(dy * y))                          (*) like y
    # dx = dz / tau                                        (*) like y
    return softmax_backward(dy, y, dim).div_(tau)


class GumbelSoftmaxFunction(torch.autograd.Function):
    """y_soft = softmax((x + g) / tau) for drawn Gumbel noise g (no gradient)."""
    autocast = FLOAT32_ON_CUDA  # autocast: softmax's policy (float32 on CUDA, input dtype on CPU)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, g, tau, dim):
        return gumbel_softmax_forward(x, g, tau, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.tau, ctx.dim = inputs[2], inputs[3]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = gumbel_softmax_backward(dy, y, ctx.tau, ctx.dim) if ctx.needs_input_grad[0] else None
        return dx, None, None, None

    @staticmethod
    def jvp(ctx, dx, _g, _tau, _dim):
        (y,) = ctx.saved_tensors
        # J is symmetric: dy = softmax_jvp(dx / tau)
        return softmax_jvp(dx / ctx.tau, y, ctx.dim)


class StraightThroughFunction(torch.autograd.Function):
    """hard=True: the one-hot of y_soft's argmax along dim, formed as torch forms it,
    y_hard - y_soft + y_soft (so the values are torch's to the bit); the gradient passes straight
    through to y_soft: dy_soft = dy."""
    autocast = INPUT  # autocast: in the input's dtype (no arithmetic to speak of)
    generate_vmap_rule = True

    @staticmethod
    def forward(y_soft, dim):
        index = y_soft.max(dim, keepdim=True)[1]
        y_hard = torch.zeros_like(y_soft, memory_format=torch.legacy_contiguous_format).scatter_(dim, index, 1.0)
        return y_hard - y_soft + y_soft

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, dy):
        # d(y_hard - y_soft.detach() + y_soft) / dy_soft = I: dy_soft = dy   (*) like y_soft
        return dy, None

    @staticmethod
    def jvp(ctx, dx, _dim):
        return dx


def gumbel_softmax(logits, tau=1, hard=False, eps=1e-10, dim=-1):
    """Drop-in for ``torch.nn.functional.gumbel_softmax``: torch's noise under the same seed,
    softmax's backward (divided by tau); ``hard=True`` is straight through."""
    if eps != 1e-10:
        warnings.warn("`eps` parameter is deprecated and has no effect.", stacklevel=2)
    # g ~ Gumbel(0, 1): torch's draw, in torch's order and layout
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()
    y_soft = apply(GumbelSoftmaxFunction, logits, gumbels, tau, dim)
    return apply(StraightThroughFunction, y_soft, dim) if hard else y_soft
