"""Classification losses: nll_loss and cross_entropy.

Shapes: x (N, C, d1, ..., dk) with the classes on dim 1 (k >= 0), or unbatched x (C,).
A class-index target t is (N, d1, ..., dk) int64 (or uint8), or 0-dim for unbatched x; a
class-probability target (cross_entropy only) has x's shape. A "row" is one position
(n, d1, ..., dk): a vector of C scores. logp = log_softmax(x) over the classes, p = softmax(x).

    nll_loss:       loss_i = -w[t_i] x[i, t_i]
    cross_entropy:  loss_i = -sum_c w_c q_ic logp_ic   with the target distribution
                    q_i = (1 - eps) onehot(t_i) + eps / C       (class indices)
                    q_i = (1 - eps) t_i + eps / C                (class probabilities)

With indices, rows whose target equals ignore_index give 0, and reduction="mean" divides by
the total weight of the other rows, sum_i w[t_i] (their count without a weight): 0/0 = nan
when every row is ignored, as torch. With probabilities "mean" divides by the number of rows.
(torch's composite cross_entropy_loss_label_smoothing / cross_entropy_loss_prob_target in
aten/src/ATen/native/LossNLL.cpp use the same denominators.)

The gradient of cross_entropy is one expression for both target kinds,

    dloss_i/dx_i = s_i p_i - w * q_i,     s_i = sum_c w_c q_ic,

so with indices and no weight or smoothing it is the familiar p_i - onehot(t_i). It is built
from p and a scatter at the target class, never from a dense one-hot. The Functions save x
(an input, so double backward sees softmax(x) as a function of x) and the target, and
recompute softmax in backward; torch saves log_softmax(x) instead, the same bytes.
"""
import torch

from ._apply import FLOAT32, apply
from ._checks import can_inspect_values, can_write_inplace, get_reduction

# ---------------------------------------------------------------------------------------------
# shared helpers


def _use_transposed_softmax(x):
    # torch's CPU softmax over the last dim runs a scalar loop when a row is shorter than one
    # SIMD vector (16 floats on AVX-512): 5-7x slower at C=10. Over dim 0 of the transposed
    # (C, N) copy its kernel vectorises across rows instead. Concrete CPU (N, C) inputs only
    # (can_inspect_values): not under vmap, where strides are hidden, nor torch.compile.
    return x.dim() == 2 and x.shape[1] < 16 and can_inspect_values(x) and x.stride(1) == 1


def _log_softmax(x):
    # logp = x - logsumexp(x) over the classes                (N, C, *)
    return torch.log_softmax(x.t(), 0).t() if _use_transposed_softmax(x) else torch.log_softmax(x, 1)


def _softmax(x):
    # p = exp(x) / sum_c exp(x_c) over the classes             (N, C, *)
    return torch.softmax(x.t(), 0).t() if _use_transposed_softmax(x) else torch.softmax(x, 1)


def _scale(p, c):
    # p * c, for a fresh p. In place in a plain backward (no graph recorded, c not batched by
    # vmap): one (N, C) allocation and pass fewer, 30% of the step at 512 x 257. Else out of
    # place: double backward needs softmax's output as it was, and vmap (torch.func's, or the
    # legacy one gradcheck uses) cannot write a batched product into an unbatched p.
    return p.mul_(c) if can_write_inplace(p, c) else p * c


def _class_view(weight, dim):
    # w as (C, 1, ..., 1), broadcasting against (N, C, d1, ..., dk)
    return weight.view((-1,) + (1,) * (dim - 2))


def _index_targets(target, ignore_index, masked):
    """(t, valid): t with ignored entries set to class 0 (safe to gather), valid = not ignored.

    ``masked=False`` says no target equals ignore_index (checked by the caller): no mask.
    """
    if not masked:
        return target, None
    valid = target != ignore_index  #                        (N, *) bool
    return torch.where(valid, target, 0), valid


def _target_weights(t, weight):
    # w_t = w[t_i] per row                                    (N, *)
    return None if weight is None else weight.index_select(0, t.reshape(-1)).view(t.shape)


def _mean_denominator(t, valid, w_t):
    # sum over non-ignored rows of w[t_i] (their count without a weight)      ()
    if w_t is None:
        return t.numel() if valid is None else valid.sum()
    return w_t.sum() if valid is None else torch.where(valid, w_t, 0).sum()


def _reduce(loss, reduction, denominator):
    # none: loss (N, *) ; sum: sum_i loss_i () ; mean: sum_i loss_i / denominator ()
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / denominator


