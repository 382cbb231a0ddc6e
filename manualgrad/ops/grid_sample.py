"""Sampling at given points: y = grid_sample(x, grid) and grid = affine_grid(theta, size), the
torch.nn.functional ops of a spatial transformer.

grid_sample: x is (N, C, *S) with S = (H, W) or (D, H, W); grid is (N, *So, d) of normalized
coordinates, grid[..., 0] along W (x), grid[..., 1] along H (y), grid[..., 2] along D (z), -1 and 1
the first and last pixel's centers (align_corners=True) or outer edges (False). At each output
point p, per dim with size L:

    pixel position     u = (g + 1) / 2 (L - 1)  (align_corners)   or   ((g + 1) L - 1) / 2
    padding_mode       zeros: u as is, taps outside [0, L) read 0; border: u clamped into
                       [0, L - 1]; reflection: u mirrored about the edges, then clamped
    bilinear           2^d taps, the corners of u's cell: weight prod_dims (1 - f) or f, f = u - floor(u)
    nearest            1 tap: round(u) (half to even)
    bicubic (2-d)      4 x 4 taps floor(u) - 1 .. floor(u) + 2 (each tap position padded as above),
                       Keys' weights with A = -0.75 of t = u - floor(u); u not padded itself

    y[n, c, p] = sum_k w_k(u) x[n, c, tap_k]

Backward, for the taps and weights of each point:

    dx[n, c, tap_k] += w_k dy[n, c, p]                                  a scatter-add
    du[n, p] = sum_c dy[n, c, p] sum_k (dw_k / du) x[n, c, tap_k]         per dim
    dgrid[n, p] = du * du/dg      du/dg = (L - 1) / 2 or L / 2, times the padding's 0 (clamped)
                                  or +-1 (mirrored)

Nearest has no grid gradient (round is flat). Everything is written with differentiable torch ops
(gather, scatter_add, the coordinates from the grid), so double backward differentiates the
backward again. The jvp is sum over the same taps of w_k dx[tap_k] + du/dg dgrid (dy/du).

affine_grid: grid[n, p] = theta[n] (x_p, y_p[, z_p], 1), the base points on the normalized
pixel centers; its backward is dtheta[n] = sum_p dgrid[n, p] (base_p)^T, a contraction with the
base grid. The forwards run torch's kernels.
"""
import itertools
import math
import warnings

import torch

from ._apply import FLOAT32_ON_CPU, INPUT, apply
from ._checks import can_write_inplace

MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}
_A = -0.75  # the cubic convolution kernel's free parameter (torch's)


# ---------------------------------------------------------------------------------------------
# coordinates: normalized grid value g -> pixel position u, and du/dg


def unnormalize(g, L, align_corners):
    """u from g in [-1, 1], and du/dg (a number)."""
    if align_corners:
        return (g + 1) / 2 * (L - 1), (L - 1) / 2
    return ((g + 1) * L - 1) / 2, L / 2


def _reflect(u, twice_low, twice_high):
    """torch's reflect_coordinates: u mirrored into [low, high]; returns it and du'/du (+-1)."""
    if twice_low == twice_high:
        return torch.zeros_like(u), torch.zeros_like(u)
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    a = (u - low).abs()
    # how many times the path from low to u crossed an edge: even -> same direction
    flips = torch.floor(a / span)
    extra = torch.fmod(a, span)
    even = torch.remainder(flips, 2) == 0
    mirrored = torch.where(even, extra + low, span - extra + low)
    sign = torch.where(u - low < 0, -1.0, 1.0).to(u.dtype) * torch.where(even, 1.0, -1.0).to(u.dtype)
    return mirrored, sign


def pad_coordinate(u, L, padding_mode, align_corners):
    """u after the padding mode (zeros: unchanged), and its derivative (0 where clamped, +-1)."""
    if padding_mode == "zeros":
        return u, torch.ones_like(u)
    slope = torch.ones_like(u)
    if padding_mode == "reflection":
        u, slope = _reflect(u, 0, 2 * (L - 1)) if align_corners else _reflect(u, -1, 2 * L - 1)
    inside = (u > 0) & (u < L - 1)
    return u.clamp(0, L - 1), slope * inside.to(u.dtype)


