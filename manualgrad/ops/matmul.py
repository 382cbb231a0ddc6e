"""Tensor-level products: matmul, mm, bmm, addmm, baddbmm.

Shapes: mm A (n, m) @ B (m, p) -> Y (n, p); bmm the same with a leading batch dim (b, n, m);
addmm / baddbmm Y = beta C + alpha A B, with C broadcastable to A B's shape; matmul follows
torch.matmul: a 1-D left operand is a row (1, m), a 1-D right operand a column (m, 1), and
the result drops that dim; batch dims (all but the last two) broadcast.

Every gradient is one more product with an operand transposed. For Y = beta C + alpha A B:

    dA = alpha dY B^T        dB = alpha A^T dY        dC = beta dY
    dY (forward mode) = beta dC + alpha (dA B + A dB)

and an operand broadcast in forward gets its gradient summed over the dims it was broadcast
along. Forward values come from torch's kernels (bit-for-bit torch's numbers); backward and
jvp are the formulas above as torch products, so they differentiate again (double backward)
and batch under vmap (``generate_vmap_rule``).
"""
import torch

from ._apply import LOWER, apply
from ._checks import can_write_inplace, rows

# (product, fused add-product) for plain matrices and for a batch of them
_KERNELS = {False: (torch.mm, torch.addmm), True: (torch.bmm, torch.baddbmm)}


def _scale(t, s):
    """s * t for a freshly computed t: t itself when s == 1 (as torch does), in place when no
    graph is recorded (saves an allocation the size of a gradient)."""
    if s == 1:
        return t
    return t.mul_(s) if can_write_inplace(t) else t * s


def _no_out(out, name):
    if out is not None:
        raise NotImplementedError(
            f"manualgrad {name}: out= is not supported (a result written into out= has no autograd "
            f"history to hand-write); call {name} without out= and copy the result"
        )


# ---------------------------------------------------------------------------------------------
# products of matrices and batches of matrices: mm, bmm (Y = A B) and addmm, baddbmm
# (Y = beta C + alpha A B). One pair serves both ranks: ``batched`` picks the kernels.

def product_forward(a, b, batched=False):
    # Y = A B                                              (n, p), or (b, n, p) batched
    return _KERNELS[batched][0](a, b)


def product_backward(dy, a, b, needs=(True, True), alpha=1, batched=False):
    """Gradients of Y = alpha A B. ``needs`` says which of (dA, dB) to compute."""
    mm = _KERNELS[batched][0]
    da = db = None
    if needs[0]:
        # dA = alpha dY B^T                                  (n, m), or (b, n, m) batched
        da = _scale(mm(dy, b.mT), alpha)
    if needs[1]:
        # dB = alpha A^T dY                                  (m, p), or (b, m, p) batched
        db = _scale(mm(a.mT, dy), alpha)
    return da, db


def product_jvp(da, db, a, b, alpha=1, dc=None, beta=0, batched=False):
    """Tangent of Y = beta C + alpha A B; a None tangent is a zero one."""
    mm, addmm = _KERNELS[batched]
    # dY = beta dC + alpha dA B + alpha A dB, each product fused into the running sum   (.., n, p)
    out = dc * beta if dc is not None and beta != 0 else None
    for x, y in ((da, b), (a, db)):
        if x is None or y is None:
            continue
        out = _scale(mm(x, y), alpha) if out is None else addmm(out, x, y, alpha=alpha)
    shape = a.shape[:-1] + b.shape[-1:]
    return a.new_zeros(shape) if out is None else out.expand(shape)


def addproduct_forward(c, a, b, beta=1, alpha=1, batched=False):
    # Y = beta C + alpha A B (C ignored, NaN included, when beta = 0)   (n, p), or (b, n, p)
    return _KERNELS[batched][1](c, a, b, beta=beta, alpha=alpha)


def addproduct_backward(dy, c_shape, a, b, beta=1, alpha=1, needs=(True, True, True), batched=False):
    """Gradients of Y = beta C + alpha A B. ``needs`` says which of (dC, dA, dB) to compute."""
    dc = None
    if needs[0]:
        # dC = beta dY, summed over the dims C was broadcast along       like C
        dc = dy.sum_to_size(c_shape)
        dc = dc if beta == 1 else dc * beta  # out of place: dc may be dy itself
    return (dc, *product_backward(dy, a, b, needs[1:], alpha, batched))


