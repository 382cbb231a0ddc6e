"""linear: y = x W^T + b.

Shapes: x (*, in), W (out, in), b (out,) or None, y (*, out). ``*`` is any number of
leading dims, including none (a single vector x of shape (in,)).
"""
import torch

from ._apply import LOWER, apply
from ._checks import rows


def linear_forward(x, w, b=None):
    # y = x W^T + b                                        (*, out)
    if b is not None and x.dim() == 2:
        return torch.addmm(b, x, w.t())  # one fused kernel, as torch does
    if b is not None and x.dim() == 3 and x.is_contiguous() and w.dim() == 2:
        # the same over x's rows, as torch does for 3-d input: no separate pass adding b   (N T, out)
        return torch.addmm(b, x.flatten(0, -2), w.t()).view(*x.shape[:-1], w.size(0))
    y = torch.matmul(x, w.t())
    return y if b is None else y + b


def linear_backward(dy, x, w, needs=(True, True, True)):
    """Gradients of y = x W^T + b. ``needs`` says which of (dx, dW, db) to compute."""
    dx = dw = db = None
    dy2 = rows(dy)  #                                       (rows, out)
    if needs[2]:
        # db = sum over rows of dy                           (out,)
        # (first, while dy is still in cache from the op that made it: as torch's addmm backward)
        db = dy2.sum(0)
    if needs[0]:
        # dx = dy W                                          (*, in)
        dx = torch.matmul(dy, w)
    if needs[1]:
        # dW = sum over rows of dy^T x                       (out, in)
        dw = dy2.t().mm(rows(x))
    return dx, dw, db


def linear_jvp(dx, dw, db, x, w):
    # dy = dx W^T + x dW^T + db                            (*, out)
    terms = []
    if dx is not None:
        terms.append(torch.matmul(dx, w.t()))
    if dw is not None:
        terms.append(torch.matmul(x, dw.t()))
    if db is not None:
        terms.append(db.expand(x.shape[:-1] + db.shape))
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


class LinearFunction(torch.autograd.Function):
    autocast = LOWER  # autocast: in the autocast dtype (torch's lower-precision list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b):
        return linear_forward(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.has_bias = b is not None
        # Save only what a gradient we will compute needs: dx needs W, dW needs x.
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_dw else None, w if need_dx else None)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        return linear_backward(dy, x, w, needs)

    @staticmethod
    def jvp(ctx, dx, dw, db):
        x, w = ctx.saved_tensors
        return linear_jvp(dx, dw, db, x, w)


def linear(input, weight, bias=None):
    """Drop-in for ``torch.nn.functional.linear`` with a hand-written backward.

    Bad shapes fail inside addmm/matmul with torch's own RuntimeError and message.
    """
    return apply(LinearFunction, input, weight, bias)