def _cubic1(t):  # Keys' kernel for |t| <= 1 and its derivative
    return ((_A + 2) * t - (_A + 3)) * t * t + 1, (3 * (_A + 2) * t - 2 * (_A + 3)) * t


def _cubic2(t):  # for 1 < |t| < 2
    return ((_A * t - 5 * _A) * t + 8 * _A) * t - 4 * _A, (3 * _A * t - 10 * _A) * t + 8 * _A


def cubic_weights(t):
    """The 4 weights of taps at distances 1 + t, t, 1 - t, 2 - t, and their derivatives in t."""
    (w0, d0), (w1, d1), (w2, d2), (w3, d3) = _cubic2(t + 1), _cubic1(t), _cubic1(1 - t), _cubic2(2 - t)
    return [w0, w1, w2, w3], [d0, d1, -d2, -d3]


# ---------------------------------------------------------------------------------------------
# taps: per output point, the flat input positions read, their weights and the weights' derivatives


def taps(grid, S, mode, padding_mode, align_corners):
    """[(lin, w, dw)] per tap: lin (N, P) flat index into S, w (N, P) weight (0 for a tap out of
    bounds), dw: [dw/dg_j (N, P) for j < d] (empty for nearest). P = the points of the grid."""
    N, d = grid.shape[0], len(S)
    g = grid.reshape(N, math.prod(grid.shape[1:-1]), d)
    per_dim = []  # one entry per spatial dim of S, in S's order: (u, du/dg)
    for j in range(d):
        L = S[d - 1 - j]  # grid[..., 0] is along S's last dim
        u, du = unnormalize(g[..., j], L, align_corners)
        if mode != "bicubic":
            u, slope = pad_coordinate(u, L, padding_mode, align_corners)
            du = du * slope
        per_dim.insert(0, (u, du))
    result = []
    if mode == "nearest":
        idx = [u.round().long() for u, _ in per_dim]
        result.append((idx, torch.ones_like(per_dim[0][0]), []))
    elif mode == "bilinear":
        lo = [u.floor() for u, _ in per_dim]
        f = [u - u0 for (u, _), u0 in zip(per_dim, lo)]
        for corner in itertools.product((0, 1), repeat=d):
            # w = prod_i (f_i if corner_i else 1 - f_i); dw/du_i swaps that factor for +-1
            factors = [fi if c else 1 - fi for fi, c in zip(f, corner)]
            w = torch.stack(factors).prod(0)
            dw = []
            for i, c in enumerate(corner):
                others = [fa for a, fa in enumerate(factors) if a != i]
                dw.append((1 if c else -1) * (torch.stack(others).prod(0) if others else torch.ones_like(w)))
            result.append(([u0.long() + c for u0, c in zip(lo, corner)], w, dw))
    else:  # bicubic, 2-d: 16 taps, each tap position padded on its own
        (uy, _), (ux, _) = per_dim
        y0, x0 = uy.floor(), ux.floor()
        wy, dwy = cubic_weights(uy - y0)
        wx, dwx = cubic_weights(ux - x0)
        for a, b in itertools.product(range(4), range(4)):
            iy, _ = pad_coordinate(y0 - 1 + a, S[0], padding_mode, align_corners)
            ix, _ = pad_coordinate(x0 - 1 + b, S[1], padding_mode, align_corners)
            result.append(([iy.detach().long(), ix.detach().long()], wy[a] * wx[b], [dwy[a] * wx[b], wy[a] * dwx[b]]))
    out = []
    for idx, w, dw in result:
        # taps outside the input read 0 (zeros padding; and the second corner at the last pixel)
        inside = torch.stack([(i >= 0) & (i < L) for i, L in zip(idx, S)]).all(0)
        lin = torch.zeros_like(idx[0])
        for i, L in zip(idx, S):
            lin = lin * L + i.clamp(0, L - 1)
        mask = inside.to(w.dtype)
        # dw/dg_j = dw/du_j du_j/dg_j, j in grid order (x first): S's dims reversed
        dg = [dw[d - 1 - j] * per_dim[d - 1 - j][1] * mask for j in range(len(dw))]
        out.append((lin, w * mask, dg))
    return out