def _row_scale(dy, reduction, denominator, valid):
    """Upstream gradient per row: dloss/dloss_i, 0 on ignored rows. A scalar when it is the
    same for every row, else (N, *)."""
    # none: dy_i ; sum: dy ; mean: dy / denominator
    g = dy / denominator if reduction == "mean" else dy
    # ignored rows: 0 (where, not a product: 0/0 = nan in an all-ignored mean must not leak)
    return g if valid is None else torch.where(valid, g, 0)


# ---------------------------------------------------------------------------------------------
# argument checks (the exception types torch raises)


def _check_index_target(input, target, weight):
    """Shape and dtype checks of nll_loss_nd; returns the target as int64."""
    if input.dim() < 1:
        raise ValueError(f"Expected 1 or more dimensions (got {input.dim()})")
    if input.dim() != 1 and (target.dim() == 0 or input.shape[0] != target.shape[0]):
        tb = target.shape[0] if target.dim() else 0
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({tb}).")
    if input.dim() <= 2:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if input.dim() == 1 and target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(
                f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}"
            )
    elif target.shape[1:] != input.shape[2:]:
        raise RuntimeError(
            f"Expected target size {[input.shape[0], *input.shape[2:]]}, got {list(target.shape)}"
        )
    elif input.shape[1] == 0 and target.numel():
        # torch folds the spatial dims of an input without classes to none ("size mismatch")
        raise RuntimeError(f"size mismatch: an input of shape {list(input.shape)} has no classes for the "
                           f"targets of shape {list(target.shape)}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_dtype_name(target.dtype)}")
    _check_weight(input, weight)
    if weight is not None:
        if weight.dtype != input.dtype:
            raise RuntimeError(
                f"expected scalar type {_dtype_name(input.dtype)} but found {_dtype_name(weight.dtype)}"
            )
        if weight.requires_grad and torch.is_grad_enabled():
            # torch has no derivative of nll_loss for the weight and refuses it up front
            # ("The function 'nll_loss_forward' is not differentiable ..."): so do we.
            raise RuntimeError(
                "the loss with class-index targets is not differentiable with respect to argument "
                "'weight'. This input cannot have requires_grad True."
            )
    return target.long()


def _check_weight(input, weight, prefix=""):
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if weight is not None and (weight.dim() != 1 or weight.numel() != n_classes):
        raise RuntimeError(
            f"{prefix}weight tensor should be defined either for all {n_classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )


def _check_has_classes(input):
    if input.dim() < 1:  # torch: IndexError from log_softmax over dim 1 of a 0-dim tensor
        raise IndexError("cross_entropy: the input needs a class dimension, got a 0-dim tensor")


def _check_label_smoothing(label_smoothing):
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    # torch silently reads a negative (or nan) label_smoothing as 0: so do we.
    return label_smoothing if label_smoothing > 0.0 else 0.0


def _dtype_name(dtype):
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.int64: "Long",
            torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
            torch.bool: "Bool", torch.bfloat16: "BFloat16"}.get(dtype, str(dtype))


def _has_ignored_targets(target, ignore_index, n_classes):
    """Whether rows must be masked (some target may equal ignore_index). On concrete CPU
    tensors also checks the range: IndexError "Target 5 is out of bounds." like torch."""
    if not can_inspect_values(target):
        return True  # cannot look: mask; an out-of-range target fails inside gather
    if target.numel() == 0:
        return False
    lo, hi = torch.aminmax(target)
    if 0 <= lo.item() and hi.item() < n_classes:  # every target is a class
        return 0 <= ignore_index < n_classes
    ignored = target == ignore_index
    bad = ~ignored & ((target < 0) | (target >= n_classes))
    if bad.any():
        raise IndexError(f"Target {target[bad][0].item()} is out of bounds.")
    return True


# ---------------------------------------------------------------------------------------------
# nll_loss: loss_i = -w[t_i] x[i, t_i]


def nll_loss_forward(x, target, weight, reduction, ignore_index, masked):
    t, valid = _index_targets(target, ignore_index, masked)
    w_t = _target_weights(t, weight)
    # loss_i = -w[t_i] x[i, t_i], 0 where ignored              (N, *)
    loss = -x.gather(1, t.unsqueeze(1)).squeeze(1)
    if w_t is not None:
        loss = loss * w_t
    if valid is not None:
        loss = torch.where(valid, loss, 0)
    return _reduce(loss, reduction, _mean_denominator(t, valid, w_t) if reduction == "mean" else None)


