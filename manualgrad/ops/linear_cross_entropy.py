"""Fused linear + cross-entropy: loss = cross_entropy(x W^T + b, t), the logits never whole.

Shapes: x (N, in) tokens, W (C, in), b (C,) or None, t (N,) class indices, class weight w (C,)
or None. A language-model head has N x C logits (4096 x 32768 floats = 512 MB) that exist
only to be reduced to N numbers; here the tokens go through in chunks of B rows, and only one
(B, C) block of logits lives at a time.

With z_i = W x_i + b and g_i = dloss/dloss_i (the reduction's weight of token i, 0 where the
target is ignored), the gradients are sums of per-token terms (classification_loss.py):

    dz_i = g_i (s_i p_i - w q_i)                (C,)   p_i = softmax(z_i)
    dx_i = dz_i W                               (in,)
    dW   = sum_i dz_i^T x_i                     (C, in)
    db   = sum_i dz_i                           (C,)

so a chunk's block of logits becomes its block of dz in place (as u_i = dz_i / r_i with a
per-row factor r_i = g_i s_i applied to the small (B, in) operands instead), adds its rows to
dx and its rank-B update to dW, and is reused for the next chunk. With reduction "mean" or "sum", g_i
does not depend on the upstream gradient, which is a scalar: the forward computes the
gradients for an upstream gradient of 1 (one pass over the logits instead of two, as torch's
chunked path and Liger-Kernel do) and backward only scales them: not at all when the upstream
gradient is exactly 1, the usual `loss.backward()`. With "none", g_i is the upstream gradient
of token i, known only in backward: backward recomputes the chunks.

Those precomputed gradients are constants of the forward, so they serve only a plain first
backward. A backward that builds a graph (create_graph, double backward) or runs under a
torch.func transform recomputes chunk by chunk from the saved inputs with differentiable,
out-of-place ops (classification_loss.cross_entropy_backward). Half-precision inputs
(float16, bfloat16) are computed in float32: logits, softmax, loss and the dW accumulation,
cast back to the input's dtype at the end.
"""
import torch

from ._apply import autocast_on, LOWER, apply
from ._checks import can_inspect_values, get_reduction, is_transformed
from .classification_loss import (
    _check_index_target,
    _check_label_smoothing,
    _has_ignored_targets,
    _index_target_terms,
    _index_targets,
    _mean_denominator,
    _reduce,
    _row_scale,
    _target_weights,
    cross_entropy,
    cross_entropy_backward,
    cross_entropy_forward,
    cross_entropy_jvp,
)
from .linear import linear, linear_forward, linear_jvp

# Rows per chunk by default: a block of logits of about this many bytes (32 MB: 256 rows of a
# 32768-word vocabulary in float32). Larger blocks mean fewer rank-B passes over dW (C x in),
# smaller ones a lower peak; see benchmarks/bench_lmhead.py.
CHUNK_BYTES = 32 << 20


def _acc_dtype(dtype):
    # float32 accumulation for half-precision inputs
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(n, rows):
    return ((s, min(s + rows, n)) for s in range(0, n, rows))


def _row_weights(dy, target, weight, reduction, ignore_index, masked):
    """(t, valid, w_t, g, denominator): safe targets, mask, target weights, g_i = dloss/dloss_i
    for an upstream gradient dy (0 on ignored rows; a scalar when the same for every row), and
    the mean's denominator (None unless reduction is "mean")."""
    t, valid = _index_targets(target, ignore_index, masked)
    w_t = _target_weights(t, weight)
    denominator = _mean_denominator(t, valid, w_t) if reduction == "mean" else None
    return t, valid, w_t, _row_scale(dy, reduction, denominator, valid), denominator


def _rows(v, s, e):
    return v if v is None or v.dim() == 0 else v[s:e]


def _softmax_(z):
    # p = softmax(z) over the classes, written over z           (B, C)
    if z.device.type == "cpu" and z.is_contiguous():
        # torch's CPU kernel works row by row (max, exp and sum, scale: one row in cache, each
        # element read before it is written), so it may write over its input: one pass over
        # the block, 5x faster than amax, sub_, exp_, sum, mul_ as separate passes.
        return torch._softmax(z, 1, False, out=z)
    return torch.softmax(z, 1)


