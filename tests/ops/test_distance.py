"""normalize, cosine_similarity, pairwise_distance, pdist (and their modules): against torch in
float32 on odd shapes with every option, float64 gradchecks with double backward, eps exactly as
torch 2.13 applies it, bad input like torch."""
import pytest
import torch
import torch.nn.functional as TF

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_error_within_torch, assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

INF = float("inf")


def x(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, requires_grad=True)


# ---------------------------------------------------------------------------------------------
# normalize

@pytest.mark.parametrize("shape,dim", [((7, 13), 1), ((2, 3, 257), -1), ((5,), 0), ((4, 3, 6), 0), ((3, 4, 5), (1, 2)),
                                       ((4, 1), 1), ((1, 5), 1)])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 1.5, 0.5, INF])
def test_normalize_matches_torch(shape, dim, p):
    assert_same_as_torch(F.normalize, TF.normalize, x(*shape), p=p, dim=dim)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 1.5, INF])
@pytest.mark.parametrize("shape,dim", [((3, 4), 1), ((2, 3, 2), 0)])
def test_normalize_gradients(shape, dim, p):
    check_gradients(F.normalize, x(*shape, dtype=torch.float64), p=p, dim=dim)


def test_normalize_clamps_to_eps_like_torch():
    # rows with norms below eps: y = x / eps, and the clamp's gradient is 0 there
    t = torch.cat([torch.randn(2, 4) * 1e-3, torch.zeros(1, 4), torch.randn(2, 4)]).requires_grad_()
    assert_same_as_torch(F.normalize, TF.normalize, t, eps=1e-2)
    check_gradients(lambda t: F.normalize(t, eps=1e-2), t.detach().double()[[0, 1, 3, 4]].requires_grad_())


def test_normalize_out_and_noncontiguous_match_torch():
    t = noncontiguous(torch.randn(5, 6, dtype=torch.float64, requires_grad=True))
    check_gradients(F.normalize, t, dim=0)
    out, ref = torch.empty(5, 6), torch.empty(5, 6)
    F.normalize(t.detach().float(), out=out)
    TF.normalize(t.detach().float(), out=ref)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------
# cosine_similarity

COSINE = [((7, 13), (7, 13), 1), ((2, 3, 257), (2, 3, 257), -1), ((5, 9), (9,), 1), ((2, 3, 4), (3, 1), 1),
          ((4,), (4,), 0), ((6, 1, 5), (1, 4, 5), 2)]


@pytest.mark.parametrize("s1,s2,dim", COSINE)
@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_cosine_similarity_matches_torch(s1, s2, dim, eps):
    assert_same_as_torch(F.cosine_similarity, TF.cosine_similarity, x(*s1), x(*s2), dim=dim, eps=eps)


@pytest.mark.parametrize("s1,s2,dim", [((3, 4), (3, 4), 1), ((3, 4), (4,), 1), ((2, 3, 2), (3, 1), 1), ((4,), (4,), 0)])
def test_cosine_similarity_gradients(s1, s2, dim):
    check_gradients(F.cosine_similarity, x(*s1, dtype=torch.float64), x(*s2, dtype=torch.float64), dim=dim)


def test_cosine_similarity_clamps_each_norm_on_its_own_like_torch_2_13():
    # |x1| = 1e-9 < eps: y = x1 / eps . x2 / |x2| (0.0436...), not x1.x2 / max(|x1||x2|, eps) (0.1)
    x1 = torch.tensor([[1e-9, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    x2 = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    y = F.cosine_similarity(x1, x2, eps=1e-8)
    torch.testing.assert_close(y, torch.tensor([1e-9 / 1e-8 / (1 + 4 + 0.25) ** 0.5], dtype=torch.float64))
    # and the gradient flows through the clamped norm as torch's (x / |x|, not 0)
    assert_same_as_torch(F.cosine_similarity, TF.cosine_similarity, x1, x2, eps=1e-8, rtol=1e-12, atol=0)


def test_cosine_similarity_of_zero_vectors_matches_torch():
    x1 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], requires_grad=True)
    x2 = torch.tensor([[1.0, -1.0, 2.0], [0.0, 0.0, 0.0]], requires_grad=True)
    assert_same_as_torch(F.cosine_similarity, TF.cosine_similarity, x1, x2)


def test_cosine_similarity_promotes_integer_input_like_torch():
    a, b = torch.arange(4.0).view(1, 4), torch.arange(4).view(1, 4)
    torch.testing.assert_close(F.cosine_similarity(a, b), TF.cosine_similarity(a, b))
    assert_raises_like_torch(F.cosine_similarity, TF.cosine_similarity, b, b, match="floating point")


# ---------------------------------------------------------------------------------------------
# pairwise_distance

PAIRWISE = [((7, 13), (7, 13)), ((2, 3, 257), (2, 3, 257)), ((5, 9), (9,)), ((3, 4), (3, 1)), ((4,), (4,)), ((), ())]


@pytest.mark.parametrize("s1,s2", PAIRWISE)
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 1.5, 0.5, INF, 0.0])
@pytest.mark.parametrize("keepdim", [False, True])
def test_pairwise_distance_matches_torch(s1, s2, p, keepdim):
    assert_same_as_torch(F.pairwise_distance, TF.pairwise_distance, x(*s1), x(*s2), p=p, keepdim=keepdim)


