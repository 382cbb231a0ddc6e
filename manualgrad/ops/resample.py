"""Resampling: y = interpolate(x, size or scale_factor, mode), torch.nn.functional.interpolate's op.

x is (N, C, *S) with d = 1, 2 or 3 spatial dims, y is (N, C, *So). Every mode is separable: along
each spatial dim of input length L and output length Lo, output position o reads K input
positions idx[o, k] with weights w[o, k] (the taps of o), and y is these 1-D resamplings one
dim after the other:

    y[o] = sum_k w[o, k] x[idx[o, k]]                                         along one dim

The taps are computed exactly as torch's kernels compute them (ATen/native/UpSample.h), from
the scale s, the input length per output step:

    s = (L - 1) / (Lo - 1)          align_corners=True (0 when Lo = 1)
    s = 1 / scale_factor            a scale_factor given and recompute_scale_factor not True
    s = L / Lo                      otherwise (a size given, or the scale recomputed from it)

    nearest        K = 1: idx = min(floor(o s), L - 1)   (2-d: o where Lo = L, o // 2 where Lo = 2 L)
    nearest-exact  K = 1: idx = min(floor((o + 1/2) s), L - 1)
    linear         K = 2: source r = s o (align_corners) or max(s (o + 1/2) - 1/2, 0); i = floor(r),
                   lam = r - i: taps i, i + 1 (i again at the last position) with weights 1 - lam, lam;
                   a dim whose length is unchanged is copied (K = 1), whatever the scale, as torch's kernels
    cubic          K = 4: r as for linear, not clamped at 0; taps i - 1 .. i + 2 clamped into [0, L),
                   weights from Keys' cubic convolution kernel with A = -0.75 at distances
                   1 + t, t, 1 - t, 2 - t (t = r - i)
    antialias      bilinear / bicubic / lanczos with antialias=True: K = 2 ceil(h max(s, 1)) + 1 taps
                   around c = s (o + 1/2), weights filter((j + 1/2 - c) / max(s, 1)) normalized to sum 1,
                   filter = 1 - |x| (h = 1), Keys' kernel with A = -0.5 (h = 2) or Lanczos-3,
                   sinc(x) sinc(x / 3) on [-3, 3) with sinc(x) = sin(pi x) / (pi x) (h = 3; as PIL's LANCZOS)
    area           adaptive average pooling: the average of the window [floor(o L / Lo), ceil((o + 1) L / Lo))

The forward runs torch's own kernels (the same numbers and checks). The backward is the adjoint
of the taps: every dy[o] goes back to the positions o read, weighted: dx[idx[o, k]] += w[o, k] dy[o],
a scatter-add (index_add) per tap, one dim after the other. It is linear in dy and built from
differentiable ops, so double backward differentiates it again; the op is linear in x, so the
jvp is the same interpolation of the tangent. Nothing is saved for backward but sizes: the taps
are recomputed from them.

Two places where the gradient differs from torch's, both with a scale_factor kept as the scale
(recompute_scale_factor not True) that does not give s = L / Lo, where torch's backward is not the
adjoint of its own forward:
- nearest of 1 or 3 dims, along a dim whose length comes out L or 2 L (3 * 1.3 -> 3, 3 * 2.2 -> 6):
  torch's forward reads floor(o s), its backward sends dy[o] to o (Lo = L) or o // 2 (Lo = 2 L);
- bicubic with every spatial length unchanged: torch's forward interpolates with s, its
  backward copies dy.
Here the gradient is the adjoint of the forward torch computes (the finite difference agrees;
tests/ops/test_resample.py pins both, and torch's behaviour).
"""
import math
import numbers
import warnings

import torch

from ._apply import FLOAT32_ON_CPU, INPUT, apply
from ._checks import can_write_inplace
from .pooling import _adaptive_matrix, adaptive_avg_pool1d, adaptive_avg_pool2d

_A = -0.75  # the cubic convolution kernel's free parameter, torch's (and OpenCV's) choice


