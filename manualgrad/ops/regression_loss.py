"""Regression losses: mse_loss, l1_loss, smooth_l1_loss, huber_loss.

Each is an elementwise function l(d) of the difference d = input - target (target broadcasts
against input, shape E), optionally times a weight of input's shape, then reduced:

    out = reduce(w * l(d))                            none: (E) ; mean, sum: ()

So each op is one pair, ``<op>_forward(d) -> l`` and ``<op>_backward(dl, d) -> l'(d) dl``, and
one shared RegressionLossFunction does the broadcast, the weight and the reduction around it:

    dd      = l'(d) * w * dout/d(wl)                 (E)
    dinput  =  sum of dd over target's broadcast dims    (input.shape)
    dtarget = -sum of dd over input's broadcast dims     (target.shape)
    dweight =  sum of l * dout/d(wl) over broadcast dims (weight.shape == input.shape)

torch's own rules, kept here:
- with a weight, reduction="mean" is sum(w l) / sum(w) for mse_loss and l1_loss, but
  mean(w l) (divided by the element count) for huber_loss;
- smooth_l1_loss with beta=0 is l1_loss (the functional routes it there);
- huber_loss returns input's dtype (computed in the common dtype, cast to input's), the others
  promote input and target to their common dtype;
- at the kinks: l1's derivative at d == 0 is sgn(0) = 0; smooth_l1/huber have a continuous first
  derivative at |d| == beta (delta), and their second derivative there is 0, as in torch
  (hardtanh, whose derivative excludes the end points, gives exactly that). One difference is
  left: at a NaN d the second derivative is 1/beta (1) here, 0 in torch; loss and gradient are
  NaN in both.
"""
import warnings

import torch
import torch.nn.functional as TF

from ._apply import FLOAT32, apply
from ._checks import REDUCTIONS, get_reduction, reduce_backward, reduce_forward


# ---------------------------------------------------------------------------------------------
# mse: l = d^2

def mse_loss_forward(d):
    # l = d^2                                                 (E) like d
    return d * d


def mse_loss_backward(dl, d):
    # dd = 2 d dl                                             (E) like d
    return 2 * d * dl


# ---------------------------------------------------------------------------------------------
# l1: l = |d|

def l1_loss_forward(d):
    # l = |d|                                                 (E) like d
    return d.abs()


def l1_loss_backward(dl, d):
    # dd = sgn(d) dl      sgn(0) = 0 as torch; d/|d| for complex d    (E) like d
    return d.sgn() * dl


# ---------------------------------------------------------------------------------------------
# smooth_l1: l = d^2 / (2 beta) if |d| < beta else |d| - beta / 2        (beta > 0)

def smooth_l1_loss_forward(d, beta):
    # with c = clamp(d, -beta, beta): l = c (d - c/2) / beta, both branches in one formula
    c = d.clamp(-beta, beta)  #                               (E)
    loss = c * torch.sub(d, c, alpha=0.5)  #                 (E)
    return loss if beta == 1.0 else loss / beta  #          no pass for the default beta


def smooth_l1_loss_backward(dl, d, beta):
    # dd = clamp(d, -beta, beta) / beta * dl                  (E) like d
    # (hardtanh, not clamp: its own derivative is 0 at |d| == beta, torch's second derivative)
    slope = TF.hardtanh(d, -beta, beta)
    return (slope if beta == 1.0 else slope / beta) * dl


# ---------------------------------------------------------------------------------------------
# huber: l = d^2 / 2 if |d| < delta else delta (|d| - delta / 2)        (delta > 0)

def huber_loss_forward(d, delta):
    # with c = clamp(d, -delta, delta): l = c (d - c/2), both branches in one formula
    c = d.clamp(-delta, delta)  #                             (E)
    return c * torch.sub(d, c, alpha=0.5)  #                 (E)


def huber_loss_backward(dl, d, delta):
    # dd = clamp(d, -delta, delta) * dl                       (E) like d; hardtanh as above
    return TF.hardtanh(d, -delta, delta) * dl


# ---------------------------------------------------------------------------------------------
# the shared part: broadcast, weight, reduction

LOSSES = {
    "mse": (mse_loss_forward, mse_loss_backward),
    "l1": (l1_loss_forward, l1_loss_backward),
    "smooth_l1": (smooth_l1_loss_forward, smooth_l1_loss_backward),
    "huber": (huber_loss_forward, huber_loss_backward),
}
# With a weight, these divide the mean by sum(w) rather than by the element count.
MEAN_BY_WEIGHT = ("mse", "l1")


def _divides_by_weight(kind, weight, reduction):
    return weight is not None and reduction == "mean" and kind in MEAN_BY_WEIGHT


