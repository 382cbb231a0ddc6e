import contextlib
import copy
import inspect

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous


def r(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


def qkv(q_shape, k_shape, ev, dtype=torch.float64):
    v_shape = k_shape[:-1] + (ev,)
    return r(*q_shape, dtype=dtype), r(*k_shape, dtype=dtype), r(*v_shape, dtype=dtype)


def bool_mask(L, S, dead_row=None):
    m = torch.rand(L, S) > 0.4
    m[:, 0] = True
    if dead_row is not None:
        m[dead_row] = False  # a row that attends to nothing
    return m


# ---------------------------------------------------------------------------------------------
# gradients (float64, small shapes: every check differentiates through q, k and v)

# Options are combined so that each case stays small: every case runs gradcheck and
# gradgradcheck with forward AD and batched gradients.
GRAD_CASES = {
    "plain-size-1": (((1, 1, 1, 2), (1, 1, 2, 2), 1), {}),
    "bool-mask-dead-row-scale": (((1, 3, 2), (1, 3, 2), 1), dict(attn_mask=bool_mask(3, 3, dead_row=1), scale=0.37)),
    "float-mask-per-head-broadcast-batch": (((2, 2, 2), (1, 3, 2), 1), dict(attn_mask=r(2, 1, 3))),
    "causal-L<S": (((1, 2, 2), (1, 3, 2), 1), dict(is_causal=True)),
    "causal-L>S-gqa": (((1, 2, 3, 2), (1, 1, 2, 2), 1), dict(is_causal=True, enable_gqa=True)),
}


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_sdpa_gradients(case):
    shapes, kwargs = case
    check_gradients(F.scaled_dot_product_attention, *qkv(*shapes), **kwargs)


def test_sdpa_gradients_non_contiguous_gqa_with_different_key_and_value_heads():
    q, k, v = r(1, 4, 2, 2), r(1, 2, 2, 2), r(1, 1, 2, 2)
    q, k = noncontiguous(q), noncontiguous(k)
    v = v.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_gradients(F.scaled_dot_product_attention, q, k, v, enable_gqa=True, gradgrad=False)


@pytest.mark.parametrize("p", [0.4, 1.0])
def test_sdpa_gradients_with_dropout_under_a_fixed_seed(p):
    # Every call reseeds, so each finite-difference evaluation draws the same dropout mask.
    # No batched checks: backward and jvp redraw the mask, and the legacy vmap those checks run
    # under refuses random ops (torch.func.vmap too, unless told a randomness mode).
    def fn(q, k, v):
        torch.manual_seed(7)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)

    inputs = qkv((1, 3, 2), (1, 3, 2), 2)
    assert gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=False, check_undefined_grad=True)
    assert gradgradcheck(fn, inputs, check_batched_grad=False, check_fwd_over_rev=True)


# ---------------------------------------------------------------------------------------------
# float32 parity with torch

PARITY_CASES = {
    "plain-odd": (((2, 7, 13), (2, 13, 13), 7), {}),
    "heads-257": (((1, 2, 5, 257), (1, 2, 3, 257), 3), {}),
    "long-keys-257": (((2, 3, 4), (2, 257, 4), 5), {}),
    "bool-mask-dead-row": (((2, 2, 5, 4), (2, 2, 7, 4), 3), dict(attn_mask=bool_mask(5, 7, dead_row=2))),
    "float-mask": (((2, 2, 5, 4), (2, 2, 7, 4), 3), dict(attn_mask=torch.randn(2, 1, 5, 7, requires_grad=True))),
    "causal-L<S": (((2, 5, 4), (2, 7, 4), 3), dict(is_causal=True)),
    "causal-L>S": (((2, 7, 4), (2, 5, 4), 3), dict(is_causal=True)),
    "scale": (((2, 5, 4), (2, 7, 4), 3), dict(scale=0.1)),
    "gqa": (((2, 6, 5, 4), (2, 2, 7, 4), 3), dict(enable_gqa=True)),
    "unbatched": (((5, 4), (7, 4), 3), {}),
    "broadcast-batch": (((2, 3, 5, 4), (3, 7, 4), 3), {}),
}