def _opmath(dtype):
    # torch computes scales, source positions and weights in float64 for float64 input, else float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def pixel_scale(L, Lo, align_corners, scale, dtype):
    """s, torch's area_pixel_compute_scale, as a 0-dim tensor of the dtype torch computes it in."""
    if align_corners:
        # (L - 1) / (Lo - 1), the division in dtype
        return torch.tensor(L - 1, dtype=dtype) / (Lo - 1) if Lo > 1 else torch.zeros((), dtype=dtype)
    if scale is not None and scale > 0:
        return torch.tensor(1.0 / scale, dtype=dtype)  # 1 / scale in double, then rounded to dtype
    return torch.tensor(L, dtype=dtype) / Lo


def nearest_taps(L, Lo, scale, exact, shortcuts=False, device=None):
    """idx (Lo, 1): the input position each output position copies, in float32 as torch's kernels.

    ``shortcuts``: torch's 2-d nearest kernel (not its 1-d and 3-d ones) copies a dim whose length
    is unchanged and takes o // 2 where it doubles, whatever the scale (nearest_idx); with
    s = L / Lo these are the same numbers, with a scale_factor kept they need not be."""
    o = torch.arange(Lo, device=device)
    if shortcuts and not exact and Lo == L:
        return o[:, None]
    if shortcuts and not exact and Lo == 2 * L:
        return (o // 2)[:, None]
    s = pixel_scale(L, Lo, False, scale, torch.float32).to(device)
    if exact:
        # floorf((o + 0.5) * s): the product in double, rounded to float before the floor
        r = ((o.double() + 0.5) * s.double()).float()
    else:
        r = o.float() * s
    return r.floor().long().clamp(max=L - 1)[:, None]


def _source(L, Lo, align_corners, scale, cubic, dtype, device):
    # r[o]: the (real) input position output position o sits at                      (Lo,)
    s = pixel_scale(L, Lo, align_corners, scale, dtype).to(device)
    o = torch.arange(Lo, device=device, dtype=dtype)
    if align_corners:
        r = s * o
    else:
        r = s * (o + 0.5) - 0.5
        if not cubic:
            r = r.clamp(min=0)
    # i = min(floor(r), L - 1) (floorf: in float32), t = clamp(r - i, 0, 1)          (Lo,), (Lo,)
    i = r.float().floor().long().clamp(max=L - 1)
    t = (r - i).clamp(0, 1)
    return i, t


def linear_taps(L, Lo, align_corners, scale, dtype, device=None):
    """idx, w (Lo, 2): y[o] = (1 - lam) x[i] + lam x[i + 1] (i + 0 at the last input position)."""
    if L == Lo:
        # torch's linear kernels copy a dim whose length does not change, whatever scale_factor says
        return torch.arange(L, device=device)[:, None], torch.ones(L, 1, dtype=dtype, device=device)
    op = _opmath(dtype)
    i, lam = _source(L, Lo, align_corners, scale, False, op, device)
    idx = torch.stack([i, i + (i < L - 1).long()], 1)
    return idx, torch.stack([1 - lam, lam], 1).to(dtype)


def _cubic1(x):  # Keys' kernel for |x| <= 1: ((A + 2) x - (A + 3)) x^2 + 1
    return ((_A + 2) * x - (_A + 3)) * x * x + 1


def _cubic2(x):  # for 1 < |x| < 2: ((A x - 5 A) x + 8 A) x - 4 A
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A


def cubic_taps(L, Lo, align_corners, scale, dtype, device=None):
    """idx, w (Lo, 4): y[o] = sum_k w[o, k] x[clamp(i - 1 + k, 0, L - 1)], the weights at distances
    1 + t, t, 1 - t, 2 - t from the four taps."""
    op = _opmath(dtype)
    i, t = _source(L, Lo, align_corners, scale, True, op, device)
    idx = torch.stack([(i - 1 + k).clamp(0, L - 1) for k in range(4)], 1)
    w = torch.stack([_cubic2(t + 1), _cubic1(t), _cubic1(1 - t), _cubic2(2 - t)], 1)
    return idx, w.to(dtype)


def _triangle(x):  # the antialiasing filter of bilinear: 1 - |x| on (-1, 1)
    return (1 - x.abs()).clamp(min=0)


def _keys_half(x):  # of bicubic: Keys' kernel with A = -0.5 (as Pillow; not the -0.75 above)
    x = x.abs()
    near = ((-0.5 + 2) * x - (-0.5 + 3)) * x * x + 1
    far = ((-0.5 * x + 2.5) * x - 4) * x + 2
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _sinc(x):  # sin(pi x) / (pi x), 1 at 0
    one = torch.ones_like(x)
    return torch.where(x == 0, one, torch.sin(math.pi * x) / torch.where(x == 0, one, math.pi * x))


def _lanczos3(x):  # of lanczos: the sinc windowed by the sinc 3 times wider, on [-3, 3) (PIL's)
    return torch.where((x >= -3) & (x < 3), _sinc(x) * _sinc(x / 3), torch.zeros_like(x))


_AA_FILTERS = {"bilinear-aa": (1.0, _triangle), "bicubic-aa": (2.0, _keys_half), "lanczos-aa": (3.0, _lanczos3)}


def antialias_taps(mode, L, Lo, align_corners, scale, dtype, device=None):
    """idx, w (Lo, K) of torch's antialiased bilinear / bicubic / lanczos (_compute_weights_aa): output o
    averages the inputs j within `support` of its center c = s (o + 1/2) with weights
    filter((j + 1/2 - c) / max(s, 1)), normalized to sum to 1. Downsampling (s > 1) stretches the
    filter by s, so every input pixel contributes: a low-pass filter before the sampling."""
    op = _opmath(dtype)
    s = pixel_scale(L, Lo, align_corners, scale, op).to(device)
    half, filter = _AA_FILTERS[mode]  # the filter's half-width (interp_size / 2) and the filter
    stretch = s if float(s) >= 1 else torch.ones_like(s)
    support = half * stretch
    K = math.ceil(float(support)) * 2 + 1
    # c[o] = s (o + 1/2); the window [xmin, xmin + size) of inputs within support   (Lo,)
    c = s * (torch.arange(Lo, device=device, dtype=op) + 0.5)
    xmin = (c - support + 0.5).trunc().long().clamp(min=0)
    size = ((c + support + 0.5).trunc().long().clamp(max=L) - xmin).clamp(0, K)
    j = torch.arange(K, device=device)
    # w[o, j] = filter((xmin + j + 1/2 - c) / stretch) on the window, 0 beyond       (Lo, K)
    x = (j + xmin[:, None] - c[:, None] + 0.5) * (1 / stretch)
    w = filter(x) * (j < size[:, None])
    total = w.sum(1, keepdim=True)
    w = torch.where(total != 0, w / total, w)
    return (xmin[:, None] + j).clamp(max=L - 1), w.to(dtype)


def taps(mode, L, Lo, align_corners, scale, dtype, device=None, d=1):
    """(idx, w) of one spatial dim of a d-dim resampling; w is None for the nearest modes (weight 1)."""
    if mode.endswith("-aa"):
        return antialias_taps(mode, L, Lo, align_corners, scale, dtype, device)
    if mode in ("nearest", "nearest-exact"):
        return nearest_taps(L, Lo, scale, mode == "nearest-exact", d == 2, device), None
    if mode == "bicubic":
        return cubic_taps(L, Lo, align_corners, scale, dtype, device)
    return linear_taps(L, Lo, align_corners, scale, dtype, device)


# ---------------------------------------------------------------------------------------------
# nearest, nearest-exact, linear, bilinear, trilinear, bicubic

_KERNELS = {
    ("nearest", 1): torch._C._nn.upsample_nearest1d,
    ("nearest", 2): torch._C._nn.upsample_nearest2d,
    ("nearest", 3): torch._C._nn.upsample_nearest3d,
    ("nearest-exact", 1): torch._C._nn._upsample_nearest_exact1d,
    ("nearest-exact", 2): torch._C._nn._upsample_nearest_exact2d,
    ("nearest-exact", 3): torch._C._nn._upsample_nearest_exact3d,
    ("linear", 1): torch._C._nn.upsample_linear1d,
    ("bilinear", 2): torch._C._nn.upsample_bilinear2d,
    ("trilinear", 3): torch._C._nn.upsample_trilinear3d,
    ("bicubic", 2): torch._C._nn.upsample_bicubic2d,
    ("bilinear-aa", 2): torch._C._nn._upsample_bilinear2d_aa,
    ("bicubic-aa", 2): torch._C._nn._upsample_bicubic2d_aa,
    ("lanczos-aa", 2): torch._C._nn._upsample_lanczos2d_aa,
}


def interpolate_forward(x, mode, d, output_size, scales, align_corners):
    # y = the taps of each dim applied to x, by torch's kernel                   (N, C, *So)
    kernel = _KERNELS[mode, d]
    if mode in ("nearest", "nearest-exact"):
        return kernel(x, output_size, scales)
    return kernel(x, output_size, align_corners, scales)


def _scatter_taps_(acc, g, dim, idx, w):
    """interpolate_backward's scatter-adds of one dim in a plain backward (no graph, no
    transform), into acc in place: the weighted g of every tap in one reused buffer, and along the
    last dim a scatter_add_ over contiguous rows (index_add_ there adds one strided column per
    index, which measured several times slower once the tensors outgrow the cache)."""
    Lo = g.shape[dim]
    buf = None if w is None else torch.empty_like(g)
    for j in range(idx.shape[1]):
        # g_j = w[o, j] g[.., o, ..]                                          like g
        gj = g if w is None else torch.mul(g, w[:, j].view((Lo,) + (1,) * (-dim - 1)), out=buf)
        if dim == -1:
            # acc[.., idx[o, j]] += g_j[.., o]: along rows                    (.., L)
            acc.scatter_add_(-1, idx[:, j].expand(gj.shape), gj)
        else:
            # acc[.., idx[o, j], ..] += g_j[.., o, ..]                         (.., L, ..)
            acc.index_add_(dim, idx[:, j], gj)
    return acc


def interpolate_backward(dy, in_sizes, mode, scales, align_corners):
    """dx for y = interpolate(x): dy (*, *So) -> dx (*, *S), S = in_sizes (the last d dims)."""
    d = len(in_sizes)
    inplace = can_write_inplace(dy)
    g = dy
    for k in range(d):
        dim = k - d  # the spatial dims, counted from the end (a vmapped dy has one dim fewer)
        L, Lo = in_sizes[k], g.shape[dim]
        scale = None if scales is None else scales[k]
        # the taps of this dim: idx, w (Lo, K)
        idx, w = taps(mode, L, Lo, align_corners, scale, dy.dtype, dy.device, d)
        # w[o, k] broadcast along dim: (Lo, 1, .., 1)
        bcast = (Lo,) + (1,) * (-dim - 1)
        shape = list(g.shape)
        shape[dim] = L
        acc = g.new_zeros(shape)
        if inplace:
            g = _scatter_taps_(acc, g, dim, idx, w)
            continue
        for j in range(idx.shape[1]):
            # dx[.., idx[o, j], ..] += w[o, j] g[.., o, ..]: a scatter-add    (.., L, ..)
            gj = g if w is None else g * w[:, j].view(bcast)
            acc = acc.index_add(dim, idx[:, j], gj)
        g = acc
    return g  #                                                                 (*, *S) like x


class InterpolateFunction(torch.autograd.Function):
    autocast = INPUT  # autocast: in the input's dtype (torch's CPU list names the upsample ops' non-.vec
    # overloads, which F.interpolate does not call: its bfloat16 input stays bfloat16, checked in tests)
    generate_vmap_rule = True

    @staticmethod
    def forward(x, mode, d, output_size, scales, align_corners):
        return interpolate_forward(x, mode, d, output_size, scales, align_corners)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mode, d, output_size, scales, align_corners = inputs
        ctx.in_sizes, ctx.mode, ctx.d = tuple(x.shape[-d:]), mode, d
        ctx.output_size, ctx.scales, ctx.align_corners = output_size, scales, align_corners

    @staticmethod
    def backward(ctx, dy):
        dx = None
        if ctx.needs_input_grad[0]:
            dx = interpolate_backward(dy, ctx.in_sizes, ctx.mode, ctx.scales, ctx.align_corners)
        return dx, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        # linear in x: dy = interpolate(dx)
        return interpolate_forward(dx, ctx.mode, ctx.d, ctx.output_size, ctx.scales, ctx.align_corners)


# ---------------------------------------------------------------------------------------------
# area, 3 spatial dims (1 and 2 are manualgrad's adaptive_avg_pool1d / 2d)


def area3d_backward(dy, in_sizes):
    """dx for y = adaptive_avg_pool3d(x): y = x contracted with A_d, A_h, A_w, each A (Lo, L) with
    A[o, j] = 1 / |window o| on window o (pooling's _adaptive_matrix); dx is the transpose."""
    (D, H, W), (d, h, w) = in_sizes, dy.shape[-3:]
    a_d, a_h, a_w = (_adaptive_matrix(L, Lo, dy) for L, Lo in zip(in_sizes, (d, h, w)))
    # dy A_w: back along the last dim                                        (*, d, h, W)
    g = torch.matmul(dy, a_w)
    # A_h^T (dy A_w): back along the middle dim                              (*, d, H, W)
    g = torch.matmul(a_h.t(), g)
    # A_d^T (..) with (H, W) folded into one: back along the first           (*, D, H, W)
    g = torch.matmul(a_d.t(), g.reshape(g.shape[:-2] + (H * W,)))
    return g.reshape(g.shape[:-1] + (H, W))


class Area3dFunction(torch.autograd.Function):
    autocast = FLOAT32_ON_CPU  # autocast: adaptive_avg_pool3d is on torch's CPU float32 list, on no CUDA list
    generate_vmap_rule = True

    @staticmethod
    def forward(x, output_size):
        return torch._C._nn.adaptive_avg_pool3d(x, output_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.output_size = inputs
        ctx.in_sizes = tuple(x.shape[-3:])

    @staticmethod
    def backward(ctx, dy):
        return (area3d_backward(dy, ctx.in_sizes) if ctx.needs_input_grad[0] else None), None

    @staticmethod
    def jvp(ctx, dx, _):
        # linear in x: dy = adaptive_avg_pool3d(dx)
        return torch._C._nn.adaptive_avg_pool3d(dx, ctx.output_size)


# ---------------------------------------------------------------------------------------------
# the functional twin: torch's argument rules, then one Function

_DIMS = {"nearest": (1, 2, 3), "nearest-exact": (1, 2, 3), "area": (1, 2, 3), "linear": (1,), "bilinear": (2,),
         "trilinear": (3,), "bicubic": (2,), "lanczos": (2,)}
_NEEDS = {"linear": "3D", "bilinear": "4D", "trilinear": "5D", "bicubic": "4D"}


def _is_integer(v):
    # an int, or an integer tensor (torch accepts both for sizes)
    return (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() and not v.is_complex())


def _sizes_and_scales(input, size, scale_factor, mode, recompute_scale_factor):
    """torch's rules: exactly one of size and scale_factor, one entry per spatial dim; returns
    (output_size, scales), one of them None, as torch passes them to its kernels."""
    dim = input.dim() - 2
    if size is not None and scale_factor is not None:
        raise ValueError("only one of size or scale_factor should be defined")
    if size is None and scale_factor is None:
        raise ValueError("either size or scale_factor should be defined")
    output_size = scales = None
    if size is not None:
        if isinstance(size, (list, tuple)):
            if len(size) != dim:
                raise ValueError(
                    f"Input and output must have the same number of spatial dimensions, but got input with "
                    f"spatial dimensions of {list(input.shape[2:])} and output size of {size}.")
            if not all(_is_integer(s) for s in size):
                raise TypeError(f"expected size to be one of int or Tuple[int] or Tuple[int, int] or "
                                f"Tuple[int, int, int], but got size with types {[type(s) for s in size]}")
            output_size = [int(s) for s in size]
        else:
            if not _is_integer(size):
                raise TypeError(f"interpolate: size must be an int or a sequence of ints, got {type(size).__name__}")
            output_size = [int(size)] * dim
    else:
        if isinstance(scale_factor, (list, tuple)):
            if len(scale_factor) != dim:
                raise ValueError(
                    f"Input and scale_factor must have the same number of spatial dimensions, but got input "
                    f"with spatial dimensions of {list(input.shape[2:])} and scale_factor of shape {scale_factor}.")
            scales = list(scale_factor)
        else:
            scales = [scale_factor] * dim
        if not all(isinstance(s, numbers.Real) and not isinstance(s, torch.Tensor) for s in scales):
            raise TypeError(f"interpolate: scale_factor must be a float or a sequence of floats, got {scale_factor!r}")
        scales = [float(s) for s in scales]
    if recompute_scale_factor and size is not None:
        raise ValueError("recompute_scale_factor is not meaningful with an explicit size.")
    if (recompute_scale_factor or mode == "area") and scales is not None:
        # the output size from the scale, and the kernel computes its scale from the sizes
        output_size, scales = [int(input.shape[2 + i] * scales[i]) for i in range(dim)], None
    return output_size, scales


def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                recompute_scale_factor=None, antialias=False):
    """Drop-in for ``torch.nn.functional.interpolate`` with a hand-written backward.

    Modes nearest, nearest-exact, linear, bilinear, bicubic, trilinear and area;
    ``antialias=True`` for bilinear and bicubic; lanczos (Lanczos-3, 4-D input, antialias=True only).
    Bad arguments fail like torch's."""
    if mode in ("nearest", "area", "nearest-exact"):
        if align_corners is not None:
            raise ValueError("align_corners option can only be set with the interpolating modes: "
                             "linear | bilinear | bicubic | trilinear")
    elif align_corners is None:
        align_corners = False
    output_size, scales = _sizes_and_scales(input, size, scale_factor, mode, recompute_scale_factor)
    d = input.dim() - 2
    if antialias:
        if not (mode in ("bilinear", "bicubic", "lanczos") and input.dim() == 4):
            raise ValueError("Anti-alias option is restricted to bilinear, bicubic, and lanczos modes and "
                             "requires a 4-D tensor as input")
    if mode == "lanczos" and d == 2:  # (other dims: the unsupported-input error below, as torch)
        if align_corners:
            raise ValueError("Lanczos mode does not support align_corners=True")
        if not antialias:
            raise ValueError("Lanczos mode requires antialias=True")
    if antialias:
        mode += "-aa"  # the antialiased taps (antialias_taps)
    if d not in _DIMS.get(mode.removesuffix("-aa"), ()):
        if mode in _NEEDS and d in (1, 2, 3):
            raise NotImplementedError(f"Got {d + 2}D input, but {mode} mode needs {_NEEDS[mode]} input")
        raise NotImplementedError(
            f"Input Error: Only 3D, 4D and 5D input Tensors supported (got {input.dim()}D) for the modes: "
            f"nearest | linear | bilinear | bicubic | trilinear | lanczos | area | nearest-exact (got {mode})")
    if mode == "area":
        if d == 1:
            return adaptive_avg_pool1d(input, output_size)
        if d == 2:
            return adaptive_avg_pool2d(input, output_size)
        return apply(Area3dFunction, input, output_size)
    return apply(InterpolateFunction, input, mode, d, output_size, scales, align_corners)


# ---------------------------------------------------------------------------------------------
# torch's deprecated aliases of interpolate: the same UserWarning as torch's, then interpolate

def upsample(input, size=None, scale_factor=None, mode="nearest", align_corners=None):
    """Drop-in for ``torch.nn.functional.upsample`` (deprecated): ``interpolate``."""
    warnings.warn("`nn.functional.upsample` is deprecated. Use `nn.functional.interpolate` instead.")
    return interpolate(input, size, scale_factor, mode, align_corners)


def upsample_nearest(input, size=None, scale_factor=None):
    """Drop-in for ``torch.nn.functional.upsample_nearest`` (deprecated): ``interpolate``, mode nearest."""
    warnings.warn("`nn.functional.upsample_nearest` is deprecated. Use `nn.functional.interpolate` instead.")
    return interpolate(input, size, scale_factor, mode="nearest")


def upsample_bilinear(input, size=None, scale_factor=None):
    """Drop-in for ``torch.nn.functional.upsample_bilinear`` (deprecated): ``interpolate``, mode
    bilinear with align_corners=True."""
    warnings.warn("`nn.functional.upsample_bilinear` is deprecated. Use `nn.functional.interpolate` instead.")
    return interpolate(input, size, scale_factor, mode="bilinear", align_corners=True)