def _gather(x_flat, lin):
    # x[n, c, lin[n, p]]                                                   (N, C, P)
    return x_flat.gather(2, lin[:, None, :].expand(-1, x_flat.shape[1], -1))


def corner_taps(grid, S, mode, padding_mode, align_corners):
    """taps() for bilinear and nearest, every tap at once: lin (N, K, P) flat index into S,
    w (N, K, P) weights (0 out of bounds), dw [dw/dg_j (N, K, P) for j < d] (empty for nearest);
    K = 2^d corners (bilinear, in taps()'s order) or 1 (nearest). Each dim contributes a pair of
    taps along its own axis (1 + i of the (N, 2, ..., 2, P) corners), broadcast against the others;
    a tap outside the input gets weight 0 in its own dim, so in every corner it is part of."""
    N, d = grid.shape[0], len(S)
    g = grid.reshape(N, math.prod(grid.shape[1:-1]), d)
    lin, w, dw = 0, [], []  # w, dw: per dim of S, the (masked) pair along its axis
    for i, L in enumerate(S):
        j = d - 1 - i  # grid[..., j] is along S's dim i
        u, du = unnormalize(g[..., j], L, align_corners)
        u, slope = pad_coordinate(u, L, padding_mode, align_corners)
        if mode == "nearest":
            idx = u.round().long()[:, None]  #                               (N, 1, P)
            w.append(((idx >= 0) & (idx < L)).to(grid.dtype))
        else:
            lo = u.floor()
            f = u - lo
            # taps lo, lo + 1: weights 1 - f, f; derivatives in g -du/dg, du/dg, 0 outside   (N, 2, P)
            i0 = lo.long()
            idx = torch.stack((i0, i0 + 1), 1)
            inside = ((idx >= 0) & (idx < L)).to(grid.dtype)
            w.append(torch.stack((1 - f, f), 1).mul_(inside))
            s = slope.mul_(du)
            dw.append(torch.stack((-s, s), 1).mul_(inside))
        # flat index of the clamped taps, dim i on its own axis        (N, 2 or 1, ..., P)
        shape = (N,) + tuple(idx.shape[1] if a == i else 1 for a in range(d)) + (-1,)
        lin = lin * L + idx.clamp(0, L - 1).view(shape)
        w[-1], dw[-1:] = w[-1].view(shape), [t.view(shape) for t in dw[-1:]]
    K = 1 if mode == "nearest" else 2 ** d
    lin = lin.expand((N,) + lin.shape[1:-1] + (g.shape[1],)).reshape(N, K, -1)
    # w = prod_i w_i,  dw/dg_j = dw_i/dg_j prod_{i' != i} w_i'  (i the dim of S along g_j)   (N, K, P)
    weight = math.prod(w).reshape(N, K, -1)
    grads = [math.prod(dw[i] if a == i else wa for a, wa in enumerate(w)).reshape(N, K, -1)
             for i in reversed(range(d))] if dw else []
    return lin, weight, grads


# taps per gather / scatter-add in the plain backward: its temporaries are this many times dy
# (the 4 of a 2-d bilinear point at once; 3-d's 8 in two rounds)
_TAPS_AT_ONCE = 4


