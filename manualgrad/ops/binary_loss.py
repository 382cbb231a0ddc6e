"""Binary and distribution losses: binary cross-entropy (on probabilities and on logits) and
the Kullback-Leibler divergence.

Each loss is elementwise, l = f(x, t) of shape (*), then reduced ('none', 'sum', 'mean', and
for kl_div 'batchmean' = sum / x.size(0)). Every backward below takes ``dl``, the upstream
gradient already spread over the elementwise loss by ``reduce_backward`` (an expanded view for
'sum' and 'mean', no copy), and returns the gradients of the input ``x`` and of the target ``t``.

Weights (``weight``, ``pos_weight``) are constants, as in torch: torch refuses to build a graph
through them (RuntimeError at the call when one requires grad), and so do we.
"""
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as TF
from torch.nn import _reduction as _legacy

from ._apply import FLOAT32, apply
from ._checks import can_inspect_values, can_write_inplace, get_reduction, is_transformed, reduce_backward, reduce_forward

# torch's constants: each log in the BCE loss is floored at -100, and x (1 - x) in its
# gradient at 1e-12 (so the gradient at x = 0 or 1 is huge and finite, not 0 as the floored
# loss would have it).
_LOG_FLOOR = -100.0
_EPS = 1e-12

# Arithmetic on fresh intermediates: ``o.mul(a, b)`` is ``a.mul_(b)`` when overwriting a is
# allowed, else ``a * b``. The first argument is always a tensor this module just made.
_IN_PLACE = SimpleNamespace(
    add=torch.Tensor.add_, sub=torch.Tensor.sub_, mul=torch.Tensor.mul_, div=torch.Tensor.div_,
    neg=torch.Tensor.neg_, clamp_min=torch.Tensor.clamp_min_, lerp=torch.Tensor.lerp_, log=torch.Tensor.log_,
)
_OUT_OF_PLACE = SimpleNamespace(
    add=torch.add, sub=torch.sub, mul=torch.mul, div=torch.div,
    neg=torch.neg, clamp_min=torch.clamp_min, lerp=torch.lerp, log=torch.log,
)


def _ops(*tensors):
    """In-place arithmetic on fresh temporaries where that is safe (see can_write_inplace):
    no graph recorded, no transform, one dtype. Otherwise out of place, so double backward
    and vmap see ordinary ops."""
    return _IN_PLACE if can_write_inplace(*tensors) else _OUT_OF_PLACE


# softplus(x) = log(1 + exp(x)) = -log sigmoid(-x), finite for every x. torch's softplus is the
# identity above its threshold; per dtype, the threshold is where exp(-threshold) is below half
# an ulp (so the switch is exact) and exp(threshold) is still finite: within an ulp of torch's
# log_sigmoid. (torch's log_sigmoid and logit kernels start threads even for a handful of
# elements; on a busy CPU that costs milliseconds per call. softplus, log and div do not.)
_SOFTPLUS_THRESHOLD = {torch.float64: 40.0, torch.float16: 10.0}  # float32, bfloat16: 20


def _softplus(x):
    return TF.softplus(x, threshold=_SOFTPLUS_THRESHOLD.get(x.dtype, 20.0))


def _not_differentiable(op, name, t):
    """torch's refusal to differentiate a weight: raised at the call, only when grad is recorded."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"The function '{op}' is not differentiable with respect to argument '{name}'. "
            "This input cannot have requires_grad True."
        )


def _fits(op, name, w, shape):
    """A weight must broadcast to the loss's shape without growing it (torch multiplies in place)."""
    if w is not None and torch.broadcast_shapes(w.shape, shape) != shape:
        raise RuntimeError(
            f"{op}: {name} of shape {list(w.shape)} does not broadcast to the input's shape "
            f"{list(shape)} (output with shape {list(shape)} doesn't match the broadcast shape "
            f"{list(torch.broadcast_shapes(w.shape, shape))})"
        )


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


# ---------------------------------------------------------------------------------------------
# binary_cross_entropy: l = -w [t log x + (1 - t) log(1 - x)], x and t in [0, 1]

