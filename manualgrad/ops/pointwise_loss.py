"""Pointwise losses: poisson_nll_loss, gaussian_nll_loss, margin_ranking_loss,
hinge_embedding_loss, soft_margin_loss.

Each is an elementwise function l(a, b, c) of up to three tensors that broadcast together to
a shape E, then reduced:

    out = reduce(l)                                   none: (E) ; mean, sum: ()

So each op is one pair, ``<op>_forward(a, b, c, param) -> l`` and
``<op>_backward(dl, a, b, c, param) -> (da, db, dc)`` (elementwise, (E) each, None where the
loss is not differentiable), and one shared PointwiseLossFunction does the reduction and the
broadcast around it:

    dl      = dout/dl from the reduction                   (E)
    da      = dl/da * dl, summed over a's broadcast dims    (a.shape), same for b and c
    tangent = reduce(sum_k dl/dk * dk)                      the backward at dl = 1 gives dl/dk

The backward pairs are written in differentiable torch ops, so double backward is the
autograd of the backward, and vmap runs them as they are (generate_vmap_rule).

torch's own rules, kept here:
- poisson_nll_loss's Stirling term (full=True) is added where target > 1 only;
- gaussian_nll_loss clamps var to eps without a gradient (torch clamps a clone in no_grad):
  the gradient of var is taken at the clamped value and passes the clamp as if it were not there;
- margin_ranking_loss and hinge_embedding_loss pass the gradient at the kink of max(0, u)
  (u == 0 counts as active: torch's clamp_min backward is where(u >= 0));
- hinge_embedding_loss and soft_margin_loss have no gradient for target (torch refuses to
  differentiate soft_margin_loss's target, and hinge's target only picks the branch).
soft_margin_loss is log(1 + exp(-y x)) written as softplus(-y x): finite where torch's
log1p(exp(.)) overflows to inf (y x < -88 in float32), the same value elsewhere.
"""
import math
import warnings

import torch

from ._apply import FLOAT32, INPUT, apply
from ._checks import can_inspect_values, get_reduction, reduce_backward, reduce_forward

_LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# poisson_nll: l = exp(x) - t x  (log_input)  or  x - t log(x + eps), plus Stirling's term

def _stirling(t):
    """(s, ds/dt): s = t log t - t + log(2 pi t) / 2 where t > 1, else 0."""
    big = t > 1
    ts = torch.where(big, t, 2.0)  # a safe t: log(0) and 1/0 off the graph, never 0 * inf
    # s = t log t - t + log(2 pi t) / 2                       (E)
    s = torch.where(big, ts * ts.log() - ts + 0.5 * (ts.log() + _LOG_2PI), 0.0)
    # ds/dt = log t + 1 / (2 t)                               (E)
    ds = torch.where(big, ts.log() + 0.5 / ts, 0.0)
    return s, ds


def poisson_nll_loss_forward(x, t, _, param):
    log_input, full, eps = param
    if log_input:
        # l = exp(x) - t x                                    (E)
        loss = x.exp() - t * x
    else:
        # l = x - t log(x + eps)                              (E)
        loss = x - t * (x + eps).log()
    return loss + _stirling(t)[0] if full else loss


def poisson_nll_loss_backward(dl, x, t, _, param):
    log_input, full, eps = param
    if log_input:
        # dx = (exp(x) - t) dl ;  dt = -x dl                  (E)
        dx, dt = (x.exp() - t) * dl, -x * dl
    else:
        # dx = (1 - t / (x + eps)) dl ;  dt = -log(x + eps) dl    (E)
        dx, dt = (1 - t / (x + eps)) * dl, -(x + eps).log() * dl
    if full:
        # dt += (log t + 1 / (2t)) dl where t > 1             (E)
        dt = dt + _stirling(t)[1] * dl
    return dx, dt, None


# ---------------------------------------------------------------------------------------------
# gaussian_nll: l = (log v + (x - t)^2 / v) / 2 [+ log(2 pi) / 2],  v = max(var, eps)

def _clamped(var, eps):
    # v = max(var, eps) in value, var in gradient (torch clamps a clone under no_grad)   (like var)
    return var + (var.clamp(min=eps) - var).detach()


def gaussian_nll_loss_forward(x, t, var, param):
    full, eps = param
    v = _clamped(var, eps)
    d = x - t  #                                              (E)
    # l = (log v + d^2 / v) / 2                               (E)
    loss = 0.5 * (v.log() + d * d / v)
    return loss + 0.5 * _LOG_2PI if full else loss


def gaussian_nll_loss_backward(dl, x, t, var, param):
    _, eps = param
    v = _clamped(var, eps)
    d = x - t  #                                              (E)
    # dx = d / v dl ;  dt = -dx                               (E)
    dx = d / v * dl
    # dvar = (1 / v - d^2 / v^2) / 2 dl                        (E)
    dvar = 0.5 * (1 - d * d / v) / v * dl
    return dx, -dx, dvar