def nll_loss_backward(dy, x_shape, target, weight, reduction, ignore_index, masked):
    t, valid = _index_targets(target, ignore_index, masked)
    w_t = _target_weights(t, weight)
    denominator = _mean_denominator(t, valid, w_t) if reduction == "mean" else None
    # g_i = dloss/dloss_i (0 where ignored)                   (N, *) or ()
    g = _row_scale(dy, reduction, denominator, valid)
    # dx[i, c] = -g_i w[t_i] [c == t_i]                        (N, C, *)
    src = -(g if w_t is None else g * w_t)
    src = src.expand(t.shape).unsqueeze(1)
    return dy.new_zeros(x_shape).scatter(1, t.unsqueeze(1), src)


def nll_loss_jvp(dx, target, weight, reduction, ignore_index, masked):
    t, valid = _index_targets(target, ignore_index, masked)
    w_t = _target_weights(t, weight)
    # dloss_i = -w[t_i] dx[i, t_i]                             (N, *)
    dloss = -dx.gather(1, t.unsqueeze(1)).squeeze(1)
    if w_t is not None:
        dloss = dloss * w_t
    if valid is not None:
        dloss = torch.where(valid, dloss, 0)
    return _reduce(dloss, reduction, _mean_denominator(t, valid, w_t) if reduction == "mean" else None)


class NLLLossFunction(torch.autograd.Function):
    autocast = FLOAT32  # autocast: in float32 (torch's float32 list)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, target, weight, reduction, ignore_index, masked):
        return nll_loss_forward(x, target, weight, reduction, ignore_index, masked)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, weight, reduction, ignore_index, masked = inputs
        ctx.options = (reduction, ignore_index, masked)
        ctx.x_shape = x.shape
        # The gradient does not depend on x: keep only the target and the weight.
        ctx.save_for_backward(target, weight)
        ctx.save_for_forward(target, weight)

    @staticmethod
    def backward(ctx, dy):
        target, weight = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = nll_loss_backward(dy, ctx.x_shape, target, weight, *ctx.options)
        return dx, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        target, weight = ctx.saved_tensors
        return nll_loss_jvp(dx, target, weight, *ctx.options)


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean"):
    """Drop-in for ``torch.nn.functional.nll_loss`` with a hand-written backward."""
    reduction = get_reduction(size_average, reduce, reduction)
    target = _check_index_target(input, target, weight)
    if not input.is_floating_point():
        raise NotImplementedError(f"nll_loss: not implemented for input of dtype {input.dtype}")
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.reshape(1)
    masked = _has_ignored_targets(target, ignore_index, input.shape[1])
    loss = apply(NLLLossFunction, input, target, weight, reduction, ignore_index, masked)
    return loss.squeeze(0) if unbatched and reduction == "none" else loss


# ---------------------------------------------------------------------------------------------
# cross_entropy with class indices: q_i = (1 - eps) onehot(t_i) + eps / C


def cross_entropy_forward(x, target, weight, reduction, ignore_index, eps, masked):
    t, valid = _index_targets(target, ignore_index, masked)
    w_t = _target_weights(t, weight)
    logp = _log_softmax(x)  #                                  (N, C, *)
    # nll_i = -w[t_i] logp[i, t_i]                             (N, *)
    loss = -logp.gather(1, t.unsqueeze(1)).squeeze(1)
    if w_t is not None:
        loss = loss * w_t
    if eps:
        # smooth_i = -sum_c w_c logp_ic                        (N, *)
        smooth = -(logp if weight is None else logp * _class_view(weight, x.dim())).sum(1)
        # loss_i = (1 - eps) nll_i + eps / C smooth_i          (N, *)
        loss = (1 - eps) * loss + (eps / x.shape[1]) * smooth
    if valid is not None:
        loss = torch.where(valid, loss, 0)
    return _reduce(loss, reduction, _mean_denominator(t, valid, w_t) if reduction == "mean" else None)


def _index_target_terms(g, w_t, weight, eps, n_classes):
    """For g_i = dloss/dloss_i: (g_i s_i, g_i (1 - eps) w[t_i]), with
    s_i = sum_c w_c q_ic = (1 - eps) w[t_i] + eps / C sum_c w_c."""
    gw = g if w_t is None else g * w_t
    if not eps:
        return gw, gw
    w_sum = n_classes if weight is None else weight.sum()
    return (1 - eps) * gw + (eps / n_classes) * w_sum * g, (1 - eps) * gw