@pytest.mark.parametrize("s1,s2", [((3, 4), (3, 4)), ((3, 4), (4,)), ((4,), (4,)), ((), ())])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 1.5, INF])
@pytest.mark.parametrize("keepdim", [False, True])
def test_pairwise_distance_gradients(s1, s2, p, keepdim):
    # (eps as a closure: check_gradients' own eps is the finite-difference step)
    check_gradients(lambda a, b: F.pairwise_distance(a, b, p, 0.1, keepdim), x(*s1, dtype=torch.float64),
                    x(*s2, dtype=torch.float64))


def test_pairwise_distance_of_equal_inputs_matches_torch():
    # v = eps everywhere: finite gradients (the eps keeps the norm away from 0)
    t = torch.randn(3, 5)
    for p in (2.0, 1.0, INF, 0.5):
        assert_same_as_torch(F.pairwise_distance, TF.pairwise_distance, t.clone().requires_grad_(), t.clone(), p=p)


# ---------------------------------------------------------------------------------------------
# pdist

@pytest.mark.parametrize("shape", [(2, 1), (7, 13), (30, 5), (1, 4), (4, 3)])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 1.5, INF, 0.0])
def test_pdist_matches_torch(shape, p):
    assert_same_as_torch(F.pdist, TF.pdist, x(*shape), p=p)


@pytest.mark.parametrize("shape", [(7, 13), (30, 5)])
def test_pdist_below_p_1_matches_torch_in_float64_and_is_as_accurate_in_float32(shape):
    # |v|^(p-1) is large for small differences: a row's gradient sums large terms of both signs,
    # and its float32 rounding depends on the order (torch's kernel's varies with the CPU)
    assert_same_as_torch(F.pdist, TF.pdist, x(*shape, dtype=torch.float64), p=0.5, rtol=1e-9, atol=1e-12)
    assert_error_within_torch(F.pdist, TF.pdist, [((x(*shape),), dict(p=0.5)) for _ in range(10)])


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 1.5, INF])
def test_pdist_gradients(p):
    # double backward too, which torch's pdist does not have
    check_gradients(F.pdist, x(5, 3, dtype=torch.float64), p=p)


def test_pdist_with_equal_rows_and_ties_matches_torch():
    t = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [2.0, 3.0, 2.0], [0.0, 0.0, 0.0]], requires_grad=True)
    for p in (2.0, 1.0, INF, 0.5, 1.5, 3.0):
        assert_same_as_torch(F.pdist, TF.pdist, t, p=p)


@pytest.mark.parametrize("rows", [0, 1])
def test_pdist_without_pairs_gives_empty_distances_and_zero_gradients(rows):
    # (not compared with torch: its backward segfaults for 0 rows in torch 2.13)
    t = x(rows, 4)
    y = F.pdist(t)
    assert y.shape == (0,) and torch.equal(y.detach(), TF.pdist(t.detach()))
    (g,) = torch.autograd.grad(y, t, torch.randn(0))
    assert torch.equal(g, torch.zeros(rows, 4))


NAN_INF_ROWS = [[1.0, float("nan"), 2.0], [float("inf"), 1.0, 0.0], [0.0, 0.0, 0.0], [-float("inf"), 2.0, 3.0], [1.0, 2.0, 3.0]]
OTHER_ROWS = [[1.0, 2.0, 2.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, float("inf"), 3.0], [1.0, 2.0, 3.0]]


@pytest.mark.parametrize("name,kwargs", [
    ("normalize", {}), ("normalize", dict(p=1.0)), ("normalize", dict(p=INF)), ("cosine_similarity", {}),
    ("pairwise_distance", {}), ("pairwise_distance", dict(p=1.0)), ("pairwise_distance", dict(p=INF)),
    ("pdist", {}), ("pdist", dict(p=1.0)), ("pdist", dict(p=INF)), ("pdist", dict(p=1.5)), ("pdist", dict(p=3.0)),
])
def test_values_and_gradients_at_nan_inf_and_zero_rows_are_torchs(name, kwargs):
    # nan exactly where torch's is (pdist's kernel: its sign and its tie test propagate nan)
    a, b = torch.tensor(NAN_INF_ROWS), torch.tensor(OTHER_ROWS)
    args = (a,) if name in ("normalize", "pdist") else (a, b)

    def run(f):
        leaves = [t.clone().requires_grad_() for t in args]
        y = getattr(f, name)(*leaves, **kwargs)
        return [y, *torch.autograd.grad(y, leaves, torch.ones_like(y))]

    for ours, theirs in zip(run(F), run(TF)):
        assert torch.equal(ours.isnan(), theirs.isnan()), (ours, theirs)
        torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_pdist_backward_in_several_chunks_matches_torch(monkeypatch):
    import manualgrad.ops.distance as distance

    monkeypatch.setattr(distance, "_CHUNK", 20)  # 5 pairs of 4 elements a chunk, the last one short
    t = x(9, 4, dtype=torch.float64)
    assert_same_as_torch(F.pdist, TF.pdist, t, rtol=1e-12, atol=1e-12)
    check_gradients(F.pdist, x(5, 4, dtype=torch.float64))


