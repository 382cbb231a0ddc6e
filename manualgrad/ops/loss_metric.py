"""Metric-learning losses: cosine_embedding_loss, triplet_margin_loss,
triplet_margin_with_distance_loss.

Each is a distance, then a hinge, then the reduction ('none', 'sum', 'mean'):

    cosine embedding   c = cos(x1, x2)                          (N,) or ()
                       l = 1 - c               where y = 1
                       l = max(0, c - margin)  where y = -1      (0 for any other y)
    triplet            d+ = d(a, p),  d- = d(a, n)               (N,) or ()
                       d- = min(d(a, n), d(p, n))                with swap (Balntas et al. 2016)
                       l = max(0, margin + d+ - d-)

The distances are manualgrad's own Functions (ops/distance.py: cosine_similarity,
pairwise_distance with torch's p and eps; or the user's ``distance_function``), so their
backward is hand-written there. The hinges are the two Functions below: their backward sends
the upstream gradient to the distances, through the hinge's active set and, with swap, to
whichever of d(a, n), d(p, n) is the smaller (half to each on a tie, as torch's minimum).

cosine: torch computes c = x1.x2 / sqrt((|x1|^2 + 1e-12)(|x2|^2 + 1e-12)); here it is
cosine_similarity with eps = 1e-6 = sqrt(1e-12), c = x1.x2 / (max(|x1|, eps) max(|x2|, eps)).
The two agree to float rounding unless a norm is below 1e-6, and at a zero row both give
c = 0 with the same gradient, x2 / (1e-6 |x2|).
"""
import torch
import torch.nn.functional as TF

from ._apply import FLOAT32, INPUT, apply, autocast_on
from ._checks import get_reduction, reduce_backward, reduce_forward
from .distance import cosine_similarity, pairwise_distance

_COS_EPS = 1e-6  # sqrt of torch's 1e-12 on the squared norms


def _sum_to(t, shape):
    return t if t.shape == shape else t.sum_to_size(shape)


def _float32_under_autocast(*tensors):
    """torch's autocast lists (CPU and CUDA) run cosine_embedding_loss and triplet_margin_loss in
    float32: their distances too, so the floating inputs are cast before them."""
    device_type = tensors[0].device.type
    if not (torch._C._is_any_autocast_enabled() and autocast_on(device_type)):
        return tensors
    return tuple(t.float() if t.is_floating_point() else t for t in tensors)


# ---------------------------------------------------------------------------------------------
# cosine embedding hinge: l = [y = 1] (1 - c) + [y = -1] max(0, c - margin)

def cosine_embedding_hinge_forward(c, y, margin):
    # l = where(y = 1, 1 - c, 0) + where(y = -1, max(0, c - margin), 0)     (N,) or ()
    zeros = torch.zeros_like(c)
    return torch.where(y == 1, 1 - c, zeros) + torch.where(y == -1, (c - margin).clamp_min(0), zeros)


def cosine_embedding_hinge_slope(c, y, margin):
    """dl/dc: -1 where y = 1, 1 where y = -1 and c - margin >= 0 (torch's clamp_min passes
    the gradient at the kink), 0 elsewhere.                      (N,) or () like l"""
    pos, neg = y == 1, (y == -1) & ((c - margin) >= 0)
    return neg.to(c.dtype) - pos.to(c.dtype)


