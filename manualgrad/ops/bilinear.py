"""bilinear: y = x1^T A x2 + b, one bilinear form per output feature.

Shapes: x1 (N, I), x2 (N, J), weight A (O, I, J), bias b (O) -> y (N, O); any leading dims
(the same for x1 and x2) are folded into N by the functional.

    y[n, o]  = sum_ij x1[n, i] A[o, i, j] x2[n, j] + b[o]

The gradients are the same product with one factor left out, summed over what it shared:

    dx1[n, i]   = sum_oj dy[n, o] A[o, i, j] x2[n, j]
    dx2[n, j]   = sum_oi dy[n, o] A[o, i, j] x1[n, i]
    dA[o, i, j] = sum_n  dy[n, o] x1[n, i] x2[n, j]
    db[o]       = sum_n  dy[n, o]

Each is one matrix product (the two other factors' outer product, flattened, times A reshaped).
They are differentiable torch ops: double backward is their autograd, vmap runs them as they are.
"""
import math

import torch

from ._apply import INPUT, apply


def _form(x1, weight, x2):
    """y[n, o] = sum_ij x1[n, i] A[o, i, j] x2[n, j]  (N, O), as matrix products (which vmap
    and gradcheck's batched checks can batch; einsum they cannot)."""
    n, (o, i, j) = x1.shape[0], weight.shape
    # u[n, o, j] = sum_i x1[n, i] A[o, i, j]                  (N, O, J)
    u = (x1 @ weight.transpose(0, 1).reshape(i, o * j)).view(n, o, j)
    # y[n, o] = sum_j u[n, o, j] x2[n, j]                     (N, O)
    return (u @ x2.unsqueeze(2)).squeeze(2)


def _outer(dy, x):
    # p[n, o, k] = dy[n, o] x[n, k], as (N, O K)             (N, O K)
    return (dy.unsqueeze(2) * x.unsqueeze(1)).reshape(dy.shape[0], dy.shape[1] * x.shape[1])


def bilinear_forward(x1, x2, weight, bias):
    # y = x1^T A_o x2 for every o                             (N, O)
    y = _form(x1, weight, x2)
    # + b                                                     (N, O)
    return y if bias is None else y + bias


def bilinear_backward(dy, x1, x2, weight, needs=(True, True, True, True)):
    """(dx1, dx2, dweight, dbias), each where needs says so (dbias: needs[3], False without a bias)."""
    o, i, j = weight.shape
    dx1 = dx2 = dweight = dbias = None
    if needs[0]:
        # dx1[n, i] = sum_oj dy[n, o] x2[n, j] A[o, i, j]     (N, O J) @ (O J, I) = (N, I)
        dx1 = _outer(dy, x2) @ weight.transpose(1, 2).reshape(o * j, i)
    if needs[1]:
        # dx2[n, j] = sum_oi dy[n, o] x1[n, i] A[o, i, j]     (N, O I) @ (O I, J) = (N, J)
        dx2 = _outer(dy, x1) @ weight.reshape(o * i, j)
    if needs[2]:
        # dA[o, i, j] = sum_n dy[n, o] x1[n, i] x2[n, j]      (O I, N) @ (N, J) = (O, I, J)
        dweight = (_outer(dy, x1).t() @ x2).view(o, i, j)
    if needs[3]:
        # db = sum_n dy                                       (O)
        dbias = dy.sum(0)
    return dx1, dx2, dweight, dbias


def bilinear_jvp(dx1, dx2, dweight, dbias, x1, x2, weight):
    # dy = dx1^T A x2 + x1^T dA x2 + x1^T A dx2 + db          (N, O), each term where its tangent exists
    terms = []
    if dx1 is not None:
        terms.append(_form(dx1, weight, x2))
    if dweight is not None:
        terms.append(_form(x1, dweight, x2))
    if dx2 is not None:
        terms.append(_form(x1, weight, dx2))
    if dbias is not None:
        terms.append(dbias.expand(x1.shape[0], weight.shape[0]))
    if not terms:
        return x1.new_zeros(x1.shape[0], weight.shape[0])
    return sum(terms[1:], terms[0])


class BilinearFunction(torch.autograd.Function):
    """y = x1^T A x2 + b on rows: x1 (N, I), x2 (N, J), A (O, I, J), b (O) or None."""
    autocast = INPUT  # autocast: no cast (torch's bilinear, through _trilinear, is on no autocast list)

    generate_vmap_rule = True

    @staticmethod
    def forward(x1, x2, weight, bias):
        return bilinear_forward(x1, x2, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x1, x2, weight, _ = inputs
        ctx.save_for_backward(x1, x2, weight)
        ctx.save_for_forward(x1, x2, weight)

    @staticmethod
    def backward(ctx, dy):
        x1, x2, weight = ctx.saved_tensors
        # (needs_input_grad is False for an absent bias)
        return bilinear_backward(dy, x1, x2, weight, ctx.needs_input_grad)

    @staticmethod
    def jvp(ctx, dx1, dx2, dweight, dbias):
        x1, x2, weight = ctx.saved_tensors
        return bilinear_jvp(dx1, dx2, dweight, dbias, x1, x2, weight)


def _dtype_name(t):
    return str(t.dtype).removeprefix("torch.")


def bilinear(input1, input2, weight, bias=None):
    """Drop-in for ``torch.nn.functional.bilinear``: y = x1^T A x2 + b over the last dims,
    any leading dims (the same for both inputs) kept."""
    if input1.dim() != input2.dim():
        raise RuntimeError(f"bilinear(): input dimensions do not match: got {input1.dim()} and {input2.dim()}")
    for d in range(input1.dim() - 1):
        if input1.shape[d] != input2.shape[d]:
            raise RuntimeError(f"bilinear(): input batch dimensions do not match at dim {d}: "
                               f"got {input1.shape[d]} and {input2.shape[d]}")
    if input1.shape[-1] != weight.shape[1]:  # IndexError for a 0-dim input, as torch's
        raise RuntimeError(f"bilinear(): input1 size does not match weight size: "
                           f"got {input1.shape[-1]} but expected {weight.shape[1]}")
    if input2.shape[-1] != weight.shape[2]:
        raise RuntimeError(f"bilinear(): input2 size does not match weight size: "
                           f"got {input2.shape[-1]} but expected {weight.shape[2]}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        got = bias.shape[0] if bias.dim() == 1 else bias.numel()
        raise RuntimeError(
            f"bilinear(): bias size does not match weight size: got {got} but expected {weight.shape[0]}")
    tensors = [input1, input2, weight] + ([] if bias is None else [bias])
    if len({t.dtype for t in tensors}) > 1:
        names = ", ".join(f"{n}: {_dtype_name(t)}" for n, t in zip(("input1", "input2", "weight", "bias"), tensors))
        raise RuntimeError(f"All tensors must have the same dtype, got {names}")
    if input1.shape[-1] == 0 or input2.shape[-1] == 0:
        # torch's _trilinear cannot fold an input without features into rows, and raises
        raise RuntimeError(f"bilinear(): inputs without features ({list(input1.shape)} and {list(input2.shape)}) "
                           "are not supported, as in torch")
    if input1.dim() == 2:  # rows already: no view nodes around the Function
        return apply(BilinearFunction, input1, input2, weight, bias)
    batch = input1.shape[:-1]
    n = math.prod(batch)  # spelled out: reshape's -1 cannot tell the row count of an empty tensor
    y = apply(BilinearFunction, input1.reshape(n, input1.shape[-1]), input2.reshape(n, input2.shape[-1]), weight, bias)
    return y.reshape(*batch, weight.shape[0])
