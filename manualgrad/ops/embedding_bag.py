"""embedding_bag: sums, means or maxes of bags of table rows, y[b] = reduce_{i in bag b} W[idx_i].

Shapes: idx (n,) integer (a 2-D (B, N) input is B bags of N), bag (n,) the bag of each entry,
W (num, D), per-sample weights p (n,), y (B, D).

The functional turns torch's arguments (offsets, include_last_offset, padding_idx, mode) into
one factor per entry, c_i, and a bag id per entry; entries that belong to no bag (after the
last offset) or hold padding_idx get c_i = 0 and take no part:

    sum / mean:  y[b] = sum_{i in b} c_i p_i W[idx_i]       c_i = 1 (sum) or 1 / |b| (mean),
                                                              |b| = entries of b that are not padding
    dW[j]  = sum_{i: idx_i = j} c_i p_i dy[bag_i]             (the transposed lookup, as in embedding)
    dp_i   = c_i dy[bag_i] . W[idx_i]                         (sum mode only: torch takes p there only)
    scale_grad_by_freq: dW[j] /= count of j in idx
    sparse=True: dW as a sparse (num, D) COO tensor of the terms u_i dy[bag_i] at rows idx_i, one per
        entry that takes part (c_i != 0), uncoalesced, as torch's

    max:  y[b, d] = max_{i in b} W[idx_i, d]  (0 for an empty bag), a[b, d] the row it came from
    dW[j, d] = sum_{b: a[b, d] = j} dy[b, d]                  (each output reads one row per feature)

Both backward passes are linear in dy and read only the indices (non-differentiable) and W, p:
they are written in differentiable torch ops, so autograd of them is double backward.
"""
import math

import torch

from ._apply import INPUT, apply
from ._checks import can_inspect_values, is_transformed
from .embedding import embedding_renorm_


# ---------------------------------------------------------------------------------------------
# sum and mean

def bag_sum_forward(idx, bag, c, w, p, num_bags):
    # u_i = c_i p_i                                          (n,)
    u = c if p is None else c * p
    # y[b] = sum_{i in b} u_i W[idx_i]                       (B, D)
    rows = w.index_select(0, idx) * u.unsqueeze(1)  #        (n, D)
    return rows.new_zeros(num_bags, w.shape[1]).index_add(0, bag, rows)


def bag_sum_backward(dy, idx, bag, c, w, p, num, scale_grad_by_freq=False, needs=(True, True), sparse=False):
    """(dW, dp), each where needs says so."""
    dw = dp = None
    # g_i = dy[bag_i]: the gradient reaching entry i        (n, D)
    g = dy.index_select(0, bag)
    if needs[0]:
        u = c if p is None else c * p
        # u_i g_i: what entry i adds to its row              (n, D)
        gu = g * u.unsqueeze(1)
        if sparse:
            # dW = sum_i e_{idx_i} (u_i g_i)^T over the entries that take part (c_i != 0), kept as a
            # list of terms: COO indices (1, n'), values (n', D); terms of width 0: none, as torch
            part = (c != 0) if gu.numel() > 0 else torch.zeros_like(c, dtype=torch.bool)
            dw = torch.sparse_coo_tensor(idx[part].unsqueeze(0), gu[part], (num, dy.shape[1]), check_invariants=False)
        else:
            # dW[j] = sum_{i: idx_i = j} u_i g_i             (num, D)
            dw = dy.new_zeros(num, dy.shape[1])
            # (in place on a fresh table, except under a transform: see embedding_backward)
            dw = dw.index_add(0, idx, gu) if is_transformed(gu) else dw.index_add_(0, idx, gu)
            if scale_grad_by_freq:
                # dW[j] /= count_j (rows never read stay 0 / 1 = 0)   (num, D)
                counts = torch.bincount(idx, minlength=num).clamp_min_(1).to(dw.dtype)
                dw = dw / counts.unsqueeze(1)
    if needs[1]:
        # dp_i = c_i g_i . W[idx_i]                          (n,)
        dp = c * (g * w.index_select(0, idx)).sum(1)
    return dw, dp