def cross_entropy_backward(dy, x, target, weight, reduction, ignore_index, eps, masked):
    n_classes, dim = x.shape[1], x.dim()
    t, valid = _index_targets(target, ignore_index, masked)
    w_t = _target_weights(t, weight)
    denominator = _mean_denominator(t, valid, w_t) if reduction == "mean" else None
    # g_i = dloss/dloss_i (0 where ignored)                    (N, *) or ()
    g = _row_scale(dy, reduction, denominator, valid)
    gs, g_hot = _index_target_terms(g, w_t, weight, eps, n_classes)
    # dx = g_i (s_i p_i - w q_i): first g_i s_i p_i            (N, C, *)
    dx = _scale(_softmax(x), gs.unsqueeze(1) if gs.dim() else gs)
    if eps != 1:
        # ... - g_i (1 - eps) w[t_i] at c = t_i (a fresh tensor: in place is safe)   (N, C, *)
        dx.scatter_add_(1, t.unsqueeze(1), (-g_hot).expand(t.shape).unsqueeze(1))
    if eps:
        # ... - g_i eps / C w_c                                (N, C, *)
        smooth = (g.unsqueeze(1) if g.dim() else g) * (eps / n_classes)
        dx = dx - (smooth if weight is None else smooth * _class_view(weight, dim))
    return dx


def cross_entropy_jvp(dx, x, target, weight, reduction, ignore_index, eps, masked):
    n_classes = x.shape[1]
    t, valid = _index_targets(target, ignore_index, masked)
    w_t = _target_weights(t, weight)
    s, hot = _index_target_terms(1.0, w_t, weight, eps, n_classes)
    # dloss_i = s_i <p_i, dx_i> - (1 - eps) w[t_i] dx[i, t_i] - eps / C <w, dx_i>     (N, *)
    dloss = s * (_softmax(x) * dx).sum(1) - hot * dx.gather(1, t.unsqueeze(1)).squeeze(1)
    if eps:
        wdx = dx if weight is None else dx * _class_view(weight, x.dim())
        dloss = dloss - (eps / n_classes) * wdx.sum(1)
    if valid is not None:
        dloss = torch.where(valid, dloss, 0)
    return _reduce(dloss, reduction, _mean_denominator(t, valid, w_t) if reduction == "mean" else None)


class CrossEntropyFunction(torch.autograd.Function):
    """cross_entropy with class-index targets: log_softmax and nll fused into one step."""
    autocast = FLOAT32  # autocast: in float32 (torch's float32 list)

    generate_vmap_rule = True

    @staticmethod
    def forward(x, target, weight, reduction, ignore_index, label_smoothing, masked):
        return cross_entropy_forward(x, target, weight, reduction, ignore_index, label_smoothing, masked)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, weight, reduction, ignore_index, label_smoothing, masked = inputs
        ctx.options = (reduction, ignore_index, label_smoothing, masked)
        # x, not log_softmax(x): an input stays connected for double backward.
        ctx.save_for_backward(x, target, weight)
        ctx.save_for_forward(x, target, weight)

    @staticmethod
    def backward(ctx, dy):
        x, target, weight = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = cross_entropy_backward(dy, x, target, weight, *ctx.options)
        return dx, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        x, target, weight = ctx.saved_tensors
        return cross_entropy_jvp(dx, x, target, weight, *ctx.options)


# ---------------------------------------------------------------------------------------------
# cross_entropy with class probabilities: q_i = (1 - eps) t_i + eps / C


def _target_distribution(target, weight, eps, dim):
    # q = (1 - eps) t + eps / C ; wq = w * q                   (N, C, *)
    q = target * (1 - eps) + eps / target.shape[1] if eps else target
    return q, (q if weight is None else q * _class_view(weight, dim))


def _rows(x):
    # mean over rows (N d1 ... dk), whatever the weights; 0 (so nan) for an empty input, as torch
    return x.numel() // x.shape[1] if x.numel() else 0


def cross_entropy_probs_forward(x, target, weight, reduction, eps):
    _, wq = _target_distribution(target, weight, eps, x.dim())
    # loss_i = -sum_c w_c q_ic logp_ic                         (N, *)
    loss = -(_log_softmax(x) * wq).sum(1)
    return _reduce(loss, reduction, _rows(x))


