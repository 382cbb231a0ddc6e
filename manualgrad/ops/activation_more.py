"""The rest of torch.nn's activations: y = f(x), dx = dy * f'(x) (softmin: a Jacobian product).

Piecewise ops take torch's value of f' at the kinks and at nan: torch's kernels branch with
comparisons (``x <= min_val || x >= max_val ? 0 : dy``), and a nan fails every comparison, so it
goes down the ``else`` branch. The masks below are written with ``_at_most`` / ``_step`` so that
nan lands on that same side. Masks are piecewise constant: zero derivative, left attached to the
input's graph, so that double backward gives zeros (not None) as torch does.

prelu and rrelu (a learned or a random slope) are in ops/activation_slopes.py.

In place (``inplace=True``): where y determines f'(x) (hardtanh, relu6, selu, celu with
alpha >= 0) the backward is written in y; elsewhere (hardsigmoid, threshold) a connected
copy of x is kept, as torch's own in-place kernels keep one (see activation.SiLUFunction).
"""
import torch

from ._apply import FLOAT32_ON_CUDA, INPUT, apply
from .activation import _inplace_negative_slope_error, _overwritten, _step, _step_nan_high, _tracks_gradients
from .softmax import _cast_input, _get_softmax_dim, softmax_backward, softmax_forward


def _at_most(t, a):
    """1.0 where t <= a, else 0.0 (also where t is nan). Zero derivative, attached to t's graph."""
    # sign(a - t): 1 below a, 0 at a, -1 above (and for nan, mapped to -1 first); + 1, at most 1
    return (a - t).nan_to_num(-1.0).sign_().add_(1).clamp_max_(1)


def _inside(t, low, high):
    """1.0 where low < t < high or t is nan (torch's ``t <= low || t >= high ? 0 : 1``), else 0.0."""
    return (1 - _at_most(t, low)) * (1 - _at_most(-t, -high))


def _elementwise_vmap(fn):
    """The vmap rule of an elementwise Function: the op on the batched tensor (in place too)."""
    def vmap(info, in_dims, x, *args):
        return fn.apply(x, *args), in_dims[0]
    return staticmethod(vmap)


# ---------------------------------------------------------------------------------------------
# hardtanh: y = clamp(x, min_val, max_val);  relu6 = hardtanh(x, 0, 6)

def hardtanh_forward(x, min_val=-1.0, max_val=1.0, inplace=False):
    return torch.nn.functional.hardtanh(x, min_val, max_val, inplace)


def hardtanh_backward(dy, y, min_val, max_val):
    """From y: min < y < max exactly where min < x < max (clamp keeps x there, nan stays nan)."""
    # dx = dy where min < x < max or x is nan, else 0      (*) like x
    return dy * _inside(y, min_val, max_val)


class HardtanhFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)

    @staticmethod
    def forward(x, min_val, max_val, inplace):
        y = hardtanh_forward(x, min_val, max_val, inplace)
        return x if inplace else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.min_val, ctx.max_val, ctx.inplace = inputs
        if ctx.inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(output)  # y, in place or not (relu's reason: the next layer saves it too)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return hardtanh_backward(dy, y, ctx.min_val, ctx.max_val), None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        (y,) = ctx.saved_tensors
        # An in-place op must update its input's tangent in place too.
        mask = _inside(y, ctx.min_val, ctx.max_val)
        return dx.mul_(mask) if ctx.inplace else dx * mask


HardtanhFunction.vmap = _elementwise_vmap(HardtanhFunction)


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    """Drop-in for ``torch.nn.functional.hardtanh``."""
    if min_val > max_val:
        raise ValueError("min_val cannot be greater than max_val")
    return apply(HardtanhFunction, input, min_val, max_val, inplace)


def hardtanh_(input, min_val=-1.0, max_val=1.0):
    """Drop-in for ``torch.nn.functional.hardtanh_``."""
    return hardtanh(input, min_val, max_val, inplace=True)


def relu6(input, inplace=False):
    """Drop-in for ``torch.nn.functional.relu6``: hardtanh(x, 0, 6), as torch computes it."""
    return hardtanh(input, 0.0, 6.0, inplace)


