import warnings

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

OPS = [(F.softmax, TF.softmax), (F.log_softmax, TF.log_softmax)]
OP_IDS = ["softmax", "log_softmax"]
NEG_INF = float("-inf")


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
@pytest.mark.parametrize("shape", [(7, 13), (2, 3, 257)])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_matches_torch_along_every_dim(ops, shape, dim):
    assert_same_as_torch(ops[0], ops[1], torch.randn(shape, requires_grad=True), dim=dim)


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
@pytest.mark.parametrize("shape, dim", [((7, 1), 1), ((1, 13), 0), ((2, 1, 5), 1), ((1,), 0)])
def test_matches_torch_along_a_size_one_dim(ops, shape, dim):
    mg_out, _ = assert_same_as_torch(ops[0], ops[1], torch.randn(shape, requires_grad=True), dim=dim)
    # softmax of a single entry is 1, log_softmax 0, whatever the entry.
    expected = 1.0 if ops[0] is F.softmax else 0.0
    torch.testing.assert_close(mg_out[0], torch.full(shape, expected))


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dim", [0, -1])
def test_zero_dim_input_matches_torch(ops, dim):
    assert_same_as_torch(ops[0], ops[1], torch.tensor(1.5, requires_grad=True), dim=dim)


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax], ids=OP_IDS)
@pytest.mark.parametrize(
    "shape, dim",
    [((), 0), ((1,), 0), ((7, 13), 0), ((7, 13), 1), ((7, 13), -1), ((2, 1, 5), 1), ((3, 1, 2), -1), ((1, 257), -1)],
)
def test_gradients(fn, shape, dim):
    check_gradients(fn, torch.randn(shape, dtype=torch.float64, requires_grad=True), dim=dim)


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax], ids=OP_IDS)
@pytest.mark.parametrize("dim", [0, 1])
def test_gradients_non_contiguous(fn, dim):
    x = noncontiguous(torch.randn(7, 13, dtype=torch.float64, requires_grad=True))
    assert not x.is_contiguous()
    check_gradients(fn, x, dim=dim)


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax], ids=OP_IDS)
def test_gradients_with_the_dtype_option(fn):
    # gradcheck needs float64 in and out, so dtype=float64 on a float64 input; a real cast
    # (float32 <-> float64) is checked against torch in the next tests.
    check_gradients(fn, torch.randn(3, 5, dtype=torch.float64, requires_grad=True), dim=1, dtype=torch.float64)


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
@pytest.mark.parametrize("in_dtype, dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_dtype_casts_the_input_first_like_torch(ops, in_dtype, dtype):
    x = torch.randn(7, 13, dtype=in_dtype, requires_grad=True)
    mg_out, _ = assert_same_as_torch(ops[0], ops[1], x, dim=1, dtype=dtype)
    assert mg_out[0].dtype == dtype  # and the input gradient is in_dtype (checked against torch)


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
def test_forward_ad_matches_torch_with_a_dtype_cast(ops):
    x, dx = torch.randn(7, 13), torch.randn(7, 13)
    results = [torch.func.jvp(lambda t: op(t, 0, dtype=torch.float64), (x,), (dx,)) for op in ops]
    for a, b in zip(*results):
        assert a.dtype == b.dtype == torch.float64
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
def test_rows_with_some_neg_inf_entries_match_torch(ops):
    # Masked attention: -inf entries get probability 0 (log-probability -inf); the rest
    # of the row is a softmax over the remaining entries.
    x = torch.randn(7, 13)
    x[torch.rand(7, 13) < 0.4] = NEG_INF
    x[:, 0] = 0.0  # no row is all -inf here
    mg_out, _ = assert_same_as_torch(ops[0], ops[1], x.requires_grad_(), dim=1)
    assert torch.isfinite(mg_out[0][x.isfinite()]).all()


def test_softmax_gradients_with_neg_inf_entries():
    # (log_softmax is left out: its output there is -inf, and -inf - -inf is no finite difference.)
    x = torch.randn(5, 7, dtype=torch.float64)
    x[:, 2] = x[3] = NEG_INF
    x[3, 0] = 0.0
    check_gradients(F.softmax, x.requires_grad_(), dim=1)


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
def test_an_all_neg_inf_row_gives_nan_output_and_gradient_like_torch(ops):
    x = torch.randn(3, 5)
    x[1] = NEG_INF
    mg_out, th_out = assert_same_as_torch(ops[0], ops[1], x.requires_grad_(), dim=1)
    # What torch gives (and so what we match): nan for that row only, output and gradient.
    assert th_out[0][1].isnan().all() and not th_out[0][[0, 2]].isnan().any()
    assert mg_out[0][1].isnan().all()


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
def test_nan_input_stays_nan(ops):
    x = torch.tensor([[float("nan"), 1.0, 2.0], [0.0, 1.0, 2.0]])
    out = ops[0](x, 1)
    assert out[0].isnan().all() and not out[1].isnan().any()
    torch.testing.assert_close(out, ops[1](x, 1), equal_nan=True)


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
def test_large_inputs_do_not_overflow(ops):
    # exp(1000) overflows float32; subtracting the row max keeps every exp <= 1.
    x = torch.randn(7, 13) * 1000
    mg_out, _ = assert_same_as_torch(ops[0], ops[1], x.requires_grad_(), dim=1)
    assert torch.isfinite(mg_out[0]).all()


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
@pytest.mark.parametrize("shape, dim", [((0, 5), 1), ((5, 0), 1), ((5, 0), 0)])
def test_empty_input_matches_torch(ops, shape, dim):
    assert_same_as_torch(ops[0], ops[1], torch.randn(shape, requires_grad=True), dim=dim)


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
@pytest.mark.parametrize("ndim", [0, 1, 2, 3, 4])
def test_implicit_dim_is_torchs_legacy_choice_with_its_warning(ops, ndim):
    x = torch.randn((3, 4, 5, 6)[:ndim])
    with warnings.catch_warnings(record=True) as mg_w:
        warnings.simplefilter("always")
        out = ops[0](x)
    with warnings.catch_warnings(record=True) as th_w:
        warnings.simplefilter("always")
        expected = ops[1](x)
    torch.testing.assert_close(out, expected)
    assert [str(w.message) for w in mg_w] == [str(w.message) for w in th_w]
    assert "Implicit dimension choice" in str(mg_w[0].message)
    assert mg_w[0].filename == __file__  # _stacklevel points at the caller, as in torch


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
def test_vmap_over_the_forward_matches_torch(ops):
    x = torch.randn(4, 7, 13)
    mg, th = (torch.func.vmap(lambda t: op(t, -1))(x) for op in ops)
    torch.testing.assert_close(mg, th)


def test_softmax_rows_sum_to_one_and_log_softmax_is_its_log():
    x = torch.randn(7, 13, dtype=torch.float64)
    torch.testing.assert_close(F.softmax(x, 0).sum(0), torch.ones(13, dtype=torch.float64))
    torch.testing.assert_close(F.log_softmax(x, 0), F.softmax(x, 0).log())


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
def test_dim_out_of_range_raises_like_torch(ops):
    assert_raises_like_torch(ops[0], ops[1], torch.randn(3, 4), 2, match="out of range")
    assert_raises_like_torch(ops[0], ops[1], torch.tensor(1.0), 1, match="out of range")


@pytest.mark.parametrize("ops", OPS, ids=OP_IDS)
def test_integer_input_or_dtype_raises_like_torch(ops):
    assert_raises_like_torch(ops[0], ops[1], torch.arange(6).view(2, 3), 1, match="floating point.*int64")
    assert_raises_like_torch(ops[0], ops[1], torch.randn(2, 3), 1, dtype=torch.int64, match="floating point")


def test_non_integer_dim_raises_like_torch():
    assert_raises_like_torch(F.softmax, TF.softmax, torch.randn(2, 3), "a")


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    dim_seed=st.integers(0, 1000),
    which=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch_for_any_shape_and_dim(shape, dim_seed, which, seed):
    torch.manual_seed(seed)
    ndim = len(shape)
    dim = dim_seed % (2 * ndim) - ndim  # any dim, negative ones too
    mg, th = OPS[which]
    mg_out, _ = assert_same_as_torch(mg, th, torch.randn(shape, requires_grad=True), dim=dim)
    if which == 0:
        torch.testing.assert_close(mg_out[0].sum(dim), torch.ones(mg_out[0].sum(dim).shape))
