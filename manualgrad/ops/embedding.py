"""embedding: a table lookup, y = W[idx].

Shapes: idx (*) integer, W (num, D), y (*, D).

The lookup is linear in W, so its backward is the transposed lookup: every row of dy is added
into the row of dW it was read from (rows read twice get both), and rows never read get zero.

    dW[j] = sum over positions i with idx_i = j of dy_i          (j != padding_idx)
    dW[padding_idx] = 0                                          (the padding row is frozen)
    scale_grad_by_freq: dW[j] /= count of j in idx
    sparse=True: dW as a sparse (num, D) COO tensor with one entry (idx_i, dy_i) per position i,
        uncoalesced (rows read twice appear twice), padding positions left out, as torch's

max_norm: before the lookup, every row W[j] that idx reads with ||W[j]||_p > max_norm is scaled
in place (no gradient) by max_norm / (||W[j]||_p + 1e-7), exactly as torch.embedding_renorm_.

The backward is linear in dy and reads only idx (a non-differentiable input), so double
backward needs nothing more: autograd differentiates index_add with respect to dy.
"""
import torch

from ._apply import INPUT, apply
from ._checks import is_transformed


def embedding_forward(idx, w):
    # y = W[idx]                                           (*, D)
    return w.index_select(0, idx.reshape(-1)).view(*idx.shape, w.shape[1])


def embedding_backward(dy, idx, num, padding_idx=None, scale_grad_by_freq=False):
    flat = idx.reshape(-1)  #                                (n,)
    dy2 = dy.reshape(flat.shape[0], dy.shape[-1])  #         (n, D)
    dw = dy.new_zeros(num, dy.shape[-1])
    # dW[j] = sum_{i: idx_i = j} dy_i                        (num, D)
    # (in place on a fresh zero table, except under a transform, which cannot write a batched
    #  dy into an unbatched table)
    dw = dw.index_add(0, flat, dy2) if is_transformed(dy) else dw.index_add_(0, flat, dy2)
    if scale_grad_by_freq:
        # dW[j] /= count_j (rows never read stay 0 / 1 = 0)  (num, D)
        counts = torch.bincount(flat, minlength=num).clamp_min_(1).to(dw.dtype)
        dw = dw / counts.unsqueeze(1)
    if padding_idx is not None:
        # dW[padding_idx] = 0                                (num, D)
        # (in place on one row: autograd and vmap both follow a write into a fresh table)
        dw[padding_idx] = 0
    return dw


def embedding_sparse_backward(dy, idx, num, padding_idx=None):
    flat = idx.reshape(-1)  #                                (n,)
    dy2 = dy.reshape(flat.shape[0], dy.shape[-1])  #         (n, D)
    if padding_idx is not None:
        # positions that read the padding row give nothing    (n',) and (n', D)
        keep = flat != padding_idx
        flat, dy2 = flat[keep], dy2[keep]
    # dW = sum_i e_{idx_i} dy_i^T, kept as the list of its terms: COO indices (1, n'), values (n', D)
    if dy2.numel() == 0:  # no terms (or terms of width 0): torch's gradient holds none
        flat, dy2 = flat[:0], dy2[:0]
    # (the indices were checked by the forward lookup: no second check)
    return torch.sparse_coo_tensor(flat.long().unsqueeze(0), dy2, (num, dy.shape[-1]), check_invariants=False)


def embedding_renorm_(w, idx, max_norm, norm_type):
    """torch.embedding_renorm_: rescale in place, without a gradient, the rows of W that idx reads
    whose p-norm exceeds max_norm. Returns w."""
    with torch.no_grad():
        table = w.detach()
        # the rows read, each once                           (u,)
        rows = torch.unique(idx.reshape(-1)).long()
        if table.shape[0] == 0 and rows.numel() > 0:  # (index_select would raise RuntimeError here)
            raise IndexError(f"index {rows[0].item()} is out of range for a table of 0 rows")
        # ||W[j]||_p                                         (u,)
        norms = table.index_select(0, rows).norm(norm_type, dim=1)
        big = norms > max_norm
        rows, norms = rows[big], norms[big]
        # s_j = max_norm / (||W[j]||_p + 1e-7), in double as torch, applied in W's dtype   (u',)
        scale = (max_norm / (norms.double() + 1e-7)).to(w.dtype)
        # W[j] *= s_j                                        (u', D)
        table.index_copy_(0, rows, table.index_select(0, rows) * scale.unsqueeze(1))
    return w


class EmbeddingFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (on no autocast list)
    generate_vmap_rule = True

    @staticmethod
    def forward(idx, w, padding_idx, scale_grad_by_freq, sparse):
        return embedding_forward(idx, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        idx, w, padding_idx, scale_grad_by_freq, sparse = inputs
        ctx.num = w.shape[0]
        ctx.padding_idx, ctx.scale_grad_by_freq, ctx.sparse = padding_idx, scale_grad_by_freq, sparse
        ctx.save_for_backward(idx)
        ctx.save_for_forward(idx)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        (idx,) = ctx.saved_tensors
        if ctx.sparse:
            if ctx.scale_grad_by_freq:  # (torch's message and type, raised in backward as torch)
                raise RuntimeError("embedding_backward: scale_grad_by_freq not supported with sparse gradients")
            return None, embedding_sparse_backward(dy, idx, ctx.num, ctx.padding_idx), None, None, None
        dw = embedding_backward(dy, idx, ctx.num, ctx.padding_idx, ctx.scale_grad_by_freq)
        return None, dw, None, None, None

    @staticmethod
    def jvp(ctx, _didx, dw, _padding_idx, _scale, _sparse):
        (idx,) = ctx.saved_tensors
        # dy = dW[idx]: the lookup is linear in W               (*, D)
        return embedding_forward(idx, dw)


def _check(input, weight, padding_idx):
    if weight.dim() != 2:
        raise RuntimeError(f"'weight' must be 2-D, got a {weight.dim()}-D weight of shape {tuple(weight.shape)}")
    if input.dtype not in (torch.long, torch.int):
        raise RuntimeError(
            "Expected tensor for argument #1 'indices' to have one of the following scalar types: Long, Int; "
            f"but got {input.dtype} instead (while checking arguments for embedding)"
        )
    if padding_idx is not None:
        # torch's checks (AssertionError, as torch): 0 always passes, even with no embeddings
        num = weight.size(0)
        if not -num <= padding_idx < max(num, 1):
            raise AssertionError(f"Padding_idx must be within num_embeddings: got {padding_idx} for {num} embeddings")
        if padding_idx < 0:
            padding_idx += num
    return padding_idx


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False):
    """Drop-in for ``torch.nn.functional.embedding`` with a hand-written backward.

    ``max_norm`` rescales the rows read in place first, as torch; ``sparse=True`` gives a sparse
    COO weight gradient, as torch's. Indices out of range fail in index_select with torch's IndexError.
    """
    padding_idx = _check(input, weight, padding_idx)
    if max_norm is not None:
        embedding_renorm_(weight, input, max_norm, norm_type)
    return apply(EmbeddingFunction, input, weight, padding_idx, scale_grad_by_freq, bool(sparse))