def _grid_sample_backward_plain(dy, x, grid, mode, padding_mode, align_corners, need_dx, need_dgrid):
    """grid_sample_backward for bilinear and nearest in a plain backward (no graph, no transform):
    the taps of every point at once (up to _TAPS_AT_ONCE of them), one gather of x and one
    scatter-add into dx over the flat (N, C, K P) index, where the reference loops over the taps
    (a gather, a scatter into a fresh copy of dx and a channel sum per tap):

        dx[n, c, lin[n, k, p]] += w[n, k, p] dy[n, c, p]
        dgrid_j[n, p] = sum_k dw_j[n, k, p] sum_c dy[n, c, p] x[n, c, lin[n, k, p]]"""
    N, C, S = x.shape[0], x.shape[1], tuple(x.shape[2:])
    g = dy.reshape(N, C, 1, -1)  #                                        (N, C, 1, P)
    x_flat = x.reshape(N, C, math.prod(S))  #                             (N, C, prod S)
    lin, w, dw = corner_taps(grid, S, mode, padding_mode, align_corners)  # (N, K, P)
    K, P = lin.shape[1:]
    dx = x_flat.new_zeros(x_flat.shape) if need_dx else None
    dy_x = []
    for k0 in range(0, K, _TAPS_AT_ONCE):
        ks = slice(k0, k0 + _TAPS_AT_ONCE)
        k = len(range(K)[ks])
        # the flat index of these taps, the same for every channel       (N, C, k P)
        index = lin[:, ks].reshape(N, 1, k * P).expand(N, C, k * P)
        if need_dx:
            # dx[n, c, lin] += w dy[n, c, p]                              (N, C, k P) -> (N, C, prod S)
            dx.scatter_add_(2, index, (w[:, None, ks] * g).reshape(N, C, k * P))
        if need_dgrid and dw:
            # dy_x = sum_c dy[n, c, p] x[n, c, tap]                       (N, k, P)
            dy_x.append(x_flat.gather(2, index).reshape(N, C, k, P).mul_(g).sum(1))
    if need_dx:
        dx = dx.view(x.shape)
    dgrid = None
    if need_dgrid:
        if dw:
            dy_x = torch.cat(dy_x, 1) if len(dy_x) > 1 else dy_x[0]  #    (N, K, P)
            # dgrid_j = sum_k dw_j dy_x                                   (N, P) per j -> (N, *So, d)
            dgrid = torch.stack([(dwj * dy_x).sum(1) for dwj in dw], -1).view(grid.shape)
        else:  # nearest: round is flat
            dgrid = torch.zeros_like(grid)
    return dx, dgrid


# bytes of the (n, C, 4, P) temporary of the 2-d bilinear backward per slice of the batch: the
# slices' gathers, products and channel sums then stay in the cache (1 MB: 2 samples of bench_ops')
_CHUNK_BYTES = 1 << 20