class ProductFunction(torch.autograd.Function):
    """Y = A B: torch.mm (batched=False) or torch.bmm (batched=True)."""
    autocast = LOWER  # autocast: in the autocast dtype (torch's lower-precision list)

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b, batched):
        return product_forward(a, b, batched)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, batched = inputs
        ctx.batched = batched
        # Save only what a gradient we will compute needs: dA needs B, dB needs A.
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)
        ctx.save_for_forward(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        return (*product_backward(dy, a, b, ctx.needs_input_grad[:2], 1, ctx.batched), None)

    @staticmethod
    def jvp(ctx, da, db, _):
        a, b = ctx.saved_tensors
        return product_jvp(da, db, a, b, batched=ctx.batched)


class AddProductFunction(torch.autograd.Function):
    """Y = beta C + alpha A B: torch.addmm (batched=False) or torch.baddbmm (batched=True)."""
    autocast = LOWER  # autocast: in the autocast dtype (torch's lower-precision list)

    generate_vmap_rule = True

    @staticmethod
    def forward(c, a, b, beta, alpha, batched):
        return addproduct_forward(c, a, b, beta, alpha, batched)

    @staticmethod
    def setup_context(ctx, inputs, output):
        c, a, b, beta, alpha, batched = inputs
        ctx.c_shape, ctx.beta, ctx.alpha, ctx.batched = c.shape, beta, alpha, batched
        ctx.save_for_backward(a if ctx.needs_input_grad[2] else None, b if ctx.needs_input_grad[1] else None)
        ctx.save_for_forward(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        grads = addproduct_backward(
            dy, ctx.c_shape, a, b, ctx.beta, ctx.alpha, ctx.needs_input_grad[:3], ctx.batched
        )
        return (*grads, None, None, None)

    @staticmethod
    def jvp(ctx, dc, da, db, *_):
        a, b = ctx.saved_tensors
        return product_jvp(da, db, a, b, ctx.alpha, dc, ctx.beta, ctx.batched)


def mm(input, mat2, *, out=None):
    """Drop-in for ``torch.mm``: (n, m) @ (m, p) -> (n, p). Bad shapes and dtypes fail in torch.mm."""
    _no_out(out, "mm")
    return apply(ProductFunction, input, mat2, False)


def bmm(input, mat2, *, out=None):
    """Drop-in for ``torch.bmm``: (b, n, m) @ (b, m, p) -> (b, n, p), no broadcasting."""
    _no_out(out, "bmm")
    return apply(ProductFunction, input, mat2, True)


def addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    """Drop-in for ``torch.addmm``: beta input + alpha mat1 @ mat2, input broadcastable to (n, p)."""
    _no_out(out, "addmm")
    return apply(AddProductFunction, input, mat1, mat2, beta, alpha, False)


def baddbmm(input, batch1, batch2, *, beta=1, alpha=1, out=None):
    """Drop-in for ``torch.baddbmm``: beta input + alpha batch1 @ batch2, input broadcastable to (b, n, p)."""
    _no_out(out, "baddbmm")
    return apply(AddProductFunction, input, batch1, batch2, beta, alpha, True)


# ---------------------------------------------------------------------------------------------
# matmul: torch.matmul's 1-D, 2-D and broadcast batched cases

def matmul_forward(a, b):
    # Y = A B, 1-D operands promoted and their dim dropped, batch dims broadcast      (*, n, p)
    return torch.matmul(a, b)


def matmul_backward(dy, a, b, a_shape, b_shape, needs=(True, True)):
    """Gradients of Y = torch.matmul(A, B). ``needs`` says which of (dA, dB) to compute; dA
    needs only B (and A's shape), dB only A, so the other may be None.

    A 1-D A is the row (1, m) and a 1-D B the column (m, 1) that torch.matmul multiplies; dY
    gets back the dim the result dropped, and the batched formulas then cover every case.
    """
    if len(a_shape) == 2 and len(b_shape) == 2:
        return product_backward(dy, a, b, needs)  # plain mm: no promotion, no broadcasting
    a2_shape = (1, *a_shape) if len(a_shape) == 1 else a_shape  #     (*A, n, m)
    b2_shape = (*b_shape, 1) if len(b_shape) == 1 else b_shape  #     (*B, m, p)
    if len(b_shape) == 1:
        dy = dy.unsqueeze(-1)
    if len(a_shape) == 1:
        dy = dy.unsqueeze(-2)  #                         (*, n, p), * = broadcast of *A and *B
    da = db = None
    if needs[0]:
        b2 = b.unsqueeze(-1) if len(b_shape) == 1 else b
        # dA = dY B^T, summed over the batch dims A was broadcast along      (*A, n, m) -> like A
        da = torch.matmul(dy, b2.mT).sum_to_size(a2_shape).reshape(a_shape)
    if needs[1]:
        a2 = a.unsqueeze(0) if len(a_shape) == 1 else a
        if len(b2_shape) == 2 and dy.dim() > 2:
            # B is shared by every batch: dB = sum_batch A^T dY, one mm over the folded rows  (m, p)
            db = rows(a2).t().mm(rows(dy))
        else:
            # dB = A^T dY, summed over the batch dims B was broadcast along  (*B, m, p)
            db = torch.matmul(a2.mT, dy).sum_to_size(b2_shape)
        db = db.reshape(b_shape)  #                      like B
    return da, db


def matmul_jvp(da, db, a, b):
    # dY = dA B + A dB (a None tangent is a zero one)     (*, n, p) like Y
    terms = [torch.matmul(x, y) for x, y in ((da, b), (a, db)) if x is not None and y is not None]
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


class MatmulFunction(torch.autograd.Function):
    autocast = LOWER  # autocast: in the autocast dtype (torch's lower-precision list)
    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        return matmul_forward(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b = inputs
        ctx.a_shape, ctx.b_shape = a.shape, b.shape
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)
        ctx.save_for_forward(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        return matmul_backward(dy, a, b, ctx.a_shape, ctx.b_shape, ctx.needs_input_grad)

    @staticmethod
    def jvp(ctx, da, db):
        a, b = ctx.saved_tensors
        return matmul_jvp(da, db, a, b)


def matmul(input, other, *, out=None):
    """Drop-in for ``torch.matmul`` (and ``@``): dot, mv, vm, mm and broadcast batched products.

    Bad input (a 0-d operand, mismatched sizes or dtypes) fails in torch.matmul with torch's
    RuntimeError and message.
    """
    _no_out(out, "matmul")
    return apply(MatmulFunction, input, other)