def cross_entropy_probs_backward(dy, x, target, weight, reduction, eps, needs=(True, True, True)):
    """Gradients w.r.t. (x, target, weight); ``needs`` says which to compute."""
    dim = x.dim()
    q, wq = _target_distribution(target, weight, eps, dim)
    # g_i = dloss/dloss_i                                      (N, 1, *) or ()
    g = dy / _rows(x) if reduction == "mean" else dy
    g = g.unsqueeze(1) if g.dim() else g
    logp = _log_softmax(x) if needs[1] or needs[2] else None
    dx = dt = dw = None
    if needs[0]:
        p = _softmax(x) if logp is None else logp.exp()
        # dx_i = g_i (s_i p_i - w q_i),  s_i = sum_c w_c q_ic  (N, C, *)
        # as -g_i (w q_i - s_i p_i): addcmul makes it two passes over (N, C, *), not three
        dx = ((-g) * torch.addcmul(wq, p, wq.sum(1, keepdim=True), value=-1)).to(x.dtype)
    if needs[1]:
        # dt_i = -(1 - eps) g_i w logp_i                       (N, C, *)
        glogp = g * logp * (1 - eps) if eps else g * logp
        dt = -(glogp if weight is None else glogp * _class_view(weight, dim))
        dt = dt.to(target.dtype)
    if needs[2]:
        # dw_c = -sum_rows g_i q_ic logp_ic                    (C,)
        dw = -(g * q * logp).sum([d for d in range(dim) if d != 1]).to(weight.dtype)
    return dx, dt, dw


def cross_entropy_probs_jvp(dx, dt, dw, x, target, weight, reduction, eps):
    dim = x.dim()
    q, wq = _target_distribution(target, weight, eps, dim)
    terms = []
    if dx is not None:
        # s_i <p_i, dx_i> - <w q_i, dx_i>                      (N, *)
        terms.append((_softmax(x) * dx).sum(1) * wq.sum(1) - (wq * dx).sum(1))
    if dt is not None or dw is not None:
        logp = _log_softmax(x)
    if dt is not None:
        # -(1 - eps) <w logp_i, dt_i>                           (N, *)
        wlogp = logp if weight is None else logp * _class_view(weight, dim)
        terms.append(-(1 - eps) * (wlogp * dt).sum(1))
    if dw is not None:
        # -<q_i logp_i, dw>                                     (N, *)
        terms.append(-(q * logp * _class_view(dw, dim)).sum(1))
    dloss = terms[0]
    for term in terms[1:]:
        dloss = dloss + term
    return _reduce(dloss, reduction, _rows(x))


class CrossEntropyProbsFunction(torch.autograd.Function):
    """cross_entropy with class-probability targets; differentiable in x, target and weight."""
    autocast = FLOAT32  # autocast: in float32 (torch's float32 list)

    generate_vmap_rule = True

    @staticmethod
    def forward(x, target, weight, reduction, label_smoothing):
        return cross_entropy_probs_forward(x, target, weight, reduction, label_smoothing)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, weight, reduction, label_smoothing = inputs
        ctx.options = (reduction, label_smoothing)
        ctx.save_for_backward(x, target, weight)
        ctx.save_for_forward(x, target, weight)

    @staticmethod
    def backward(ctx, dy):
        x, target, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        dx, dt, dw = cross_entropy_probs_backward(dy, x, target, weight, *ctx.options, needs=needs)
        return dx, dt, dw, None, None

    @staticmethod
    def jvp(ctx, dx, dt, dw, *_):
        x, target, weight = ctx.saved_tensors
        return cross_entropy_probs_jvp(dx, dt, dw, x, target, weight, *ctx.options)


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
):
    """Drop-in for ``torch.nn.functional.cross_entropy`` with a hand-written, fused backward.

    As torch: a target of the input's shape holds class probabilities (and must be
    floating point), any other target class indices.
    """
    reduction = get_reduction(size_average, reduce, reduction)
    unbatched = input.dim() == 1
    if input.shape == target.shape:
        if not target.is_floating_point():
            raise RuntimeError(
                "Expected floating point type for target with class probabilities, "
                f"got {_dtype_name(target.dtype)}"
            )
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        _check_has_classes(input)
        _check_weight(input, weight, prefix="cross_entropy: ")
        eps = _check_label_smoothing(label_smoothing)
        if unbatched:
            input, target = input.unsqueeze(0), target.unsqueeze(0)
        loss = apply(CrossEntropyProbsFunction, input, target, weight, reduction, eps)
    else:
        eps = _check_label_smoothing(label_smoothing)
        _check_has_classes(input)
        target = _check_index_target(input, target, weight)
        if unbatched:
            input, target = input.unsqueeze(0), target.reshape(1)
        masked = _has_ignored_targets(target, ignore_index, input.shape[1])
        loss = apply(CrossEntropyFunction, input, target, weight, reduction, ignore_index, eps, masked)
    return loss.squeeze(0) if unbatched and reduction == "none" else loss
