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

from ._apply import FLOAT32, INPUT, apply, autocast_on
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


# ---------------------------------------------------------------------------------------------
# shared checks of the two margin losses (torch's kernels: a vector or matrix of scores)


def _rows(input):
    """input as (N, C): a 0-dim input is one row of one class, a 1-D input one row; torch's
    RuntimeError for more than 2 dims or rows without classes."""
    if input.dim() > 2 or (input.dim() >= 1 and input.shape[-1] == 0):
        raise RuntimeError(f"Expected non-empty vector or matrix with optional 0-dim batch size, but got: "
                           f"{list(input.shape)}")
    return input.reshape(1, 1) if input.dim() == 0 else input.reshape(-1, input.shape[-1]) if input.dim() == 1 \
        else input


def _dtype_name(dtype):
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
            torch.uint8: "Byte", torch.bool: "Bool"}.get(dtype, str(dtype))


def _check_long(target):
    if target.dtype != torch.int64:
        raise RuntimeError(f"expected scalar type Long but found {_dtype_name(target.dtype)}")


# ---------------------------------------------------------------------------------------------
# multilabel_margin: every target class against every non-target class of its row


def _multilabel_terms(x, t):
    """(z, m, tc): z[n, j, i] = 1 - x[n, t[n, j]] + x[n, i] (N, C, C); m: the pairs that count
    (j a target position before the first -1, i not a target class) (N, C, C) bool; tc: t with
    the positions from the first -1 on set to class 0 (safe to gather) (N, C)."""
    # valid[n, j]: j before the first negative entry          (N, C) bool
    valid = (t >= 0).cumprod(1).bool()
    tc = torch.where(valid, t, 0)
    # is_target[n, i]: i one of row n's target classes        (N, C) bool
    is_target = torch.zeros_like(t).scatter_add(1, tc, valid.long()) > 0
    # x[n, t[n, j]]                                           (N, C)
    xt = x.gather(1, tc)
    z = 1 - xt.unsqueeze(2) + x.unsqueeze(1)  #              (N, C, C)
    m = valid.unsqueeze(2) & ~is_target.unsqueeze(1)  #     (N, C, C)
    return z, m, tc


def multilabel_margin_loss_forward(x, t):
    z, m, _ = _multilabel_terms(x, t)
    # row_n = sum_{j, i} m max(0, z) / C                      (N)
    return torch.where(m, z.clamp_min(0), 0).sum((1, 2)) / x.shape[1]


def multilabel_margin_loss_backward(drow, x, t):
    z, m, tc = _multilabel_terms(x, t)
    # g[n, j, i] = drow_n / C on the active pairs (z > 0)    (N, C, C)
    g = torch.where(m & (z > 0), (drow / x.shape[1])[:, None, None], 0)
    # dx[n, i] = sum_j g[n, j, i]  -  sum over the positions j with t[n, j] = i of sum_i' g[n, j, i']   (N, C)
    return g.sum(1).scatter_add(1, tc, -g.sum(2))


def multilabel_margin_loss_jvp(dx, x, t):
    z, m, tc = _multilabel_terms(x, t)
    a = (m & (z > 0)).to(x.dtype)  #                          (N, C, C)
    # d row_n = sum_{j, i} a (dx[n, i] - dx[n, t[n, j]]) / C   (N)
    return ((a * dx.unsqueeze(1)).sum((1, 2)) - (a.sum(2) * dx.gather(1, tc)).sum(1)) / x.shape[1]


