"""pixel_shuffle, pixel_unshuffle, channel_shuffle, unfold and fold against torch and finite differences.

These ops copy values (fold also sums them). The upstream gradients here are multiples of 1/4 in
[-4, 4] (``exact_dy``), whose sums are exact in float32 in any order, so the float32
comparisons with torch are exact (rtol = atol = 0) on every CPU.
"""
import itertools

import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy, noncontiguous

EXACT = dict(rtol=0, atol=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py



def same_as_torch(name, x, *args):
    dy = exact_dy(getattr(TF, name)(x.detach(), *args).shape)
    assert_same_as_torch(getattr(F, name), getattr(TF, name), x, *args, grad_output=dy, **EXACT)


def leaf64(*shape):
    return torch.randn(shape, dtype=torch.float64, requires_grad=True)

# ---------------------------------------------------------------------------------------------
# pixel_shuffle / pixel_unshuffle / channel_shuffle


# (op, input shape, factor or groups): batched, unbatched, extra leading dims, factor 1, size-1
# and zero-size dims
SHUFFLES = [
    ("pixel_shuffle", (2, 8, 3, 5), 2),
    ("pixel_shuffle", (9, 2, 1), 3),
    ("pixel_shuffle", (2, 3, 4, 2, 3), 2),
    ("pixel_shuffle", (1, 5, 3, 2), 1),
    ("pixel_unshuffle", (2, 3, 4, 6), 2),
    ("pixel_unshuffle", (1, 6, 3), 3),
    ("pixel_unshuffle", (2, 1, 3, 2, 4), 2),
    ("channel_shuffle", (2, 6, 3, 5), 3),
    ("channel_shuffle", (3, 8, 7), 2),
    ("channel_shuffle", (1, 6, 2, 3, 2), 6),
    ("channel_shuffle", (2, 4, 1), 1),
    ("channel_shuffle", (0, 4, 3), 2),
]
SHUFFLE_IDS = [f"{n}-{s}-{a}" for n, s, a in SHUFFLES]


@pytest.mark.parametrize("name, shape, arg", [c for c in SHUFFLES if 0 not in c[1]],
                         ids=[i for c, i in zip(SHUFFLES, SHUFFLE_IDS) if 0 not in c[1]])
def test_shuffle_gradients(name, shape, arg):
    check_gradients(getattr(F, name), leaf64(*shape), arg)


@pytest.mark.parametrize("name, shape, arg", SHUFFLES, ids=SHUFFLE_IDS)
def test_shuffle_matches_torch(name, shape, arg):
    same_as_torch(name, torch.randn(shape, requires_grad=True), arg)
    same_as_torch(name, noncontiguous(torch.randn(shape, requires_grad=True)), arg)


@pytest.mark.parametrize("name, arg", [("pixel_shuffle", 2), ("pixel_unshuffle", 2), ("channel_shuffle", 4)])
def test_shuffle_matches_torch_on_channels_last_and_strided_inputs(name, arg):
    same_as_torch(name, torch.randn(2, 8, 4, 6).to(memory_format=torch.channels_last).requires_grad_(), arg)
    same_as_torch(name, torch.randn(3, 16, 9, 8)[:, ::2, 1:, ::2].requires_grad_(), arg)
    check_gradients(getattr(F, name), noncontiguous(leaf64(2, 8, 4, 2)), arg)


def test_pixel_shuffle_places_channels_as_worked_by_hand():
    # 4 channels of one pixel, r = 2: y[0, 0, i, j] = x[0, 2 i + j, 0, 0]
    x = torch.arange(4.0).view(1, 4, 1, 1)
    assert F.pixel_shuffle(x, 2).tolist() == [[[[0.0, 1.0], [2.0, 3.0]]]]
    # channel_shuffle of 6 channels in 2 groups: (0 1 2)(3 4 5) -> 0 3 1 4 2 5; the backward undoes it
    x = torch.arange(6.0).view(1, 6, 1).requires_grad_()
    y = F.channel_shuffle(x, 2)
    assert y.flatten().tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    (dx,) = torch.autograd.grad(y, x, torch.tensor([0.0, 3, 1, 4, 2, 5]).view(1, 6, 1))
    assert dx.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_shuffles_of_empty_inputs_give_torchs_output_and_an_empty_gradient():
    # torch's pixel_shuffle / pixel_unshuffle return an empty input as it is (pixel_unshuffle keeps
    # its shape: (2, 0, 2, 2) stays (2, 0, 2, 2)), and torch's backward then fails on the shape
    # (pixel_shuffle), or on groups C / g = 0 (channel_shuffle of no channels). manualgrad gives
    # torch's outputs and the gradient of a sum over nothing: zeros like x.
    for name, shape, arg, torch_backward_fails in [
        ("pixel_shuffle", (0, 4, 3, 2), 2, True), ("pixel_shuffle", (2, 4, 0, 3), 2, True),
        ("pixel_unshuffle", (2, 0, 2, 2), 2, False), ("pixel_unshuffle", (0, 1, 4, 2), 2, False),
        ("channel_shuffle", (2, 0, 3), 2, True), ("channel_shuffle", (0, 4, 3), 2, False),
    ]:
        x = torch.randn(shape, requires_grad=True)
        ours, theirs = getattr(F, name)(x, arg), getattr(TF, name)(x, arg)
        assert ours.shape == theirs.shape, name
        if torch_backward_fails:
            with pytest.raises(RuntimeError):
                torch.autograd.grad(theirs, x, torch.zeros_like(theirs))
        (dx,) = torch.autograd.grad(ours, x, torch.zeros_like(ours))
        assert dx.shape == x.shape


BAD_SHUFFLES = [
    ("pixel_shuffle", (2, 8, 3, 5), 3, "divisible by the square of upscale_factor"),
    ("pixel_shuffle", (8, 3), 2, "at least 3 dimensions"),
    ("pixel_shuffle", (2, 8, 3, 5), 0, "positive upscale_factor"),
    ("pixel_shuffle", (2, 8, 3, 5), 1.5, "must be int"),
    ("pixel_unshuffle", (2, 8, 3, 5), 2, "height to be divisible by downscale_factor"),
    ("pixel_unshuffle", (2, 3, 4, 6), -1, "positive downscale_factor"),
    ("channel_shuffle", (2, 8, 3), 3, "Number of channels must be divisible by groups"),
    ("channel_shuffle", (2, 6), 3, "expects input with > 2 dims"),
    ("channel_shuffle", (2, 6, 3), 0, "must be positive"),
]


@pytest.mark.parametrize("name, shape, arg, match", BAD_SHUFFLES, ids=[f"{b[0]}-{b[1]}-{b[2]}" for b in BAD_SHUFFLES])
def test_bad_shuffle_raises_like_torch(name, shape, arg, match):
    assert_raises_like_torch(getattr(F, name), getattr(TF, name), torch.randn(shape), arg, match=match)

# ---------------------------------------------------------------------------------------------
# unfold / fold


def _blocks(size, k, d, p, s):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# every combination of kernel, dilation, padding and stride (ints and per-dim tuples), on an input
# big enough for all of them; stride (2, 3) skips some positions (no block reads them)
OPTIONS = [dict(kernel_size=k, dilation=d, padding=p, stride=s)
           for k, d, p, s in itertools.product([2, (3, 1)], [1, (2, 1)], [0, (1, 2)], [1, (2, 3)])]
OPTION_IDS = [f"k{o['kernel_size']}-d{o['dilation']}-p{o['padding']}-s{o['stride']}" for o in OPTIONS]


def _fold_input(shape_x, opts):
    """A cols shape that folds back onto the spatial size of shape_x under opts."""
    two = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    k, d, p, s = (two(opts[n]) for n in ("kernel_size", "dilation", "padding", "stride"))
    L = _blocks(shape_x[-2], k[0], d[0], p[0], s[0]) * _blocks(shape_x[-1], k[1], d[1], p[1], s[1])
    return (*shape_x[:-3], shape_x[-3] * k[0] * k[1], L)


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
def test_unfold_and_fold_match_torch_for_every_option(opts):
    for shape in [(2, 3, 7, 8), (3, 6, 7)]:
        same_as_torch("unfold", torch.randn(shape, requires_grad=True), *opts.values())
        cols = torch.randn(_fold_input(shape, opts), requires_grad=True)
        same_as_torch("fold", cols, shape[-2:], *opts.values())


@pytest.mark.parametrize("opts", OPTIONS[::5], ids=OPTION_IDS[::5])
def test_unfold_and_fold_gradients(opts):
    check_gradients(F.unfold, leaf64(2, 2, 5, 6), **opts)
    check_gradients(F.fold, leaf64(*_fold_input((2, 5, 6), opts)), (5, 6), **opts)


def test_unfold_and_fold_on_odd_empty_and_strided_inputs_match_torch():
    same_as_torch("unfold", torch.randn(1, 1, 1, 1, requires_grad=True), 1)
    same_as_torch("unfold", torch.randn(2, 3, 1, 9, requires_grad=True), (1, 4), 1, 0, (1, 2))
    same_as_torch("unfold", torch.randn(0, 3, 4, 4, requires_grad=True), 2)
    same_as_torch("fold", torch.randn(0, 12, 9, requires_grad=True), (4, 4), 2)
    same_as_torch("unfold", torch.randn(2, 3, 6, 5).to(memory_format=torch.channels_last).requires_grad_(), 2, 1, 1, 2)
    same_as_torch("unfold", noncontiguous(torch.randn(2, 3, 6, 5, requires_grad=True)), (2, 3))
    same_as_torch("fold", torch.randn(2, 12, 12, 3)[..., 1].requires_grad_(), (4, 5), 2)
    check_gradients(F.fold, noncontiguous(leaf64(2, 12, 12)), (4, 5), 2)


def test_unfold_and_fold_are_adjoint():
    # <unfold(x), c> = <x, fold(c)>: fold is unfold's backward and unfold is fold's
    opts = dict(kernel_size=(3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1))
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    cols = F.unfold(x, **opts)
    c = torch.randn_like(cols, requires_grad=True)
    folded = F.fold(c, (7, 6), **opts)
    torch.testing.assert_close((cols * c).sum(), (x * folded).sum())
    (dx,) = torch.autograd.grad(cols, x, c)
    (dc,) = torch.autograd.grad(folded, c, x)
    assert torch.equal(dx, folded) and torch.equal(dc, cols)


def test_fold_sums_overlapping_blocks_as_worked_by_hand():
    # 1 channel, 1 x 3 output, kernel (1, 2), stride 1: blocks [0, 1] and [1, 2]; position 1 gets both
    cols = torch.tensor([[[1.0, 10.0], [100.0, 1000.0]]])  # (1, kh kw = 2, L = 2)
    assert F.fold(cols, (1, 3), (1, 2)).tolist() == [[[[1.0, 100.0 + 10.0, 1000.0]]]]


BAD_FOLDS = [
    ("unfold", (1, 2, 8, 3, 5), (2,), "Expected 3D or 4D"),
    ("unfold", (2, 8, 3, 5), (4,), "calculated shape of the array of sliding blocks"),
    ("unfold", (2, 8, 3, 5), (0,), "kernel size should be greater than zero"),
    ("unfold", (2, 8, 3, 5), (2, 1, 0, 0), "stride should be greater than zero"),
    ("unfold", (2, 8, 3, 5), (2, 1, -1), "padding should be non-negative"),
    ("unfold", (2, 8, 3, 5), ((2, 2, 2),), "kernel_size equals to 2"),
    ("unfold", (2, 0, 4, 4), (2,), "non-zero dimensions"),
    ("fold", (2, 12, 6), ((4, 4), 2), "match the calculated number of sliding blocks"),
    ("fold", (2, 12, 6, 1), ((3, 4), 2), "Expected 2D or 3D"),
    ("fold", (2, 12, 6), ((3, 4), (2, 3)), "match the calculated number of sliding blocks"),
    ("fold", (2, 0, 6), ((3, 4), 2), "non-zero dimensions"),
]


@pytest.mark.parametrize("name, shape, args, match", BAD_FOLDS, ids=[f"{b[0]}-{b[1]}-{b[2]}" for b in BAD_FOLDS])
def test_bad_fold_and_unfold_raise_like_torch(name, shape, args, match):
    assert_raises_like_torch(getattr(F, name), getattr(TF, name), torch.randn(shape), *args, match=match)


# one call per op: (name, input shape, arguments after the input)
ONE_CALL = [("pixel_shuffle", (2, 8, 3, 5), (2,)), ("pixel_unshuffle", (2, 3, 4, 6), (2,)),
            ("channel_shuffle", (2, 8, 3), (2,)), ("unfold", (2, 3, 5, 5), (2,)), ("fold", (2, 12, 6), ((3, 4), 2))]


@pytest.mark.parametrize("name, shape, args", ONE_CALL)
def test_rearrangements_under_autocast_keep_the_input_dtype_like_torch(name, shape, args):
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(shape, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = getattr(F, name)(x, *args), getattr(TF, name)(x, *args)
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name, shape, args", ONE_CALL)
def test_rearrangements_save_nothing_for_backward(name, shape, args):
    from manualgrad.testing import saved_bytes

    ours, _ = saved_bytes(getattr(F, name), torch.randn(shape, requires_grad=True), *args)
    assert ours == 0
