import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vjp, vmap

import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.ops.dropout import pack_bits, unpack_bits
from manualgrad.testing import assert_raises_like_torch, check_gradients
from tests.conftest import VIEWS, inplace_on_view, noncontiguous

INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}


def assert_bitwise_equal(a, b, what):
    """Equal bit for bit: same zeros' signs, same nans."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype])), what


def run_seeded(fn, x, dy, seed, inplace=False, **kwargs):
    """Output and input gradient of fn(x) after torch.manual_seed(seed)."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = fn(x * 1 if inplace else x, inplace=inplace, **kwargs)  # in place needs a non-leaf
    y.backward(dy)
    return y.detach(), x.grad


def assert_same_as_torch_bitwise(x, seed=0, inplace=False, **kwargs):
    dy = torch.randn(x.shape, dtype=x.dtype)
    mg_y, mg_dx = run_seeded(F.dropout, x, dy, seed, inplace, **kwargs)
    th_y, th_dx = run_seeded(TF.dropout, x, dy, seed, inplace, **kwargs)
    assert_bitwise_equal(mg_y, th_y, "output")
    assert_bitwise_equal(mg_dx, th_dx, "gradient")
    return mg_y, mg_dx


def seeded_dropout(p, inplace=False, seed=1234):
    """dropout with the mask fixed: every call reseeds, so draws the same mask. That makes it
    a deterministic function of x, which finite differences need."""

    def f(x):
        torch.manual_seed(seed)
        return F.dropout(x.clone() if inplace else x, p, inplace=inplace)

    return f


# ---------------------------------------------------------------------------------------------
# pack_bits / unpack_bits


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (257,), (3, 13), (2, 3, 17)])
def test_pack_bits_is_numpys_little_endian_packbits_along_the_last_dim(shape):
    bits = torch.rand(shape) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], math.ceil(shape[-1] / 8))
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.numpy(), axis=-1, bitorder="little"))


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (257,), (3, 13), (2, 3, 17)])
def test_unpack_bits_inverts_pack_bits(shape):
    bits = torch.rand(shape) < 0.5
    out = unpack_bits(pack_bits(bits), shape[-1])
    assert out.dtype == torch.bool
    assert torch.equal(out, bits)


def test_pack_bits_reads_a_non_contiguous_input_in_logical_order():
    bits = torch.rand(13, 6) < 0.5
    packed = pack_bits(bits.t())
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.t().numpy(), axis=-1, bitorder="little"))


# ---------------------------------------------------------------------------------------------
# same mask as torch under the same seed: outputs and gradients equal bit for bit


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (1,), (7, 13), (2, 3, 257)])
def test_matches_torch_bitwise_under_the_same_seed(p, dtype, shape):
    assert_same_as_torch_bitwise(torch.randn(shape, dtype=dtype), p=p)


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_matches_torch_bitwise_on_a_non_contiguous_input(p):
    x = noncontiguous(torch.randn(7, 13))
    assert not x.is_contiguous()
    assert_same_as_torch_bitwise(x, p=p)


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_inplace_matches_torch_bitwise_and_overwrites_its_input(p):
    assert_same_as_torch_bitwise(torch.randn(7, 13), inplace=True, p=p)
    h = torch.randn(5, 7)
    torch.manual_seed(0)
    expected = TF.dropout(h.clone(), p)
    torch.manual_seed(0)
    out = F.dropout(h, p, inplace=True)
    assert out is h
    assert_bitwise_equal(h, expected, "input after inplace dropout")


@pytest.mark.parametrize("view", VIEWS.values(), ids=VIEWS.keys())
@pytest.mark.parametrize("p", [0.3, 1.0])
def test_inplace_on_a_view_matches_torch_bitwise(view, p):
    # HF MobileNetV2's classifier runs nn.Dropout(inplace=True) on a view; autograd refused a
    # Function writing into a view that returns two tensors (output and mask)
    leaf, w, v = (torch.randn(4, 6, dtype=torch.float64) for _ in range(3))
    ours = inplace_on_view(lambda t: F.dropout(t, p, inplace=True), view, leaf, w, v)
    theirs = inplace_on_view(lambda t: TF.dropout(t, p, inplace=True), view, leaf, w, v)
    for what in theirs:
        if "base" in what or what == "output":
            assert_bitwise_equal(ours[what], theirs[what], what)
        else:  # a dropped entry's gradient: +0 here (0 + -0, summed at the base), torch's -0 where dy < 0
            assert torch.equal(ours[what], theirs[what]), what