# ---------------------------------------------------------------------------------------------
# hardsigmoid: y = relu6(x + 3) / 6

def hardsigmoid_forward(x, inplace=False):
    return torch.nn.functional.hardsigmoid(x, inplace)


def hardsigmoid_backward(dy, x):
    # f'(x) = 1/6 where -3 < x < 3, else 0 (0 at the kinks and for nan: torch's rule)   (*) like x
    d = _step(x, -3.0) * _step(-x, -3.0) * (1 / 6)
    # dx = dy f'(x)                                           (*)
    return dy * d


class HardsigmoidFunction(torch.autograd.Function):
    """``apply(x, inplace, x0)``. From x, not y: x + 3 rounds to 6 for x a few ulp below 3, where
    y = 1 but f'(x) = 1/6. So in place, a connected copy x0 of x is kept (see activation.SiLUFunction;
    torch's hardsigmoid_ keeps a copy too). Staticmethods, not activation._CopyInplaceFunction's
    classmethods, which Dynamo cannot trace without a graph break."""
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)

    @staticmethod
    def forward(x, inplace, x0):
        y = hardsigmoid_forward(x, inplace)
        return x if inplace else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.inplace, x0 = inputs
        ctx.overwrote_a_view = ctx.inplace and x._is_view()
        if ctx.inplace:
            ctx.mark_dirty(x)
        else:
            x0 = x
        ctx.save_for_backward(x0)
        ctx.save_for_forward(x0)

    @staticmethod
    def backward(ctx, dy):
        (x0,) = ctx.saved_tensors
        if not ctx.inplace:
            return hardsigmoid_backward(dy, x0), None, None
        if x0 is None:
            raise RuntimeError(_NO_COPY.format("hardsigmoid"))
        dx0 = hardsigmoid_backward(dy, x0) if ctx.needs_input_grad[2] else None
        return _overwritten(ctx, dy), None, dx0

    @staticmethod
    def jvp(ctx, dx, _inplace, dx0):
        (x0,) = ctx.saved_tensors
        if not ctx.inplace:
            return hardsigmoid_backward(dx, x0)
        if x0 is None or dx0 is None:
            raise RuntimeError(_NO_COPY.format("hardsigmoid"))
        return dx.copy_(hardsigmoid_backward(dx0, x0))

    @staticmethod
    def vmap(info, in_dims, x, inplace, x0):
        if x0 is not None and in_dims[2] != in_dims[0]:
            x0 = x0.movedim(in_dims[2], in_dims[0])  # a clone of x: batched like x
        return HardsigmoidFunction.apply(x, inplace, x0), in_dims[0]


_NO_COPY = "{0}(inplace=True) needs a connected copy of its input: call it through manualgrad.functional.{0}"


def hardsigmoid(input, inplace=False):
    """Drop-in for ``torch.nn.functional.hardsigmoid``; in place it keeps a copy of the input, as silu."""
    x0 = input.clone() if inplace and _tracks_gradients(input) else None
    return apply(HardsigmoidFunction, input, inplace, x0)


# ---------------------------------------------------------------------------------------------
# Smooth ops of x alone: logsigmoid, softsign, tanhshrink

def logsigmoid_forward(x):
    return torch.nn.functional.logsigmoid(x)


def logsigmoid_backward(dy, x):
    # y = -log(1 + e^-x):  f'(x) = e^-x / (1 + e^-x) = sigmoid(-x)   (*) like x
    return dy * torch.sigmoid(-x)


def softsign_forward(x):
    # y = x / (1 + |x|), torch's expression
    return x / (x.abs() + 1)


def softsign_backward(dy, x):
    a = x.abs() + 1
    # f'(x) = 1 / (1 + |x|)^2, written as the quotient rule gives it, (1 - |x| / (1 + |x|)) / (1 + |x|),
    # so that x = +-inf gives torch's nan (inf / inf) and not 0      (*) like x
    d = (1 - x.abs() / a) / a
    # dx = dy f'(x)                                           (*)
    return dy * d


def tanhshrink_forward(x):
    # y = x - tanh(x), torch's expression
    return x - torch.tanh(x)


def tanhshrink_backward(dy, x):
    # f'(x) = 1 - (1 - tanh(x)^2) = tanh(x)^2                 (*) like x
    return dy * torch.tanh(x).square()


