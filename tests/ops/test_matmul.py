import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients, saved_bytes
from tests.conftest import noncontiguous

torch.set_num_threads(1)  # many small ops: OpenMP stalls under load

# torch.matmul's cases: (input shape, other shape)
MATMUL_SHAPES = [
    ((7,), (7,)),  # dot -> ()
    ((1,), (1,)),
    ((5, 7), (7,)),  # mv -> (5,)
    ((7,), (7, 13)),  # vector @ matrix -> (13,)
    ((1, 1), (1, 1)),
    ((7, 13), (13, 5)),  # mm
    ((2, 3, 7), (7, 5)),  # batched @ shared matrix: batch dims folded into one mm
    ((3, 7), (2, 7, 5)),  # shared matrix @ batched
    ((2, 3, 7), (2, 7, 1)),  # bmm
    ((2, 1, 3, 4), (5, 4, 6)),  # batch dims broadcast both ways -> (2, 5, 3, 6)
    ((1, 3, 4), (2, 4, 1)),
    ((2, 3, 7), (7,)),  # batched @ vector -> (2, 3)
    ((7,), (2, 3, 7, 5)),  # vector @ batched -> (2, 3, 5)
]


def _ids(cases):
    return ["@".join("x".join(map(str, s)) or "()" for s in case) for case in cases]


def _pair(sa, sb, dtype=torch.float64):
    return torch.randn(sa, dtype=dtype, requires_grad=True), torch.randn(sb, dtype=dtype, requires_grad=True)


# ---------------------------------------------------------------------------------------------
# matmul

@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES, ids=_ids(MATMUL_SHAPES))
def test_matmul_gradients(sa, sb):
    check_gradients(F.matmul, *_pair(sa, sb))


@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES + [((64, 257), (257, 13)), ((4, 0, 3), (3, 2))], ids=_ids(MATMUL_SHAPES + [((64, 257), (257, 13)), ((4, 0, 3), (3, 2))]))
def test_matmul_matches_torch(sa, sb):
    # atol 1e-5: a 257-term float32 sum of products rounds differently in different blockings
    assert_same_as_torch(F.matmul, torch.matmul, *_pair(sa, sb, torch.float32), atol=1e-5)


def test_matmul_gradients_non_contiguous_operands():
    a = noncontiguous(torch.randn(2, 7, 13, dtype=torch.float64, requires_grad=True))
    b = torch.randn(5, 13, dtype=torch.float64).t().requires_grad_()  # a transposed weight
    assert not a.is_contiguous() and not b.is_contiguous()
    check_gradients(F.matmul, a, b)
    check_gradients(F.matmul, b.detach().t().requires_grad_(), noncontiguous(torch.randn(13, dtype=torch.float64, requires_grad=True)))


def test_matmul_matches_torch_with_transposed_and_expanded_operands():
    a = torch.randn(6, 2, 7).transpose(0, 1).requires_grad_()  # (2, 6, 7), non-contiguous
    b = torch.randn(7, 1).expand(7, 5).requires_grad_()  # a zero-stride operand
    assert_same_as_torch(F.matmul, torch.matmul, a, b)


def test_matmul_only_computes_and_saves_what_is_needed():
    x = torch.randn(8, 16)  # no grad: only dW = x^T dY is needed, so only x is kept
    w = torch.randn(16, 4, requires_grad=True)
    nbytes, y = saved_bytes(F.matmul, x, w, exclude=(w,))
    assert nbytes == x.numel() * x.element_size()
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.t() @ torch.ones(8, 4))
    assert x.grad is None


def test_matmul_under_vmap_and_jacrev_matches_torch():
    x, w = torch.randn(5, 3, 4), torch.randn(4, 6)
    torch.testing.assert_close(torch.func.vmap(F.matmul, in_dims=(0, None))(x, w), torch.func.vmap(torch.matmul, in_dims=(0, None))(x, w))
    a, v = torch.randn(3, 4), torch.randn(4)
    for argnums in (0, 1):
        torch.testing.assert_close(
            torch.func.jacrev(F.matmul, argnums=argnums)(a, v), torch.func.jacrev(torch.matmul, argnums=argnums)(a, v)
        )


def test_matmul_of_integer_tensors_matches_torch():
    a, b = torch.randint(-5, 5, (2, 3, 4)), torch.randint(-5, 5, (4, 2))
    assert torch.equal(F.matmul(a, b), torch.matmul(a, b))


def test_matmul_propagates_nan():
    a = torch.randn(3, 4)
    a[1, 2] = float("nan")
    y = F.matmul(a, torch.randn(4, 5))
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


_dims = st.integers(1, 4)