def test_inplace_module_on_a_view_matches_torch_bitwise():
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for dropout in (mnn.Dropout(0.4, inplace=True), torch.nn.Dropout(0.4, inplace=True)):
        torch.manual_seed(0)
        h = x * 1
        out = dropout(h[:, 2:])  # a view: the flattened features of a classifier head, say
        h.sum().backward()
        results.append((out.detach(), h.detach(), x.grad))
        x.grad = None
    for what, a, b in zip(["output", "base", "grad"], *results):
        assert_bitwise_equal(a, b, what)


def test_out_of_place_on_a_fused_kernel_device_takes_native_dropouts_mask(monkeypatch):
    # On CUDA (no CUDA here: the CPU stands in for it) torch's out-of-place dropout is the
    # fused native_dropout, whose kernel draws the mask; its in-place dropout_ draws with bernoulli_.
    monkeypatch.setattr("manualgrad.ops.dropout.FUSED_DEVICES", ("cpu",))
    x, dy = torch.randn(7, 13, dtype=torch.float64), torch.randn(7, 13, dtype=torch.float64)
    y, dx = run_seeded(F.dropout, x, dy, seed=0, p=0.3)
    torch.manual_seed(0)
    ref, mask = torch.native_dropout(x, 0.3, True)
    after = torch.rand(4)
    assert_bitwise_equal(y, ref, "output")
    torch.testing.assert_close(dx, torch.ops.aten.native_dropout_backward(dy, mask, 1 / 0.7))
    torch.manual_seed(0)
    F.dropout(x, 0.3)
    assert torch.equal(torch.rand(4), after), "the generator advanced otherwise than native_dropout's"
    assert_same_as_torch_bitwise(x, inplace=True, p=0.3)  # in place: bernoulli_, as torch's dropout_
    with pytest.raises(NotImplementedError, match="native_dropout"):
        vmap(lambda t: F.dropout(t, 0.3), randomness="different")(x)


def test_inplace_on_a_leaf_that_requires_grad_raises_like_torch():
    x = torch.randn(3, 4, requires_grad=True)
    assert_raises_like_torch(F.dropout, TF.dropout, x, 0.5, inplace=True, match="leaf")


def test_forward_ad_matches_torch_bitwise():
    x, dx = torch.randn(7, 13), torch.randn(7, 13)
    results = []
    for fn in (F.dropout, TF.dropout):
        torch.manual_seed(0)
        results.append(torch.func.jvp(lambda t: fn(t, 0.3), (x,), (dx,)))
    assert_bitwise_equal(results[0][0], results[1][0], "output")
    assert_bitwise_equal(results[0][1], results[1][1], "tangent")


def test_nan_and_inf_input_stay_nan_like_torch():
    # Kept: nan stays nan, inf stays inf; dropped: nan * 0 and inf * 0 are nan (torch multiplies).
    x = torch.tensor([float("nan"), float("inf"), -1.0] * 20)
    y, _ = assert_same_as_torch_bitwise(x, p=0.5)
    assert y[::3].isnan().all()


# ---------------------------------------------------------------------------------------------
# structure, independent of torch


def test_kept_values_are_scaled_and_the_gradient_has_the_outputs_zero_pattern():
    p, n = 0.3, 200_000
    x = (torch.rand(n) + 0.5).requires_grad_()  # no zeros in x, so zeros in y are dropped ones
    y = F.dropout(x, p)
    dy = torch.rand(n) + 0.5
    y.backward(dy)
    kept = y != 0
    assert torch.equal(kept, x.grad != 0)
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    torch.testing.assert_close(x.grad[kept], dy[kept] / (1 - p))
    # The kept count is Binomial(n, 1 - p): within 5 standard deviations.
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))