def _elementwise_function(name, forward_fn, backward_fn):
    """A Function for y = forward_fn(x), x saved, dx = backward_fn(dy, x), jvp the same formula.

    Built with plain staticmethods (not classmethods on a shared base): Dynamo traces these
    without a graph break."""
    def forward(x):
        return forward_fn(x)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return backward_fn(dy, x)

    def jvp(ctx, dx):
        (x,) = ctx.saved_tensors
        return backward_fn(dx, x)

    return type(name, (torch.autograd.Function,), {
        "autocast": INPUT,  # autocast: in the input's dtype (on no autocast list)
        "generate_vmap_rule": True,
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp),
        "__module__": __name__, "__qualname__": name,
    })


LogSigmoidFunction = _elementwise_function("LogSigmoidFunction", logsigmoid_forward, logsigmoid_backward)
SoftsignFunction = _elementwise_function("SoftsignFunction", softsign_forward, softsign_backward)
TanhshrinkFunction = _elementwise_function("TanhshrinkFunction", tanhshrink_forward, tanhshrink_backward)


def logsigmoid(input):
    """Drop-in for ``torch.nn.functional.logsigmoid``."""
    return apply(LogSigmoidFunction, input)


def softsign(input):
    """Drop-in for ``torch.nn.functional.softsign``."""
    return apply(SoftsignFunction, input)


def tanhshrink(input):
    """Drop-in for ``torch.nn.functional.tanhshrink``."""
    return apply(TanhshrinkFunction, input)


# ---------------------------------------------------------------------------------------------
# softshrink: y = x - lambd sign(x) where |x| > lambd, else 0
# hardshrink: y = x where |x| > lambd, else 0
# Both: f'(x) = 1 where |x| > lambd or x is nan, else 0 (torch: -lambd <= x <= lambd ? 0 : dy)

def softshrink_forward(x, lambd=0.5):
    return torch.nn.functional.softshrink(x, lambd)  # torch raises RuntimeError for lambd < 0


def hardshrink_forward(x, lambd=0.5):
    return torch.nn.functional.hardshrink(x, lambd)


def shrink_backward(dy, x, lambd):
    # dx = dy where |x| > lambd or x is nan, else 0           (*) like x
    return dy * (1 - _at_most(x, lambd) * _at_most(-x, lambd))


def _shrink_function(name, forward_fn):
    """A Function for y = forward_fn(x, lambd), x saved (plain staticmethods, as _elementwise_function)."""
    def forward(x, lambd):
        return forward_fn(x, lambd)

    def setup_context(ctx, inputs, output):
        x, ctx.lambd = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return shrink_backward(dy, x, ctx.lambd), None

    def jvp(ctx, dx, _):
        (x,) = ctx.saved_tensors
        return shrink_backward(dx, x, ctx.lambd)

    return type(name, (torch.autograd.Function,), {
        "autocast": INPUT,  # autocast: in the input's dtype (on no autocast list)
        "generate_vmap_rule": True,
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp),
        "__module__": __name__, "__qualname__": name,
    })


SoftshrinkFunction = _shrink_function("SoftshrinkFunction", softshrink_forward)
HardshrinkFunction = _shrink_function("HardshrinkFunction", hardshrink_forward)


def softshrink(input, lambd=0.5):
    """Drop-in for ``torch.nn.functional.softshrink``."""
    return apply(SoftshrinkFunction, input, lambd)


def hardshrink(input, lambd=0.5):
    """Drop-in for ``torch.nn.functional.hardshrink``."""
    return apply(HardshrinkFunction, input, lambd)


# ---------------------------------------------------------------------------------------------
# threshold: y = x where x > threshold, else value

def threshold_forward(x, threshold, value, inplace=False):
    return torch.nn.functional.threshold(x, threshold, value, inplace)


def threshold_backward(dy, x, threshold):
    # dx = dy where x > threshold or x is nan, else 0         (*) like x
    return dy * (1 - _at_most(x, threshold))