# ---------------------------------------------------------------------------------------------
# margin_ranking: l = max(0, -y (x1 - x2) + margin)

def margin_ranking_loss_forward(x1, x2, y, margin):
    # l = max(0, u),  u = margin - y (x1 - x2)                 (E)
    return (margin - y * (x1 - x2)).clamp_min(0)


def margin_ranking_loss_backward(dl, x1, x2, y, margin):
    # active where u >= 0 (torch's clamp_min gradient)         (E) bool
    active = margin - y * (x1 - x2) >= 0
    g = torch.where(active, dl, 0.0)  #                       (E)
    # dx1 = -y g ;  dx2 = y g ;  dy = -(x1 - x2) g             (E)
    return -y * g, y * g, -(x1 - x2) * g


# ---------------------------------------------------------------------------------------------
# hinge_embedding: l = x where y == 1, max(0, margin - x) where y == -1 (both terms for other y)

def hinge_embedding_loss_forward(x, y, _, margin):
    # l = [y != 1] max(0, margin - x) + [y != -1] x            (E)
    return torch.where(y != 1, (margin - x).clamp_min(0), 0.0) + torch.where(y != -1, x, 0.0)


def hinge_embedding_loss_backward(dl, x, y, _, margin):
    # dx = (-[y != 1][margin - x >= 0] + [y != -1]) dl          (E); y only picks the branch
    slope = torch.where(y != -1, 1.0, 0.0) - ((y != 1) & (margin - x >= 0)).to(dl.dtype)
    return slope * dl, None, None


# ---------------------------------------------------------------------------------------------
# soft_margin: l = log(1 + exp(-y x))

def soft_margin_loss_forward(x, y, _, __):
    z = -y * x  #                                             (E)
    # l = softplus(z) = max(z, 0) + log(1 + exp(-|z|))         (E), finite for every z
    return z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))


def soft_margin_loss_backward(dl, x, y, _, __):
    # dx = -y sigmoid(-y x) dl                                 (E); no gradient for y (as torch)
    return -y * torch.sigmoid(-y * x) * dl, None, None


# ---------------------------------------------------------------------------------------------
# the shared part: broadcast and reduction

LOSSES = {
    "poisson_nll": (poisson_nll_loss_forward, poisson_nll_loss_backward),
    "gaussian_nll": (gaussian_nll_loss_forward, gaussian_nll_loss_backward),
    "margin_ranking": (margin_ranking_loss_forward, margin_ranking_loss_backward),
    "hinge_embedding": (hinge_embedding_loss_forward, hinge_embedding_loss_backward),
    "soft_margin": (soft_margin_loss_forward, soft_margin_loss_backward),
}


def _sum_to(g, t):
    # g (E) summed over the dims t was broadcast along       (t.shape)
    return None if g is None else g.sum_to_size(t.shape)


def _shape(*tensors):
    return torch.broadcast_shapes(*(t.shape for t in tensors if t is not None))


def pointwise_loss_backward(kind, dout, a, b, c, param, reduction, needs=(True, True, True)):
    """Gradients (da, db, dc) of out = reduce(l(a, b, c))."""
    # dl = dout/dl from the reduction                         (E) expanded, no copy
    dl = reduce_backward(dout, _shape(a, b, c), reduction)
    grads = LOSSES[kind][1](dl, a, b, c, param)
    # each gradient summed over its input's broadcast dims    (a.shape), (b.shape), (c.shape)
    return tuple(_sum_to(g, t) if need else None for g, t, need in zip(grads, (a, b, c), needs))


def pointwise_loss_jvp(kind, tangents, a, b, c, param, reduction):
    """Tangent of out = reduce(l(a, b, c)): reduce(sum_k dl/dk * tangent_k)."""
    shape = _shape(a, b, c)
    ref = next(t for t in (a, b, c) if t is not None)
    # dl/dk: the backward at dl = 1                           (E) each
    partials = LOSSES[kind][1](ref.new_ones(()).expand(shape), a, b, c, param)
    total = None
    for partial, tangent in zip(partials, tangents):
        if partial is not None and tangent is not None:
            # dl += dl/dk dk                                  (E)
            term = partial * tangent
            total = term if total is None else total + term
    if total is None:
        total = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    return reduce_forward(total.expand(shape), reduction)