@pytest.mark.parametrize("case", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_sdpa_matches_torch(case):
    shapes, kwargs = case
    # torch's fused CPU kernel sums in blocks: a few ulps of float32 apart from the math path
    assert_same_as_torch(
        F.scaled_dot_product_attention, TF.scaled_dot_product_attention, *qkv(*shapes, dtype=torch.float32),
        rtol=1e-5, atol=1e-5, **kwargs,
    )


def test_sdpa_fully_masked_rows_give_zero_output_and_gradient_like_torch():
    q, k, v = qkv((1, 3, 2), (1, 4, 2), 2, dtype=torch.float32)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    out, _ = assert_same_as_torch(F.scaled_dot_product_attention, TF.scaled_dot_product_attention, q, k, v, attn_mask=mask)
    assert (out[0][0, 1] == 0).all()
    q.grad = None
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    assert (q.grad[0, 1] == 0).all() and not k.grad.isnan().any()


def test_sdpa_causal_is_top_left_aligned():
    # Independent of torch's kernel: query i sees keys 0..i, also when L != S.
    q, k, v = qkv((1, 3, 2), (1, 5, 2), 2)
    expected = TF.softmax((q @ k.transpose(-2, -1)) / 2**0.5 + torch.full((3, 5), -torch.inf).triu(1), -1) @ v
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), expected)


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("L", [8, 11, 16])
def test_sdpa_causal_blocked_backward_matches_the_plain_form(monkeypatch, needs, L):
    # the fast form (query rows by blocks, keys cut at the block's end) against the plain
    # backward it replaces, float64; blocks of 4 rows, L a multiple of them or not
    from manualgrad.ops import attention

    monkeypatch.setattr(attention, "CAUSAL_BLOCK_ROWS", 4)
    q, k, v, do = (torch.randn(2, 3, L, e, dtype=torch.float64) for e in (5, 5, 6, 6))
    with torch.no_grad():  # as in a plain backward
        assert attention._causal_blocks_apply(do, q, k, v, None, 0.0, True, False)
        fast = attention.sdpa_backward(do, q, k, v, None, 0.0, True, 0.3, False, None, (*needs, False))
        monkeypatch.setattr(attention, "_causal_blocks_apply", lambda *args: False)
        plain = attention.sdpa_backward(do, q, k, v, None, 0.0, True, 0.3, False, None, (*needs, False))
    for a, b in zip(fast, plain):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sdpa_causal_long_sequence_gradients_match_torch():
    # L = 256 takes the blocked backward; torch's fused kernel as the independent reference
    q, k, v = qkv((1, 2, 256, 8), (1, 2, 256, 8), 8, dtype=torch.float32)
    assert_same_as_torch(
        F.scaled_dot_product_attention, TF.scaled_dot_product_attention, q, k, v, is_causal=True, rtol=1e-5, atol=1e-5,
    )


def test_sdpa_dropout_drops_whole_attention_entries_and_rescales():
    q, k, v = qkv((2, 16, 4), (2, 32, 4), 32)
    v = torch.eye(32, dtype=torch.float64).expand(2, 32, 32)  # O = Pd V = Pd itself
    p = 0.3
    torch.manual_seed(3)
    pd = F.scaled_dot_product_attention(q, k, v, dropout_p=p).detach()
    probs = TF.softmax(q @ k.transpose(-2, -1) / 2, -1).detach()
    kept = pd != 0
    torch.testing.assert_close(pd[kept], probs[kept] / (1 - p))
    assert abs((~kept).double().mean().item() - p) < 0.05
    # reproducible under the same seed, different under another
    torch.manual_seed(3)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, dropout_p=p), pd)
    torch.manual_seed(4)
    assert not torch.equal(F.scaled_dot_product_attention(q, k, v, dropout_p=p).detach(), pd)


DROPOUT_CASES = {
    "plain": (((2, 3, 5, 4), (2, 3, 7, 4), 6), {}),
    "unbatched-causal": (((5, 4), (7, 4), 3), dict(is_causal=True)),
    "broadcast-batch": (((2, 3, 5, 4), (3, 7, 4), 3), {}),
    "gqa": (((2, 6, 5, 4), (2, 2, 7, 4), 3), dict(enable_gqa=True)),
    "bool-mask-dead-row": (((2, 2, 5, 4), (2, 2, 7, 4), 3), dict(attn_mask=bool_mask(5, 7, dead_row=2))),
    "float-mask-scale": (((2, 2, 5, 4), (2, 2, 7, 4), 3), dict(attn_mask=torch.randn(2, 1, 5, 7), scale=1.0)),
}