class MultilabelMarginLossFunction(torch.autograd.Function):
    """out = reduce(row), row as in multilabel_margin_loss_forward; x (N, C), t (N, C) int64."""
    autocast = FLOAT32  # autocast: in float32 (torch's float32 list)

    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, reduction):
        return reduce_forward(multilabel_margin_loss_forward(x, t), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, ctx.reduction = inputs
        ctx.save_for_backward(x, t)
        ctx.save_for_forward(x, t)

    @staticmethod
    def backward(ctx, dout):
        x, t = ctx.saved_tensors
        # drow from the reduction                             (N)
        drow = reduce_backward(dout, x.shape[:1], ctx.reduction)
        return multilabel_margin_loss_backward(drow, x, t), None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        x, t = ctx.saved_tensors
        return reduce_forward(multilabel_margin_loss_jvp(dx, x, t), ctx.reduction)


def multilabel_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """Drop-in for ``torch.nn.functional.multilabel_margin_loss``: per row, the hinge
    max(0, 1 - x[j] + x[i]) of every target class j (target's entries before the first -1)
    against every other class i, summed and divided by C."""
    reduction = get_reduction(size_average, reduce, reduction)
    x = _rows(input)
    if (input.dim() <= 1 and (target.dim() > 1 or target.numel() != input.numel())) or (
            input.dim() == 2 and target.shape != input.shape):
        raise RuntimeError(f"inconsistent target size: {list(target.shape)} for input of size: {list(input.shape)}")
    _check_long(target)
    t = target.reshape(x.shape)
    if can_inspect_values(t) and t.numel():
        # the entries up to the first negative one must be classes, that one -1
        upto = torch.cat([torch.ones_like(t[:, :1], dtype=torch.bool), (t >= 0).cumprod(1).bool()[:, :-1]], 1)
        if bool((upto & ((t < -1) | (t >= x.shape[1]))).any()):
            raise RuntimeError("argument #2 'target' is out of range")
    out = apply(MultilabelMarginLossFunction, x, t, reduction)
    return out.reshape(()) if reduction == "none" and input.dim() <= 1 else out


# ---------------------------------------------------------------------------------------------
# multi_margin: the target class against every other class


def _multi_margin_terms(x, y, p, margin, weight):
    """(z, a, s): z[n, i] = margin - x[n, y_n] + x[n, i] (N, C); a: the active hinges (z > 0,
    i != y_n) (N, C) bool; s: w[y_n] per row (N, 1), or None."""
    xy = x.gather(1, y.unsqueeze(1))  #                     (N, 1)
    z = margin - xy + x  #                                    (N, C)
    classes = torch.arange(x.shape[1], device=x.device)
    a = (z > 0) & (classes != y.unsqueeze(1))  #            (N, C)
    s = None if weight is None else weight.index_select(0, y).unsqueeze(1)
    return z, a, s


def multi_margin_loss_forward(x, y, p, margin, weight):
    z, a, s = _multi_margin_terms(x, y, p, margin, weight)
    # h = max(0, z)^p on i != y                               (N, C)
    h = torch.where(a, z if p == 1 else z * z, 0)
    if s is not None:
        h = h * s  #                                          w[y_n] h
    # row_n = sum_i h / C                                     (N)
    return h.sum(1) / x.shape[1]


def multi_margin_loss_backward(drow, x, y, p, margin, weight):
    z, a, s = _multi_margin_terms(x, y, p, margin, weight)
    # g[n, i] = drow_n / C * dh/dz = drow_n / C * (1 or 2 z) * w[y_n] on the active hinges   (N, C)
    g = (drow / x.shape[1]).unsqueeze(1)
    g = torch.where(a, g if p == 1 else 2 * z * g, 0)
    if s is not None:
        g = g * s
    # dx[n, i] = g[n, i] ;  dx[n, y_n] = -sum_i g[n, i]        (N, C)   (dz_i/dx_y = -1)
    return g.scatter_add(1, y.unsqueeze(1), -g.sum(1, keepdim=True))


def multi_margin_loss_jvp(dx, x, y, p, margin, weight):
    z, a, s = _multi_margin_terms(x, y, p, margin, weight)
    # dh/dz on the active hinges                             (N, C)
    slope = torch.where(a, 1.0 if p == 1 else 2 * z, 0)
    if s is not None:
        slope = slope * s
    # d row_n = sum_i slope (dx[n, i] - dx[n, y_n]) / C        (N)
    return (slope * (dx - dx.gather(1, y.unsqueeze(1)))).sum(1) / x.shape[1]


class MultiMarginLossFunction(torch.autograd.Function):
    """out = reduce(row), row as in multi_margin_loss_forward; x (N, C), y (N) int64, weight (C) a constant."""
    autocast = FLOAT32  # autocast: in float32 (torch's float32 list)

    generate_vmap_rule = True

    @staticmethod
    def forward(x, y, weight, p, margin, reduction):
        return reduce_forward(multi_margin_loss_forward(x, y, p, margin, weight), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, weight, ctx.p, ctx.margin, ctx.reduction = inputs
        ctx.save_for_backward(x, y, weight)
        ctx.save_for_forward(x, y, weight)

    @staticmethod
    def backward(ctx, dout):
        x, y, weight = ctx.saved_tensors
        # drow from the reduction                             (N)
        drow = reduce_backward(dout, x.shape[:1], ctx.reduction)
        return multi_margin_loss_backward(drow, x, y, ctx.p, ctx.margin, weight), None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        x, y, weight = ctx.saved_tensors
        return reduce_forward(multi_margin_loss_jvp(dx, x, y, ctx.p, ctx.margin, weight), ctx.reduction)


def multi_margin_loss(input, target, p=1, margin=1.0, weight=None, size_average=None, reduce=None,
                      reduction="mean"):
    """Drop-in for ``torch.nn.functional.multi_margin_loss``: per row,
    sum over i != y of w[y] max(0, margin - x[y] + x[i])^p, divided by C (p = 1 or 2)."""
    if p != 1 and p != 2:
        raise ValueError("only p == 1 and p == 2 supported")
    if weight is not None and weight.dim() != 1:
        raise ValueError("weight must be one-dimensional")
    reduction = get_reduction(size_average, reduce, reduction)
    x = _rows(input)
    if target.dim() > 1 or target.numel() != x.shape[0]:
        raise RuntimeError(
            "multi_margin_loss: target tensor should be 1-D with size equal to the number of input samples "
            f"(batch size). Expected target size [{x.shape[0]}], but got {list(target.shape)}. "
            f"Input has shape {list(input.shape)}.")
    _check_long(target)
    if weight is not None:
        if weight.numel() != x.shape[1]:
            raise RuntimeError(f"inconsistent weight size, expected {x.shape[1]} but got {list(weight.shape)}")
        if weight.dtype != input.dtype and not autocast_on(input.device.type):  # autocast: both float32
            raise RuntimeError(
                f"expected scalar type {_dtype_name(input.dtype)} but found {_dtype_name(weight.dtype)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("The function 'multi_margin_loss' is not differentiable with respect to argument "
                               "'weight'. This input cannot have requires_grad True.")
    y = target.reshape(x.shape[0])
    if can_inspect_values(y) and y.numel() and bool(((y < 0) | (y >= x.shape[1])).any()):
        raise RuntimeError("target out of range")
    out = apply(MultiMarginLossFunction, x, y, weight, int(p), float(margin), reduction)
    return out.reshape(target.shape) if reduction == "none" and input.dim() <= 1 else out