def _sum_to(g, t):
    """g (E) summed over the dims t was broadcast along; the real part for a real t."""
    g = g.sum_to_size(t.shape)
    return g.real if g.is_complex() and not t.is_complex() else g


def _difference(input, target):
    # d = input - target in promote_types(input, target)    (E) = broadcast(input, target)
    # torch broadcasts the pair first, so a 0-dim target promotes as a full tensor would.
    dtype = torch.promote_types(input.dtype, target.dtype)
    return input.to(dtype) - target.to(dtype)


def regression_loss_forward(kind, input, target, weight, reduction, param=None):
    fwd = LOSSES[kind][0]
    params = () if param is None else (param,)
    d = _difference(input, target)  #                        (E) = broadcast(input, target)
    loss = fwd(d, *params)  #                                 (E)
    if kind == "huber" and loss.dtype != input.dtype:
        loss = loss.to(input.dtype)  # torch's huber kernel writes into a tensor like input
    if weight is None:
        return reduce_forward(loss, reduction)
    loss = loss * weight  #                                   (E) w broadcast like input
    if _divides_by_weight(kind, weight, reduction):
        # out = sum(w l) / sum(w)                             ()
        return reduce_forward(loss, "sum") / weight.sum()
    return reduce_forward(loss, reduction)


def regression_loss_backward(kind, dout, input, target, weight, output, reduction, param=None,
                             needs=(True, True, True)):
    """Gradients (dinput, dtarget, dweight) of out = reduce(w * l(input - target))."""
    fwd, bwd = LOSSES[kind]
    params = () if param is None else (param,)
    d = _difference(input, target)  #                        (E) recomputed: d stays on the graph
    if _divides_by_weight(kind, weight, reduction):
        # d out / d(w l) = 1 / sum(w)                         (E) expanded, no copy
        scale = dout / weight.sum()
        dwl = reduce_backward(scale, d.shape, "sum")
    else:
        # d out / d(w l) from the reduction                   (E)
        dwl = reduce_backward(dout, d.shape, reduction)
    dinput = dtarget = dweight = None
    if needs[0] or needs[1]:
        # dl = w dwl                                          (E)
        dl = dwl if weight is None else dwl * weight
        # dd = l'(d) dl                                       (E)
        dd = bwd(dl, d, *params)
        if needs[0]:
            # dinput = dd, summed over target's broadcast dims    (input.shape)
            dinput = _sum_to(dd, input)
        if needs[1]:
            # dtarget = -dd, summed over input's broadcast dims   (target.shape)
            dtarget = -_sum_to(dd, target)
    if needs[2]:
        # dweight = l dwl, summed over broadcast dims         (weight.shape)
        dweight = _sum_to(fwd(d, *params) * dwl, weight)
        if _divides_by_weight(kind, weight, reduction):
            # d(1/sum(w)) term: - dout out / sum(w)           (weight.shape)
            dweight = dweight - scale * output
    return dinput, dtarget, dweight


def regression_loss_jvp(kind, dinput, dtarget, dweight, input, target, weight, output, reduction,
                        param=None):
    """Tangent of out = reduce(w * l(input - target)) for tangents of input, target, weight."""
    fwd, bwd = LOSSES[kind]
    params = () if param is None else (param,)
    d = _difference(input, target)  #                        (E)
    # d(d) = dinput - dtarget                                 (E) or a broadcastable part of it
    if dinput is None:
        dd = None if dtarget is None else -dtarget
    else:
        dd = dinput if dtarget is None else dinput - dtarget
    dwl = None
    if dd is not None:
        if d.is_complex():  # only l1 takes complex: d|d| = Re(conj(sgn d) dd)
            dl = (d.sgn().conj() * dd).real
        else:
            # dl = l'(d) dd                                   (E)
            dl = bwd(dd, d, *params)
        # d(w l) = w dl                                       (E)
        dwl = dl if weight is None else dl * weight
    if dweight is not None:
        # d(w l) += l dw                                      (E)
        ldw = fwd(d, *params) * dweight
        dwl = ldw if dwl is None else dwl + ldw
    if kind == "huber":
        dwl = dwl.to(output.dtype)
    if _divides_by_weight(kind, weight, reduction):
        # d out = (sum d(w l) - out sum(dw)) / sum(w)         ()
        num = reduce_forward(dwl, "sum")
        if dweight is not None:
            num = num - output * dweight.sum()
        return num / weight.sum()
    return reduce_forward(dwl, reduction)