@given(
    batch=st.lists(st.tuples(_dims, st.sampled_from(["both", "a1", "b1", "a_only", "b_only"])), max_size=3),
    n=_dims,
    m=_dims,
    p=_dims,
    a_vec=st.booleans(),
    b_vec=st.booleans(),
)
@settings(max_examples=30, deadline=None)
def test_matmul_matches_torch_property(batch, n, m, p, a_vec, b_vec):
    # batch dims: present in both, size 1 on one side (broadcast), or on one side only (leading)
    ba, bb = [], []
    for size, kind in batch:
        ba.append({"both": size, "a1": 1, "b1": size, "a_only": size, "b_only": 1}[kind])
        bb.append({"both": size, "a1": size, "b1": 1, "a_only": 1, "b_only": size}[kind])
    sa = (m,) if a_vec else (*ba, n, m)
    sb = (m,) if b_vec else (*bb, m, p)
    assert_same_as_torch(F.matmul, torch.matmul, *_pair(sa, sb, torch.float32))


# ---------------------------------------------------------------------------------------------
# mm, bmm

@pytest.mark.parametrize("n,m,p", [(1, 1, 1), (7, 13, 5), (3, 257, 2)])
def test_mm_and_bmm_gradients(n, m, p):
    check_gradients(F.mm, *_pair((n, m), (m, p)))
    check_gradients(F.bmm, *_pair((2, n, m), (2, m, p)))


def test_mm_and_bmm_gradients_non_contiguous_operands():
    a = torch.randn(13, 7, dtype=torch.float64).t().requires_grad_()
    check_gradients(F.mm, a, noncontiguous(torch.randn(13, 5, dtype=torch.float64, requires_grad=True)))
    b = torch.randn(3, 2, 7, dtype=torch.float64).transpose(0, 1).requires_grad_()
    check_gradients(F.bmm, b, torch.randn(2, 5, 7, dtype=torch.float64).mT.requires_grad_())


@pytest.mark.parametrize("n,m,p", [(1, 1, 1), (7, 13, 5), (64, 257, 13)])
def test_mm_and_bmm_match_torch(n, m, p):
    assert_same_as_torch(F.mm, torch.mm, *_pair((n, m), (m, p), torch.float32), atol=1e-5)
    assert_same_as_torch(F.bmm, torch.bmm, *_pair((3, n, m), (3, m, p), torch.float32), atol=1e-5)


def test_mm_under_vmap_matches_torch():
    x, w = torch.randn(5, 3, 4), torch.randn(5, 4, 6)
    torch.testing.assert_close(torch.func.vmap(F.mm)(x, w), torch.bmm(x, w))


# ---------------------------------------------------------------------------------------------
# addmm, baddbmm

BETA_ALPHA = [(1, 1), (0.5, -2.0), (0, 1), (2, 0)]
C_SHAPES = [(3, 5), (5,), (3, 1), (1,), ()]  # broadcastable to the (3, 5) product


@pytest.mark.parametrize("beta,alpha", BETA_ALPHA)
@pytest.mark.parametrize("c_shape", C_SHAPES, ids=str)
def test_addmm_and_baddbmm_gradients(c_shape, beta, alpha):
    c = torch.randn(c_shape, dtype=torch.float64, requires_grad=True)
    check_gradients(lambda c, a, b: F.addmm(c, a, b, beta=beta, alpha=alpha), c, *_pair((3, 7), (7, 5)))
    check_gradients(lambda c, a, b: F.baddbmm(c, a, b, beta=beta, alpha=alpha), c, *_pair((2, 3, 7), (2, 7, 5)))


@pytest.mark.parametrize("beta,alpha", BETA_ALPHA)
@pytest.mark.parametrize("c_shape", C_SHAPES + [(4, 1, 5)], ids=str)
def test_addmm_and_baddbmm_match_torch(c_shape, beta, alpha):
    c = torch.randn(c_shape, requires_grad=True)
    if len(c_shape) < 3:
        assert_same_as_torch(F.addmm, torch.addmm, c, *_pair((3, 13), (13, 5), torch.float32), beta=beta, alpha=alpha)
    assert_same_as_torch(F.baddbmm, torch.baddbmm, c, *_pair((4, 3, 13), (4, 13, 5), torch.float32), beta=beta, alpha=alpha)


def test_addmm_gradients_non_contiguous_operands():
    c = noncontiguous(torch.randn(7, 5, dtype=torch.float64, requires_grad=True))
    a = torch.randn(13, 7, dtype=torch.float64).t().requires_grad_()
    check_gradients(lambda c, a, b: F.addmm(c, a, b, beta=0.5, alpha=2), c, a, noncontiguous(torch.randn(13, 5, dtype=torch.float64, requires_grad=True)))