def run_seeded_sdpa(sdpa, q, k, v, dy, seed=3, **kwargs):
    """Output, q/k/v gradients and the next torch.rand(8) after torch.manual_seed(seed)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    out = sdpa(q, k, v, **kwargs)
    after = torch.rand(8)
    out.backward(dy)
    return out.detach(), q.grad, k.grad, v.grad, after


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", DROPOUT_CASES.values(), ids=DROPOUT_CASES.keys())
def test_sdpa_dropout_draws_torchs_mask_under_the_same_seed(case, dtype):
    # HF BERT/GPT-2/T5 (sdpa attention) under enable() gave another loss than torch's SDPA:
    # the mask came from a private generator seeded from the global one
    shapes, kwargs = case
    q, k, v = qkv(*shapes, dtype=dtype)
    dy = torch.randn_like(TF.scaled_dot_product_attention(q, k, v, **kwargs))
    for p in (0.3, 0.9):
        ours = run_seeded_sdpa(F.scaled_dot_product_attention, q, k, v, dy, dropout_p=p, **kwargs)
        theirs = run_seeded_sdpa(TF.scaled_dot_product_attention, q, k, v, dy, dropout_p=p, **kwargs)
        # same kept entries, values within rounding (torch's math path scales q and k by sqrt(scale) each)
        assert torch.equal(ours[0] == 0, theirs[0] == 0) or dtype == torch.float32
        for what, a, b in zip(["output", "dq", "dk", "dv"], ours, theirs):
            torch.testing.assert_close(a, b, msg=lambda m, what=what: f"{what}: {m}")
        assert torch.equal(ours[4], theirs[4]), "the global generator advanced otherwise than torch's"


def test_sdpa_dropout_one_draws_nothing_like_torch():
    q, k, v = qkv((2, 5, 4), (2, 7, 4), 3)
    dy = torch.randn(2, 5, 3, dtype=torch.float64)
    ours = run_seeded_sdpa(F.scaled_dot_product_attention, q, k, v, dy, dropout_p=1.0)
    theirs = run_seeded_sdpa(TF.scaled_dot_product_attention, q, k, v, dy, dropout_p=1.0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sdpa_dropout_second_derivative_and_forward_mode_match_torch():
    q, k, v = qkv((1, 3, 2), (1, 4, 2), 2)
    mask = bool_mask(3, 4)
    tangents = [torch.randn_like(t) for t in (q, k, v)]

    def derivatives(fn):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        torch.manual_seed(5)
        g = torch.autograd.grad(fn(qq, kk, vv, attn_mask=mask, dropout_p=0.5).square().sum(), (qq, kk, vv),
                                create_graph=True)
        hvp = torch.autograd.grad(sum(x.sin().sum() for x in g), (qq, kk, vv))
        torch.manual_seed(5)
        jvp = torch.func.jvp(lambda a, b, c: fn(a, b, c, attn_mask=mask, dropout_p=0.5), (q, k, v), tuple(tangents))
        return (*hvp, *jvp)

    for a, b in zip(derivatives(F.scaled_dot_product_attention), derivatives(TF.scaled_dot_product_attention)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_sdpa_dropout_under_vmap_matches_torch_output_and_per_sample_gradient(randomness):
    q, k, v = qkv((3, 2, 4, 2), (3, 2, 5, 2), 2)
    dy = torch.randn(3, 2, 4, 2, dtype=torch.float64)

    def run(sdpa):
        def one(a, b, c, g):
            out, pull = torch.func.vjp(lambda *t: sdpa(*t, dropout_p=0.5), a, b, c)
            return out, *pull(g)

        torch.manual_seed(0)
        return torch.func.vmap(one, randomness=randomness)(q, k, v, dy)

    ours, theirs = run(F.scaled_dot_product_attention), run(TF.scaled_dot_product_attention)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_sdpa_dropout_off_the_cpu_raises_not_implemented():
    # torch's fused kernels draw their masks inside the kernel; no CUDA here: the check itself
    from manualgrad.ops.attention import _generator_state

    with pytest.raises(NotImplementedError, match="dropout"):
        _generator_state(torch.device("cuda"))
    assert _generator_state(torch.device("meta")) is None


class T5LikeBlock(torch.nn.Module):
    """The pattern of HF transformers' T5 layers with sdpa attention, in plain torch: q/k/v/o
    without bias, a learned position bias as a float mask, scale 1, dropout on the attention
    probabilities (SDPA's dropout_p) and nn.Dropout on the hidden states."""

    def __init__(self, d=8, heads=2, p=0.1):
        super().__init__()
        self.heads, self.p = heads, p
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d, bias=False) for _ in range(4))
        self.bias = torch.nn.Embedding(7, heads)  # relative position buckets
        self.ff = torch.nn.Sequential(torch.nn.Linear(d, 2 * d, bias=False), torch.nn.ReLU(), torch.nn.Dropout(p),
                                      torch.nn.Linear(2 * d, d, bias=False))
        self.dropout = torch.nn.Dropout(p)

    def forward(self, x):
        n, L, d = x.shape
        split = lambda t: t.view(n, L, self.heads, -1).transpose(1, 2)  # noqa: E731
        pos = torch.arange(L)
        bias = self.bias((pos[None, :] - pos[:, None]).clamp(-3, 3) + 3).permute(2, 0, 1)[None]  # (1, H, L, L)
        y = TF.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=bias,
                                            dropout_p=self.p if self.training else 0.0, scale=1.0)
        x = x + self.dropout(self.o(y.transpose(1, 2).reshape(n, L, d)))
        return x + self.dropout(self.ff(x))