def _bilinear_zeros_2d_backward(dy, x, grid, align_corners, need_dx, need_dgrid):
    """_grid_sample_backward_plain for the commonest case (2-d, bilinear, zeros padding), its fast
    form (the backward 1.08x faster on bench_ops' (16, 32, 32, 32) case): both coordinates of the
    grid at once in (N, 2, P), the 4 corners as a (2, 2) axis broadcast from the per-dim pairs
    (y tap, x tap), masks as 0/1 floats (a bool tensor op costs 4x a float one), and the gather /
    scatter-add / channel sum over slices of the batch with one reused temporary (a 16 MB one
    leaves the cache at every pass). dx and the channel sums s are the plain form's sums in its
    order; dgrid groups its 4 terms by the taps of the other dim first. The tests compare it to
    the per-tap reference:

        dx[n, c, lin_ab] += w_ab dy[n, c, p]          w_ab = wy_a wx_b, a b = 0, 1 the y, x taps
        s_ab[n, p] = sum_c dy[n, c, p] x[n, c, lin_ab]
        dgrid_x = sum_ab wy_a dwx_b s_ab,  dgrid_y = sum_ab dwy_a wx_b s_ab     dw = -+ du/dg, 0 outside"""
    N, C, H, W = x.shape
    P = grid.numel() // (2 * N)
    g = grid.reshape(N, P, 2).transpose(1, 2).contiguous()  #             (N, 2, P): x, y
    L = g.new_tensor([[W], [H]])
    u, du = unnormalize(g, L, align_corners)  # pixel positions           (N, 2, P)
    lo = u.floor()
    f = u - lo
    # the taps lo, lo + 1 of each dim, clamped into the input; 1 where they were inside already   (N, 2, 2, P)
    tap = lo[:, :, None] + g.new_tensor([[0.0], [1.0]])
    clamped = torch.minimum(tap.clamp(min=0), (L - 1)[:, None])
    inside = torch.eq(clamped, tap, out=torch.empty_like(tap))
    # per-dim weights 1 - f, f (0 outside)                                (N, 2 dims, 2 taps, P)
    wp = torch.stack((1 - f, f), 2).mul_(inside)
    # flat index of corner (a, b) = (y tap, x tap): y W + x              (N, 1, 4 P), the same for every channel
    ci = clamped.to(torch.int32 if H * W < 2 ** 31 else torch.int64)  # int32: half the bytes to add
    index = torch.add(ci[:, 0, None], ci[:, 1, :, None], alpha=W).long().view(N, 1, 4 * P).expand(N, C, 4 * P)
    dy4 = dy.reshape(N, C, 1, P)  #                                     (N, C, 1, P)
    x_flat = x.reshape(N, C, H * W)  #                                   (N, C, H W)
    dx = x_flat.new_empty(x_flat.shape) if need_dx else None  # zeroed slice by slice, just before its scatter
    w = (wp[:, 1, :, None] * wp[:, 0, None, :]).view(N, 1, 4, P) if need_dx else None  # w_ab  (N, 1, 4, P)
    s = x_flat.new_empty(N, 4, P) if need_dgrid else None
    step = max(1, _CHUNK_BYTES // (C * 4 * P * x.element_size()))
    buf = x_flat.new_empty(min(step, N), C, 4, P)
    for n in range(0, N, step):
        sl = slice(n, n + step)
        i, b = index[sl], buf[:min(step, N - n)]
        if need_dx:
            # dx[n, c, lin_ab] += w_ab dy[n, c, p]                        (n, C, 4 P) -> (n, C, H W)
            dx[sl].zero_().scatter_add_(2, i, torch.mul(w[sl], dy4[sl], out=b).view(i.shape))
        if need_dgrid:
            # s_ab = sum_c dy[n, c, p] x[n, c, lin_ab]                    (n, 4, P)
            torch.gather(x_flat[sl], 2, i, out=b.view(i.shape))
            torch.sum(b.mul_(dy4[sl]), 1, out=s[sl])
    dgrid = None
    if need_dgrid:
        s = s.view(N, 2, 2, P)  #                                        s_ab
        # dw/du per dim and tap: -1, +1 times du/dg, 0 outside            (N, 2, 2, P)
        dwp = inside.mul_(g.new_tensor([-1.0, 1.0])[:, None] * du[:, None])
        # sum_a wy_a s_ab (for x), sum_b wx_b s_ab (for y)                (N, 2, 2, P)
        rows = torch.stack(((wp[:, 1, :, None] * s).sum(1), (wp[:, 0, None, :] * s).sum(2)), 1)
        # dgrid_j = sum over the taps of dim j: dw/dg rows                (N, 2, P) -> (N, *So, 2)
        dgrid = rows.mul_(dwp).sum(2).transpose(1, 2).reshape(grid.shape)
    return (dx.view(x.shape) if need_dx else None), dgrid


def grid_sample_backward(dy, x, grid, mode, padding_mode, align_corners, need_dx=True, need_dgrid=True):
    """dx (N, C, *S) and dgrid (N, *So, d) for y = grid_sample(x, grid): dy (N, C, *So)."""
    if mode != "bicubic" and x.numel() and grid.numel() and can_write_inplace(dy, x, grid):
        if mode == "bilinear" and padding_mode == "zeros" and x.dim() == 4:
            return _bilinear_zeros_2d_backward(dy, x, grid, align_corners, need_dx, need_dgrid)
        return _grid_sample_backward_plain(dy, x, grid, mode, padding_mode, align_corners, need_dx, need_dgrid)
    N, C, S = x.shape[0], x.shape[1], tuple(x.shape[2:])
    d = len(S)
    g = dy.reshape(N, C, math.prod(dy.shape[2:]))  #                          (N, C, P)
    x_flat = x.reshape(N, C, math.prod(S))  #                                 (N, C, prod S)
    dx = x_flat.new_zeros(x_flat.shape) if need_dx else None
    dgrid = [0] * d
    for lin, w, dw in taps(grid, S, mode, padding_mode, align_corners):
        if need_dx:
            # dx[n, c, lin] += w dy[n, c, p]: a scatter-add                 (N, C, prod S)
            dx = dx.scatter_add(2, lin[:, None, :].expand(-1, C, -1), w[:, None, :] * g)
        if need_dgrid and dw:
            # sum_c dy[n, c, p] x[n, c, tap]                                 (N, P)
            dy_x = (g * _gather(x_flat, lin)).sum(1)
            for j in range(d):
                # dgrid_j += (dw/dg_j) sum_c dy x[tap]                       (N, P)
                dgrid[j] = dgrid[j] + dw[j] * dy_x
    if need_dx:
        dx = dx.reshape(x.shape)
    if need_dgrid:
        dgrid = torch.stack([t if torch.is_tensor(t) else grid.new_zeros(grid.shape[:1] + (g.shape[2],))
                             for t in dgrid], -1).reshape(grid.shape)
    return dx, (dgrid if need_dgrid else None)


def grid_sample_jvp(t_x, t_grid, x, grid, mode, padding_mode, align_corners):
    """dy = sum_k w_k t_x[tap_k] + sum_j (dy/dg_j) t_grid_j                 (N, C, *So)"""
    N, C = x.shape[:2]
    x_flat = x.reshape(N, C, math.prod(x.shape[2:]))
    tx_flat = None if t_x is None else t_x.reshape(x_flat.shape)
    dy = 0
    for lin, w, dw in taps(grid, tuple(x.shape[2:]), mode, padding_mode, align_corners):
        if tx_flat is not None:
            dy = dy + w[:, None, :] * _gather(tx_flat, lin)
        if t_grid is not None and dw:
            tg = t_grid.reshape(N, math.prod(t_grid.shape[1:-1]), len(dw))
            rate = sum(dw[j] * tg[..., j] for j in range(len(dw)))
            dy = dy + rate[:, None, :] * _gather(x_flat, lin)
    out_shape = (N, C) + tuple(grid.shape[1:-1])
    if not torch.is_tensor(dy):
        return x.new_zeros(out_shape)
    return dy.reshape(out_shape)


class GridSampleFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CPU  # autocast: grid_sampler is on torch's CPU float32 list, on no CUDA list
    generate_vmap_rule = True

    @staticmethod
    def forward(x, grid, mode, padding_mode, align_corners):
        return torch.grid_sampler(x, grid, MODES[mode], PADDING_MODES[padding_mode], align_corners)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, grid, ctx.mode, ctx.padding_mode, ctx.align_corners = inputs
        ctx.save_for_backward(x, grid)
        ctx.save_for_forward(x, grid)

    @staticmethod
    def backward(ctx, dy):
        x, grid = ctx.saved_tensors
        need_dx, need_dgrid = ctx.needs_input_grad[:2]
        dx, dgrid = grid_sample_backward(dy, x, grid, ctx.mode, ctx.padding_mode, ctx.align_corners,
                                         need_dx, need_dgrid)
        return dx, dgrid, None, None, None

    @staticmethod
    def jvp(ctx, t_x, t_grid, *_):
        x, grid = ctx.saved_tensors
        return grid_sample_jvp(t_x, t_grid, x, grid, ctx.mode, ctx.padding_mode, ctx.align_corners)


def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
    """Drop-in for ``torch.nn.functional.grid_sample`` with a hand-written backward (input and grid)."""
    if mode not in MODES:
        raise ValueError(f"nn.functional.grid_sample(): expected mode to be 'bilinear', 'nearest' or 'bicubic', "
                         f"but got: '{mode}'")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"nn.functional.grid_sample(): expected padding_mode to be 'zeros', 'border', or "
                         f"'reflection', but got: '{padding_mode}'")
    if align_corners is None:
        warnings.warn("Default grid_sample and affine_grid behavior has changed to align_corners=False since 1.3.0. "
                      "Please specify align_corners=True if the old behavior is desired. See the documentation of "
                      "grid_sample for details.", stacklevel=2)
        align_corners = False
    return apply(GridSampleFunction, input, grid, mode, padding_mode, align_corners)