class CosineEmbeddingHingeFunction(torch.autograd.Function):
    autocast = FLOAT32  # a loss: float32 (its inputs are cast before the distance already)
    generate_vmap_rule = True

    @staticmethod
    def forward(c, y, margin, reduction):
        return reduce_forward(cosine_embedding_hinge_forward(c, y, margin), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        c, y, margin, ctx.reduction = inputs
        # the slope is piecewise constant: all backward needs       (N,) or ()
        slope = cosine_embedding_hinge_slope(c, y, margin)
        ctx.c_shape = c.shape
        ctx.save_for_backward(slope)
        ctx.save_for_forward(slope)

    @staticmethod
    def backward(ctx, dout):
        (slope,) = ctx.saved_tensors
        # dl = dout spread over the elementwise loss                (N,) or ()
        dl = reduce_backward(dout, slope.shape, ctx.reduction)
        # dc = dl dl/dc, summed back where c was broadcast to y     c's shape
        return _sum_to(dl * slope, ctx.c_shape), None, None, None

    @staticmethod
    def jvp(ctx, dc, *_):
        (slope,) = ctx.saved_tensors
        # dl = dl/dc dc, reduced as the loss is                     () or (N,)
        return reduce_forward(slope * dc, ctx.reduction)


def cosine_embedding_loss(input1, input2, target, margin=0, size_average=None, reduce=None, reduction="mean"):
    """Drop-in for ``torch.nn.functional.cosine_embedding_loss``."""
    reduction = get_reduction(size_average, reduce, reduction)
    dim = target.dim()
    if dim not in (0, 1):
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    if input1.dim() != dim + 1 or input2.dim() != dim + 1:
        raise RuntimeError(
            f"{dim}D target tensor expects {dim + 1}D input tensors, but found inputs with sizes "
            f"{list(input1.shape)} and {list(input2.shape)}."
        )
    input1, input2 = _float32_under_autocast(input1, input2)
    # c = cos(x1, x2) along the features                              (N,) or ()
    c = cosine_similarity(input1, input2, dim=dim, eps=_COS_EPS)
    return apply(CosineEmbeddingHingeFunction, c, target, margin, reduction)


# ---------------------------------------------------------------------------------------------
# triplet hinge: l = max(0, margin + d+ - d-),  d- = min(d(a, n), d(p, n)) with swap

def triplet_hinge_forward(d_pos, d_neg, d_swap, margin):
    if d_swap is not None:
        # d- = min(d(a, n), d(p, n))                                 (N,) or ()
        d_neg = torch.minimum(d_neg, d_swap)
    # l = max(0, margin + d+ - d-)                                   (N,) or ()
    return (margin + d_pos - d_neg).clamp_min(0)


def triplet_hinge_slopes(d_pos, d_neg, d_swap, margin):
    """dl/dd+, dl/dd(a, n), dl/dd(p, n) (None without swap), each (N,) or () like l.

    dl/dd+ = [z >= 0] with z = margin + d+ - d- (torch's clamp_min passes the gradient at the
    kink), dl/dd- = -[z >= 0]; with swap d- = min(d(a, n), d(p, n)) takes torch's minimum
    gradient: all of it to the smaller one, half to each on a tie (and, where one is nan, all
    of it to both)."""
    d_min = d_neg if d_swap is None else torch.minimum(d_neg, d_swap)
    active = ((margin + d_pos - d_min) >= 0).to(d_pos.dtype)
    if d_swap is None:
        return active, -active, None
    share = torch.where(d_neg == d_swap, 0.5, 1.0).to(d_pos.dtype)
    to_neg = share.masked_fill(d_neg > d_swap, 0)
    to_swap = share.masked_fill(d_neg < d_swap, 0)
    return active, -active * to_neg, -active * to_swap


class TripletHingeFunction(torch.autograd.Function):
    # the input's dtype: float32 inputs come from triplet_margin_loss under autocast;
    # triplet_margin_with_distance_loss is torch's Python, no autocast entry
    autocast = INPUT
    generate_vmap_rule = True

    @staticmethod
    def forward(d_pos, d_neg, d_swap, margin, reduction):
        return reduce_forward(triplet_hinge_forward(d_pos, d_neg, d_swap, margin), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        d_pos, d_neg, d_swap, margin, ctx.reduction = inputs
        slopes = triplet_hinge_slopes(d_pos, d_neg, d_swap, margin)
        ctx.shapes = [None if d is None else d.shape for d in (d_pos, d_neg, d_swap)]
        ctx.loss_shape = torch.broadcast_shapes(*[s for s in ctx.shapes if s is not None])
        ctx.save_for_backward(*slopes)
        ctx.save_for_forward(*slopes)

    @staticmethod
    def backward(ctx, dout):
        # dl = dout spread over the elementwise loss                (N,) or ()
        dl = reduce_backward(dout, ctx.loss_shape, ctx.reduction)
        grads = []
        for slope, shape, needed in zip(ctx.saved_tensors, ctx.shapes, ctx.needs_input_grad):
            # dd = dl dl/dd, summed back where d was broadcast       d's shape
            grads.append(_sum_to(dl * slope, shape) if needed and slope is not None else None)
        return (*grads, None, None)

    @staticmethod
    def jvp(ctx, d_pos_t, d_neg_t, d_swap_t, *_):
        # dl = sum_d dl/dd dd, reduced as the loss is              () or (N,)
        t = sum(s * dt for s, dt in zip(ctx.saved_tensors, (d_pos_t, d_neg_t, d_swap_t)) if s is not None and dt is not None)
        if not isinstance(t, torch.Tensor):
            t = torch.zeros(ctx.loss_shape, dtype=ctx.saved_tensors[0].dtype, device=ctx.saved_tensors[0].device)
        return reduce_forward(t.expand(ctx.loss_shape), ctx.reduction)


def _check_margin(margin):
    if margin <= 0:
        raise ValueError(f"margin must be greater than 0, got {margin}")


def _check_dims(anchor, positive, negative):
    a, p, n = anchor.dim(), positive.dim(), negative.dim()
    if not a == p == n:
        raise RuntimeError(
            "The anchor, positive, and negative tensors are expected to have the same number of "
            f"dimensions, but got: anchor {a}D, positive {p}D, and negative {n}D inputs"
        )


def triplet_margin_loss(anchor, positive, negative, margin=1.0, p=2, eps=1e-6, swap=False, size_average=None,
                        reduce=None, reduction="mean"):
    """Drop-in for ``torch.nn.functional.triplet_margin_loss``."""
    reduction = get_reduction(size_average, reduce, reduction)
    _check_margin(margin)
    _check_dims(anchor, positive, negative)
    anchor, positive, negative = _float32_under_autocast(anchor, positive, negative)
    # d+ = ||a - p + eps||_p, d- = ||a - n + eps||_p (and ||p - n + eps||_p)   (N,) or ()
    d_pos = pairwise_distance(anchor, positive, p, eps)
    d_neg = pairwise_distance(anchor, negative, p, eps)
    d_swap = pairwise_distance(positive, negative, p, eps) if swap else None
    return apply(TripletHingeFunction, d_pos, d_neg, d_swap, margin, reduction)


def _distance(fn):
    """torch's pairwise_distance (its default) or any torch / torch.nn.functional function
    with a manualgrad twin -> the twin; anything else (a module, the user's function) as it is."""
    if fn is None:
        return pairwise_distance
    from .. import functional as MF  # functional imports this module

    name = getattr(fn, "__name__", None)
    if name is not None and (getattr(TF, name, None) is fn or getattr(torch, name, None) is fn) and hasattr(MF, name):
        return getattr(MF, name)
    return fn


def triplet_margin_with_distance_loss(anchor, positive, negative, *, distance_function=None, margin=1.0, swap=False,
                                      reduction="mean"):
    """Drop-in for ``torch.nn.functional.triplet_margin_with_distance_loss``: the distances are
    ``distance_function``'s (pairwise_distance by default), the hinge is hand-written."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    _check_margin(margin)
    _check_dims(anchor, positive, negative)
    distance = _distance(distance_function)
    # d+ = d(a, p), d- = d(a, n) (and d(p, n))                        (N,) or ()
    d_pos, d_neg = distance(anchor, positive), distance(anchor, negative)
    d_swap = distance(positive, negative) if swap else None
    return apply(TripletHingeFunction, d_pos, d_neg, d_swap, margin, reduction)