def test_saves_the_mask_bit_packed_numel_over_8_bytes_where_torch_saves_a_float_copy():
    def saved(fn, x):
        found = []

        def pack(t):
            found.append((t.dtype, t.numel() * t.element_size()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, 0.5)
        return found

    for shape in [(7, 13), (2, 3, 257), (1,)]:
        x = torch.randn(shape, requires_grad=True)
        ours, torchs = saved(F.dropout, x), saved(TF.dropout, x)
        assert ours == [(torch.uint8, math.ceil(x.numel() / 8))]
        assert torchs == [(torch.float32, 4 * x.numel())]  # torch keeps the scaled float mask


# ---------------------------------------------------------------------------------------------
# the cases where torch does not draw a mask


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    "shape, kwargs", [((3, 4), dict(p=0.0)), ((3, 4), dict(p=0.5, training=False)), ((0, 4), dict(p=0.5))]
)
def test_eval_p0_and_empty_input_return_the_input_itself_like_torch(inplace, shape, kwargs):
    for fn in (F.dropout, TF.dropout):
        x = torch.randn(shape, requires_grad=True)
        state = torch.random.get_rng_state()
        out = fn(x, inplace=inplace, **kwargs)
        # torch returns the very same tensor: no copy, no graph node, no random draw.
        assert out is x and out.grad_fn is None, fn
        assert torch.equal(torch.random.get_rng_state(), state), fn


def test_p_one_gives_zeros_and_zero_gradients_like_torch_without_a_draw():
    x = torch.tensor([1.0, -2.0, 0.0, float("nan"), float("inf")])
    state = torch.random.get_rng_state()
    y, dx = assert_same_as_torch_bitwise(x, p=1.0)
    assert torch.equal(torch.random.get_rng_state(), state)  # neither draws
    assert (y[:3] == 0).all() and y[3:].isnan().all()  # -0 for -2.0, nan for nan and inf
    assert (dx == 0).all()


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_p_outside_zero_one_raises_value_error_like_torch(p):
    assert_raises_like_torch(F.dropout, TF.dropout, torch.randn(3), p, match=f"between 0 and 1, but got {p}")
    assert_raises_like_torch(F.dropout, TF.dropout, torch.randn(3), p, training=False, match="between 0 and 1")


def test_nan_p_raises_runtime_error_like_torch():
    assert_raises_like_torch(F.dropout, TF.dropout, torch.randn(3), float("nan"), match="but got nan")


def test_integer_and_complex_input_raise_like_torch():
    assert_raises_like_torch(F.dropout, TF.dropout, torch.arange(6), 0.5, match="floating point.*int64")
    c = torch.randn(4, dtype=torch.complex64)
    assert_raises_like_torch(F.dropout, TF.dropout, c, 0.5, match="complex")
    # With p == 1 torch draws nothing and returns integer zeros; so do we.
    assert torch.equal(F.dropout(torch.arange(6), 1.0), TF.dropout(torch.arange(6), 1.0))


# ---------------------------------------------------------------------------------------------
# gradients: gradcheck + gradgradcheck with the mask fixed by a seed


def test_seeded_dropout_is_deterministic_and_drops_something():
    x = torch.randn(7, 13, dtype=torch.float64)
    f = seeded_dropout(0.5)
    a, b = f(x), f(x)
    assert torch.equal(a, b)
    assert (a == 0).any() and (a != 0).any()


# torch's batched forward-AD check runs the function itself under its legacy vmap, which
# refuses random ops; torch's own dropout fails that check the same way.
NO_BATCHED_FWD = dict(batched_forward_grad=False)


@pytest.mark.parametrize("shape", [(), (1,), (7, 13), (2, 1, 5)])
def test_gradients(shape):
    check_gradients(seeded_dropout(0.5), torch.randn(shape, dtype=torch.float64, requires_grad=True), **NO_BATCHED_FWD)


@pytest.mark.parametrize("p", [0.2, 1.0])
def test_gradients_for_other_p(p):
    check_gradients(seeded_dropout(p), torch.randn(3, 5, dtype=torch.float64, requires_grad=True), **NO_BATCHED_FWD)


def test_gradients_non_contiguous():
    x = noncontiguous(torch.randn(7, 13, dtype=torch.float64, requires_grad=True))
    check_gradients(seeded_dropout(0.5), x, **NO_BATCHED_FWD)


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_inplace_gradients(p):
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    check_gradients(seeded_dropout(p, inplace=True), x, **NO_BATCHED_FWD)


# ---------------------------------------------------------------------------------------------
# torch.func.vmap


def test_vmap_randomness_error_raises_like_torch():
    x = torch.randn(4, 6)
    for inplace in (False, True):
        assert_raises_like_torch(
            vmap(lambda t: F.dropout(t * 1, 0.5, inplace=inplace)),
            vmap(lambda t: TF.dropout(t * 1, 0.5, inplace=inplace)),
            x,
            match="randomness error mode",
        )


