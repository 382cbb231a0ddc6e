"""Multi-class and multi-label losses over a row of C scores: multilabel_soft_margin_loss,
multilabel_margin_loss, multi_margin_loss.

Each gives one loss per row (x (N, C) -> (N)), then the reduction ('none' (N), 'sum', 'mean'
over the rows). A 1-D input (C) is one row (and its 'none' loss is 0-dim, as torch's).

    multilabel_soft_margin: row_n = sum_c w_c [-t_nc log s(x_nc) - (1 - t_nc) log s(-x_nc)] / C
    multilabel_margin:      row_n = sum_{j in y_n} sum_{i not in y_n} max(0, 1 - x_n[j] + x_n[i]) / C
    multi_margin:           row_n = sum_{i != y_n} w[y_n] max(0, margin - x_n[y_n] + x_n[i])^p / C

(s = sigmoid; y_n in multilabel_margin is the list of target classes of row n: the entries of
target[n] before the first -1.) The backward pairs are written in differentiable torch ops:
double backward is their autograd, vmap runs them as they are (generate_vmap_rule). The hinge
masks are constants, strict (z > 0) as in torch's kernels: at z == 0 no gradient.

multilabel_margin_loss compares every target class with every class at once, an (N, C, C)
tensor: fine for the tens to hundreds of labels it is used with; torch loops instead.
"""
import torch
import torch.nn.functional as TF

from ._apply import FLOAT32, INPUT, apply
from ._checks import can_inspect_values, get_reduction, reduce_backward, reduce_forward


def _sum_to(g, t):
    # g over the dims t was broadcast along summed, over the dims g was broadcast along expanded  (t.shape)
    return g.expand(torch.broadcast_shapes(g.shape, t.shape)).sum_to_size(t.shape)


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


# ---------------------------------------------------------------------------------------------
# multilabel_soft_margin: binary cross-entropy on logits per class, averaged over the classes


def multilabel_soft_margin_loss_forward(x, t, w, class_dim):
    # l = -(t log s(x) + (1 - t) log s(-x))                   (E) = broadcast(x, t)
    loss = -(t * TF.logsigmoid(x) + (1 - t) * TF.logsigmoid(-x))
    if w is not None:
        loss = loss * w  #                                    (E) w broadcast
    # row = sum_c l / C                                       (E without the class dim)
    return loss.sum(class_dim) / x.shape[class_dim]


def multilabel_soft_margin_loss_backward(drow, x, t, w, class_dim, needs=(True, True, True)):
    C = x.shape[class_dim]
    # g = drow / C on every class                            (E with 1 on the class dim)
    g = drow.unsqueeze(class_dim) / C
    gw = g if w is None else g * w
    dx = dt = dw = None
    if needs[0]:
        # dx = (s(x) - t) w g                                 (x.shape)
        dx = _sum_to((torch.sigmoid(x) - t) * gw, x)
    if needs[1]:
        # dt = -x w g     (d/dt of l: log s(-x) - log s(x) = -x)    (t.shape)
        dt = _sum_to(-x * gw, t)
    if needs[2]:
        # dw = l g                                            (w.shape)
        dw = _sum_to(-(t * TF.logsigmoid(x) + (1 - t) * TF.logsigmoid(-x)) * g, w)
    return dx, dt, dw


def multilabel_soft_margin_loss_jvp(dx, dt, dw, x, t, w, class_dim):
    # d l = (s(x) - t) dx - x dt                              (E)
    dl = None if dx is None else (torch.sigmoid(x) - t) * dx
    dl = _add(dl, None if dt is None else -x * dt)
    if dl is not None and w is not None:
        dl = dl * w  #                                        d(w l) = w dl + l dw
    if dw is not None:
        dl = _add(dl, -(t * TF.logsigmoid(x) + (1 - t) * TF.logsigmoid(-x)) * dw)
    shape = torch.broadcast_shapes(x.shape, t.shape, () if w is None else w.shape)
    # d row = sum_c d(w l) / C                               (rows)
    return dl.expand(shape).sum(class_dim) / x.shape[class_dim]


class MultilabelSoftMarginLossFunction(torch.autograd.Function):
    """out = reduce(sum_c w_c l(x, t)_c / C)."""
    autocast = INPUT  # autocast: no cast (torch writes this loss in Python, on no autocast list)

    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, w, class_dim, reduction):
        return reduce_forward(multilabel_soft_margin_loss_forward(x, t, w, class_dim), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, w, ctx.class_dim, ctx.reduction = inputs
        ctx.save_for_backward(x, t, w)
        ctx.save_for_forward(x, t, w)

    @staticmethod
    def backward(ctx, dout):
        x, t, w = ctx.saved_tensors
        shape = torch.broadcast_shapes(x.shape, t.shape, () if w is None else w.shape)
        rows = shape[:ctx.class_dim] + shape[ctx.class_dim + 1:]
        # drow from the reduction                             (rows)
        drow = reduce_backward(dout, rows, ctx.reduction)
        grads = multilabel_soft_margin_loss_backward(drow, x, t, w, ctx.class_dim, ctx.needs_input_grad[:3])
        return (*grads, None, None)

    @staticmethod
    def jvp(ctx, dx, dt, dw, *_):
        x, t, w = ctx.saved_tensors
        return reduce_forward(multilabel_soft_margin_loss_jvp(dx, dt, dw, x, t, w, ctx.class_dim), ctx.reduction)


def multilabel_soft_margin_loss(input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    """Drop-in for ``torch.nn.functional.multilabel_soft_margin_loss``: binary cross-entropy
    on logits per class (times weight), averaged over the classes (input's last dim)."""
    if size_average is not None or reduce is not None:
        reduction = get_reduction(size_average, reduce, reduction)
    class_dim = input.dim() - 1
    input.size(class_dim)  # IndexError for a 0-dim input, as torch's
    # RuntimeError when they cannot broadcast; torch sums the broadcast loss over dim input.dim() - 1
    torch.broadcast_shapes(input.shape, target.shape, () if weight is None else weight.shape)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(reduction + " is not valid")
    return apply(MultilabelSoftMarginLossFunction, input, target, weight, class_dim, reduction)