@pytest.mark.parametrize("batched", [False, True])
def test_beta_zero_ignores_nan_input_like_torch(batched):
    shape = (2, 3, 5) if batched else (3, 5)
    c = torch.full(shape, float("nan"), requires_grad=True)
    a, b = _pair(shape[:-1] + (4,), shape[:-2] + (4, 5), torch.float32)
    fn, torch_fn = (F.baddbmm, torch.baddbmm) if batched else (F.addmm, torch.addmm)
    mg_out, _ = assert_same_as_torch(fn, torch_fn, c, a, b, beta=0, alpha=0.25)
    assert not mg_out[0].isnan().any()


@given(
    batch=st.integers(1, 3),
    n=st.integers(1, 5),
    m=st.integers(1, 5),
    p=st.integers(1, 5),
    c_kind=st.sampled_from(["full", "row", "col", "scalar"]),
    beta=st.sampled_from([0, 1, 0.5]),
    alpha=st.sampled_from([1, -1.5]),
    batched=st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_addmm_and_baddbmm_match_torch_property(batch, n, m, p, c_kind, beta, alpha, batched):
    lead = (batch,) if batched else ()
    c_shape = {"full": (*lead, n, p), "row": (p,), "col": (n, 1), "scalar": ()}[c_kind]
    c = torch.randn(c_shape, requires_grad=True)
    fn, torch_fn = (F.baddbmm, torch.baddbmm) if batched else (F.addmm, torch.addmm)
    assert_same_as_torch(fn, torch_fn, c, *_pair((*lead, n, m), (*lead, m, p), torch.float32), beta=beta, alpha=alpha)


# ---------------------------------------------------------------------------------------------
# bad input: torch's forward kernels raise, with torch's type and message

BAD = [
    ("matmul", (torch.tensor(1.0), torch.randn(3, 4)), "at least 1D"),
    ("matmul", (torch.randn(3, 4), torch.randn(5, 6)), "cannot be multiplied"),
    ("matmul", (torch.randn(2, 3, 4), torch.randn(3, 4, 5)), None),  # batch dims 2 and 3 do not broadcast
    ("matmul", (torch.randn(3, 4), torch.randn(4, 5, dtype=torch.float64)), "dtype"),
    ("matmul", (torch.randn(3), torch.randn(4)), None),
    ("mm", (torch.randn(3), torch.randn(3, 4)), "matrix"),
    ("mm", (torch.randn(2, 3, 4), torch.randn(4, 5)), "matrix"),
    ("mm", (torch.randn(3, 4), torch.randn(5, 6)), "cannot be multiplied"),
    ("bmm", (torch.randn(3, 4), torch.randn(4, 5)), "3D"),
    ("bmm", (torch.randn(2, 3, 4), torch.randn(3, 4, 5)), None),
    ("bmm", (torch.randn(2, 3, 4), torch.randn(2, 4, 5, dtype=torch.float64)), "Float but found Double"),
    ("addmm", (torch.randn(3), torch.randn(2, 4), torch.randn(4, 5)), "size"),
    ("addmm", (torch.randn(5), torch.randn(2, 4), torch.randn(3, 5)), "cannot be multiplied"),
    ("baddbmm", (torch.randn(5), torch.randn(2, 3, 4), torch.randn(3, 4, 5)), None),
    ("baddbmm", (torch.randn(4, 5), torch.randn(2, 3, 4), torch.randn(2, 4, 5)), None),
]


@pytest.mark.parametrize("name,args,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_like_torch(name, args, match):
    args = tuple(a.requires_grad_() if a.is_floating_point() else a for a in args)
    assert_raises_like_torch(getattr(F, name), getattr(torch, name), *args, match=match)


@pytest.mark.parametrize("name,n_args", [("matmul", 2), ("mm", 2), ("bmm", 2), ("addmm", 3), ("baddbmm", 3)])
def test_out_argument_raises_not_implemented(name, n_args):
    shapes = {"matmul": [(2, 3), (3, 4)], "mm": [(2, 3), (3, 4)], "bmm": [(1, 2, 3), (1, 3, 4)]}
    shapes = shapes.get(name, [(4,), (2, 3), (3, 4)] if name == "addmm" else [(4,), (1, 2, 3), (1, 3, 4)])
    args = [torch.randn(s) for s in shapes]
    out = torch.empty(0)
    getattr(torch, name)(*args, out=out)  # torch accepts it ...
    with pytest.raises(NotImplementedError, match="out="):  # ... we refuse rather than lose the graph
        getattr(F, name)(*args, out=out)