def test_t5_like_block_with_dropout_matches_torch_under_enable():
    torch.manual_seed(0)
    model = torch.nn.Sequential(T5LikeBlock(), T5LikeBlock()).double().train()
    ours = mg.convert(copy.deepcopy(model))
    x = torch.randn(2, 6, 8, dtype=torch.float64)

    def run(m, mode):
        torch.manual_seed(1)
        with mode:
            loss = m(x).square().mean()
        loss.backward()
        return [loss.detach(), torch.rand(4)] + [p.grad for p in m.parameters()]

    for a, b in zip(run(ours, mg.enable()), run(model, contextlib.nullcontext())):
        torch.testing.assert_close(a, b)


def test_sdpa_backward_saves_no_attention_matrix():
    L = S = 64
    q, k, v = qkv((1, 2, L, 4), (1, 2, S, 4), 4, dtype=torch.float32)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert sizes and max(sizes) < L * S, sizes
    # torch's math path, for contrast, keeps the (L x S) matrix
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            TF.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert max(sizes) >= L * S
    out.sum().backward()


def test_sdpa_propagates_nan():
    q, k, v = qkv((1, 3, 2), (1, 4, 2), 2, dtype=torch.float32)
    q = q.detach().clone()
    q[0, 0, 0] = float("nan")
    out = F.scaled_dot_product_attention(q, k, v)
    assert out[0, 0].isnan().all() and not out[0, 1:].isnan().any()


def test_sdpa_second_derivative_matches_torch():
    q, k, v = qkv((1, 3, 2), (1, 4, 2), 2)
    mask = bool_mask(3, 4)

    def hvp(fn):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        g = torch.autograd.grad(fn(qq, kk, vv, attn_mask=mask).square().sum(), (qq, kk, vv), create_graph=True)
        return torch.autograd.grad(sum(x.sin().sum() for x in g), (qq, kk, vv))

    for a, b in zip(hvp(F.scaled_dot_product_attention), hvp(TF.scaled_dot_product_attention)):
        torch.testing.assert_close(a, b)


def test_sdpa_matches_torch_under_vmap():
    q, k, v = qkv((3, 2, 4, 2), (3, 2, 5, 2), 2)
    mask = bool_mask(4, 5)
    ours = torch.func.vmap(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask))(q, k, v)
    torch.testing.assert_close(ours, TF.scaled_dot_product_attention(q, k, v, attn_mask=mask))