class ThresholdFunction(torch.autograd.Function):
    """``apply(x, threshold, value, inplace, x0)``: in place, y = value does not say whether x was
    below the threshold when value > threshold, so a connected copy x0 of x is kept, as torch's
    threshold_ keeps one (see activation.SiLUFunction)."""
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)

    @staticmethod
    def forward(x, threshold, value, inplace, x0):
        y = threshold_forward(x, threshold, value, inplace)
        return x if inplace else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.threshold, _, ctx.inplace, x0 = inputs
        ctx.overwrote_a_view = ctx.inplace and x._is_view()
        if ctx.inplace:
            ctx.mark_dirty(x)
        else:
            x0 = x
        ctx.save_for_backward(x0)
        ctx.save_for_forward(x0)

    @staticmethod
    def backward(ctx, dy):
        (x0,) = ctx.saved_tensors
        if not ctx.inplace:
            return threshold_backward(dy, x0, ctx.threshold), None, None, None, None
        if x0 is None:
            raise RuntimeError(_NO_COPY.format("threshold"))
        dx0 = threshold_backward(dy, x0, ctx.threshold) if ctx.needs_input_grad[4] else None
        return _overwritten(ctx, dy), None, None, None, dx0

    @staticmethod
    def jvp(ctx, dx, _threshold, _value, _inplace, dx0):
        (x0,) = ctx.saved_tensors
        if not ctx.inplace:
            return threshold_backward(dx, x0, ctx.threshold)
        if x0 is None or dx0 is None:
            raise RuntimeError(_NO_COPY.format("threshold"))
        return dx.copy_(threshold_backward(dx0, x0, ctx.threshold))

    @staticmethod
    def vmap(info, in_dims, x, threshold, value, inplace, x0):
        if x0 is not None and in_dims[4] != in_dims[0]:
            x0 = x0.movedim(in_dims[4], in_dims[0])  # a clone of x: batched like x
        return ThresholdFunction.apply(x, threshold, value, inplace, x0), in_dims[0]


def threshold(input, threshold, value, inplace=False):
    """Drop-in for ``torch.nn.functional.threshold``; in place it keeps a copy of the input, as torch."""
    x0 = input.clone() if inplace and _tracks_gradients(input) else None
    return apply(ThresholdFunction, input, threshold, value, inplace, x0)


def threshold_(input, threshold, value):
    """Drop-in for ``torch.nn.functional.threshold_``."""
    return _threshold(input, threshold, value, inplace=True)


_threshold = threshold  # (threshold_'s argument of the same name hides the function there)


# ---------------------------------------------------------------------------------------------
# selu and celu: torch's elu with a scale on the output and on the input,
#   y = scale x where x > 0, else scale alpha (exp(input_scale x) - 1)
#   selu: scale = 1.0507..., alpha = 1.6732..., input_scale = 1;  celu: scale = 1, input_scale = 1 / alpha

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def scaled_elu_forward(x, alpha, scale, input_scale, inplace=False):
    return (torch._C._nn.elu_ if inplace else torch._C._nn.elu)(x, alpha, scale, input_scale)


def scaled_elu_backward(dy, x, alpha, scale, input_scale):
    # e = exp(input_scale min(x, 0)): finite where unused (x > 0, nan), see activation.elu_backward   (*) like x
    e = (x.nan_to_num(0.0).clamp_max(0) * input_scale).exp_()
    # s = 1 where x > 0 or x is nan (torch's x <= 0 ? ... : ...), else 0   (*)
    s = _step_nan_high(x)
    # f'(x) = scale s + scale alpha input_scale e (1 - s)   (not lerp: e = inf for celu with alpha < 0
    # at x = -inf, torch's value, and lerp would give inf + 0 * -inf = nan)   (*)
    d = torch.addcmul(s * scale, e * (scale * alpha * input_scale), 1 - s)
    # dx = dy f'(x)                                           (*)
    return dy * d


def scaled_elu_backward_from_output(dy, y, alpha, scale, input_scale):
    """In place, from y: needs alpha >= 0 (then y > 0 exactly where x > 0)."""
    # scale alpha input_scale e^(input_scale x) = input_scale (y + scale alpha) for x <= 0   (*) like x
    d = (y.nan_to_num(0.0).clamp_max(0) + scale * alpha) * input_scale
    # dx = dy scale where y > 0 or y is nan, else dy d        (*)
    return torch.lerp(dy * d, dy * scale, _step_nan_high(y))