class EmbeddingBagSumFunction(torch.autograd.Function):
    """y[b] = sum_{i in b} c_i p_i W[idx_i]: sum and mean modes (c holds the 1 / |b| of mean)."""
    autocast = INPUT  # autocast: no cast (torch's embedding_bag is on no CPU or CUDA autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(idx, bag, c, w, p, num_bags, scale_grad_by_freq, sparse):
        return bag_sum_forward(idx, bag, c, w, p, num_bags)

    @staticmethod
    def setup_context(ctx, inputs, output):
        idx, bag, c, w, p, num_bags, scale_grad_by_freq, sparse = inputs
        ctx.num, ctx.num_bags, ctx.scale_grad_by_freq, ctx.sparse = w.shape[0], num_bags, scale_grad_by_freq, sparse
        ctx.save_for_backward(idx, bag, c, w, p)
        ctx.save_for_forward(idx, bag, c, w, p)

    @staticmethod
    def backward(ctx, dy):
        idx, bag, c, w, p = ctx.saved_tensors
        needs = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        if ctx.sparse and ctx.scale_grad_by_freq and needs[0]:  # (torch's type and message, in backward as torch)
            raise RuntimeError("embedding_backward: scale_grad_by_freq not supported with sparse gradients")
        dw, dp = bag_sum_backward(dy, idx, bag, c, w, p, ctx.num, ctx.scale_grad_by_freq, needs, ctx.sparse)
        return None, None, None, dw, dp, None, None, None

    @staticmethod
    def jvp(ctx, _didx, _dbag, _dc, dw, dp, _num_bags, _scale, _sparse):
        idx, bag, c, w, p = ctx.saved_tensors
        # dy[b] = sum_{i in b} c_i (p_i dW[idx_i] + dp_i W[idx_i])      (B, D), each term where its tangent exists
        terms = []
        if dw is not None:
            terms.append(bag_sum_forward(idx, bag, c, dw, p, ctx.num_bags))
        if dp is not None:
            terms.append(bag_sum_forward(idx, bag, c * dp, w, None, ctx.num_bags))
        return sum(terms[1:], terms[0])


# ---------------------------------------------------------------------------------------------
# max

def bag_max_forward(idx, bag, keep, w, num_bags):
    """y (B, D) and a (B, D): the row each maximum was read from (-1 for an empty bag), the
    first one on ties, as torch. NaN as torch's running max: a bag whose first entry is NaN
    gives NaN, a NaN later in a bag is passed over."""
    n, d = idx.shape[0], w.shape[1]
    rows = w.index_select(0, idx)  #                         (n, D)
    nan = rows.isnan()
    # W[idx_i], -inf where entry i takes no part or is NaN   (n, D)
    vals = rows.masked_fill(~keep.unsqueeze(1) | nan, -math.inf)
    at = bag.unsqueeze(1).expand(n, d)
    # m[b, d] = max_{i in b} W[idx_i, d] over the numbers    (B, D)
    m = vals.new_full((num_bags, d), -math.inf).scatter_reduce(0, at, vals, "amax")
    # the entries that reach it, and a NaN that leads its bag (the first entry taking part)   (n, D)
    i = torch.arange(n, device=idx.device)
    start = torch.full((num_bags,), n, device=idx.device).scatter_reduce(0, bag, torch.where(keep, i, n), "amin")
    leads = keep & (i == start.index_select(0, bag))
    hit = ((vals == m.index_select(0, bag)) & keep.unsqueeze(1) & ~nan) | (leads.unsqueeze(1) & nan)
    # the first such entry per bag and feature (n: none)    (B, D)
    first = torch.full((num_bags, d), n, device=idx.device)
    first = first.scatter_reduce(0, at, torch.where(hit, i.unsqueeze(1).expand(n, d), n), "amin")
    # a[b, d] = idx at that entry, -1 for an empty bag       (B, D)
    a = torch.cat([idx, idx.new_full((1,), -1)])[first]
    # y[b, d] = W[idx, d] at that entry, 0 for an empty bag  (B, D)
    y = torch.cat([rows, rows.new_zeros(1, d)]).gather(0, first)
    return y, a