BAD = {
    "head-dim-mismatch": ((torch.randn(2, 4, 5), torch.randn(2, 6, 4), torch.randn(2, 6, 5)), {}),
    "kv-length-mismatch": ((torch.randn(2, 4, 5), torch.randn(2, 6, 5), torch.randn(2, 7, 5)), {}),
    "mask-and-causal": ((torch.randn(2, 4, 5), torch.randn(2, 6, 5), torch.randn(2, 6, 5)),
                        dict(attn_mask=torch.ones(4, 6, dtype=torch.bool), is_causal=True)),
    "integer-mask": ((torch.randn(2, 4, 5), torch.randn(2, 6, 5), torch.randn(2, 6, 5)),
                     dict(attn_mask=torch.ones(4, 6, dtype=torch.long))),
    "mask-shape": ((torch.randn(2, 4, 5), torch.randn(2, 6, 5), torch.randn(2, 6, 5)), dict(attn_mask=torch.ones(4, 7))),
    "dtype-mismatch": ((torch.randn(2, 4, 5), torch.randn(2, 6, 5), torch.randn(2, 6, 5, dtype=torch.float64)), {}),
    "gqa-heads": ((torch.randn(1, 6, 4, 5), torch.randn(1, 4, 6, 5), torch.randn(1, 4, 6, 5)), dict(enable_gqa=True)),
    "heads-without-gqa": ((torch.randn(1, 6, 4, 5), torch.randn(1, 3, 6, 5), torch.randn(1, 3, 6, 5)), {}),
    "1-d-query": ((torch.randn(5), torch.randn(6, 5), torch.randn(6, 5)), {}),
}


@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_sdpa_rejects_bad_input_like_torch(case, dropout_p):
    args, kwargs = case
    assert_raises_like_torch(F.scaled_dot_product_attention, TF.scaled_dot_product_attention, *args,
                             dropout_p=dropout_p, **kwargs)


def test_sdpa_rejects_bad_dropout_probability_like_torch():
    args = (torch.randn(2, 4, 5), torch.randn(2, 6, 5), torch.randn(2, 6, 5))
    assert_raises_like_torch(F.scaled_dot_product_attention, TF.scaled_dot_product_attention, *args, dropout_p=1.5,
                             match="between 0 and 1")


def test_sdpa_signature_matches_torch_docs():
    assert TF.scaled_dot_product_attention.__doc__.strip().startswith(
        "scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,\n"
        "        is_causal=False, scale=None, enable_gqa=False)"
    )
    params = [(p.name, p.default) for p in inspect.signature(F.scaled_dot_product_attention).parameters.values()]
    assert params == [("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty),
                      ("value", inspect.Parameter.empty), ("attn_mask", None), ("dropout_p", 0.0),
                      ("is_causal", False), ("scale", None), ("enable_gqa", False)]


@given(
    n=st.integers(1, 2), h=st.sampled_from([1, 2]), L=st.integers(1, 6), S=st.integers(1, 6), e=st.integers(1, 5),
    ev=st.integers(1, 4), mask=st.sampled_from([None, "bool", "float", "causal"]), scale=st.sampled_from([None, 0.5]),
)
@settings(max_examples=25, deadline=None)
def test_sdpa_matches_torch_property(n, h, L, S, e, ev, mask, scale):
    q, k, v = qkv((n, h, L, e), (n, h, S, e), ev, dtype=torch.float32)
    kwargs = dict(scale=scale)
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(L, S) > 0.5  # may mask whole rows
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(n, 1, L, S, requires_grad=True)
    elif mask == "causal":
        kwargs["is_causal"] = True
    assert_same_as_torch(F.scaled_dot_product_attention, TF.scaled_dot_product_attention, q, k, v,
                         rtol=1e-5, atol=1e-5, **kwargs)


# ---------------------------------------------------------------------------------------------
# MultiheadAttention

E, H = 8, 2


def mha_pair(**kwargs):
    th = torch.nn.MultiheadAttention(E, H, **kwargs)
    ours = mnn.MultiheadAttention(E, H, **kwargs)
    ours.load_state_dict(th.state_dict())
    return ours, th


def mha_inputs(batch_first, self_attention, N=3, L=5, S=7, kdim=E, vdim=E):
    def seq(n, d):
        return torch.randn((N, n, d) if batch_first else (n, N, d), requires_grad=True)

    if self_attention:
        x = seq(L, E)
        return x, x, x
    return seq(L, E), seq(S, kdim), seq(S, vdim)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("self_attention", [False, True])
def test_multihead_attention_matches_torch(batch_first, need_weights, self_attention):
    ours, th = mha_pair(batch_first=batch_first)
    x = mha_inputs(batch_first, self_attention)
    kwargs = dict(need_weights=need_weights, average_attn_weights=False)
    (o1, w1), (o2, w2) = assert_same_as_torch(ours, th, *x, atol=1e-5, **kwargs)
    assert (w1 is None) == (w2 is None) == (not need_weights)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_matches_torch_with_masks(mask_kind, need_weights):
    ours, th = mha_pair(batch_first=True)
    q, k, v = mha_inputs(True, False)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 4:] = True
    attn = torch.rand(5, 7) > 0.7
    attn[:, 0] = False
    if mask_kind == "float":
        pad = torch.zeros(3, 7).masked_fill(pad, -torch.inf)
        attn = torch.randn(5, 7)
    assert_same_as_torch(ours, th, q, k, v, atol=1e-5, key_padding_mask=pad, attn_mask=attn, need_weights=need_weights)


