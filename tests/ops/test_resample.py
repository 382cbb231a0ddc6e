"""interpolate: every mode and option against torch (float32) and finite differences (float64).

The forward is torch's kernel, so outputs are identical. The backward sums at most a few dozen
rounded products w * dy per input position here (K^d taps times the positions one input feeds),
so it may differ from torch's in the last bits of those sums: 32 float32 ulps of the gradient's
scale. The nearest modes only add upstream gradients: with ``exact_dy`` those sums are exact.
"""
import itertools

import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.ops.resample import interpolate_backward, taps
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy, noncontiguous

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py

EPS = torch.finfo(torch.float32).eps
# mode -> spatial dims it takes
MODES = {"nearest": (1, 2, 3), "nearest-exact": (1, 2, 3), "area": (1, 2, 3), "linear": (1,),
         "bilinear": (2,), "bicubic": (2,), "trilinear": (3,)}
CORNERS = {m: ([None] if m in ("nearest", "nearest-exact", "area") else [False, True]) for m in MODES}
# (size / scale_factor arguments): up, down, mixed, unchanged; scales with and without recompute
SIZINGS = [
    dict(size=7),
    dict(size=2),
    dict(scale_factor=2.0),
    dict(scale_factor=0.6),
    dict(scale_factor=1.7, recompute_scale_factor=True),
    dict(scale_factor=1.3, recompute_scale_factor=False),
    dict(scale_factor=2.5),
]


def spatial(d, sizes=(5, 4, 6)):
    # no SIZINGS scale takes these lengths to L or 2 L but 2.0 (see the nearest and bicubic tests below)
    return sizes[:d]


def same_as_torch(x, **kwargs):
    with torch.no_grad():
        y = TF.interpolate(x, **kwargs)
    dy = exact_dy(y.shape)
    scale = float(y.abs().max()) if y.numel() else 1.0
    tol = 0.0 if kwargs.get("mode", "nearest") in ("nearest", "nearest-exact") else 32 * EPS * 4 * max(scale, 1.0)
    assert_same_as_torch(F.interpolate, TF.interpolate, x, grad_output=dy, rtol=0, atol=tol, **kwargs)


CASES = [(m, d, ac, s) for m, dims in MODES.items() for d in dims for ac in CORNERS[m] for s in SIZINGS]


@pytest.mark.parametrize("mode, d, align_corners, sizing", CASES,
                         ids=[f"{m}-{d}d-{ac}-{s}" for m, d, ac, s in CASES])
def test_interpolate_matches_torch(mode, d, align_corners, sizing):
    x = torch.randn((2, 3) + spatial(d), requires_grad=True)
    same_as_torch(x, mode=mode, align_corners=align_corners, **sizing)


# float64 gradients: every mode, up and down, sizes and scales, on 1-3 positions per dim
GRAD_CASES = [(m, d, ac, s) for m, dims in MODES.items() for d in dims for ac in CORNERS[m]
              for s in (dict(size=5), dict(scale_factor=0.7), dict(scale_factor=1.3))]


@pytest.mark.parametrize("mode, d, align_corners, sizing", GRAD_CASES,
                         ids=[f"{m}-{d}d-{ac}-{s}" for m, d, ac, s in GRAD_CASES])
def test_interpolate_gradients(mode, d, align_corners, sizing):
    x = torch.randn((1, 2) + spatial(d, (3, 2, 3)), dtype=torch.float64, requires_grad=True)
    check_gradients(F.interpolate, x, mode=mode, align_corners=align_corners, **sizing)


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic", "area", "nearest-exact"])
def test_interpolate_matches_torch_on_odd_layouts_and_sizes(mode):
    ac = None if mode in ("nearest", "area", "nearest-exact") else False
    # channels-last, non-contiguous, size-1 dims both ways, float64
    x = torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last).requires_grad_()
    same_as_torch(x, size=(9, 4), mode=mode, align_corners=ac)
    x = noncontiguous(torch.randn(3, 4, 5, 6, requires_grad=True))
    same_as_torch(x, scale_factor=(1.5, 0.5), mode=mode, align_corners=ac)
    same_as_torch(torch.randn(1, 1, 1, 1, requires_grad=True), size=(3, 1), mode=mode, align_corners=ac)
    same_as_torch(torch.randn(1, 2, 7, 1, requires_grad=True), size=(1, 1), mode=mode, align_corners=ac)
    same_as_torch(torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True), size=(5, 6), mode=mode,
                  align_corners=ac)


def test_interpolate_on_empty_batches_and_channels_matches_torch():
    same_as_torch(torch.randn(0, 3, 4, 5, requires_grad=True), size=(3, 7), mode="bilinear")
    same_as_torch(torch.randn(0, 2, 4, 3, 5, requires_grad=True), scale_factor=2.0, mode="nearest")