# ---------------------------------------------------------------------------------------------
# affine_grid


def _steps(n, align_corners, dtype, device):
    # torch's linspace_from_neg_one: n points from -1 to 1, scaled by (n - 1) / n without align_corners
    if n <= 1:
        return torch.zeros(1, dtype=dtype, device=device)
    r = torch.linspace(-1, 1, n, dtype=dtype, device=device)
    return r if align_corners else r * (n - 1) / n


def base_grid(S, align_corners, dtype, device=None):
    """(P, d + 1): the normalized (x, y[, z], 1) of every output pixel, x along S's last dim."""
    axes = [_steps(n, align_corners, dtype, device) for n in S]
    mesh = torch.meshgrid(*axes, indexing="ij")  # each (*S)
    return torch.stack(list(reversed(mesh)) + [torch.ones_like(mesh[0])], -1).reshape(-1, len(S) + 1)


def affine_grid_backward(dgrid, S, align_corners):
    """dtheta (N, d, d + 1) for grid = base theta^T: dgrid (N, *S, d)."""
    base = base_grid(S, align_corners, dgrid.dtype, dgrid.device)  # (P, d + 1)
    # dtheta[n] = sum_p dgrid[n, p]^T base_p = dgrid[n]^T base          (N, d, d + 1)
    return torch.matmul(dgrid.reshape(dgrid.shape[0], math.prod(S), len(S)).transpose(1, 2), base)


class AffineGridFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: affine_grid_generator is on no autocast list
    generate_vmap_rule = True

    @staticmethod
    def forward(theta, size, align_corners):
        return torch.affine_grid_generator(theta, size, align_corners)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.size, ctx.align_corners = inputs

    @staticmethod
    def backward(ctx, dgrid):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return affine_grid_backward(dgrid, tuple(ctx.size[2:]), ctx.align_corners), None, None

    @staticmethod
    def jvp(ctx, t_theta, *_):
        # linear in theta: dgrid = affine_grid(t_theta)
        return torch.affine_grid_generator(t_theta, ctx.size, ctx.align_corners)


def affine_grid(theta, size, align_corners=None):
    """Drop-in for ``torch.nn.functional.affine_grid`` with a hand-written backward."""
    if align_corners is None:
        warnings.warn("Default grid_sample and affine_grid behavior has changed to align_corners=False since 1.3.0. "
                      "Please specify align_corners=True if the old behavior is desired. See the documentation of "
                      "grid_sample for details.", stacklevel=2)
        align_corners = False
    if not theta.is_floating_point():
        raise ValueError(f"Expected theta to have floating point type, but got {theta.dtype}")
    d = len(size) - 2
    if d not in (2, 3):
        raise NotImplementedError(f"affine_grid only supports 4D and 5D sizes, for 2D and 3D affine transforms, "
                                  f"respectively. Got size {size}.")
    if theta.dim() != 3 or theta.shape[-2] != d or theta.shape[-1] != d + 1:
        raise ValueError(f"Expected a batch of {d}D affine matrices of shape Nx{d}x{d + 1} for size {size}. "
                         f"Got {theta.shape}.")
    if align_corners and min(size[2:]) == 1:
        warnings.warn("Since version 1.3.0, affine_grid behavior has changed for unit-size grids when "
                      "align_corners=True. This is not an intended use case of affine_grid. See the documentation "
                      "of affine_grid for details.", stacklevel=2)
    elif min(size) <= 0:
        raise ValueError(f"Expected non-zero, positive output size. Got {size}")
    return apply(AffineGridFunction, theta, list(size), align_corners)