def test_multihead_attention_causal_hint_matches_torch():
    ours, th = mha_pair(batch_first=True)
    x = mha_inputs(True, True, S=5)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    for need_weights in (False, True):
        assert_same_as_torch(ours, th, *x, atol=1e-5, attn_mask=causal, is_causal=True, need_weights=need_weights)


@pytest.mark.parametrize(
    "kwargs", [dict(kdim=5, vdim=3), dict(add_bias_kv=True), dict(add_zero_attn=True), dict(bias=False)],
    ids=["kdim-vdim", "bias-kv", "zero-attn", "no-bias"],
)
def test_multihead_attention_options_match_torch(kwargs):
    ours, th = mha_pair(**kwargs)
    x = mha_inputs(False, False, kdim=kwargs.get("kdim", E), vdim=kwargs.get("vdim", E))
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    for need_weights in (False, True):
        assert_same_as_torch(ours, th, *x, atol=1e-5, key_padding_mask=pad, need_weights=need_weights)


def test_multihead_attention_unbatched_matches_torch():
    ours, th = mha_pair()
    x = torch.randn(5, E, requires_grad=True)
    for need_weights in (False, True):
        assert_same_as_torch(ours, th, x, x, x, atol=1e-5, need_weights=need_weights)


def test_multihead_attention_dropout_with_weights_matches_torch_under_one_seed():
    # need_weights=True runs torch's F.dropout path, whose mask manualgrad's dropout draws identically
    ours, th = mha_pair(dropout=0.3, batch_first=True)
    assert_same_as_torch(ours, th, *mha_inputs(True, True), atol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_dropout_without_weights_matches_torch_under_one_seed(batch_first):
    # need_weights=False runs SDPA with dropout_p, whose mask manualgrad's sdpa draws identically
    ours, th = mha_pair(dropout=0.3, batch_first=batch_first)
    assert_same_as_torch(ours, th, *mha_inputs(batch_first, False), atol=1e-5, need_weights=False)


def test_multihead_attention_dropout_without_weights_drops_in_training_only():
    ours, _ = mha_pair(dropout=0.5, batch_first=True)
    x = mha_inputs(True, True)
    a = ours(*x, need_weights=False)[0]
    b = ours(*x, need_weights=False)[0]
    assert not torch.allclose(a, b)
    ours.eval()
    torch.testing.assert_close(ours(*x, need_weights=False)[0], ours(*x, need_weights=False)[0])


def test_multihead_attention_gradients():
    m = mnn.MultiheadAttention(4, 2, batch_first=True).double()
    x = r(1, 3, 4)
    pad = torch.tensor([[False, False, True]])
    params = list(m.parameters())

    def fn(x, *ps):
        return torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x, x, x),
                                          dict(key_padding_mask=pad, need_weights=False))[0]

    gradcheck(fn, (x, *[p.detach().requires_grad_() for p in params]))


def test_multihead_attention_module_is_a_drop_in():
    ours, th = mha_pair(batch_first=True, add_bias_kv=True)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert repr(ours) == repr(th)
    th.load_state_dict(ours.state_dict())
    for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), th.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    model = torch.nn.Sequential(copy.deepcopy(th))
    mg.convert(model)
    assert type(model[0]) is mnn.MultiheadAttention


def test_multihead_attention_rejects_bad_input_like_torch():
    ours, th = mha_pair()
    q = torch.randn(5, 3, E)
    assert_raises_like_torch(ours, th, q, q, q, attn_mask=torch.ones(4, 5, dtype=torch.bool), match="2D attn_mask")
    assert_raises_like_torch(ours, th, q, q, torch.randn(6, 3, E), match="value shape")
    assert_raises_like_torch(ours, th, q, q, q, is_causal=True, match="Need attn_mask")