def bag_max_backward(dy, a, num):
    # dW[j, d] = sum_{b: a[b, d] = j} dy[b, d]               (num, D), empty bags add nothing
    routed = torch.where(a < 0, 0, dy)
    return dy.new_zeros(num, dy.shape[1]).scatter_add(0, a.clamp(min=0), routed)


class EmbeddingBagMaxFunction(torch.autograd.Function):
    """y[b, d] = max_{i in b} W[idx_i, d]; also returns the rows a (B, D) it read (not differentiable)."""
    autocast = INPUT  # autocast: no cast (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(idx, bag, keep, w, num_bags):
        return bag_max_forward(idx, bag, keep, w, num_bags)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.num = inputs[3].shape[0]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])

    @staticmethod
    def backward(ctx, dy, _da):
        (a,) = ctx.saved_tensors
        dw = bag_max_backward(dy, a, ctx.num) if ctx.needs_input_grad[3] else None
        return None, None, None, dw, None

    @staticmethod
    def jvp(ctx, _didx, _dbag, _dkeep, dw, _num_bags):
        (a,) = ctx.saved_tensors
        # dy[b, d] = dW[a[b, d], d]: the max reads one row per feature     (B, D), 0 for an empty bag
        return torch.where(a < 0, 0, dw.gather(0, a.clamp(min=0))), None


# ---------------------------------------------------------------------------------------------
# the functional: torch's arguments -> bag ids and factors

_MODES = ("sum", "mean", "max")


def _check_index_dtype(t, what):
    if t.dtype not in (torch.long, torch.int):
        raise RuntimeError(
            f"Expected tensor for argument #1 '{what}' to have one of the following scalar types: Long, Int; "
            f"but got {t.dtype} instead (while checking arguments for embedding_bag)"
        )


def _check_values(idx, offsets, num):
    """torch's checks of index and offset values (RuntimeError), where values can be read for free."""
    if not can_inspect_values(idx, offsets):
        return
    if offsets.numel() > 0:
        if offsets[0].item() != 0:
            raise RuntimeError(f"offsets[0] has to be 0, i.e., the first sequence in the mini-batch has to start "
                               f"from position 0. However, got {offsets[0].item()}")
        if offsets[-1].item() > idx.numel():
            raise RuntimeError(f"offsets[-1] can not be greater than input's length {idx.numel()} but got "
                               f"offsets[-1] of {offsets[-1].item()}")
        if (offsets[1:] < offsets[:-1]).any():
            raise RuntimeError(f"embedding_bag: offsets must be non-decreasing, got {offsets.tolist()}")
    if idx.numel() > 0 and (idx.min().item() < 0 or idx.max().item() >= num):
        bad = idx[(idx < 0) | (idx >= num)][0].item()
        raise RuntimeError(f"embedding_bag: index {bad} is out of range for a table of {num} rows")


def _bags(idx, offsets, include_last_offset):
    """(bag (n,) the bag of each entry, in_bag (n,) whether it belongs to one, B)."""
    n = idx.shape[0]
    starts = offsets[:-1] if include_last_offset else offsets
    num_bags = starts.shape[0]
    pos = torch.arange(n, device=idx.device)
    # bag_i = the last bag starting at or before i          (n,)
    bag = torch.searchsorted(starts.long(), pos, right=True) - 1
    end = offsets[-1] if include_last_offset else n
    in_bag = (bag >= 0) & (pos < end)
    return bag.clamp(0, max(num_bags - 1, 0)), in_bag, num_bags