def _dlogits_(z, t, valid, w_t, weight, g, eps, want_loss):
    """One chunk, in place (no graph: a forward, or a plain backward). z (B, C) holds the
    logits; returns (u, r, loss) with u the block that replaced z and r the row factors:

        dz_i = g_i (s_i p_i - w q_i) = r_i u_i,   r_i = g_i s_i,   u_i = p_i - w q_i / s_i

    so g never touches the (B, C) block: it scales x's rows (for dW) and dx's rows (small).
    s_i = sum_c w_c q_ic = (1 - eps) w[t_i] + eps / C sum_c w_c. loss (B,) when ``want_loss``.
    """
    n_classes = z.shape[1]
    loss = None
    if want_loss:
        # z[i, t_i]; max_c z_ic and where; sum_c w_c z_ic (smoothing), before z is overwritten  (B,)
        zt = z.gather(1, t.unsqueeze(1)).squeeze(1)
        zmax, argmax = z.max(1)
        zw = (z.sum(1) if weight is None else z.mv(weight)) if eps else None
    u = _softmax_(z)  #                                           (B, C)
    if want_loss:
        # lse_i = max z_i + log sum_c exp(z_ic - max z_i) = max z_i - log p[i, argmax]: p at the
        # argmax is at least 1 / C, so this log never meets an underflow          (B,)
        lse = zmax - u.gather(1, argmax.unsqueeze(1)).squeeze(1).log()
        # nll_i = w[t_i] (lse_i - z[i, t_i])                                        (B,)
        loss = lse - zt if w_t is None else (lse - zt) * w_t
        if eps:
            # loss_i = (1 - eps) nll_i + eps / C sum_c w_c (lse_i - z_ic)           (B,)
            w_sum = n_classes if weight is None else weight.sum()
            loss = (1 - eps) * loss + (eps / n_classes) * (w_sum * lse - zw)
        if valid is not None:
            loss = torch.where(valid, loss, 0)
    if g is None:
        return None, None, loss
    s, hot = _index_target_terms(1.0, w_t, weight, eps, n_classes)  # s_i, (1 - eps) w[t_i]
    s = torch.as_tensor(s, dtype=z.dtype)
    # s_i = 0 only where w[t_i] = 0 (and no smoothing): dz_i = 0 through r_i = 0
    s_safe = torch.where(s == 0, 1, s) if w_t is not None else s
    if eps != 1:
        # u = p - (1 - eps) w[t_i] / s_i at c = t_i               (B, C)
        u.scatter_add_(1, t.unsqueeze(1), (-hot / s_safe).expand(t.shape).unsqueeze(1))
    if eps:
        # ... - eps / C w_c / s_i                                  (B, C)
        if weight is None:
            u.sub_((eps / n_classes) / (s_safe.unsqueeze(1) if s_safe.dim() else s_safe))
        else:
            u.addr_((-(eps / n_classes) / s_safe).expand(t.shape), weight)
    # r_i = g_i s_i, 0 where ignored (g is)                       (B,) or ()
    return u, g * s, loss


def _chunked_inplace(x, w, b, t, valid, w_t, weight, g, eps, rows, want_loss, needs):
    """Loss rows (N,) and (dx, dW, db) for the row weights g, reusing one (B, C) buffer."""
    n, acc = x.shape[0], _acc_dtype(x.dtype)
    wa, ba = w.to(acc), None if b is None else b.to(acc)
    need_dx, need_dw, need_db = needs if g is not None else (False, False, False)
    loss = x.new_empty(n, dtype=acc) if want_loss else None
    dx = x.new_empty(x.shape) if need_dx else None
    dw = w.new_zeros(w.shape, dtype=acc) if need_dw else None
    db = w.new_zeros(w.shape[0], dtype=acc) if need_db else None
    buf = w.new_empty(min(rows, n), w.shape[0], dtype=acc)
    for s, e in _chunks(n, rows):
        xc = x[s:e].to(acc)
        z = buf[: e - s]
        # z = x W^T + b                                          (B, C)
        torch.mm(xc, wa.t(), out=z) if ba is None else torch.addmm(ba, xc, wa.t(), out=z)
        u, r, lc = _dlogits_(z, t[s:e], _rows(valid, s, e), _rows(w_t, s, e), weight, _rows(g, s, e), eps,
                             want_loss)
        if want_loss:
            loss[s:e] = lc
        if r is None:
            continue
        r_col = r.unsqueeze(1) if r.dim() else r  #              (B, 1) or ()
        if need_dx:
            # dx_i = dz_i W = r_i (u_i W)                        (B, in)
            if dx.dtype == acc:
                torch.mm(u, wa, out=dx[s:e]).mul_(r_col)
            else:
                dx[s:e] = u.mm(wa).mul_(r_col)
        if need_dw:
            # dW += sum_i dz_i^T x_i = u^T (r x)                 (C, in)
            dw.addmm_(u.t(), xc * r_col)
        if need_db:
            # db += sum_i dz_i = u^T r                           (C,)
            db.addmv_(u.t(), r.expand(e - s))
    dw = None if dw is None else dw.to(w.dtype)
    db = None if db is None else db.to(b.dtype)
    return loss, dx, dw, db