def binary_cross_entropy_forward(x, t, w=None, reduction="mean"):
    # checked here, after apply's autocast casts (both to float32 under autocast, as torch)
    if t.dtype != x.dtype:
        raise RuntimeError(f"binary_cross_entropy: target dtype {t.dtype} differs from input dtype {x.dtype}")
    o = _ops(x, t, w)
    # l = -w [t max(log x, -100) + (1 - t) max(log(1 - x), -100)]     (*) like x
    log_x = torch.log(x).clamp_min_(_LOG_FLOOR)
    log_1mx = torch.neg(x).log1p_().clamp_min_(_LOG_FLOOR)
    loss = o.lerp(log_1mx, log_x, t).neg_()  # lerp(a, b, t) = a + t (b - a)
    if w is not None:
        loss = o.mul(loss, w)
    return reduce_forward(loss, reduction)


def binary_cross_entropy_backward(dl, x, t, w=None, needs=(True, True)):
    """Gradients (dx, dt) from dl, the gradient of the unreduced loss. Formulas are torch's."""
    o = _ops(dl, x, t, w)
    dx = dt = None
    if w is not None:
        dl = dl * w  #                                                   (*) like x
    if needs[0]:
        # dx = dl (x - t) / max(x (1 - x), 1e-12)                        (*) like x
        dx = o.mul(o.div(x - t, o.clamp_min(o.mul(1 - x, x), _EPS)), dl)
    if needs[1]:
        # dt = dl (log(1 - x) - log x) = -dl log(x / (1 - x)), unfloored (*) like t
        # (torch.logit's formula; torch.logit itself starts threads even for tiny inputs)
        dt = o.mul(o.neg(o.log(torch.div(x, 1 - x))), dl)
    return dx, dt


def binary_cross_entropy_jvp(dx, dt, x, t, w=None, reduction="mean"):
    # dl = w [(x - t) / max(x (1 - x), 1e-12) dx - logit(x) dt], reduced like the loss
    gx = binary_cross_entropy_backward(dx, x, t, w, (True, False))[0] if dx is not None else None
    gt = binary_cross_entropy_backward(dt, x, t, w, (False, True))[1] if dt is not None else None
    dl = _add(gx, gt)
    return reduce_forward(torch.zeros_like(x) if dl is None else dl, reduction)


class BinaryCrossEntropyFunction(torch.autograd.Function):
    autocast = FLOAT32  # autocast: in float32 (torch's float32 list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, w, reduction):
        return binary_cross_entropy_forward(x, t, w, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, w, reduction = inputs
        ctx.reduction = reduction
        ctx.save_for_backward(x, t, w)
        ctx.save_for_forward(x, t, w)

    @staticmethod
    def backward(ctx, dout):
        x, t, w = ctx.saved_tensors
        dl = reduce_backward(dout, x.shape, ctx.reduction)
        dx, dt = binary_cross_entropy_backward(dl, x, t, w, ctx.needs_input_grad[:2])
        return dx, dt, None, None

    @staticmethod
    def jvp(ctx, dx, dt, _dw, _):
        # weight is a constant: torch ignores its tangent too.
        x, t, w = ctx.saved_tensors
        return binary_cross_entropy_jvp(dx, dt, x, t, w, ctx.reduction)


def _check_unit_interval(name, v):
    lo, hi = torch.aminmax(v)
    if not (lo >= 0 and hi <= 1):  # also false for NaN
        raise RuntimeError(
            f"binary_cross_entropy: all elements of {name} should be between 0 and 1, "
            f"found values in [{lo.item()}, {hi.item()}]"
        )


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    """Drop-in for ``torch.nn.functional.binary_cross_entropy`` with a hand-written backward.

    Like torch: input and target must be in [0, 1] (RuntimeError, checked where values can be
    read for free), have the same size (ValueError) and dtype (RuntimeError); weight broadcasts
    to the target's shape and gets no gradient.
    """
    reduction = get_reduction(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}) "
            "is deprecated. Please ensure they have the same size."
        )
    if not input.is_floating_point():
        raise NotImplementedError(f'"binary_cross_entropy" not implemented for {input.dtype}')
    if weight is not None:
        weight = weight.expand(torch.broadcast_shapes(target.size(), weight.size()))
        _fits("binary_cross_entropy", "weight", weight, input.shape)
        if weight.dtype != input.dtype:
            weight = weight.to(input.dtype)
    _not_differentiable("binary_cross_entropy", "weight", weight)
    if input.numel() and can_inspect_values(input, target):
        _check_unit_interval("input", input)
        _check_unit_interval("target", target)
    return apply(BinaryCrossEntropyFunction, input, target, weight, reduction)