class RegressionLossFunction(torch.autograd.Function):
    """out = reduce(weight * l(input - target)) for l one of LOSSES (kind), param beta/delta."""
    autocast = FLOAT32  # autocast: in float32 (torch's float32 list)

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, kind, param, reduction):
        return regression_loss_forward(kind, input, target, weight, reduction, param)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, kind, param, reduction = inputs
        ctx.kind, ctx.param, ctx.reduction = kind, param, reduction
        # The output only enters dweight and the tangent of a mean divided by sum(w).
        out = output if _divides_by_weight(kind, weight, reduction) else None
        ctx.save_for_backward(input, target, weight, out)
        ctx.save_for_forward(input, target, weight, output)

    @staticmethod
    def backward(ctx, dout):
        input, target, weight, output = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads = regression_loss_backward(
            ctx.kind, dout, input, target, weight, output, ctx.reduction, ctx.param, needs
        )
        return (*grads, None, None, None)

    @staticmethod
    def jvp(ctx, dinput, dtarget, dweight, *_):
        input, target, weight, output = ctx.saved_tensors
        return regression_loss_jvp(
            ctx.kind, dinput, dtarget, dweight, input, target, weight, output, ctx.reduction, ctx.param
        )


# ---------------------------------------------------------------------------------------------
# functional twins: torch.nn.functional's signatures, checks in torch's order

def _check_shapes(input, target, weight):
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
        torch.broadcast_shapes(input.shape, target.shape)  # RuntimeError when they cannot broadcast
    if weight is not None and weight.size() != input.size():
        shapes = f"weight {tuple(weight.shape)}, input {tuple(input.shape)}"
        raise ValueError(f"Weights and input must have the same size: {shapes}.")


def _unweighted_reduction(reduction):
    """torch.nn._reduction.get_enum: 'elementwise_mean' is a deprecated 'mean'."""
    if reduction == "elementwise_mean":
        message = "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead."
        warnings.warn(message, stacklevel=3)
        return "mean"
    return get_reduction(None, None, reduction)


def _check_floating(name, dtype):
    # torch's fused kernels (mse, smooth_l1, huber) exist for floating dtypes only.
    if not dtype.is_floating_point:
        raise NotImplementedError(f"{name} is not implemented for {dtype}: input and target must be floating")


def _apply(kind, input, target, weight, reduction, param):
    if weight is not None and reduction not in REDUCTIONS:
        # torch computes a weighted loss first (raising on bad dtypes), then looks at reduction.
        apply(RegressionLossFunction, input, target, weight, kind, param, "none")
        raise ValueError(f"Invalid reduction mode: {reduction}. Expected one of 'none', 'mean', 'sum'.")
    return apply(RegressionLossFunction, input, target, weight, kind, param, reduction)


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Drop-in for ``torch.nn.functional.mse_loss``: reduce(weight * (input - target)^2)."""
    _check_shapes(input, target, weight)
    if size_average is not None or reduce is not None:
        reduction = get_reduction(size_average, reduce, reduction)
    if weight is None:
        reduction = _unweighted_reduction(reduction)
        _check_floating("mse_loss", torch.promote_types(input.dtype, target.dtype))
    return _apply("mse", input, target, weight, reduction, None)


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Drop-in for ``torch.nn.functional.l1_loss``: reduce(weight * |input - target|)."""
    _check_shapes(input, target, weight)
    if size_average is not None or reduce is not None:
        reduction = get_reduction(size_average, reduce, reduction)
    if weight is None:
        reduction = _unweighted_reduction(reduction)
    return _apply("l1", input, target, weight, reduction, None)


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """Drop-in for ``torch.nn.functional.smooth_l1_loss``; beta=0 is l1_loss, as in torch."""
    _check_shapes(input, target, None)
    if size_average is not None or reduce is not None:
        reduction = get_reduction(size_average, reduce, reduction)
    reduction = _unweighted_reduction(reduction)
    if beta == 0.0:
        return _apply("l1", input, target, None, reduction, None)
    if not beta >= 0:
        raise RuntimeError(f"smooth_l1_loss does not support negative values for beta, got beta={beta}.")
    _check_floating("smooth_l1_loss", torch.promote_types(input.dtype, target.dtype))
    return _apply("smooth_l1", input, target, None, reduction, float(beta))


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """Drop-in for ``torch.nn.functional.huber_loss``. With a weight, "mean" is mean(w l), as in torch."""
    _check_shapes(input, target, weight)
    if weight is None:
        reduction = _unweighted_reduction(reduction)
    if not delta > 0:
        raise RuntimeError(f"huber_loss does not support non-positive values for delta, got delta={delta}.")
    common = torch.promote_types(input.dtype, target.dtype)
    if not torch.can_cast(common, input.dtype):
        # torch's kernel writes the loss into a tensor of input's dtype.
        raise RuntimeError(f"huber_loss: result type {common} can't be cast to the output type {input.dtype}")
    _check_floating("huber_loss", input.dtype)
    return _apply("huber", input, target, weight, reduction, float(delta))
