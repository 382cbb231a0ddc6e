"""weight_norm: w = g v / ||v||, the weight normalization of Salimans & Kingma (2016),
https://arxiv.org/abs/1602.07868 (torch._weight_norm, which torch.nn.utils.parametrizations.weight_norm calls).

Shapes: v (*) any weight, g like v with size 1 in every dim but ``dim`` (a 0-d g for dim = -1,
one norm of the whole tensor); ||v|| is the 2-norm over every dim but ``dim``, shaped like g.

    w = g v / ||v||

For one slice (all of v for dim = -1) with n = ||v||, r = dw . v (summed over the slice):

    dg = r / n
    dv = (g / n) (dw - v r / n^2)          dw with its part along v taken out, scaled by g / n

(the paper's eq. 3). Both are differentiable torch ops: double backward is their autograd.
"""
import torch

from ._apply import INPUT, apply


def _reduced(v, dim):
    """The dims a norm sums over: every dim but ``dim`` (all of them for dim = -1)."""
    return [d for d in range(v.dim()) if d != dim]


def _slice_sum(t, dim):
    """Sum over every dim but ``dim``, kept as size 1 (all dims, to 0-d, for dim = -1). A 1-D t
    has nothing to sum for dim = 0 (sum over an empty list of dims would sum everything)."""
    dims = _reduced(t, dim)
    return t.sum(dims, keepdim=dim != -1) if dims else t


def _norm(v, dim):
    # n = ||v|| over every dim but dim                      like g (keepdim), () for dim = -1
    return _slice_sum(v.square(), dim).sqrt()


def weight_norm_forward(v, g, dim):
    # w = g v / n                                            like v
    return v * (g / _norm(v, dim))


def weight_norm_backward(dw, v, g, dim, needs=(True, True)):
    """(dv, dg), each where needs says so. n is recomputed from v (a pass over v, no saved
    tensor; and so double backward sees that n depends on v)."""
    n = _norm(v, dim)
    # r = dw . v per slice                                   like n
    r = _slice_sum(dw * v, dim)
    dv = dg = None
    if needs[0]:
        # dv = (g / n) (dw - v r / n^2)                      like v
        dv = (g / n) * (dw - v * (r / n.square()))
    if needs[1]:
        # dg = r / n                                         like g
        dg = (r / n).reshape(g.shape)
    return dv, dg


class WeightNormFunction(torch.autograd.Function):
    """w = g v / ||v||, the norm over every dim of v but ``dim`` (all for dim = -1)."""
    autocast = INPUT  # autocast: no cast (_weight_norm is on no autocast list; torch's kernel keeps the dtype)
    generate_vmap_rule = True

    @staticmethod
    def forward(v, g, dim):
        return weight_norm_forward(v, g, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        v, g, dim = inputs
        ctx.dim = dim
        ctx.save_for_backward(v, g)
        ctx.save_for_forward(v, g)

    @staticmethod
    def backward(ctx, dw):
        v, g = ctx.saved_tensors
        dv, dg = weight_norm_backward(dw, v, g, ctx.dim, ctx.needs_input_grad[:2])
        return dv, dg, None

    @staticmethod
    def jvp(ctx, dv, dg, _dim):
        v, g = ctx.saved_tensors
        n = _norm(v, ctx.dim)
        # dw = (g / n) (dv - v (v . dv) / n^2) + dg v / n   like v, each term where its tangent exists
        dw = torch.zeros_like(v)
        if dv is not None:
            r = _slice_sum(dv * v, ctx.dim)
            dw = dw + (g / n) * (dv - v * (r / n.square()))
        if dg is not None:
            dw = dw + v * (dg / n)
        return dw


def weight_norm(v, g, dim=0):
    """Drop-in for ``torch._weight_norm(v, g, dim)``: w = g v / ||v||, the norm over every dim but
    ``dim`` (dim = -1: one norm of the whole tensor), with the Salimans & Kingma gradient written out."""
    if v.dim() == 0:
        raise IndexError("weight_norm: v must have at least one dimension, got a 0-d tensor")
    if dim != -1:
        if not -v.dim() <= dim < v.dim():
            raise IndexError(f"Dimension out of range (expected to be in range of [{-v.dim()}, {v.dim() - 1}], "
                             f"but got {dim})")
        dim %= v.dim()
        if v.shape[dim] == 0:  # torch's kernel cannot fold v into (slices, rest) then, and raises
            raise RuntimeError(f"weight_norm: v of shape {list(v.shape)} has no slices along dim {dim}, as torch "
                               "refuses it")
    return apply(WeightNormFunction, v, g, dim)