# ---------------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits: l = -w [p t log sigmoid(x) + (1 - t) log sigmoid(-x)]
#                                     = w [(1 - t) x - (1 + (p - 1) t) log sigmoid(x)]
# The second form is torch's, term for term (log sigmoid(x) = -softplus(-x)): no exp of a
# large number, so the loss and its gradients are finite at |x| = 1e4 in float32.

def binary_cross_entropy_with_logits_forward(x, t, w=None, pw=None, reduction="mean"):
    o = _ops(x, t, w, pw)
    # l = w [(1 - t) x + (1 + (p - 1) t) softplus(-x)]                  (*) like x
    nls = _softplus(torch.neg(x))  # -log sigmoid(x)
    if pw is not None:
        nls = o.mul(nls, torch.mul(t, pw - 1).add_(1))
    loss = o.add(o.mul(1 - t, x), nls)
    if w is not None:
        loss = o.mul(loss, w)
    return reduce_forward(loss, reduction)


def binary_cross_entropy_with_logits_backward(dl, x, t, w=None, pw=None, needs=(True, True)):
    """Gradients (dx, dt) from dl, the gradient of the unreduced loss. sigmoid(x) is recomputed
    from x, so double backward differentiates through it."""
    o = _ops(dl, x, t, w, pw)
    dx = dt = None
    if w is not None:
        dl = dl * w  #                                                   (*) like x
    if needs[0]:
        if pw is None:
            # dx = dl (sigmoid(x) - t)                                   (*) like x
            dx = o.mul(o.sub(torch.sigmoid(x), t), dl)
        else:
            # dx = dl [(p t + 1 - t) sigmoid(x) - p t]                   (*) like x
            pt = torch.mul(t, pw)
            dx = o.mul(o.sub(o.mul(o.sub(pt + 1, t), torch.sigmoid(x)), pt), dl)
    if needs[1]:
        if pw is None:
            # dt = -dl x                                                 (*) like t
            dt = o.mul(torch.neg(x), dl)
        else:
            # dt = dl [log sigmoid(-x) - p log sigmoid(x)]
            #    = dl [p softplus(-x) - softplus(x)]                     (*) like t
            dt = o.mul(o.sub(o.mul(_softplus(torch.neg(x)), pw), _softplus(x)), dl)
    return dx, dt


def binary_cross_entropy_with_logits_jvp(dx, dt, x, t, w=None, pw=None, reduction="mean"):
    # dl = dl/dx dx + dl/dt dt, reduced like the loss
    backward = binary_cross_entropy_with_logits_backward
    gx = backward(dx, x, t, w, pw, (True, False))[0] if dx is not None else None
    gt = backward(dt, x, t, w, pw, (False, True))[1] if dt is not None else None
    dl = _add(gx, gt)
    return reduce_forward(torch.zeros_like(x) if dl is None else dl, reduction)