@pytest.mark.parametrize("randomness", ["different", "same"])
@pytest.mark.parametrize("inplace", [False, True])
def test_vmap_matches_torch_bitwise_output_and_per_sample_gradient(randomness, inplace):
    x, dy = torch.randn(4, 6, 5), torch.randn(4, 6, 5)

    def out_and_grad(fn):
        def one(t, g):
            out, pull = vjp(lambda u: fn(u * 1, 0.5, inplace=inplace), t)
            return out, pull(g)[0]

        torch.manual_seed(0)
        return vmap(one, randomness=randomness)(x, dy)

    (y, dx), (th_y, th_dx) = out_and_grad(F.dropout), out_and_grad(TF.dropout)
    assert_bitwise_equal(y, th_y, "output")
    assert_bitwise_equal(dx, th_dx, "gradient")
    masks_differ = any(not torch.equal(y[0] != 0, y[i] != 0) for i in range(1, 4))
    assert masks_differ == (randomness == "different")


VMAP_LAYOUTS = {  # name: (vmapped function of one (3, 4, 6) batch)
    "transposed-sample": lambda f, r: vmap(lambda t: f(t.t()), randomness=r),
    "batch-dim-1": lambda f, r: vmap(f, in_dims=1, randomness=r),
    "nested": lambda f, r: vmap(vmap(f, randomness=r), randomness=r),
    "nested-inner-dim-1": lambda f, r: vmap(vmap(f, in_dims=1, randomness=r), randomness=r),
    "nested-same-outside": lambda f, r: vmap(vmap(f, randomness=r), randomness="same"),
    "nested-same-inside": lambda f, r: vmap(vmap(f, randomness="same"), randomness=r),
}


@pytest.mark.parametrize("layout", VMAP_LAYOUTS.values(), ids=VMAP_LAYOUTS.keys())
@pytest.mark.parametrize("randomness", ["different", "same"])
def test_vmap_draws_torchs_mask_whatever_the_batch_dims_and_layout(layout, randomness):
    # torch draws under vmap on a contiguous (*batch, *sample) tensor, not in x's memory order
    x = torch.rand(3, 4, 6) + 0.5

    def run(fn):
        def one(t):
            out, pull = vjp(lambda u: fn(u, 0.5), t)
            return out, pull(torch.ones_like(out))[0]

        torch.manual_seed(0)
        return layout(one, randomness)(x)

    for what, a, b in zip(["output", "gradient"], run(F.dropout), run(TF.dropout)):
        assert_bitwise_equal(a, b, what)


@pytest.mark.parametrize("outer", ["different", "same"])
@pytest.mark.parametrize("inner", ["different", "same"])
def test_nested_vmap_shares_the_mask_where_torch_does_and_grads_follow_the_mask(outer, inner):
    x = torch.rand(3, 4, 5) + 0.5  # no zeros

    def one(w):
        out, pull = vjp(lambda u: F.dropout(u, 0.5), w)
        return out, pull(torch.ones_like(out))[0]

    y, dx = vmap(vmap(one, randomness=inner, in_dims=1), randomness=outer)(x)  # (outer, inner, 5)
    kept = y != 0
    assert torch.equal(kept, dx != 0)
    torch.testing.assert_close(dx[kept], torch.full_like(dx[kept], 2.0))
    same_over_outer = all(torch.equal(kept[0], kept[i]) for i in range(3))
    same_over_inner = all(torch.equal(kept[:, 0], kept[:, j]) for j in range(4))
    assert same_over_outer == (outer == "same") and same_over_inner == (inner == "same")


# ---------------------------------------------------------------------------------------------
# property


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    p=st.sampled_from([0.0, 0.05, 0.25, 0.5, 0.8, 1.0]),
    training=st.booleans(),
    inplace=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch_bitwise(shape, p, training, inplace, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape)
    dy = torch.randn(shape)
    results = []
    for fn in (F.dropout, TF.dropout):
        x_ = x.clone().requires_grad_()
        torch.manual_seed(seed)
        y = fn(x_ * 1, p, training, inplace)
        y.backward(dy)
        results.append((y.detach(), x_.grad))
    assert_bitwise_equal(results[0][0], results[1][0], "output")
    assert_bitwise_equal(results[0][1], results[1][1], "gradient")