def _chunked_graph(x, w, b, target, weight, g, reduction, ignore_index, eps, masked, rows, want_loss, needs):
    """The same, out of place with differentiable ops: for double backward and transforms.
    g is the upstream gradient per row (before the mask), or None for the loss only."""
    n, acc = x.shape[0], _acc_dtype(x.dtype)
    wa, ba = w.to(acc), None if b is None else b.to(acc)
    weight = None if weight is None else weight.to(acc)
    need_dx, need_dw, need_db = needs if g is not None else (False, False, False)
    loss, dx, dw, db = [], [], 0, 0
    for s, e in _chunks(n, rows):
        xc = x[s:e].to(acc)
        z = linear_forward(xc, wa, ba)  #                        (B, C)
        if want_loss:
            loss.append(cross_entropy_forward(z, target[s:e], weight, "none", ignore_index, eps, masked))
        if g is None:
            continue
        # dz = g_i (s_i p_i - w q_i), 0 on ignored rows          (B, C)
        dz = cross_entropy_backward(_rows(g, s, e), z, target[s:e], weight, "none", ignore_index, eps, masked)
        if need_dx:
            dx.append(dz.mm(wa))  #                              (B, in)
        if need_dw:
            dw = dw + dz.t().mm(xc)  #                           (C, in)
        if need_db:
            db = db + dz.sum(0)  #                               (C,)
    if want_loss:
        loss = torch.cat(loss) if loss else x.new_zeros(0, dtype=acc)  # (N,), also for N = 0
        loss = _reduce(loss, reduction, _row_weights_denominator(target, weight, reduction, ignore_index, masked))
    else:
        loss = None
    dx = _cat_rows(dx, x) if need_dx else None
    dw = _as_grad(dw, w) if need_dw else None
    db = _as_grad(db, b) if need_db else None
    return loss, dx, dw, db


def _row_weights_denominator(target, weight, reduction, ignore_index, masked):
    if reduction != "mean":
        return None
    t, valid = _index_targets(target, ignore_index, masked)
    return _mean_denominator(t, valid, _target_weights(t, weight))


def _cat_rows(parts, x):
    return torch.cat(parts).to(x.dtype) if parts else x.new_zeros(x.shape)


def _as_grad(total, p):
    # a sum over no chunk (no tokens) is the python 0: a zero gradient
    return total.to(p.dtype) if isinstance(total, torch.Tensor) else p.new_zeros(p.shape)


def _use_inplace(*tensors):
    # in-place chunk buffers: no graph recorded, nothing seen through a transform
    return not torch.is_grad_enabled() and not any(t is not None and is_transformed(t) for t in tensors)


def linear_cross_entropy_forward(x, w, b, target, weight, reduction, ignore_index, eps, masked, rows, needs):
    """(loss, dx, dW, db): the loss, and when ``needs`` is a triple (reduction "mean"/"sum")
    the gradients of the loss for an upstream gradient of 1 (None where not needed)."""
    acc = _acc_dtype(x.dtype)
    if not _use_inplace(x, w, b, weight):
        loss, *_ = _chunked_graph(x, w, b, target, weight, None, reduction, ignore_index, eps, masked, rows, True,
                                  (False,) * 3)
        return loss.to(x.dtype), None, None, None
    weight_acc = None if weight is None else weight.to(acc)
    one = torch.ones((), dtype=acc)
    # g_i: 1 (sum), 1 / denominator (mean), 0 where ignored      (N,) or ()
    t, valid, w_t, g, denominator = _row_weights(one, target, weight_acc, reduction, ignore_index, masked)
    loss, dx, dw, db = _chunked_inplace(x, w, b, t, valid, w_t, weight_acc, g if needs else None, eps, rows, True,
                                        needs or (False,) * 3)
    # none: loss_i (N,) ; sum: sum_i loss_i ; mean: sum_i loss_i / denominator
    return _reduce(loss, reduction, denominator).to(x.dtype), dx, dw, db