def test_pdist_noncontiguous_matches_torch():
    assert_same_as_torch(F.pdist, TF.pdist, noncontiguous(x(6, 4)))


# ---------------------------------------------------------------------------------------------
# bad input, modules

@pytest.mark.parametrize("call", [
    lambda f: f.pdist(torch.randn(4)),
    lambda f: f.pdist(torch.randn(2, 3, 4)),
    lambda f: f.pdist(torch.randn(3, 4), -1.0),
    lambda f: f.pdist(torch.arange(6.0).view(2, 3).long()),
    lambda f: f.cosine_similarity(torch.randn(3, 4), torch.randn(3, 4), 2),
    lambda f: f.cosine_similarity(torch.randn(3, 4), torch.randn(2, 4)),
    lambda f: f.pairwise_distance(torch.randn(3, 4), torch.randn(2, 4)),
    lambda f: f.normalize(torch.randn(3, 4), dim=2),
    lambda f: f.normalize(torch.arange(4)),
], ids=["pdist-1d", "pdist-3d", "pdist-negative-p", "pdist-int", "cosine-dim", "cosine-shapes", "pairwise-shapes",
        "normalize-dim", "normalize-int"])
def test_bad_input_raises_like_torch(call):
    assert_raises_like_torch(lambda: call(F), lambda: call(TF))


@pytest.mark.parametrize("name,kwargs", [("CosineSimilarity", {}), ("CosineSimilarity", dict(dim=0, eps=0.1)),
                                         ("PairwiseDistance", {}), ("PairwiseDistance", dict(p=1.0, eps=0.0, keepdim=True))])
def test_distance_modules_are_drop_ins(name, kwargs):
    theirs, ours = getattr(torch.nn, name)(**kwargs), getattr(mnn, name)(**kwargs)
    assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
    assert_same_as_torch(ours, theirs, x(5, 7), x(5, 7))
    model = mg.convert(torch.nn.Sequential(getattr(torch.nn, name)(**kwargs)), strict=True)
    assert type(model[0]) is getattr(mnn, name)


def test_simclr_style_step_matches_torch():
    # normalize the two views' embeddings, all-pairs cosine similarities / temperature, cross entropy
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    ours = mg.convert(torch.nn.Sequential(torch.nn.Linear(6, 4)))
    ours.load_state_dict(torch.nn.Sequential(lin).state_dict())
    a, b = torch.randn(5, 6), torch.randn(5, 6)

    def loss(f, model):
        za, zb = f.normalize(model(a), dim=1), f.normalize(model(b), dim=1)
        sim = f.cosine_similarity(za.unsqueeze(1), zb.unsqueeze(0), dim=-1) / 0.1
        return f.cross_entropy(sim, torch.arange(5))

    ours_loss, theirs_loss = loss(F, ours), loss(TF, torch.nn.Sequential(lin))
    ours_loss.backward()
    theirs_loss.backward()
    torch.testing.assert_close(ours_loss, theirs_loss)
    torch.testing.assert_close(ours[0].weight.grad, lin.weight.grad)


@pytest.mark.parametrize("name,args", [("pdist", lambda: (x(5, 3),)), ("cosine_similarity", lambda: (x(4, 6), x(4, 6))),
                                       ("pairwise_distance", lambda: (x(4, 6), x(4, 6))), ("normalize", lambda: (x(4, 6),))])
def test_bfloat16_autocast_gives_torchs_dtypes_and_values(name, args):
    if name == "pdist":  # a bfloat16 input is not cast up: both refuse it
        def under_autocast(f):
            def run(t):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return f(t)
            return run
        assert_raises_like_torch(under_autocast(F.pdist), under_autocast(TF.pdist), torch.randn(4, 3).bfloat16())
    # none is on torch's CPU autocast lists: each runs in its input's dtype (pdist has no bfloat16 CPU kernel)
    inputs = [t.detach().to(torch.float32 if name == "pdist" else torch.bfloat16).requires_grad_() for t in args()]

    def run(f):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = getattr(f, name)(*leaves)
        y.float().sum().backward()
        return y, [t.grad for t in leaves]

    (y, grads), (ref, ref_grads) = run(F), run(TF)
    assert y.dtype == ref.dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2)
