"""Elementwise activations: y = f(x), dx = dy * f'(x).

Every op here is elementwise, so its vmap rule is the op itself on the batched tensor (the
batch dim passes through untouched). That rule, unlike ``generate_vmap_rule``, also serves
``inplace=True``, where the Function marks its input dirty and returns it; ops without
``inplace`` use ``generate_vmap_rule``.

In-place variants (``inplace=True``) overwrite x with y, so their backward is written in
terms of y. Where y does not determine f'(x), torch refuses (leaky_relu / elu with a
negative slope: backward raises RuntimeError) or keeps a copy of x (silu: see SiLUFunction).
"""
import math

import torch
import torch.autograd.forward_ad as fwAD

from ..memory import recipe_of, tag
from ._apply import FLOAT32_ON_CUDA, INPUT, apply
from ._checks import can_write_inplace


# ---------------------------------------------------------------------------------------------
# relu: y = max(x, 0)

def relu_forward(x, inplace=False):
    return x.clamp_min_(0) if inplace else x.clamp_min(0)


def relu_backward(dy, y):
    # dx = dy * 1[x > 0] = dy * sign(y), as y = max(x, 0) >= 0 has sign 0 or 1, and dy where
    # x is nan (torch's rule, y <= 0 ? 0 : dy, sends nan to dy): nan counts as 1   (*) like x
    # (sign stays in y's dtype: a bool mask `y > 0` costs a slow compare and a cast on CPU)
    s = _relu_step(y)
    return s.mul_(dy) if can_write_inplace(s, dy) else dy * s


def _relu_step(y):
    # 1.0 where y > 0 or y is nan, 0.0 where y = 0 (y = relu(x))       (*) like y
    return y.nan_to_num(1.0).sign_()


class ReLUFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    @staticmethod
    def forward(x, inplace):
        y = relu_forward(x, inplace)
        return x if inplace else y  # in place: the input object itself (Dynamo checks that)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, inplace = inputs
        ctx.inplace = inplace
        if inplace:
            ctx.mark_dirty(x)
        # lean(): relu of a tagged input (relu(batch_norm(x)), say) is that input's recipe, then relu
        r = recipe_of(x, since=1 if inplace else 0)  # in place, forward wrote x once
        if r is not None:
            tag(ctx, output, relu, r, inplace, inplace=inplace)
        # y, not x: the next layer usually saves y too, so the two share one storage.
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return relu_backward(dy, y), None

    @staticmethod
    def jvp(ctx, dx, _):
        (y,) = ctx.saved_tensors
        # An in-place op must update its input's tangent in place too.
        return dx.mul_(_relu_step(y)) if ctx.inplace else relu_backward(dx, y)

    @staticmethod
    def vmap(info, in_dims, x, inplace):
        return ReLUFunction.apply(x, inplace), in_dims[0]


def relu(input, inplace=False):
    """Drop-in for ``torch.nn.functional.relu``."""
    return apply(ReLUFunction, input, inplace)


# ---------------------------------------------------------------------------------------------
# The ops below take their forward values from torch's fused elementwise kernels (one pass, and
# bit-for-bit torch's numbers); their backward and jvp are written here from the formulas.
#
# Speed notes for the backward helpers (CPU, torch 2.13, measured): torch.where is ~50x slower than a multiply,
# so a branch is a lerp with a 0/1 weight (exact: lerp(a, b, 0) = a, lerp(a, b, 1) = b), and
# each fresh temporary costs an allocation, so a chain reuses one buffer with in-place ops. Those
# stay correct under double backward (autograd keeps what an in-place op overwrites) as long as
# no in-place op touches a tensor some op saved as its *output* (exp, tanh, sigmoid results), and
# under vmap as long as the buffer written is batched like its operands: so dy (batched on its
# own in batched-gradient checks) only ever enters through an out-of-place op.