class BinaryCrossEntropyWithLogitsFunction(torch.autograd.Function):
    autocast = FLOAT32  # autocast: in float32 (torch's float32 list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, w, pw, reduction):
        return binary_cross_entropy_with_logits_forward(x, t, w, pw, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, w, pw, reduction = inputs
        ctx.reduction = reduction
        ctx.save_for_backward(x, t, w, pw)
        ctx.save_for_forward(x, t, w, pw)

    @staticmethod
    def backward(ctx, dout):
        x, t, w, pw = ctx.saved_tensors
        dl = reduce_backward(dout, x.shape, ctx.reduction)
        dx, dt = binary_cross_entropy_with_logits_backward(dl, x, t, w, pw, ctx.needs_input_grad[:2])
        return dx, dt, None, None, None

    @staticmethod
    def jvp(ctx, dx, dt, _dw, _dpw, _):
        # weight and pos_weight are constants: torch ignores their tangents too.
        x, t, w, pw = ctx.saved_tensors
        return binary_cross_entropy_with_logits_jvp(dx, dt, x, t, w, pw, ctx.reduction)


def binary_cross_entropy_with_logits(
    input, target, weight=None, size_average=None, reduce=None, reduction="mean", pos_weight=None
):
    """Drop-in for ``torch.nn.functional.binary_cross_entropy_with_logits``.

    weight and pos_weight broadcast to the input's shape (pos_weight of shape (C,) along the
    last, class, dim) and get no gradient, as in torch. The result has the target's dtype.
    """
    op = "binary_cross_entropy_with_logits"
    reduction = get_reduction(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    result_type = torch.promote_types(input.dtype, target.dtype)
    if not torch.can_cast(result_type, target.dtype):
        raise RuntimeError(f"{op}: result type {result_type} can't be cast to the target's type {target.dtype}")
    _fits(op, "weight", weight, input.shape)
    _fits(op, "pos_weight", pos_weight, input.shape)
    _not_differentiable(op, "weight", weight)
    _not_differentiable(op, "pos_weight", pos_weight)
    loss = apply(BinaryCrossEntropyWithLogitsFunction, input, target, weight, pos_weight, reduction)
    return loss if loss.dtype == target.dtype else loss.to(target.dtype)


# ---------------------------------------------------------------------------------------------
# kl_div: x holds log-probabilities; l = t (log t - x), or with log_target l = exp(t) (t - x)
#
# With log_target and a constant target, the forward's exp(t) is also returned (a second,
# non-differentiable output) and kept for backward instead of recomputing it: the backward
# then costs one multiply, like torch's. Constant means: t needs no gradient and carries no
# tangent (no forward-AD level, no functorch wrapper), so exp(t) is a constant in any double
# backward too. Otherwise the backward recomputes exp(t) from the saved t.

def kl_div_forward(x, t, reduction="mean", log_target=False, batch_size=None, keep_exp=False):
    """The reduced loss; with keep_exp also exp(t) (log_target only)."""
    if log_target:
        # l = exp(t) (t - x)                                             broadcast(x, t)
        e = torch.exp(t)
        loss = _ops(x, t).mul(t - x, e) if x.shape == t.shape else (t - x) * e
    else:
        # l = t log t - t x, with 0 log 0 = 0 (xlogy)                    broadcast(x, t)
        loss = torch.xlogy(t, t) - t * x
    out = reduce_forward(loss, reduction)
    # batchmean: sum / x.size(0)                                         ()
    out = out if batch_size is None else out / batch_size
    return (out, e) if keep_exp else out


def kl_div_backward(dl, x, t, log_target=False, needs=(True, True), e=None):
    """Gradients (dx, dt) from dl, the gradient of the unreduced (broadcast) loss.
    ``e`` is exp(t) when the forward kept it (log_target only)."""
    # In place only where every fresh intermediate has the loss's (broadcast) shape.
    o = _ops(dl, x, t) if x.shape == t.shape else _OUT_OF_PLACE
    dx = dt = None
    if log_target:
        if e is None:
            e = torch.exp(t)
        if needs[0]:
            # dx = -dl exp(t)                                            broadcast, summed to x
            dx = o.neg(e * dl)
        if needs[1]:
            # dt = dl exp(t) (t - x + 1)                                 broadcast, summed to t
            dt = o.mul(o.mul(o.add(t - x, 1), e), dl)
    else:
        if needs[0]:
            # dx = -dl t                                                 broadcast, summed to x
            dx = o.neg(t * dl)
        if needs[1]:
            # dt = dl (log t + t / t - x): torch's xlogy derivative, log t + 1 for t > 0 and
            # NaN at t = 0 (0 / 0), as torch gives                       broadcast, summed to t
            dt = o.mul(o.sub(o.add(torch.log(t), t / t), x), dl)
    if dx is not None and dx.shape != x.shape:
        dx = dx.sum_to_size(x.shape)
    if dt is not None and dt.shape != t.shape:
        dt = dt.sum_to_size(t.shape)
    return dx, dt


def kl_div_jvp(dx, dt, x, t, log_target=False, reduction="mean", batch_size=None):
    # dl = dl/dx dx + dl/dt dt (no summing: the tangent has the loss's broadcast shape)
    dl = None
    if log_target:
        e = torch.exp(t)
        if dx is not None:
            dl = torch.neg(e * dx)
        if dt is not None:
            dl = _add(dl, e * (t - x + 1) * dt)
    else:
        if dx is not None:
            dl = torch.neg(t * dx)
        if dt is not None:
            dl = _add(dl, (torch.log(t) + t / t - x) * dt)
    out = reduce_forward(dl, reduction)
    return out if batch_size is None else out / batch_size


class KLDivFunction(torch.autograd.Function):
    autocast = FLOAT32  # autocast: in float32 (torch's float32 list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, reduction, log_target, batch_size, keep_exp):
        return kl_div_forward(x, t, reduction, log_target, batch_size, keep_exp)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, reduction, log_target, batch_size, keep_exp = inputs
        ctx.reduction, ctx.log_target, ctx.batch_size = reduction, log_target, batch_size
        ctx.loss_shape = torch.broadcast_shapes(x.shape, t.shape)
        e = None
        if keep_exp:
            e = output[1]
            ctx.mark_non_differentiable(e)
        ctx.save_for_backward(x, t, e)
        ctx.save_for_forward(x, t)

    @staticmethod
    def backward(ctx, dout, *_):
        x, t, e = ctx.saved_tensors
        if ctx.batch_size is not None:
            dout = dout / ctx.batch_size  # d (s / B) / d s = 1 / B      ()
        dl = reduce_backward(dout, ctx.loss_shape, ctx.reduction)
        dx, dt = kl_div_backward(dl, x, t, ctx.log_target, ctx.needs_input_grad[:2], e)
        return dx, dt, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dt, *_):
        x, t = ctx.saved_tensors
        return kl_div_jvp(dx, dt, x, t, ctx.log_target, ctx.reduction, ctx.batch_size)


def _constant(t):
    """t gets no gradient and carries no tangent, so anything computed from it is a constant."""
    return (
        not t.requires_grad
        and torch.autograd.forward_ad._current_level < 0
        and not is_transformed(t)
        and not torch.compiler.is_compiling()
    )


_KL_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """Drop-in for ``torch.nn.functional.kl_div`` with a hand-written backward.

    Like torch: input and target broadcast; 'batchmean' divides the sum by input.size(0) (a
    0-dim input: the sum), even when size_average/reduce override the reduction; 'mean' warns.
    """
    batch_size = input.size(0) if reduction == "batchmean" and input.dim() != 0 else None
    if size_average is not None or reduce is not None:
        reduction = _legacy.legacy_get_string(size_average, reduce)
    else:
        if reduction == "mean":
            warnings.warn(_KL_MEAN_WARNING, stacklevel=2)
        reduction = get_reduction(None, None, "sum" if reduction == "batchmean" else reduction)
    for t in (input, target):
        if t.is_complex():
            raise RuntimeError("kl_div: Complex inputs not supported.")
        if not t.is_floating_point():
            raise RuntimeError(f"kl_div: Integral inputs not supported (got {t.dtype}).")
    # Keep exp(t) for backward only when there will be one (see above).
    keep_exp = (
        log_target and input.requires_grad and torch.is_grad_enabled() and not is_transformed(input) and _constant(target)
    )
    out = apply(KLDivFunction, input, target, reduction, log_target, batch_size, keep_exp)
    return out[0] if keep_exp else out
