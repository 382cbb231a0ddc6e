"""embedding_bag: sums, means or maxes of bags of table rows, y[b] = reduce_{i in bag b} W[idx_i].

Shapes: idx (n,) integer (a 2-D (B, N) input is B bags of N), bag (n,) the bag of each entry,
W (num, D), per-sample weights p (n,), y (B, D).

Entry i belongs to bag bag_i, the last bag starting at or before it; entries that take part in
no bag (past the last offset with include_last_offset, or holding padding_idx) are left out.
bag_i is recomputed from the offsets in backward rather than kept, as torch keeps only the
indices and offsets (and p, W when p is given). The sum and mean forward runs in torch's
forward-only kernel (bag_sum_forward_fast); bag_sum_forward is the formula it is tested against:

    sum:   y[b] = sum_{i in b} p_i W[idx_i]                   (p_i = 1 without per-sample weights)
    mean:  y[b] = (1 / |b|) sum_{i in b} W[idx_i]             |b| = entries of b taking part, 0 if none
    dW[j]  = sum_{i: idx_i = j} p_i c_{bag_i} dy[bag_i]       c_b = 1 (sum) or 1 / |b| (mean): the
                                                              transposed lookup, as in embedding
    dp_i   = dy[bag_i] . W[idx_i]                             (sum mode only: torch takes p there only)
    scale_grad_by_freq: dW[j] /= count of j in idx
    sparse=True: dW as a sparse (num, D) COO tensor of the terms p_i c_{bag_i} dy[bag_i] at rows idx_i,
        one per entry that takes part, uncoalesced, as torch's

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
# which bag each entry belongs to, recomputed from the offsets (cheaper than keeping it)

def entry_bags(idx, offsets, include_last_offset, padding_idx):
    """(bag (n,), B): bag_i of entry i, and the number of bags B. An entry that takes part in no
    bag (past the last offset with include_last_offset, or holding padding_idx) gets bag_i = B,
    an extra bin that the callers drop."""
    n = idx.shape[0]
    num_bags = offsets.shape[0] - (1 if include_last_offset else 0)
    # bag_i = #{k >= 1: offsets[k] <= i}: a 1 at each later offset, summed up to i   (n,)
    # (with include_last_offset the last offset sends the entries past it to bag B)
    marks = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    marks = marks.index_add(0, offsets[1:], torch.ones_like(offsets[1:], dtype=torch.long))
    bag = marks[:n].cumsum(0)
    if padding_idx is not None:
        # entries holding padding_idx take no part                                   (n,)
        bag = torch.where(idx == padding_idx, num_bags, bag)
    return bag, num_bags


def _bag_sizes(bag, num_bags, dtype):
    # |b| = the entries taking part in bag b                                          (B,)
    size = torch.zeros(num_bags + 1, dtype=dtype, device=bag.device)
    return size.index_add(0, bag, torch.ones_like(bag, dtype=dtype))[:num_bags]


# ---------------------------------------------------------------------------------------------
# sum and mean

def bag_sum_forward(idx, offsets, w, p, mean, include_last_offset, padding_idx):
    bag, num_bags = entry_bags(idx, offsets, include_last_offset, padding_idx)
    # p_i W[idx_i]                                           (n, D)
    rows = w.index_select(0, idx)
    if p is not None:
        rows = rows * p.unsqueeze(1)
    # s[b] = sum_{i in b} p_i W[idx_i]; row B collects the entries of no bag   (B + 1, D)
    s = rows.new_zeros(num_bags + 1, w.shape[1]).index_add(0, bag, rows)
    if mean:
        # mean: y[b] = s[b] / |b| (an empty bag stays 0)    (B, D)
        return s[:num_bags] / _bag_sizes(bag, num_bags, s.dtype).clamp_min(1).unsqueeze(1)
    # sum: y = s without row B (a copy: an output may not be a view of a temporary)   (B, D)
    return s[:num_bags].clone()


def bag_sum_forward_fast(idx, offsets, w, p, mean, include_last_offset, padding_idx):
    """bag_sum_forward in torch's forward-only kernel: each row read is added into its bag at once,
    never stored as the (n, D) rows above (about 10x faster on the bench case: 82k rows of 64). The
    plain form is the reference (tested equal) and runs where the kernel cannot: where a graph is
    recorded (the kernel has no derivative: a jvp under double backward), under a transform (no
    batching rule), for a table of width 0 (the kernel indexes past it) and for no offsets with
    indices (no bags: the float64 kernel writes past its empty output)."""
    tracked = torch.is_grad_enabled() and (w.requires_grad or (p is not None and p.requires_grad))
    transformed = is_transformed(w) or (p is not None and is_transformed(p))
    if tracked or transformed or w.shape[1] == 0 or offsets.shape[0] == 0:
        return bag_sum_forward(idx, offsets, w, p, mean, include_last_offset, padding_idx)
    # with include_last_offset the kernel adds the entries past the last offset to the last bag
    # (torch 2.13 CPU, in float64 or with padding_idx; pytorch/pytorch#52851): every offset is
    # given as a bag start instead, those entries land in an extra bag B, dropped as above
    y = torch.ops.aten._embedding_bag_forward_only(
        w, idx, offsets.to(idx.dtype), False, 1 if mean else 0, False, p, False,
        -1 if padding_idx is None else padding_idx)[0]
    return y[:-1].clone() if include_last_offset else y


def bag_sum_backward(dy, idx, offsets, w, p, mean, include_last_offset, padding_idx, num,
                     scale_grad_by_freq=False, needs=(True, True), sparse=False):
    """(dW, dp), each where needs says so."""
    dw = dp = None
    bag, num_bags = entry_bags(idx, offsets, include_last_offset, padding_idx)
    if mean:
        # mean: the gradient reaching each summand, dy[b] / |b|   (B, D)
        dy = dy / _bag_sizes(bag, num_bags, dy.dtype).clamp_min(1).unsqueeze(1)
    # g_i = dy[bag_i], 0 for an entry of no bag              (n, D)
    g = torch.cat([dy, dy.new_zeros(1, dy.shape[1])]).index_select(0, bag)
    if needs[0]:
        # p_i g_i: what entry i adds to its row              (n, D)
        gp = g if p is None else g * p.unsqueeze(1)
        if sparse:
            # dW = sum_i e_{idx_i} (p_i g_i)^T over the entries that take part (bag_i < B), kept as a
            # list of terms: COO indices (1, n'), values (n', D); terms of width 0: none, as torch
            part = (bag < num_bags) if gp.numel() > 0 else torch.zeros_like(bag, dtype=torch.bool)
            dw = torch.sparse_coo_tensor(idx[part].long().unsqueeze(0), gp[part], (num, dy.shape[1]),
                                         check_invariants=False)
        else:
            # dW[j] = sum_{i: idx_i = j} p_i g_i             (num, D)
            dw = dy.new_zeros(num, dy.shape[1])
            # (in place on a fresh table, except under a transform: see embedding_backward)
            dw = dw.index_add(0, idx, gp) if is_transformed(gp) else dw.index_add_(0, idx, gp)
            if scale_grad_by_freq:
                # dW[j] /= count_j (rows never read stay 0 / 1 = 0)   (num, D)
                counts = torch.bincount(idx, minlength=num).clamp_min_(1).to(dw.dtype)
                dw = dw / counts.unsqueeze(1)
    if needs[1]:
        # dp_i = g_i . W[idx_i]                              (n,)
        dp = (g * w.index_select(0, idx)).sum(1)
    return dw, dp


class EmbeddingBagSumFunction(torch.autograd.Function):
    """y[b] = sum_{i in b} p_i W[idx_i] (sum), or that over |b| (mean). Keeps what torch's keeps:
    the indices, the offsets, and p and W when p is given; the bag of each entry is recomputed."""
    autocast = INPUT  # autocast: no cast (torch's embedding_bag is on no CPU or CUDA autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(idx, offsets, w, p, mean, include_last_offset, padding_idx, scale_grad_by_freq, sparse):
        return bag_sum_forward_fast(idx, offsets, w, p, mean, include_last_offset, padding_idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        idx, offsets, w, p, mean, include_last_offset, padding_idx, scale_grad_by_freq, sparse = inputs
        ctx.num, ctx.scale_grad_by_freq, ctx.sparse = w.shape[0], scale_grad_by_freq, sparse
        ctx.bags = mean, include_last_offset, padding_idx
        # W is read by dp only
        saved = idx, offsets, (w if p is not None else None), p
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, dy):
        idx, offsets, w, p = ctx.saved_tensors
        needs = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        if ctx.sparse and ctx.scale_grad_by_freq and needs[0]:  # (torch's type and message, in backward as torch)
            raise RuntimeError("embedding_backward: scale_grad_by_freq not supported with sparse gradients")
        dw, dp = bag_sum_backward(dy, idx, offsets, w, p, *ctx.bags, ctx.num, ctx.scale_grad_by_freq, needs,
                                  ctx.sparse)
        return None, None, dw, dp, None, None, None, None, None

    @staticmethod
    def jvp(ctx, _didx, _doffsets, dw, dp, *_):
        idx, offsets, w, p = ctx.saved_tensors
        # dy[b] = sum_{i in b} (p_i dW[idx_i] + dp_i W[idx_i]) (over |b| for mean)   (B, D)
        # (each term where its tangent exists)
        terms = []
        if dw is not None:
            terms.append(bag_sum_forward_fast(idx, offsets, dw, p, *ctx.bags))
        if dp is not None:
            terms.append(bag_sum_forward_fast(idx, offsets, w, dp, *ctx.bags))
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

    if mode == "max":
        idx = input.long()
        bag, num_bags = entry_bags(idx, offsets, include_last_offset, padding_idx)
        # the entries that take part, and their bags (those of none clamped into range: masked by keep)   (n,)
        keep = bag < num_bags
        bag = bag.clamp(max=max(num_bags - 1, 0))
        return apply(EmbeddingBagMaxFunction, idx, bag, keep, weight, num_bags)[0]
    return apply(EmbeddingBagSumFunction, input, offsets, weight, psw, mode == "mean", include_last_offset,
                 padding_idx, scale_grad_by_freq, bool(sparse))