def _step(t, at=0.0):
    """1.0 where t > at, else 0.0 (also where t is nan, as t > at is False there).

    Piecewise constant: its derivative is zero, and it is left attached to t's graph (sign's
    derivative is zero) so that under double backward a parameter reached only through the
    step gets a zero gradient, as torch gives, not None (an optimizer skips a None)."""
    return (t - at).sign_().clamp_min_(0) if at else t.sign().clamp_min_(0)


def _step_nan_high(t):
    """1.0 where t > 0 or t is nan, else 0.0: the second branch of torch's ``t <= 0 ? a : b``,
    which a nan takes (elu's rule). Zero derivative, attached to t's graph, as _step."""
    return t.nan_to_num(1.0).sign_().clamp_min_(0)


_CHUNK = 1 << 17


def _chunked(body, dy, x):
    """dx = body applied chunk by chunk, for a plain backward (no graph, no transform).

    ``body(out, tmp, x, dy)`` writes dx for one flat chunk into ``out`` using one scratch buffer
    ``tmp``. Only dx is allocated in full: a fresh CPU tensor costs page faults, several times an
    in-place pass over it, and chunks the size of the cache keep the chain of passes there."""
    xf, dyf = x.reshape(-1), dy.reshape(-1)
    n = xf.numel()
    out = torch.empty_like(xf)
    tmp = torch.empty(min(n, _CHUNK), dtype=x.dtype, device=x.device)
    for i in range(0, n, _CHUNK):
        j = min(n, i + _CHUNK)
        body(out[i:j], tmp[: j - i], xf[i:j], dyf[i:j])
    return out.view(x.shape)


def _ones(t):
    # lerp's end 1, broadcast like t without a copy
    return t.new_ones(()).expand_as(t)


def _step_into(out, t, at=0.0):
    # out = 1.0 where t > at, else 0.0 (0.0 where t is nan): _step without an allocation
    (torch.sub(t, at, out=out) if at else torch.sign(t, out=out)).sign_().clamp_min_(0)
    return out


def _step_nan_high_into(out, t):
    # out = 1.0 where t > 0 or t is nan, else 0.0: _step_nan_high without an allocation
    return torch.nan_to_num(t, 1.0, out=out).sign_().clamp_min_(0)


def _plain(dy, x):
    # a plain backward whose chunks line up: dy is x's shape
    return can_write_inplace(dy, x) and dy.shape == x.shape


def _inplace_negative_slope_error(op, name, value):
    # torch raises the same RuntimeError, from backward (or from forward-mode AD), not from forward.
    return RuntimeError(
        f"in-place {op} backward is not supported with a negative {name} ({name}={value}): the overwritten "
        f"input cannot be recovered from the output, whose sign no longer says where x > 0. "
        f"Call {op} with inplace=False."
    )


# ---------------------------------------------------------------------------------------------
# leaky_relu: y = x if x > 0 else negative_slope * x

def leaky_relu_forward(x, negative_slope=0.01, inplace=False):
    return torch.nn.functional.leaky_relu(x, negative_slope, inplace)


def leaky_relu_backward(dy, t, negative_slope):
    """t is x, or y when negative_slope >= 0 (then y > 0 exactly where x > 0)."""
    if _plain(dy, t):
        return _chunked(lambda out, tmp, t, dy: _step_into(out, t).mul_(1 - negative_slope).add_(negative_slope).mul_(dy), dy, t)
    # dx = dy where x > 0, else negative_slope * dy            (*) like x
    return torch.lerp(dy * negative_slope, dy, _step(t))


class LeakyReLUFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    @staticmethod
    def forward(x, negative_slope, inplace):
        y = leaky_relu_forward(x, negative_slope, inplace)
        return x if inplace else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, negative_slope, inplace = inputs
        ctx.negative_slope, ctx.inplace = negative_slope, inplace
        if inplace:
            ctx.mark_dirty(x)
        # Like relu, save y when its sign says where x > 0; a negative slope flips the sign of
        # y for x < 0, so then x is needed, which in-place has overwritten (see backward).
        t = output if inplace or negative_slope >= 0 else x
        ctx.save_for_backward(t)
        ctx.save_for_forward(t)

    @staticmethod
    def _grad(ctx, dy):
        (t,) = ctx.saved_tensors
        if ctx.inplace and ctx.negative_slope < 0:
            raise _inplace_negative_slope_error("leaky_relu", "negative_slope", ctx.negative_slope)
        return leaky_relu_backward(dy, t, ctx.negative_slope)

    @staticmethod
    def backward(ctx, dy):
        return LeakyReLUFunction._grad(ctx, dy), None, None

    @staticmethod
    def jvp(ctx, dx, _slope, _inplace):
        dy = LeakyReLUFunction._grad(ctx, dx)
        # An in-place op must update its input's tangent in place too.
        return dx.copy_(dy) if ctx.inplace else dy

    @staticmethod
    def vmap(info, in_dims, x, negative_slope, inplace):
        return LeakyReLUFunction.apply(x, negative_slope, inplace), in_dims[0]


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """Drop-in for ``torch.nn.functional.leaky_relu``.

    ``inplace=True`` with ``negative_slope < 0`` runs, but its backward raises RuntimeError, as torch's does.
    """
    return apply(LeakyReLUFunction, input, negative_slope, inplace)


# ---------------------------------------------------------------------------------------------
# elu: y = x if x > 0 else alpha * (exp(x) - 1)

def elu_forward(x, alpha=1.0, inplace=False):
    return torch.nn.functional.elu(x, alpha, inplace)


def _elu_body(alpha):
    def body(out, tmp, x, dy):
        # tmp = alpha exp(min(x, 0)) (1 where x is nan),  out = 1[x > 0 or x nan]   (chunk)
        torch.nan_to_num(x, 0.0, out=tmp).clamp_max_(0).exp_().mul_(alpha)
        _step_nan_high_into(out, x)
        # dx = dy where x > 0 or x is nan (torch's x <= 0 ? ... : dy), else dy alpha e^x   (chunk)
        torch.mul(tmp.lerp_(_ones(tmp), out), dy, out=out)
    return body


def elu_backward(dy, x, alpha):
    if _plain(dy, x):
        return _chunked(_elu_body(alpha), dy, x)
    # e = exp(min(x, 0)): e^x where it is used (x <= 0), finite where not (nan included), else
    # double backward would get 0 * inf = nan there, and lerp a nan it weighs by 0   (*) like x
    e = x.nan_to_num(0.0).clamp_max_(0).exp_()
    # dx = dy where x > 0 or x is nan (torch's x <= 0 ? ... : dy), else dy * alpha * e^x   (*)
    return torch.lerp((dy * e).mul_(alpha), dy, _step_nan_high(x))


def elu_backward_from_output(dy, y, alpha):
    """For in-place elu, from y alone: needs alpha >= 0 (then y > 0 exactly where x > 0).

    Less precise than elu_backward for very negative x in float32 (y + alpha cancels), as torch's is.
    """
    # dx = dy where y > 0 or y is nan, else dy * (y + alpha)   (alpha e^x = y + alpha for x <= 0;
    # min(y, 0) there, so that the unused branch stays finite for y = inf or nan)   (*) like x
    return torch.lerp(dy * (y.nan_to_num(0.0).clamp_max(0) + alpha), dy, _step_nan_high(y))


class ELUFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    @staticmethod
    def forward(x, alpha, inplace):
        y = elu_forward(x, alpha, inplace)
        return x if inplace else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, alpha, inplace = inputs
        ctx.alpha, ctx.inplace = alpha, inplace
        if inplace:
            ctx.mark_dirty(x)
        # Out of place, x, as torch does: alpha exp(x) is exact where y + alpha cancels in float32.
        t = output if inplace else x
        ctx.save_for_backward(t)
        ctx.save_for_forward(t)

    @staticmethod
    def _grad(ctx, dy):
        (t,) = ctx.saved_tensors
        if not ctx.inplace:
            return elu_backward(dy, t, ctx.alpha)
        if ctx.alpha < 0:
            raise _inplace_negative_slope_error("elu", "alpha", ctx.alpha)
        return elu_backward_from_output(dy, t, ctx.alpha)

    @staticmethod
    def backward(ctx, dy):
        return ELUFunction._grad(ctx, dy), None, None

    @staticmethod
    def jvp(ctx, dx, _alpha, _inplace):
        dy = ELUFunction._grad(ctx, dx)
        return dx.copy_(dy) if ctx.inplace else dy

    @staticmethod
    def vmap(info, in_dims, x, alpha, inplace):
        return ELUFunction.apply(x, alpha, inplace), in_dims[0]


def elu(input, alpha=1.0, inplace=False):
    """Drop-in for ``torch.nn.functional.elu``.

    ``inplace=True`` with ``alpha < 0`` runs, but its backward raises RuntimeError, as torch's does.
    """
    return apply(ELUFunction, input, alpha, inplace)


# ---------------------------------------------------------------------------------------------
# gelu: y = x * Phi(x), Phi the standard normal CDF; or, approximate='tanh',
#       y = x/2 * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3)

_SQRT1_2 = 0.5**0.5  # 1 / sqrt(2)
_INV_SQRT_2PI = (2 * math.pi) ** -0.5  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = (2 / math.pi) ** 0.5
_GELU_C = 0.044715


def gelu_forward(x, approximate="none"):
    # torch's kernel raises RuntimeError for an approximate other than 'none' / 'tanh'
    return torch.nn.functional.gelu(x, approximate=approximate)


def _gelu_body(out, tmp, x, dy):
    # out = erf(x / sqrt 2) = 2 Phi(x) - 1,  tmp = exp(-x^2 / 2) = sqrt(2 pi) phi(x)   (chunk)
    torch.mul(x, _SQRT1_2, out=out).erf_()
    torch.mul(x, x, out=tmp).mul_(-0.5).exp_()
    # out = 2 (Phi(x) + x phi(x)) - 1                        (chunk)
    out.addcmul_(x, tmp, value=2 * _INV_SQRT_2PI)
    # dx = dy (Phi(x) + x phi(x)) = (dy + dy out) / 2        (chunk)
    torch.addcmul(dy, dy, out, out=out).mul_(0.5)


def _gelu_tanh_body(out, tmp, x, dy):
    # out = t = tanh(u), u = sqrt(2/pi) x (1 + 0.044715 x^2)   (chunk)
    torch.mul(x, x, out=out).mul_(_SQRT_2_OVER_PI * _GELU_C).add_(_SQRT_2_OVER_PI).mul_(x).tanh_()
    # tmp = 1 + x (1 - t) du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)   (chunk)
    torch.mul(x, x, out=tmp).mul_(3 * _SQRT_2_OVER_PI * _GELU_C).add_(_SQRT_2_OVER_PI).mul_(x)
    tmp.addcmul_(tmp, out, value=-1).add_(1)
    # dx = dy f'(x) = dy (1 + t)/2 tmp                       (chunk)
    out.add_(1).mul_(tmp).mul_(dy).mul_(0.5)


