"""pad: every mode in 1, 2 and 3 dims, negative pads included, against torch and finite differences.

Padding copies values, and its backward only sums upstream gradients. The upstream gradients
here are multiples of 1/4 in [-4, 4] (``exact_dy``): their sums are exact in float32 in any
order, so the float32 comparisons with torch are exact (rtol = atol = 0) on every CPU.
"""
import itertools

import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.ops.padding import pad_backward, source_index
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy, noncontiguous

EXACT = dict(rtol=0, atol=0)
MODES = ["constant", "reflect", "replicate", "circular"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py



def padded_shape(shape, pad):
    out = list(shape)
    for k in range(len(pad) // 2):
        out[-1 - k] += pad[2 * k] + pad[2 * k + 1]
    return tuple(out)


def same_as_torch(x, pad, mode, value=None):
    dy = exact_dy(padded_shape(x.shape, pad))
    assert_same_as_torch(F.pad, TF.pad, x, pad, mode, value, grad_output=dy, **EXACT)


# (input shape, pad): 1, 2 and 3 padded dims, batched and unbatched, positive, zero, negative
# and mixed pads; every pad is valid for every non-constant mode (reflect: < size; circular:
# <= what the negative pads leave)
CASES = [
    ((2, 3, 5), (2, 1)),
    ((3, 6), (0, 3)),
    ((2, 3, 5), (-2, 1)),
    ((2, 3, 5), (3, -1)),
    ((2, 1, 4, 5), (1, 2, 3, 0)),
    ((3, 4, 5), (-1, 2, 1, -2)),
    ((1, 2, 3, 4, 5), (1, 2, 2, 1, 1, 2)),
    ((2, 3, 4, 5), (2, -1, 0, 1, -1, 2)),
]
IDS = [f"{s}-{p}" for s, p in CASES]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, pad", CASES, ids=IDS)
def test_pad_gradients(shape, pad, mode):
    check_gradients(F.pad, torch.randn(shape, dtype=torch.float64, requires_grad=True), pad, mode)


def test_constant_pad_gradients_with_a_value_and_more_padded_dims_than_spatial():
    # constant mode pads any dims (here the batch dims too) and its value has no gradient
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    check_gradients(F.pad, x, (1, -1, 0, 2, 1, 1), "constant", 2.5)
    check_gradients(F.pad, torch.randn(5, dtype=torch.float64, requires_grad=True), (-2, 3), value=-1.0)


@pytest.mark.parametrize("mode", MODES)
def test_pad_gradients_non_contiguous(mode):
    x = noncontiguous(torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True))
    assert not x.is_contiguous()
    check_gradients(F.pad, x, (2, 1, -1, 3), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, pad", CASES, ids=IDS)
def test_pad_matches_torch(shape, pad, mode):
    same_as_torch(torch.randn(shape, requires_grad=True), pad, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, pad", [
    ((2, 1, 1), (0, 0)),             # size-1 dims (reflect allows no positive pad of a size-1 dim)
    ((1, 1, 1, 7), (2, 1, 1, 0)),
    ((0, 3, 5), (2, 1)),             # no samples
    ((2, 3, 17, 1), (0, 0, 3, -2)),  # odd sizes, a size-1 dim left alone
    ((3, 1, 2, 9, 2), (1, 1, 1, 1, 1, 1)),
])
def test_pad_matches_torch_on_odd_and_empty_shapes(shape, pad, mode):
    if mode == "reflect" and any(p > 0 for k, p in enumerate(pad) if shape[-1 - k // 2] == 1):
        pytest.skip("reflect cannot pad a size-1 dim")
    same_as_torch(torch.randn(shape, requires_grad=True), pad, mode)


@pytest.mark.parametrize("mode", MODES)
def test_pad_matches_torch_on_channels_last_and_non_contiguous_inputs(mode):
    x = torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last).requires_grad_()
    same_as_torch(x, (2, 1, 3, -1), mode)
    x = torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d).requires_grad_()
    same_as_torch(x, (1, 2, 0, 1, 2, 1), mode)
    same_as_torch(noncontiguous(torch.randn(3, 4, 9, requires_grad=True)), (3, 2), mode)
    same_as_torch(torch.randn(4, 9, 8)[:, ::2, 1:].requires_grad_(), (1, 2, 2, 1), mode)


def test_constant_pad_matches_torch_with_values_dtypes_and_any_dims():
    same_as_torch(torch.randn(3, 4, 5, requires_grad=True), (1, -2, 2, 0, -1, 1), "constant", 0.5)
    same_as_torch(torch.randn(7, requires_grad=True), (3, -4), "constant", float("inf"))
    same_as_torch(torch.randn(2, 3, dtype=torch.float64, requires_grad=True), (), "constant", 1.0)
    x = torch.arange(6).view(2, 3)  # integer input: no gradient, torch's values
    assert torch.equal(F.pad(x, (1, 1), value=7), TF.pad(x, (1, 1), value=7))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_every_pad_of_a_short_dim_matches_torch_or_fails_like_it(mode):
    # every (pl, pr) in [-5, 5]^2 on sizes 1..4: where torch pads, the same values and gradient;
    # where it refuses, the same exception type (circular: see the next test for torch's holes)
    for L, pl, pr in itertools.product(range(1, 5), range(-5, 6), range(-5, 6)):
        x = torch.randn(2, L, requires_grad=True)
        kept = L - max(-pl, 0) - max(-pr, 0)
        if mode == "circular" and 0 < max(pl, pr) <= L and max(pl, pr) > kept and L + pl + pr >= 0:
            continue
        try:
            TF.pad(x, (pl, pr), mode)
        except RuntimeError:
            assert_raises_like_torch(F.pad, TF.pad, x, (pl, pr), mode)
            continue
        same_as_torch(x, (pl, pr), mode)


def test_circular_pad_wrapping_past_what_the_negative_pad_leaves_raises():
    # torch checks each pad against the dim's full size only: here the negative pad before
    # leaves 1 of 4 positions and 2 are to wrap after. torch fails on overlapping memory or, as
    # for the first, returns uninitialized memory; manualgrad says what is wrong
    x = torch.arange(4.0).view(1, 1, 4)
    for pad in [(-4, 2), (-3, 2), (2, -3), (-2, 3)]:
        with pytest.raises(RuntimeError, match=r"wrapping around more than once.*\(size 4\) leaves [012] positions"):
            F.pad(x, pad, "circular")
    with pytest.raises(RuntimeError, match="leaves 1 positions after the negative padding, fewer than the 2"):
        F.pad(torch.randn(2, 4, 5, 6), (0, 0, -4, 2, 0, 0), "circular")
    assert F.pad(x, (-2, 2), "circular").tolist() == [[[2.0, 3.0, 2.0, 3.0]]]  # exactly what is left: fine


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_source_index_gathers_torchs_padding(mode):
    # The index map on its own: gathering x at source_index along each dim is torch's pad.
    for pad in [(1, 2), (3, -1, 2, 0), (-1, 2, 1, 3, 2, -2), (0, 0, 4, 4)]:
        x = torch.randn(2, 3, *(5, 6, 4)[3 - len(pad) // 2:])
        y = x
        for k in range(len(pad) // 2):
            y = y.index_select(-1 - k, source_index(x.shape[-1 - k], pad[2 * k], pad[2 * k + 1], mode))
        assert torch.equal(y, TF.pad(x, pad, mode)), pad


def test_reflect_backward_sums_the_mirrored_gradients_worked_by_hand():
    # x of size 3, reflect (2, 1): y = [x2, x1, x0, x1, x2, x1]
    dy = torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0])
    dx = pad_backward(dy.view(1, 6), (1, 3), (2, 1), "reflect")
    assert dx.tolist() == [[100.0, 10.0 + 1000.0 + 100000.0, 1.0 + 10000.0]]
    # replicate (2, -1): y = [x0, x0, x0, x1]; circular (1, 2): y = [x2, x0, x1, x2, x0, x1]
    assert pad_backward(dy[:4].view(1, 4), (1, 3), (2, -1), "replicate").tolist() == [[111.0, 1000.0, 0.0]]
    assert pad_backward(dy.view(1, 6), (1, 3), (1, 2), "circular").tolist() == [[10010.0, 100100.0, 1001.0]]


def test_pad_jvp_puts_no_tangent_on_the_constant():
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(2, 3), torch.randn(2, 3)
    with fwAD.dual_level():
        y = F.pad(fwAD.make_dual(x, t), (1, 2), value=5.0)
        tangent = fwAD.unpack_dual(y).tangent
    assert torch.equal(tangent, TF.pad(t, (1, 2)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pad_under_autocast_gives_torchs_dtype_and_values(mode, dims):
    # torch's CPU autocast runs reflect pads of 1 and 2 dims and every replicate pad in float32
    # (a bfloat16 input comes out float32), the others in the input's dtype
    x = torch.randn(2, 3, *(5, 4, 6)[:dims])
    pad = (2, 1, 1, 0, 0, 1)[:2 * dims]
    for dtype in (torch.bfloat16, torch.float32):
        leaf = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = F.pad(leaf, pad, mode), TF.pad(leaf, pad, mode)
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)
        dy = exact_dy(ours.shape).to(ours.dtype)
        assert torch.equal(*(torch.autograd.grad(y, leaf, dy)[0] for y in (ours, theirs)))


def test_pad_records_the_hand_written_backward():
    x = torch.randn(2, 3, 4, requires_grad=True)
    assert type(F.pad(x, (1, 1), "reflect").grad_fn).__name__ == "ReflectReplicatePadFunctionBackward"
    assert type(F.pad(x, (1, 1), "circular").grad_fn).__name__ == "PadFunctionBackward"


# bad input: torch's exception type and message (the forward runs torch's own checks)
BAD = [
    ((1, 2, 3), (3, 3), "reflect", None, "Padding size should be less than the corresponding input dimension"),
    ((1, 2, 3), (0, 3), "reflect", None, "Padding size should be less than"),
    ((1, 2, 3), (1, 2, 3), "reflect", None, "Padding length must be divisible by 2"),
    ((1, 2, 3), (1,) * 8, "constant", None, "less than or equal to two times the input dimension"),
    ((1, 2, 3), (1, 1), "foo", None, "Unrecognised padding mode foo"),
    ((1, 2, 3), (1,) * 6, "reflect", None, "Padding size 6 is not supported for 3D input tensor"),
    ((3,), (1, 1), "replicate", None, "Padding size 2 is not supported for 1D input tensor"),
    ((1, 2, 3, 4), (1, 1), "circular", None, "Padding size 2 is not supported for 4D input tensor"),
    ((1, 2, 3), (1, 1), "reflect", 1.0, 'Padding mode "reflect" doesn\'t take in value argument'),
    ((1, 2, 3), (4, 1), "circular", None, "wrapping around more than once"),
    ((1, 2, 3), (-3, -1), "replicate", None, "is too small"),
    ((1, 2, 3), (-2, -2), "reflect", None, "is too small"),
    ((1, 2, 3), (-2, -2), "constant", None, "length must be non-negative"),
    ((1, 0, 3), (1, 1), "reflect", None, "non-zero dimensions"),
    ((1, 2, 0), (0, 0), "replicate", None, "non-zero dimensions"),
]


@pytest.mark.parametrize("shape, pad, mode, value, match", BAD, ids=[f"{b[2]}-{b[1]}-{b[0]}" for b in BAD])
def test_bad_pad_raises_like_torch(shape, pad, mode, value, match):
    assert_raises_like_torch(F.pad, TF.pad, torch.randn(shape), pad, mode, value, match=match)


def test_pad_of_the_wrong_type_raises_like_torch():
    x = torch.randn(1, 2, 3)
    assert_raises_like_torch(F.pad, TF.pad, x, (1.5, 1), "reflect", match="must be tuple of ints")
    assert_raises_like_torch(F.pad, TF.pad, x, torch.tensor([1, 1]), "circular", match="must be tuple of ints")


@pytest.mark.parametrize("mode", MODES)
def test_pad_saves_nothing_for_backward_and_torch_saves_no_less(mode):
    # the backward needs only shapes and pads (torch's reflect/replicate save the input)
    from manualgrad.testing import saved_bytes

    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    ours, _ = saved_bytes(F.pad, x, (1, 2, 2, 1), mode)
    theirs, _ = saved_bytes(TF.pad, x, (1, 2, 2, 1), mode)
    assert ours == 0 <= theirs


@pytest.mark.parametrize("mode", MODES)
def test_per_sample_gradients_under_vmap_match_torch(mode):
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)

    def loss(fn):
        return lambda t: (fn(t, (1, 2, 2, -1), mode) ** 2).sum()
    ours = torch.func.vmap(torch.func.grad(loss(F.pad)))(x)
    # (float64: the summation order of the replicated edges differs from torch's in the last bits)
    torch.testing.assert_close(ours, torch.func.vmap(torch.func.grad(loss(TF.pad)))(x))
    # and vmap over a padded dim: the pad moves to the dims left
    ours = torch.func.vmap(lambda t: F.pad(t, (2, 1), mode), in_dims=3)(x)
    assert torch.equal(ours, torch.func.vmap(lambda t: TF.pad(t, (2, 1), mode), in_dims=3)(x))