def test_linear_modes_copy_a_dim_whose_length_does_not_change_like_torch():
    # scale_factor 1.3 on a length-3 dim gives 3 again: torch's linear kernels copy that dim
    # (ignoring the scale), the other dim is interpolated with s = 1 / 1.3
    x = torch.eye(3, dtype=torch.float64)[:, None]
    y = F.interpolate(x, scale_factor=1.3, mode="linear")
    assert torch.equal(y, x)
    idx, w = taps("linear", 3, 3, False, 1.3, torch.float64)
    assert torch.equal(idx[:, 0], torch.arange(3)) and torch.equal(w, torch.ones(3, 1, dtype=torch.float64))
    same_as_torch(torch.randn(2, 3, 3, 4, requires_grad=True), scale_factor=1.3, mode="bilinear")


def test_linear_taps_match_a_weight_worked_out_by_hand():
    # L = 4 -> Lo = 5, align_corners=False: s = 4/5, output 1 sits at r = 0.8 * 1.5 - 0.5 = 0.7,
    # between inputs 0 and 1 with weights 0.3, 0.7; output 4 at r = 3.1: clamped to input 3 alone
    idx, w = taps("linear", 4, 5, False, None, torch.float64)
    assert idx[1].tolist() == [0, 1] and torch.allclose(w[1], torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert idx[4].tolist() == [3, 3] and w[4].sum() == 1


def test_bicubic_gradient_is_the_adjoint_of_torchs_forward_where_torchs_is_not():
    # every length unchanged (3 * 1.3 -> 3) with the scale kept: torch's forward interpolates
    # with s = 1 / 1.3, its backward copies dy. manualgrad's gradient is the finite difference's.
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    check_gradients(F.interpolate, x, scale_factor=1.3, mode="bicubic")
    y = TF.interpolate(x, scale_factor=1.3, mode="bicubic")
    assert not torch.allclose(y, x)  # the forward is not a copy
    dy = torch.randn_like(y)
    (g_torch,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(g_torch, dy)  # torch's backward is (when torch fixes it, this test goes)
    (g,) = torch.autograd.grad(F.interpolate(x, scale_factor=1.3, mode="bicubic"), x, dy)
    # <y(x), dy> = <x, dx>: the adjoint of torch's forward
    torch.testing.assert_close((y * dy).sum(), (x * g).sum())


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_nearest_gradient_is_the_adjoint_of_torchs_forward_where_torchs_is_not(mode):
    # 3 * 1.3 -> 3 and 3 * 2.2 -> 6 with the scales kept: torch's 1-d forward reads floor(o / 1.3) =
    # [0, 0, 1] and floor(o / 2.2) = [0, 0, 0, 1, 1, 2], its nearest backward o and o // 2 (the
    # 2-d kernel takes o and o // 2 in its forward too: the float64 gradient tests cover it)
    x = torch.randn(1, 1, 3, dtype=torch.float64, requires_grad=True)
    for scale, src in ((1.3, [0, 0, 1]), (2.2, [0, 0, 0, 1, 1, 2])):
        check_gradients(F.interpolate, x, scale_factor=scale, mode=mode)
        y = TF.interpolate(x, scale_factor=scale, mode=mode)
        dy = torch.randn_like(y)
        (g,) = torch.autograd.grad(F.interpolate(x, scale_factor=scale, mode=mode), x, dy)
        (g_torch,) = torch.autograd.grad(y, x, dy)
        if mode == "nearest":
            assert torch.equal(y[0, 0], x[0, 0, src])
            expected = torch.zeros(3, dtype=torch.float64).index_add(0, torch.tensor(src), dy[0, 0])
            assert torch.equal(g[0, 0], expected)
            assert not torch.allclose(g_torch, g)  # torch's (when torch fixes it, this line goes)
        torch.testing.assert_close((y * dy).sum(), (x * g).sum())


def test_interpolate_backward_is_the_adjoint_of_torchs_forward_in_every_mode():
    # <interpolate(x), dy> = <x, interpolate_backward(dy)> for random x, dy: independent of torch's backward
    for mode, dims in MODES.items():
        if mode == "area":
            continue
        for d in dims:
            for ac, sizing in itertools.product(CORNERS[mode], SIZINGS):
                x = torch.randn((1, 2) + spatial(d), dtype=torch.float64)
                y = TF.interpolate(x, mode=mode, align_corners=ac, **sizing)
                dy = torch.randn_like(y)
                scales = None
                if "scale_factor" in sizing and not sizing.get("recompute_scale_factor"):
                    scales = [sizing["scale_factor"]] * d
                dx = interpolate_backward(dy, x.shape[2:], mode, scales, ac)
                torch.testing.assert_close((y * dy).sum(), (x * dx).sum(), msg=f"{mode} {d} {ac} {sizing}")


def test_interpolate_under_vmap_matches_torch():
    x = torch.randn(3, 2, 4, 5)
    for mode in ("nearest", "bilinear", "bicubic"):
        ours = torch.func.vmap(lambda t: F.interpolate(t, size=(7, 3), mode=mode))(x[:, :, None])
        theirs = torch.func.vmap(lambda t: TF.interpolate(t, size=(7, 3), mode=mode))(x[:, :, None])
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_interpolate_keeps_torchs_dtype_under_cpu_autocast():
    # the upsample ops keep bfloat16 (F.interpolate calls overloads not on the CPU list); the
    # area mode of 5-D input is adaptive_avg_pool3d, on the CPU float32 list
    x4, x5 = torch.randn(1, 2, 4, 5, dtype=torch.bfloat16), torch.randn(1, 2, 3, 4, 5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x, mode in ((x4, "bilinear"), (x4, "nearest"), (x5, "trilinear"), (x5, "area")):
            assert F.interpolate(x, size=x.shape[2:], mode=mode).dtype == TF.interpolate(x, size=x.shape[2:],
                                                                                         mode=mode).dtype


def x3(*s):
    return torch.randn(*s)


@pytest.mark.parametrize("args, kwargs", [
    ((x3(1, 2, 4),), dict(size=3, scale_factor=2.0)),              # both
    ((x3(1, 2, 4),), {}),                                           # neither
    ((x3(1, 2, 4),), dict(size=(3, 3))),                            # size per dim
    ((x3(1, 2, 4, 4),), dict(scale_factor=(2.0,))),                 # scale per dim
    ((x3(1, 2, 4),), dict(size=(2.5,))),                            # non-integer size
    ((x3(1, 2, 4),), dict(size=2.5)),
    ((x3(1, 2, 4),), dict(scale_factor=torch.tensor(2.0))),         # a tensor scale
    ((x3(1, 2, 4),), dict(size=3, recompute_scale_factor=True)),
    ((x3(1, 2, 4),), dict(size=3, align_corners=True)),             # nearest with align_corners
    ((x3(1, 2, 4),), dict(size=3, mode="bilinear")),                # wrong dims for the mode
    ((x3(1, 2, 4, 4),), dict(size=3, mode="trilinear")),
    ((x3(1, 2, 4, 4, 4),), dict(size=3, mode="bicubic")),
    ((x3(2, 4),), dict(size=3)),                                    # 2-D input
    ((x3(1, 2, 4),), dict(size=3, mode="cubic")),                   # unknown mode
    ((x3(1, 2, 4),), dict(size=3, mode="linear", antialias=True)),  # antialias needs 4-D bilinear / bicubic
    ((x3(1, 2, 4, 4),), dict(size=3, mode="lanczos")),              # lanczos needs antialias
    ((x3(1, 2, 4, 4),), dict(size=3, mode="lanczos", antialias=True, align_corners=True)),
    ((x3(1, 2, 4),), dict(size=3, mode="lanczos")),                 # lanczos on 3-D / 5-D input
    ((x3(1, 2, 4, 4, 4),), dict(size=3, mode="lanczos")),
    ((x3(1, 2, 4, 4).bfloat16(),), dict(size=3, mode="lanczos", antialias=True)),  # no bfloat16 kernel
    ((x3(1, 2, 4),), dict(size=0, mode="linear")),                  # empty output
    ((x3(1, 2, 0, 3),), dict(size=3, mode="bilinear")),             # empty input
    ((x3(2, 0, 4),), dict(size=3)),                                 # no channels
])
def test_interpolate_bad_input_fails_like_torch(args, kwargs):
    assert_raises_like_torch(F.interpolate, TF.interpolate, *args, **kwargs)


AA_SIZINGS = [dict(size=(3, 4)), dict(size=(2, 13)), dict(scale_factor=0.3), dict(scale_factor=(0.45, 1.3)),
              dict(size=(1, 1)), dict(scale_factor=0.26, recompute_scale_factor=True)]
AA_CASES = list(itertools.product(["bilinear", "bicubic"], [False, True], AA_SIZINGS))
# lanczos: align_corners=False only; also upsampling (the filter is not stretched, 7 taps)
AA_CASES += [("lanczos", False, s) for s in AA_SIZINGS + [dict(size=(23, 17)), dict(scale_factor=1.7)]]


@pytest.mark.parametrize("mode, align_corners, sizing", AA_CASES, ids=[f"{m}-{a}-{s}" for m, a, s in AA_CASES])
def test_antialiased_interpolate_matches_torch(mode, align_corners, sizing):
    x = torch.randn(2, 3, 9, 10, requires_grad=True)
    same_as_torch(x, mode=mode, align_corners=align_corners, antialias=True, **sizing)


@pytest.mark.parametrize("mode, align_corners",
                         list(itertools.product(["bilinear", "bicubic"], [False, True])) + [("lanczos", False)])
def test_antialiased_interpolate_gradients(mode, align_corners):
    x = torch.randn(1, 1, 7, 5, dtype=torch.float64, requires_grad=True)
    for sizing in (dict(size=(3, 2)), dict(scale_factor=(0.4, 1.5))):
        check_gradients(F.interpolate, x, mode=mode, align_corners=align_corners, antialias=True, **sizing)


def test_antialias_taps_match_a_box_worked_out_by_hand():
    # bilinear, L = 6 -> Lo = 2: s = 3, filter 1 - |x| stretched by 3 around c = 1.5 (o = 0):
    # input centers j + 1/2 = 0.5 .. 3.5 at distances 1, 0, 1, 2 (/ 3) weigh 2/3, 1, 2/3, 1/3 (the
    # mirror of input 3, at -0.5, is outside) -> normalized by 8/3: 1/4, 3/8, 1/4, 1/8
    idx, w = taps("bilinear-aa", 6, 2, False, None, torch.float64)
    nonzero = w[0] != 0
    assert idx[0][nonzero].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(w[0][nonzero], torch.tensor([2, 3, 2, 1], dtype=torch.float64) / 8)


def test_lanczos_taps_match_the_windowed_sinc_worked_out_by_hand():
    # L = 4 -> Lo = 4 (s = 1): output o = 1 at c = 1.5 reads inputs 0..3 at distances -1, 0, 1, 2:
    # sinc(x) sinc(x / 3) is 0 at the nonzero integers, 1 at 0: the identity
    idx, w = taps("lanczos-aa", 4, 4, False, None, torch.float64)
    # (sin(pi k) is ~1e-16, not 0, in float64: the identity up to that)
    torch.testing.assert_close((w * (idx == torch.arange(4)[:, None])).sum(1), torch.ones(4, dtype=torch.float64),
                               rtol=1e-15, atol=1e-15)
    # L = 2 -> Lo = 1 (s = 2, filter stretched by 2, around c = 1): inputs 0, 1 at x = -1/4, 1/4,
    # equal weights 1/2 after normalization (the filter is even)
    idx, w = taps("lanczos-aa", 2, 1, False, None, torch.float64)
    assert sorted(idx[0][w[0] != 0].tolist()) == [0, 1]
    torch.testing.assert_close(w[0][w[0] != 0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    # L = 4 -> Lo = 1 (s = 4, around c = 2): inputs 0..3 at x = (j + 1/2 - 2) / 4 = -3/8, -1/8, 1/8, 3/8
    x = torch.tensor([-3, -1, 1, 3], dtype=torch.float64) / 8
    lz = torch.sinc(x) * torch.sinc(x / 3)
    idx, w = taps("lanczos-aa", 4, 1, False, None, torch.float64)
    torch.testing.assert_close(w[0][w[0] != 0], lz / lz.sum(), rtol=1e-15, atol=1e-15)


def test_lanczos_under_vmap_matches_torch():
    # vmap of the function (the batched rule) and of its vjp against torch's
    x = torch.randn(3, 2, 5, 6)
    f = lambda m: (lambda t: m.interpolate(t, size=(9, 4), mode="lanczos", antialias=True))  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(f(F))(x[:, :, None]), torch.func.vmap(f(TF))(x[:, :, None]),
                               rtol=0, atol=0)
    dy = torch.randn(3, 2, 1, 9, 4)
    vjps = [torch.func.vmap(lambda t, g: torch.func.vjp(f(m), t)[1](g)[0])(x[:, :, None], dy) for m in (F, TF)]
    torch.testing.assert_close(*vjps, rtol=0, atol=32 * EPS * 4)


def test_interpolate_saves_no_more_than_torch():
    # only sizes are kept: the taps are recomputed in backward (torch saves nothing either, but
    # adaptive_avg_pool3d, which keeps its input)
    from manualgrad.testing import saved_bytes
    x4, x5 = torch.randn(2, 3, 8, 9, requires_grad=True), torch.randn(2, 3, 4, 8, 9, requires_grad=True)
    for x, kw in ((x4, dict(size=(5, 17), mode="bicubic")),
                  (x4, dict(scale_factor=0.5, mode="bilinear", antialias=True)),
                  (x5, dict(size=(5, 3, 17), mode="area")), (x5, dict(scale_factor=2.0, mode="nearest"))):
        assert saved_bytes(F.interpolate, x, **kw)[0] <= saved_bytes(TF.interpolate, x, **kw)[0]
