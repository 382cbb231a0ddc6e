"""Distances and normalization: normalize, cosine_similarity, pairwise_distance, pdist.

All are built on the p-norm n = ||v||_p = (sum |v_i|^p)^(1/p) along a dim, whose gradient is

    dn/dv = sign(v) |v|^(p-1) / n^(p-1)      (p = 2: v / n;  p = 1: sign(v);  p = inf: sign(v) on the
                                              entries where |v| = n, shared among ties;  p = 0: 0)

with torch's conventions where that is 0/0 (n = 0: 0). ``norm_backward`` writes it out once;
pdist has its own (torch's _pdist_backward kernel: no sharing among ties for p = inf).

eps, as torch 2.13 applies it:
- normalize: y = x / max(||x||_p, eps); the clamp is differentiated (0 past it).
- cosine_similarity: y = sum(x1 / max(||x1||, eps) * x2 / max(||x2||, eps)): each norm clamped on
  its own, and the clamp is done under no_grad in torch, so its gradient flows as if the norm were
  not clamped (see cosine_similarity_backward).
- pairwise_distance: y = ||x1 - x2 + eps||_p along the last dim.
"""
import torch

from ._apply import FLOAT32_ON_CUDA, apply


def _sum_to(t, shape):
    """t summed over the dims broadcasting added or expanded, back to ``shape``."""
    return t if t.shape == shape else t.sum_to_size(shape)


# ---------------------------------------------------------------------------------------------
# the p-norm along dim, kept: n = ||v||_p  (*, 1, *)

def norm_forward(v, p, dim):
    return torch.linalg.vector_norm(v, p, dim, keepdim=True)


def norm_backward(dn, v, n, p, dim):
    """dv for n = ||v||_p along dim (dn and n keep that dim, size 1), torch's norm_backward."""
    if p == 0:
        # n counts the nonzero entries: piecewise constant     (*) like v
        return torch.zeros_like(v) * dn
    if p == 1:
        # dv = dn sign(v)                                     (*) like v
        return dn * v.sgn()
    if p == 2:
        # dv = dn v / n  (0 where n = 0)                       (*) like v
        return dn * (v / n).masked_fill(n == 0, 0)
    if p in (float("inf"), -float("inf")):
        # dv = dn sign(v) on the entries |v| = n (or nan), shared equally among them   (*) like v
        mask = (v.abs() == n) | v.isnan()
        return v.sgn() * (dn / mask.sum(dim, keepdim=True)) * mask
    if p < 1:
        # dv = dn sign(v) |v|^(p-1) n^(1-p)  (0 where v = 0)   (*) like v
        return v.sgn() * v.abs().pow(p - 1).masked_fill(v == 0, 0) * dn * n.pow(1 - p)
    # dv = dn sign(v) |v|^(p-1) / n^(p-1)  (0 where n = 0)     (*) like v
    scaled = v.sgn() * v.abs().pow(p - 1) if p < 2 else v * v.abs().pow(p - 2)
    return scaled * (dn / n.pow(p - 1)).masked_fill(n == 0, 0)


# ---------------------------------------------------------------------------------------------
# normalize: y = x / d,  d = max(||x||_p, eps) along dim

def normalize_forward(x, p, dim, eps):
    # y = x / max(n, eps),  n = ||x||_p along dim               (*) like x
    return x / norm_forward(x, p, dim).clamp_min(eps)


def normalize_backward(dy, x, p, dim, eps):
    # n recomputed from x (one reduction), not saved: a saved copy would be a constant to double backward
    n = norm_forward(x, p, dim)  #                             (*, 1, *)
    d = n.clamp_min(eps)
    # dL/dd = -sum(dy x, dim) / d^2; d = n where n >= eps, eps (flat) below   (*, 1, *)
    dd = -(dy * x).sum(dim, keepdim=True) / d.square()
    dn = dd * (n >= eps)
    # dx = dy / d + dn dn/dx                                   (*) like x
    return dy / d + norm_backward(dn, x, n, p, dim)


class NormalizeFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CUDA  # autocast: its norm is float32 on CUDA, input dtype on CPU (torch's lists)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, p, dim, eps):
        return normalize_forward(x, p, dim, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.p, ctx.dim, ctx.eps = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return normalize_backward(dy, x, ctx.p, ctx.dim, ctx.eps), None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        (x,) = ctx.saved_tensors
        n = norm_forward(x, ctx.p, ctx.dim)
        d = n.clamp_min(ctx.eps)
        # dn = sum(dn/dx * dx) (the norm's jvp), 0 where clamped         (*, 1, *)
        dn = (norm_backward(torch.ones_like(n), x, n, ctx.p, ctx.dim) * dx).sum(ctx.dim, keepdim=True) * (n >= ctx.eps)
        # dy = dx / d - x dn / d^2                                         (*) like x
        return dx / d - x * dn / d.square()


def normalize(input, p=2.0, dim=1, eps=1e-12, out=None):
    """Drop-in for ``torch.nn.functional.normalize``; with ``out=`` torch's (no gradient through out=)."""
    if out is not None:
        return torch.nn.functional.normalize(input, p, dim, eps, out)
    return apply(NormalizeFunction, input, p, dim, eps)


# ---------------------------------------------------------------------------------------------
# cosine_similarity: y = sum(u1 u2, dim),  u = x / c,  c = max(||x||, eps)

def cosine_similarity_forward(x1, x2, dim, eps):
    """torch's expression, op for op."""
    x1, x2 = torch.broadcast_tensors(x1, x2)  # torch broadcasts first (a norm per broadcast row)
    n1, n2 = norm_forward(x1, 2, dim), norm_forward(x2, 2, dim)
    # y = sum(x1 / max(n1, eps) * x2 / max(n2, eps), dim)     (*) broadcast, dim reduced
    return ((x1 / n1.clamp_min(eps)) * (x2 / n2.clamp_min(eps))).sum(dim)


def cosine_similarity_partials(x1, x2, y, dim, eps):
    """dy/dx1, dy/dx2 per element of the broadcast inputs.

    torch clamps c = max(n, eps) without recording it, so autograd differentiates c as if it
    were n: dc/dx = x / n. With u = x / c:
        dy/dx1 = u2 / c1 - sum(u1 u2) x1 / (n1 c1) = (u2 - y x1 / n1) / c1
    which is (u2 - y u1) / n1 where nothing is clamped; x / n is 0 where n = 0 (torch's norm_backward)."""
    x1, x2 = torch.broadcast_tensors(x1, x2)
    # the norms, recomputed (saved copies would be constants to double backward)   (*, 1, *)
    n1, n2 = norm_forward(x1, 2, dim), norm_forward(x2, 2, dim)
    y = y.unsqueeze(dim)  #                                    (*, 1, *)
    c1, c2 = n1.clamp_min(eps), n2.clamp_min(eps)
    # dy/dx1 = (x2 / c2 - y x1 / n1) / c1                       (*) broadcast
    p1 = (x2 / c2 - y * (x1 / n1).masked_fill(n1 == 0, 0)) / c1
    # dy/dx2 = (x1 / c1 - y x2 / n2) / c2                       (*) broadcast
    p2 = (x1 / c1 - y * (x2 / n2).masked_fill(n2 == 0, 0)) / c2
    return p1, p2


def cosine_similarity_backward(dy, x1, x2, y, dim, eps):
    p1, p2 = cosine_similarity_partials(x1, x2, y, dim, eps)
    g = dy.unsqueeze(dim)  #                                   (*, 1, *)
    # dx = dy dy/dx, summed back over the dims broadcasting added     x1's, x2's shape
    return _sum_to(g * p1, x1.shape), _sum_to(g * p2, x2.shape)


def cosine_similarity_jvp(dx1, dx2, x1, x2, y, dim, eps):
    p1, p2 = cosine_similarity_partials(x1, x2, y, dim, eps)
    # dy = sum(dy/dx1 dx1 + dy/dx2 dx2, dim)                     (*)
    t = (p1 * dx1 if dx1 is not None else 0) + (p2 * dx2 if dx2 is not None else 0)
    return t.sum(dim) if isinstance(t, torch.Tensor) else torch.zeros_like(y)


class CosineSimilarityFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CUDA  # autocast: float32 on CUDA, input dtype on CPU (torch's lists)
    generate_vmap_rule = True

    @staticmethod
    def forward(x1, x2, dim, eps):
        return cosine_similarity_forward(x1, x2, dim, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x1, x2, ctx.dim, ctx.eps = inputs
        ctx.save_for_backward(x1, x2, output)
        ctx.save_for_forward(x1, x2, output)

    @staticmethod
    def backward(ctx, dy):
        x1, x2, y = ctx.saved_tensors
        dx1, dx2 = cosine_similarity_backward(dy, x1, x2, y, ctx.dim, ctx.eps)
        return (dx1 if ctx.needs_input_grad[0] else None), (dx2 if ctx.needs_input_grad[1] else None), None, None

    @staticmethod
    def jvp(ctx, dx1, dx2, *_):
        x1, x2, y = ctx.saved_tensors
        return cosine_similarity_jvp(dx1, dx2, x1, x2, y, ctx.dim, ctx.eps)


def cosine_similarity(x1, x2, dim=1, eps=1e-8):
    """Drop-in for ``torch.nn.functional.cosine_similarity`` (torch 2.13's eps: each norm clamped)."""
    # (result_type only where the dtypes differ: under torch.compile it is a graph break)
    dtype = x1.dtype if x1.dtype == x2.dtype else torch.result_type(x1, x2)
    if not dtype.is_floating_point:
        raise RuntimeError(f"expected common dtype to be floating point, yet common dtype is {_name(dtype)}")
    x1, x2 = x1.to(dtype), x2.to(dtype)
    return apply(CosineSimilarityFunction, x1, x2, dim, eps)


def _name(dtype):
    return {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
            torch.uint8: "Byte", torch.bool: "Bool"}.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------------
# pairwise_distance: y = ||x1 - x2 + eps||_p along the last dim (of the broadcast shape)

def pairwise_distance_forward(x1, x2, p, eps, keepdim):
    dim = max(x1.dim(), x2.dim()) - 1
    # v = x1 - x2 + eps;  y = ||v||_p                          (*) broadcast, last dim reduced
    return torch.linalg.vector_norm(x1 - x2 + eps, p, dim, keepdim=keepdim)


def _kept(t, v, keepdim):
    # t with v's last dim kept (size 1), as norm_backward wants it
    return t if keepdim or v.dim() == 0 else t.unsqueeze(-1)


def pairwise_distance_backward(dy, x1, x2, y, p, eps, keepdim):
    v = x1 - x2 + eps  #                                       (*, M) broadcast
    # dv = dn/dv dy  (norm_backward)                           (*, M)
    dv = norm_backward(_kept(dy, v, keepdim), v, _kept(y, v, keepdim), p, -1)
    # dx1 = dv, dx2 = -dv, each summed back to its own shape   x1's, x2's
    return _sum_to(dv, x1.shape), _sum_to(-dv, x2.shape)


def pairwise_distance_jvp(dx1, dx2, x1, x2, y, p, eps, keepdim):
    v = x1 - x2 + eps
    # dy = sum(dn/dv (dx1 - dx2)) along the last dim           (*)
    dv = (dx1 if dx1 is not None else 0) - (dx2 if dx2 is not None else 0)
    d = norm_backward(torch.ones_like(_kept(y, v, keepdim)), v, _kept(y, v, keepdim), p, -1)
    return (d * dv).sum(-1, keepdim=keepdim) if v.dim() else d * dv


class PairwiseDistanceFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CUDA  # autocast: its norm is float32 on CUDA, input dtype on CPU (torch's lists)
    generate_vmap_rule = True

    @staticmethod
    def forward(x1, x2, p, eps, keepdim):
        return pairwise_distance_forward(x1, x2, p, eps, keepdim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x1, x2, ctx.p, ctx.eps, ctx.keepdim = inputs
        ctx.save_for_backward(x1, x2, output)
        ctx.save_for_forward(x1, x2, output)

    @staticmethod
    def backward(ctx, dy):
        if ctx.p == 0:  # a count of nonzeros: torch gives no gradient at all (None), not zeros
            return None, None, None, None, None
        x1, x2, y = ctx.saved_tensors
        dx1, dx2 = pairwise_distance_backward(dy, x1, x2, y, ctx.p, ctx.eps, ctx.keepdim)
        return (dx1 if ctx.needs_input_grad[0] else None), (dx2 if ctx.needs_input_grad[1] else None), None, None, None

    @staticmethod
    def jvp(ctx, dx1, dx2, *_):
        x1, x2, y = ctx.saved_tensors
        return pairwise_distance_jvp(dx1, dx2, x1, x2, y, ctx.p, ctx.eps, ctx.keepdim)


def pairwise_distance(x1, x2, p=2.0, eps=1e-6, keepdim=False):
    """Drop-in for ``torch.nn.functional.pairwise_distance``."""
    return apply(PairwiseDistanceFunction, x1, x2, p, eps, keepdim)


# ---------------------------------------------------------------------------------------------
# pdist: y_k = ||x_i - x_j||_p for the rows i < j of x (N, M), k running over the pairs in order

def pdist_forward(x, p):
    return torch.pdist(x, p)  # torch's kernel: its values bit for bit


def _kernel_sign(v):
    # torch's pdist kernel's sign: -1, 0, 1, and nan for nan (torch.sign gives 0 there)
    return v.sign().masked_fill(v.isnan(), float("nan"))


def pdist_pair_grad(g, v, n, p):
    """dv_k = g_k dn_k/dv_k for the pairs' differences v (P, M), distances n and upstream g (P, 1):
    torch's _pdist_backward kernel, per p, nan included."""
    if p == 0:
        # n counts nonzeros: piecewise constant                (P, M)
        return torch.zeros_like(v) * g
    if p == 1:
        # dv = g sign(v)                                       (P, M)
        return g * _kernel_sign(v)
    if p == 2:
        # dv = g v / n  (0 where n = 0)                        (P, M)
        return (g * v / n).masked_fill(n == 0, 0)
    if p == float("inf"):
        # dv = g sign(v) where |v| = n: every tie gets all of g (torch's kernel; norm_backward shares).
        # The kernel's test, 1 - min(1, ceil(| |v| - n |)), is nan where n or v is   (P, M)
        at_max = 1 - ((v.abs() - n).abs().ceil().clamp_max(1))
        return g * _kernel_sign(v) * at_max
    if p < 2:
        # dv = g sign(v) |v|^(p-1) / n^(p-1)  (0 where n = 0, and where v = 0 for p < 1)   (P, M)
        dv = (_kernel_sign(v) * v.abs().pow(p - 1) * g / n.pow(p - 1)).masked_fill(n == 0, 0)
        return dv.masked_fill(v == 0, 0) if p < 1 else dv
    # dv = g v |v|^(p-2) / n^(p-1)  (0 where n = 0)            (P, M)
    return (v * v.abs().pow(p - 2) * g / n.pow(p - 1)).masked_fill(n == 0, 0)


_CHUNK = 1 << 20  # elements of the pair differences held at once in backward


def _pair_chunks(x):
    """The pairs i < j in torch's order, (0,1), (0,2), ..., (1,2), ..., as slices (k, i, j) of
    at most _CHUNK / M pairs: the (P, M) differences, P = N(N-1)/2, never exist whole."""
    n, m = x.shape
    i, j = torch.triu_indices(n, n, 1, device=x.device)
    step = max(1, _CHUNK // max(m, 1))
    for k in range(0, i.numel(), step):
        yield slice(k, k + step), i[k : k + step], j[k : k + step]


def pdist_backward(dy, x, y, p):
    dx = torch.zeros_like(x)
    for k, i, j in _pair_chunks(x):
        # v_k = x_i - x_j;  dv_k = dy_k dn_k/dv_k              (pairs, M)
        dv = pdist_pair_grad(dy[k].unsqueeze(1), x[i] - x[j], y[k].unsqueeze(1), p)
        # dx_i += dv_k,  dx_j -= dv_k                          (N, M)
        dx = dx.index_add(0, i, dv).index_add(0, j, -dv)
    return dx


def pdist_jvp(dx, x, y, p):
    out = []
    for k, i, j in _pair_chunks(x):
        # dy_k = sum_m dn_k/dv_km (dx_i - dx_j)_m               (pairs,)
        rows = pdist_pair_grad(torch.ones_like(y[k]).unsqueeze(1), x[i] - x[j], y[k].unsqueeze(1), p)
        out.append((rows * (dx[i] - dx[j])).sum(1))
    return torch.cat(out) if out else torch.zeros_like(y)


class PdistFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CUDA  # autocast: float32 on CUDA; on CPU the input's dtype (bfloat16 fails, as torch's)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, p):
        return pdist_forward(x, p)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.p = inputs
        ctx.save_for_backward(x, output)
        ctx.save_for_forward(x, output)

    @staticmethod
    def backward(ctx, dy):
        x, y = ctx.saved_tensors
        return pdist_backward(dy, x, y, ctx.p), None

    @staticmethod
    def jvp(ctx, dx, _):
        x, y = ctx.saved_tensors
        return pdist_jvp(dx, x, y, ctx.p)


def pdist(input, p=2):
    """Drop-in for ``torch.nn.functional.pdist``. Its backward is differentiable (torch's is not)."""
    if input.dim() != 2:
        raise RuntimeError(f"pdist only supports 2D tensors, got: {input.dim()}D")
    if p < 0:
        raise RuntimeError("pdist only supports non-negative p values")
    return apply(PdistFunction, input, p)