def gelu_backward(dy, x, approximate="none"):
    if approximate in ("none", "tanh") and _plain(dy, x):
        return _chunked(_gelu_tanh_body if approximate == "tanh" else _gelu_body, dy, x)
    if approximate == "tanh":
        x2 = x.square()
        # t = tanh(u), u = sqrt(2/pi) x (1 + 0.044715 x^2)   (*) like x
        t = torch.tanh((x2 * (_SQRT_2_OVER_PI * _GELU_C)).add_(_SQRT_2_OVER_PI).mul_(x))
        # du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)          (*)
        du = x2.mul_(3 * _SQRT_2_OVER_PI * _GELU_C).add_(_SQRT_2_OVER_PI)
        # f'(x) = (1 + t)/2 + x/2 (1 - t^2) du = (1 + t)/2 (1 + x (1 - t) du)   (*)
        d = (1 - t).mul_(x).mul_(du).add_(1).mul_(t + 1).mul_(0.5)
        # dx = dy f'(x)                                      (*)
        return dy * d
    # f'(x) = Phi(x) + x phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2,
    #                            phi(x) = exp(-x^2 / 2) / sqrt(2 pi)                   (*) like x
    # (add_ rather than addcmul_: vmap has no batching rule for addcmul_ and would loop per sample)
    x_phi = x * x.square().mul_(-0.5).exp_()
    d = torch.erf(x * _SQRT1_2).add_(1).mul_(0.5).add_(x_phi, alpha=_INV_SQRT_2PI)
    # dx = dy f'(x)                                          (*)
    return dy * d


class GELUFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, approximate):
        return gelu_forward(x, approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, approximate = inputs
        ctx.approximate = approximate
        tag(ctx, output, gelu, x, approximate)  # lean(): y recomputed from the kept x
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return gelu_backward(dy, x, ctx.approximate), None

    @staticmethod
    def jvp(ctx, dx, _):
        (x,) = ctx.saved_tensors
        return gelu_backward(dx, x, ctx.approximate)


def gelu(input, approximate="none"):
    """Drop-in for ``torch.nn.functional.gelu``."""
    return apply(GELUFunction, input, approximate)


# ---------------------------------------------------------------------------------------------
# silu: y = x * sigmoid(x)

def silu_forward(x, inplace=False):
    return torch.nn.functional.silu(x, inplace)


def _silu_body(out, tmp, x, dy):
    # f'(x) = s + x s (1 - s) = lerp(s, 1, x s),  s = sigmoid(x)   (chunk)
    torch.sigmoid(x, out=out)
    out.lerp_(_ones(out), torch.mul(x, out, out=tmp))
    # dx = dy f'(x)                                           (chunk)
    out.mul_(dy)


def silu_backward(dy, x):
    if _plain(dy, x):
        return _chunked(_silu_body, dy, x)
    s = torch.sigmoid(x)
    # f'(x) = s + x s (1 - s) = s (1 + x (1 - s)),  s = sigmoid(x)   (*) like x
    d = (1 - s).mul_(x).add_(1).mul_(s)
    # dx = dy f'(x)                                           (*)
    return dy * d


_SILU_NO_COPY = "silu(inplace=True) needs a connected copy of its input: call it through manualgrad.functional.silu"


class SiLUFunction(torch.autograd.Function):
    """``apply(x, inplace, x0)``. In-place, y overwrites x, and y does not determine x, so
    backward needs ``x0``: a copy of x made by a differentiable clone *before* the call, passed
    in as an input so that it stays connected to the graph (a copy made inside forward would
    be a constant for double backward). The gradient goes to x0 (and through the clone to x's
    history); the overwritten x gets None. Out of place, x0 is None and x is saved.
    """
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)

    @staticmethod
    def forward(x, inplace, x0):
        y = silu_forward(x, inplace)
        return x if inplace else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, inplace, x0 = inputs
        ctx.inplace = inplace
        ctx.overwrote_a_view = inplace and x._is_view()
        if inplace:
            ctx.mark_dirty(x)
        else:
            x0 = x
            tag(ctx, output, silu, x)  # lean(): y recomputed from the kept x
        ctx.save_for_backward(x0)
        ctx.save_for_forward(x0)

    @staticmethod
    def backward(ctx, dy):
        (x0,) = ctx.saved_tensors
        if ctx.inplace:
            if x0 is None:
                raise RuntimeError(_SILU_NO_COPY)
            # the gradient goes to the connected copy x0; the overwritten x gets none
            return _overwritten(ctx, dy), None, (silu_backward(dy, x0) if ctx.needs_input_grad[2] else None)
        return silu_backward(dy, x0), None, None

    @staticmethod
    def jvp(ctx, dx, _, dx0):
        (x0,) = ctx.saved_tensors
        if not ctx.inplace:
            return silu_backward(dx, x0)
        if x0 is None or dx0 is None:
            raise RuntimeError(_SILU_NO_COPY)
        return dx.copy_(silu_backward(dx0, x0))

    @staticmethod
    def vmap(info, in_dims, x, inplace, x0):
        if x0 is not None and in_dims[2] != in_dims[0]:
            # x0 is a clone of x, so batched like x: only its batch dim's position may differ.
            x0 = x0.movedim(in_dims[2], in_dims[0])
        return SiLUFunction.apply(x, inplace, x0), in_dims[0]