def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False, mode="mean",
                  sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """Drop-in for ``torch.nn.functional.embedding_bag`` with a hand-written backward.

    ``max_norm`` rescales the rows read in place first and ``sparse=True`` gives a sparse weight
    gradient, as torch's. ``scale_grad_by_freq`` divides
    each row's gradient by its count in ``input``, as documented (torch 2.13's CPU kernel divides
    some rows by another row's count: pytorch/pytorch#190063)."""
    psw = per_sample_weights
    # torch's checks, in torch's order and with its exception types
    if psw is not None and input.size() != psw.size():
        raise ValueError(f"embedding_bag: If per_sample_weights ({psw.shape}) is not None, "
                         f"then it must have the same shape as the input ({input.shape})")
    if weight.dim() != 2:
        raise ValueError(f"weight has to be a 2D Tensor, but got Tensor of dimension {weight.dim()}")
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("if input is 2D, then offsets has to be None, as input is treated is a mini-batch of "
                             f"fixed length sequences. However, found offsets of type {type(offsets)}")
        if input.shape[1] == 0:
            raise RuntimeError("embedding_bag: a 2-D input needs at least one index per bag (torch: step must be "
                               "nonzero)")
        offsets = torch.arange(0, input.numel(), input.shape[1], dtype=input.dtype, device=input.device)
        include_last_offset = False
        input = input.reshape(-1)
        psw = None if psw is None else psw.reshape(-1)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets has to be a 1D Tensor but got None")
        if offsets.dim() != 1:
            raise ValueError("offsets has to be a 1D Tensor")
    else:
        raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}")
    if mode not in _MODES:
        raise ValueError("mode has to be one of sum, mean or max")
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("max mode does not support scaling the gradient by the frequency")
    if mode == "max" and sparse:
        raise ValueError("max mode does not support sparse weights")
    if max_norm is not None:
        # the rows read are rescaled in place where torch does it: before the remaining checks
        _check_index_dtype(input, "indices")
        embedding_renorm_(weight, input, max_norm, norm_type)
    if psw is not None and mode != "sum":
        raise NotImplementedError(
            "embedding_bag: per_sample_weights was not None. per_sample_weights is only supported for mode='sum' "
            f"(got mode='{mode}'), as in torch")
    _check_index_dtype(input, "indices")
    _check_index_dtype(offsets, "offsets")
    if psw is not None and psw.dtype != weight.dtype:
        raise RuntimeError(f"Expected tensor for argument #1 'weight' to have the same type as tensor for argument #1 "
                           f"'per_sample_weights'; but type {weight.dtype} does not equal {psw.dtype} "
                           "(while checking arguments for embedding_bag)")
    num = weight.shape[0]
    if padding_idx is not None:
        if not -num <= padding_idx < num:
            raise RuntimeError(f"padding_idx must be within the number of embeddings, -{num} through {num - 1}, "
                               f"but got {padding_idx}")
        padding_idx %= num
    if include_last_offset and offsets.numel() < 1:
        raise RuntimeError("include_last_offset: number of offset should be at least 1")
    _check_values(input, offsets, num)

    idx = input.long()
    bag, keep, num_bags = _bags(idx, offsets, include_last_offset)
    if padding_idx is not None:
        keep = keep & (idx != padding_idx)
    if mode == "max":
        return apply(EmbeddingBagMaxFunction, idx, bag, keep, weight, num_bags)[0]
    # c_i = 1 for an entry of a bag (sum), 1 / |b| (mean), 0 for an entry of none   (n,)
    c = keep.to(weight.dtype)
    if mode == "mean":
        size = torch.zeros(num_bags, dtype=weight.dtype, device=idx.device).index_add_(0, bag, c)
        c = c / size.clamp_min(1).index_select(0, bag)
    return apply(EmbeddingBagSumFunction, idx, bag, c, weight, psw, num_bags, scale_grad_by_freq, bool(sparse))