class ScaledELUFunction(torch.autograd.Function):
    """``apply(x, alpha, scale, input_scale, inplace, name)``: the base of SELUFunction and
    CELUFunction (name for errors)."""
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)

    @staticmethod
    def forward(x, alpha, scale, input_scale, inplace, name):
        y = scaled_elu_forward(x, alpha, scale, input_scale, inplace)
        return x if inplace else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.alpha, ctx.scale, ctx.input_scale, ctx.inplace, ctx.name = inputs
        if ctx.inplace:
            ctx.mark_dirty(x)
        t = output if ctx.inplace else x  # out of place x, as torch (exact where y + alpha cancels)
        ctx.save_for_backward(t)
        ctx.save_for_forward(t)

    @staticmethod
    def _grad(ctx, dy):
        (t,) = ctx.saved_tensors
        args = ctx.alpha, ctx.scale, ctx.input_scale
        if not ctx.inplace:
            return scaled_elu_backward(dy, t, *args)
        if ctx.alpha < 0:
            raise _inplace_negative_slope_error(ctx.name, "alpha", ctx.alpha)
        return scaled_elu_backward_from_output(dy, t, *args)

    @staticmethod
    def backward(ctx, dy):
        return ScaledELUFunction._grad(ctx, dy), None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        dy = ScaledELUFunction._grad(ctx, dx)
        return dx.copy_(dy) if ctx.inplace else dy


class SELUFunction(ScaledELUFunction):
    """selu: its own class, so that its graph node and coverage row say selu."""


class CELUFunction(ScaledELUFunction):
    """celu: its own class, so that its graph node and coverage row say celu."""


SELUFunction.vmap = _elementwise_vmap(SELUFunction)
CELUFunction.vmap = _elementwise_vmap(CELUFunction)


def selu(input, inplace=False):
    """Drop-in for ``torch.nn.functional.selu``."""
    return apply(SELUFunction, input, _SELU_ALPHA, _SELU_SCALE, 1.0, inplace, "selu")


def selu_(input):
    """Drop-in for ``torch.nn.functional.selu_``."""
    return selu(input, inplace=True)


def celu(input, alpha=1.0, inplace=False):
    """Drop-in for ``torch.nn.functional.celu``.

    ``inplace=True`` with ``alpha < 0`` runs, but its backward raises RuntimeError, as torch's does.
    """
    if alpha == 0:
        raise RuntimeError("ZeroDivisionError: alpha cannot be 0 for CELU")
    return apply(CELUFunction, input, alpha, 1.0, 1.0 / alpha, inplace, "celu")


def celu_(input, alpha=1.0):
    """Drop-in for ``torch.nn.functional.celu_``."""
    return celu(input, alpha, inplace=True)


# ---------------------------------------------------------------------------------------------
# softmin: y = softmax(-x) along dim;  dx = -J^T dy, J softmax's Jacobian at -x (see ops/softmax.py)

class SoftminFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CUDA  # autocast: as softmax (float32 on CUDA, input dtype on CPU)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim, dtype):
        # y = softmax(-x): torch negates first, then casts  (*) like x
        return softmax_forward(_cast_input(-x, dtype, "softmin"), dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.dim, _ = inputs
        ctx.input_dtype = x.dtype
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (y,) = ctx.saved_tensors
        # dx = -y * (dy - sum(dy * y)): softmax's backward, negated by the chain rule through -x   (*)
        return softmax_backward(dy, y, ctx.dim).neg_().to(ctx.input_dtype), None, None

    @staticmethod
    def jvp(ctx, dx, _dim, _dtype):
        (y,) = ctx.saved_tensors
        # dy = J (-dx), J symmetric                           (*)
        return softmax_backward(-dx.to(y.dtype), y, ctx.dim)


def softmin(input, dim=None, _stacklevel=3, dtype=None):
    """Drop-in for ``torch.nn.functional.softmin``."""
    if dim is None:
        dim = _get_softmax_dim("softmin", input.dim(), _stacklevel)
    return apply(SoftminFunction, input, dim, dtype)