class PointwiseLossFunction(torch.autograd.Function):
    """out = reduce(l(a, b, c)) for l one of LOSSES (kind) with its options (param)."""
    autocast = FLOAT32  # autocast: in float32 (torch's float32 list: poisson, margin, hinge, soft margin)

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b, c, kind, param, reduction):
        return reduce_forward(LOSSES[kind][0](a, b, c, param), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, c, kind, param, reduction = inputs
        ctx.kind, ctx.param, ctx.reduction = kind, param, reduction
        ctx.save_for_backward(a, b, c)
        ctx.save_for_forward(a, b, c)

    @staticmethod
    def backward(ctx, dout):
        a, b, c = ctx.saved_tensors
        grads = pointwise_loss_backward(ctx.kind, dout, a, b, c, ctx.param, ctx.reduction, ctx.needs_input_grad[:3])
        return (*grads, None, None, None)

    @staticmethod
    def jvp(ctx, da, db, dc, *_):
        a, b, c = ctx.saved_tensors
        return pointwise_loss_jvp(ctx.kind, (da, db, dc), a, b, c, ctx.param, ctx.reduction)


class InputDtypePointwiseLossFunction(PointwiseLossFunction):
    """The same, for the losses torch writes in Python (on no autocast list): gaussian_nll."""
    autocast = INPUT  # autocast: no cast, the dtype the inputs arrive in


# ---------------------------------------------------------------------------------------------
# functional twins: torch.nn.functional's signatures, checks in torch's order


def _reduction(size_average, reduce, reduction):
    return get_reduction(size_average, reduce, reduction)


def _not_differentiable(op, name, t):
    """torch's refusal to differentiate an argument: raised at the call, only when grad is recorded."""
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"The function '{op}' is not differentiable with respect to argument '{name}'. "
            "This input cannot have requires_grad True."
        )


def poisson_nll_loss(input, target, log_input=True, full=False, size_average=None, eps=1e-8, reduce=None,
                     reduction="mean"):
    """Drop-in for ``torch.nn.functional.poisson_nll_loss``: exp(x) - t x (log_input) or
    x - t log(x + eps), plus Stirling's approximation of log(t!) where t > 1 (full)."""
    reduction = _reduction(size_average, reduce, reduction)
    torch.broadcast_shapes(input.shape, target.shape)  # RuntimeError when they cannot broadcast
    param = (bool(log_input), bool(full), float(eps))
    return apply(PointwiseLossFunction, input, target, None, "poisson_nll", param, reduction)


def _gaussian_var(input, var):
    """torch's checks and shape rules for var: a float, input's shape, input's shape without its
    last dim (unsqueezed), or input's shape but one dim of size 1."""
    if isinstance(var, (int, float)):
        if var < 0:
            raise ValueError("var has negative entry/entries")
        return torch.full_like(input, float(var))
    if can_inspect_values(var) and bool((var < 0).any()):
        raise ValueError("var has negative entry/entries")
    if var.size() != input.size():
        if input.size()[:-1] == var.size():
            return var.unsqueeze(-1)
        if input.dim() == var.dim() and sum(v for i, v in zip(input.size(), var.size()) if i != v) == 1:
            return var
        raise ValueError("var is of incorrect size")
    return var


def gaussian_nll_loss(input, target, var, full=False, eps=1e-6, reduction="mean"):
    """Drop-in for ``torch.nn.functional.gaussian_nll_loss``: (log v + (x - t)^2 / v) / 2
    with v = max(var, eps), plus log(2 pi) / 2 (full)."""
    var = _gaussian_var(input, var)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(reduction + " is not valid")
    param = (bool(full), float(eps))
    return apply(InputDtypePointwiseLossFunction, input, target, var, "gaussian_nll", param, reduction)


def margin_ranking_loss(input1, input2, target, margin=0, size_average=None, reduce=None, reduction="mean"):
    """Drop-in for ``torch.nn.functional.margin_ranking_loss``: max(0, -y (x1 - x2) + margin)."""
    reduction = _reduction(size_average, reduce, reduction)
    if input1.dim() != input2.dim() or input1.dim() != target.dim():
        raise RuntimeError(
            f"margin_ranking_loss : All input tensors should have same dimension but got sizes: "
            f"input1: {input1.size()}, input2: {input2.size()}, target: {target.size()} "
        )
    return apply(PointwiseLossFunction, input1, input2, target, "margin_ranking", float(margin), reduction)


def hinge_embedding_loss(input, target, margin=1.0, size_average=None, reduce=None, reduction="mean"):
    """Drop-in for ``torch.nn.functional.hinge_embedding_loss``: x where y == 1,
    max(0, margin - x) where y == -1."""
    reduction = _reduction(size_average, reduce, reduction)
    torch.broadcast_shapes(input.shape, target.shape)  # RuntimeError when they cannot broadcast
    return apply(PointwiseLossFunction, input, target, None, "hinge_embedding", float(margin), reduction)


def soft_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """Drop-in for ``torch.nn.functional.soft_margin_loss``: log(1 + exp(-y x))."""
    reduction = _reduction(size_average, reduce, reduction)
    shape = torch.broadcast_shapes(input.shape, target.shape)  # RuntimeError when they cannot broadcast
    if shape != input.shape:  # torch's kernel writes the loss into a tensor of input's shape
        raise RuntimeError(f"output with shape {list(input.shape)} doesn't match the broadcast shape {list(shape)}")
    _not_differentiable("soft_margin_loss", "target", target)
    return apply(PointwiseLossFunction, input, target, None, "soft_margin", None, reduction)