def _overwritten(ctx, dy):
    """The gradient of the input an in-place op overwrote: nothing of its old values reaches y
    (backward goes through the copy x0), so None; but zeros for a view, because autograd drops
    the gradient of the view's whole base (outside the view too) when a Function that wrote
    into the view returns None for it."""
    return torch.zeros_like(dy) if ctx.overwrote_a_view and ctx.needs_input_grad[0] else None


def _tracks_gradients(t):
    """Whether some autograd mode (reverse, forward, or a torch.func transform) follows t."""
    return (
        (t.requires_grad and torch.is_grad_enabled())
        or torch._C._functorch.is_functorch_wrapped_tensor(t)
        or fwAD.unpack_dual(t).tangent is not None
    )


def silu(input, inplace=False):
    """Drop-in for ``torch.nn.functional.silu``.

    In-place, when a gradient may be needed, a differentiable clone of the input is kept for
    backward (torch's own silu_ keeps a copy of the input too).
    """
    x0 = input.clone() if inplace and _tracks_gradients(input) else None
    return apply(SiLUFunction, input, inplace, x0)


# ---------------------------------------------------------------------------------------------
# tanh: y = tanh(x)

def tanh_forward(x):
    return torch.tanh(x)


def tanh_backward(dy, y):
    # dx = dy (1 - y^2)                                       (*) like x
    return dy * y.square().neg_().add_(1)


class TanhFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return tanh_forward(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return tanh_backward(dy, y)

    @staticmethod
    def jvp(ctx, dx):
        (y,) = ctx.saved_tensors
        return tanh_backward(dx, y)


def tanh(input):
    """Drop-in for ``torch.nn.functional.tanh``."""
    return apply(TanhFunction, input)


# ---------------------------------------------------------------------------------------------
# sigmoid: y = 1 / (1 + exp(-x))

def sigmoid_forward(x):
    return torch.sigmoid(x)


def sigmoid_backward(dy, y):
    # dx = dy y (1 - y)                                       (*) like x
    return (dy * y).mul_(1 - y)


class SigmoidFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return sigmoid_forward(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return sigmoid_backward(dy, y)

    @staticmethod
    def jvp(ctx, dx):
        (y,) = ctx.saved_tensors
        return sigmoid_backward(dx, y)


def sigmoid(input):
    """Drop-in for ``torch.nn.functional.sigmoid``."""
    return apply(SigmoidFunction, input)


# ---------------------------------------------------------------------------------------------
# softplus: y = log(1 + exp(beta x)) / beta where beta x <= threshold, else x

def softplus_forward(x, beta=1.0, threshold=20.0):
    return torch.nn.functional.softplus(x, beta, threshold)


def _softplus_body(beta, threshold):
    def body(out, tmp, x, dy):
        # out = sigmoid(beta x),  tmp = 1[beta x > threshold]   (chunk)
        torch.sigmoid(torch.mul(x, beta, out=tmp), out=out)
        _step_into(tmp, tmp, threshold)
        # dx = dy where beta x > threshold, else dy sigmoid(beta x)   (chunk)
        out.lerp_(_ones(out), tmp).mul_(dy)
    return body


def softplus_backward(dy, x, beta, threshold):
    if _plain(dy, x):
        return _chunked(_softplus_body(beta, threshold), dy, x)
    bx = x * beta
    # dx = dy where beta x > threshold (y = x there), else dy sigmoid(beta x)   (*) like x
    return torch.lerp(dy * torch.sigmoid(bx), dy, _step(bx, threshold))


class SoftplusFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CUDA  # autocast: float32 on CUDA, input dtype on CPU (torch's lists)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, beta, threshold):
        return softplus_forward(x, beta, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, beta, threshold = inputs
        ctx.beta, ctx.threshold = beta, threshold
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return softplus_backward(dy, x, ctx.beta, ctx.threshold), None, None

    @staticmethod
    def jvp(ctx, dx, _beta, _threshold):
        (x,) = ctx.saved_tensors
        return softplus_backward(dx, x, ctx.beta, ctx.threshold)


def softplus(input, beta=1.0, threshold=20.0):
    """Drop-in for ``torch.nn.functional.softplus``."""
    return apply(SoftplusFunction, input, beta, threshold)


# ---------------------------------------------------------------------------------------------
# hardswish: y = x * relu6(x + 3) / 6,  and  mish: y = x * tanh(softplus(x))
#
# Neither output determines its input (both dip below zero and come back), so in place they
# keep a connected copy x0 of the input, as silu does (see SiLUFunction): torch's hardswish_ and
# mish_ keep a copy of the input too.

def hardswish_forward(x, inplace=False):
    return torch.nn.functional.hardswish(x, inplace)


def hardswish_backward(dy, x):
    # f'(x) = 0 for x <= -3, x / 3 + 1/2 for -3 < x < 3, 1 for x >= 3 and for nan (torch's values
    # at the kinks; its rule, x < 3 ? ... : 1, sends nan to 1)   (*) like x
    above = 1 - _step(-x, -3.0)  # 1.0 where x >= 3 or x is nan
    # the middle piece, finite everywhere (x = +-inf or nan would make lerp's weight-0 end nan)
    mid = (x.nan_to_num(0.0).clamp(-3.0, 3.0) * (1 / 3)).add_(0.5).mul_(_step(x, -3.0))
    d = torch.lerp(mid, torch.ones_like(x), above)
    # dx = dy f'(x)                                           (*)
    return dy * d


def mish_forward(x, inplace=False):
    return torch.nn.functional.mish(x, inplace)


def mish_backward(dy, x):
    # t = tanh(softplus(x)),  s = sigmoid(x) = d softplus / dx                          (*) like x
    t = torch.tanh(torch.nn.functional.softplus(x))
    s = torch.sigmoid(x)
    # f'(x) = t + x s (1 - t^2)                               (*)
    # (t and s are outputs tanh / sigmoid save: only fresh temporaries are updated in place)
    d = (t * t).neg_().add_(1).mul_(s).mul_(x).add_(t)
    # dx = dy f'(x)                                           (*)
    return dy * d


class _CopyInplaceFunction(torch.autograd.Function):
    """``apply(x, inplace, x0)`` for y = f(x) whose output does not determine x: out of
    place, x is saved; in place, ``x0``, a differentiable clone of x made before the call
    (see SiLUFunction). Subclasses set ``_forward``, ``_backward`` (pure functions) and ``_name``."""
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)

    @classmethod
    def forward(cls, x, inplace, x0):
        y = cls._forward(x, inplace)
        return x if inplace else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, inplace, x0 = inputs
        ctx.inplace = inplace
        ctx.overwrote_a_view = inplace and x._is_view()
        if inplace:
            ctx.mark_dirty(x)
        else:
            x0 = x
        ctx.save_for_backward(x0)
        ctx.save_for_forward(x0)

    @classmethod
    def backward(cls, ctx, dy):
        (x0,) = ctx.saved_tensors
        if ctx.inplace:
            if x0 is None:
                raise RuntimeError(_SILU_NO_COPY.replace("silu", cls._name))
            return _overwritten(ctx, dy), None, (cls._backward(dy, x0) if ctx.needs_input_grad[2] else None)
        return cls._backward(dy, x0), None, None

    @classmethod
    def jvp(cls, ctx, dx, _, dx0):
        (x0,) = ctx.saved_tensors
        if not ctx.inplace:
            return cls._backward(dx, x0)
        if x0 is None or dx0 is None:
            raise RuntimeError(_SILU_NO_COPY.replace("silu", cls._name))
        return dx.copy_(cls._backward(dx0, x0))

    @classmethod
    def vmap(cls, info, in_dims, x, inplace, x0):
        if x0 is not None and in_dims[2] != in_dims[0]:
            x0 = x0.movedim(in_dims[2], in_dims[0])
        return cls.apply(x, inplace, x0), in_dims[0]


class HardswishFunction(_CopyInplaceFunction):
    _name = "hardswish"
    _forward = staticmethod(hardswish_forward)
    _backward = staticmethod(hardswish_backward)


class MishFunction(_CopyInplaceFunction):
    _name = "mish"
    _forward = staticmethod(mish_forward)
    _backward = staticmethod(mish_backward)


def hardswish(input, inplace=False):
    """Drop-in for ``torch.nn.functional.hardswish``; in place it keeps a copy of the input, as silu."""
    x0 = input.clone() if inplace and _tracks_gradients(input) else None
    return apply(HardswishFunction, input, inplace, x0)


def mish(input, inplace=False):
    """Drop-in for ``torch.nn.functional.mish``; in place it keeps a copy of the input, as silu."""
    x0 = input.clone() if inplace and _tracks_gradients(input) else None
    return apply(MishFunction, input, inplace, x0)


# ---------------------------------------------------------------------------------------------
# glu: a, b = x split in two halves along dim;  y = a * sigmoid(b)

def glu_forward(x, dim=-1):
    # torch's kernel raises for an odd or missing dim, a scalar and a non-float input
    return torch.nn.functional.glu(x, dim)


def glu_backward(dy, x, dim):
    a, b = x.chunk(2, dim)
    s = torch.sigmoid(b)
    # da = dy s                                               (*, n/2, *)
    da = dy * s
    # db = dy a s (1 - s) = da a (1 - s)                      (*, n/2, *)
    db = da * a * (1 - s)
    # dx = [da, db] along dim                                 (*, n, *) like x
    return torch.cat([da, db], dim)


def glu_jvp(dx, x, dim):
    a, b = x.chunk(2, dim)
    da, db = dx.chunk(2, dim)
    s = torch.sigmoid(b)
    # dy = da s + a s (1 - s) db                              (*, n/2, *)
    return da * s + (a * s) * (1 - s) * db


class GLUFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim):
        return glu_forward(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dim = inputs
        ctx.dim = dim
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return glu_backward(dy, x, ctx.dim), None

    @staticmethod
    def jvp(ctx, dx, _):
        (x,) = ctx.saved_tensors
        return glu_jvp(dx, x, ctx.dim)


def glu(input, dim=-1):
    """Drop-in for ``torch.nn.functional.glu``."""
    return apply(GLUFunction, input, dim)


# ---------------------------------------------------------------------------------------------
# functional in-place forms (torch.nn.functional.relu_, elu_, leaky_relu_): the Functions above
# with inplace=True (the input is overwritten and returned; backward from the output)

def relu_(input):
    """Drop-in for ``torch.nn.functional.relu_``: ``relu(input, inplace=True)``."""
    return relu(input, inplace=True)


def elu_(input, alpha=1.0):
    """Drop-in for ``torch.nn.functional.elu_``: ``elu(input, alpha, inplace=True)``."""
    return elu(input, alpha, inplace=True)


def leaky_relu_(input, negative_slope=0.01):
    """Drop-in for ``torch.nn.functional.leaky_relu_``: ``leaky_relu(input, negative_slope, inplace=True)``."""
    return leaky_relu(input, negative_slope, inplace=True)