def linear_cross_entropy_backward(dloss, x, w, b, target, weight, reduction, ignore_index, eps, masked, rows, needs):
    """Gradients (dx, dW, db) for the upstream gradient dloss, recomputed chunk by chunk."""
    if not _use_inplace(dloss, x, w, b, weight):
        # differentiable: g per row is dloss (none), dloss (sum), dloss / denominator (mean)
        g = dloss
        if reduction == "mean":
            g = dloss / _row_weights_denominator(target, weight, reduction, ignore_index, masked)
        return _chunked_graph(x, w, b, target, weight, g, reduction, ignore_index, eps, masked, rows, False,
                              needs)[1:]
    acc = _acc_dtype(x.dtype)
    weight_acc = None if weight is None else weight.to(acc)
    t, valid, w_t, g, _ = _row_weights(dloss.to(acc), target, weight_acc, reduction, ignore_index, masked)
    return _chunked_inplace(x, w, b, t, valid, w_t, weight_acc, g, eps, rows, False, needs)[1:]


def linear_cross_entropy_jvp(dx, dw, db, x, w, b, target, weight, reduction, ignore_index, eps, masked, rows):
    """dloss = reduce over tokens of <dloss_i/dz_i, dz_i>, dz_i = dx_i W^T + x_i dW^T + db."""
    acc = _acc_dtype(x.dtype)
    wa, ba = w.to(acc), None if b is None else b.to(acc)
    weight_acc = None if weight is None else weight.to(acc)
    dwa, dba = None if dw is None else dw.to(acc), None if db is None else db.to(acc)
    parts = []
    for s, e in _chunks(x.shape[0], rows):
        xc = x[s:e].to(acc)
        z = linear_forward(xc, wa, ba)  #                        (B, C)
        # dz = dx W^T + x dW^T + db                              (B, C)
        dz = linear_jvp(None if dx is None else dx[s:e].to(acc), dwa, dba, xc, wa)
        # dloss_i = s_i <p_i, dz_i> - (1 - eps) w[t_i] dz[i, t_i] - eps / C <w, dz_i>     (B,)
        parts.append(cross_entropy_jvp(dz, z, target[s:e], weight_acc, "none", ignore_index, eps, masked))
    dloss = torch.cat(parts) if parts else x.new_zeros(0, dtype=acc)
    denominator = _row_weights_denominator(target, weight_acc, reduction, ignore_index, masked)
    return _reduce(dloss, reduction, denominator).to(x.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Outputs (loss, dx, dW, db): the last three are the forward's precomputed gradients
    (None unless reduction is "mean"/"sum" and a graph is recorded), non-differentiable and
    saved for backward; the functional returns only the loss."""
    autocast = LOWER  # autocast: in the autocast dtype (torch's lower-precision list)

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, target, weight, reduction, ignore_index, eps, masked, rows, needs):
        return linear_cross_entropy_forward(x, w, b, target, weight, reduction, ignore_index, eps, masked, rows,
                                            needs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, target, weight, reduction, ignore_index, eps, masked, rows, _ = inputs
        _, dx, dw, db = output
        ctx.mark_non_differentiable(*[t for t in (dx, dw, db) if t is not None])
        # No zero-filled upstream gradients for the gradient outputs: that would be a
        # (C, in) allocation per backward. A missing dloss comes in as None.
        ctx.set_materialize_grads(False)
        ctx.options = (reduction, ignore_index, eps, masked, rows)
        # The inputs (they exist anyway; backward recomputes from them when it must) and the
        # precomputed gradients, which the graph holds until backward.
        ctx.save_for_backward(x, w, b, target, weight, dx, dw, db)
        ctx.save_for_forward(x, w, b, target, weight)

    @staticmethod
    def backward(ctx, dloss, *_):
        x, w, b, target, weight, dx, dw, db = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        if dloss is None or not any(needs):
            return (None,) * 11
        precomputed = all(p is not None for p, need in zip((dx, dw, db), needs) if need)
        if precomputed and _use_inplace(dloss):
            grads = [p if need else None for p, need in zip((dx, dw, db), needs)]
            if not (can_inspect_values(dloss) and dloss.item() == 1):
                # d(dloss * loss) = dloss * (gradients for 1): fresh tensors, the saved ones intact
                grads = [None if p is None else dloss * p for p in grads]
            # else the saved gradients themselves: no copy (autograd steals them into .grad
            # once the graph is freed)
        else:
            grads = linear_cross_entropy_backward(dloss, x, w, b, target, weight, *ctx.options, needs)
        return (*grads, None, None, None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, dx, dw, db, *_):
        x, w, b, target, weight = ctx.saved_tensors
        dloss = linear_cross_entropy_jvp(dx, dw, db, x, w, b, target, weight, *ctx.options)
        return dloss, None, None, None


def _default_rows(n_classes, itemsize):
    return max(1, CHUNK_BYTES // max(1, n_classes * itemsize))


def _chunk_rows(options, n, in_features, n_classes, dtype):
    """Rows per chunk: LinearCrossEntropyOptions' batch_chunk_size or explicit chunking_method
    ("aspect_ratio[:k]"), else about CHUNK_BYTES of logits."""
    if options is None:
        return _default_rows(n_classes, _acc_dtype(dtype).itemsize)
    if options.acc_dtype is not None and options.acc_dtype != _acc_dtype(dtype):
        raise NotImplementedError(
            f"linear_cross_entropy: options.acc_dtype={options.acc_dtype} is not supported; manualgrad "
            f"accumulates in {_acc_dtype(dtype)} for {dtype} inputs (pass acc_dtype=None)"
        )
    # acc_policy trades torch's buffers for precision; manualgrad has one policy (acc_dtype
    # throughout), the same result. allow_retain_graph: always allowed here.
    method = options.chunking_method
    if method == "auto" and options.batch_chunk_size is not None:
        method = None
    if method is None:
        rows = options.batch_chunk_size or n
        return max(1, min(rows, n))
    if method == "auto":
        return _default_rows(n_classes, _acc_dtype(dtype).itemsize)
    rows = options._compute_batch_chunk_size(n, in_features, n_classes, method)
    if options.batch_chunk_size is not None and options.batch_chunk_size != rows:
        raise ValueError(
            f"batch_chunk_size (={options.batch_chunk_size}) and chunking_method ('{method}') give different "
            f"chunk sizes ({options.batch_chunk_size} vs {rows}); pass only one."
        )
    return max(1, rows)


def linear_cross_entropy(
    input,
    linear_weight,
    target,
    *,
    linear_bias=None,
    weight=None,
    reduction="mean",
    ignore_index=None,
    label_smoothing=0.0,
    options=None,
):
    """Drop-in for ``torch.nn.functional.linear_cross_entropy``: always chunked over the tokens,
    whatever ``options`` (which sets only the chunk size here), with a hand-written backward.

    Class-index targets with a (C, in) linear_weight take the fused, chunked path. Class
    probabilities (the target already holds N x C numbers) and K-dimensional weights
    (C, d1, ..., dK, in) are computed as manualgrad's cross_entropy(linear(...)), as torch's
    reference path does.
    """
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    batch, in_features = input.shape[:-1], input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    n_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes, *out_features):
        raise RuntimeError(
            f"expected linear_bias shape {(n_classes, *out_features)}, got {tuple(linear_bias.shape)}"
        )
    if out_features and not batch:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}"
        )
    logits_shape = (*batch, n_classes, *out_features)
    probabilities = tuple(target.shape) == logits_shape
    if probabilities and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else ignore_index
    reduction = get_reduction(None, None, reduction)
    if probabilities or out_features:
        # logits = x W^T + b reshaped to (N, C, d1, ..., dK), then cross_entropy
        w2 = linear_weight.reshape(-1, in_features)
        b2 = None if linear_bias is None else linear_bias.reshape(-1)
        logits = linear(input, w2, b2).reshape(logits_shape)
        return cross_entropy(logits, target, weight=weight, reduction=reduction, ignore_index=ignore_index,
                             label_smoothing=label_smoothing)

    eps = _check_label_smoothing(label_smoothing)
    autocast = autocast_on(input.device.type)  # then apply casts all to one dtype
    for name, p in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if p is not None and p.dtype != input.dtype and not autocast:
            raise RuntimeError(
                f"linear_cross_entropy: expected {name} of the input's dtype {input.dtype}, got {p.dtype}"
            )
    # cross_entropy's target and class-weight checks, on the logits' shape (meta: no memory)
    target = _check_index_target(input.new_empty(logits_shape, device="meta"), target, weight)
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.reshape(1)
    masked = _has_ignored_targets(target, ignore_index, n_classes)
    rows = _chunk_rows(options, input.shape[0], in_features, n_classes, input.dtype)
    needs = None
    if reduction != "none" and torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
        needs = (input.requires_grad, linear_weight.requires_grad,
                 linear_bias is not None and linear_bias.requires_grad)
        needs = needs if any(needs) else None
    loss = apply(LinearCrossEntropyFunction, input, linear_weight, linear_bias, target, weight, reduction,
                 ignore_index, eps, masked, rows, needs)[0]
    if autocast:  # the products ran in the autocast dtype; the loss is float32, as torch's cross_entropy's
        loss = loss.float()
    return loss.squeeze(0) if unbatched and reduction == "none" else loss
