"""cosine_embedding_loss, triplet_margin_loss, triplet_margin_with_distance_loss and their
modules: against torch in float32 on odd shapes with every option, float64 gradchecks with
double backward, the hinge's kink and swap's ties as torch differentiates them, bad input
like torch."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import manualgrad
import manualgrad.functional as F
from manualgrad.coverage import graph_nodes
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")

INF = float("inf")
REDUCTIONS = ["mean", "sum", "none"]


def x(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def signs(n):
    """Targets 1, -1 and a 0 (which torch gives no loss), as float."""
    return torch.tensor([1.0, -1.0, 0.0] * n)[:n]


# ---------------------------------------------------------------------------------------------
# cosine_embedding_loss

@pytest.mark.parametrize("n,d", [(1, 1), (7, 13), (5, 257)])
@pytest.mark.parametrize("margin", [0.0, 0.4, -0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cosine_embedding_loss_matches_torch(n, d, margin, reduction):
    assert_same_as_torch(F.cosine_embedding_loss, TF.cosine_embedding_loss, x(n, d), x(n, d), signs(n),
                         margin=margin, reduction=reduction)


@pytest.mark.parametrize(
    "case",
    [
        "unbatched",  # 0-D target, 1-D inputs
        "int target",
        "broadcast input2",  # (1, D) against (N, D)
        "zero rows",  # cos = 0, gradient x2 / (1e-6 |x2|) in both
        "legacy size_average",
    ],
)
def test_cosine_embedding_loss_cases_match_torch(case):
    a, b, t, kw = x(6, 5), x(6, 5), signs(6), {}
    if case == "unbatched":
        a, b, t = x(5), x(5), torch.tensor(-1.0)
        kw = dict(margin=-0.5)
    elif case == "int target":
        t = torch.tensor([1, -1, 1, -1, 2, 1])
    elif case == "broadcast input2":
        b = x(1, 5)
    elif case == "zero rows":
        a = torch.cat([torch.zeros(2, 5), torch.randn(4, 5)]).requires_grad_()
        t = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
        kw = dict(margin=-0.5)
    elif case == "legacy size_average":
        kw = dict(size_average=False)
    assert_same_as_torch(F.cosine_embedding_loss, TF.cosine_embedding_loss, a, b, t, rtol=1e-5, atol=1e-5, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cosine_embedding_loss_gradients(reduction):
    check_gradients(F.cosine_embedding_loss, x(5, 4, dtype=torch.float64), x(5, 4, dtype=torch.float64), signs(5),
                    margin=-0.2, reduction=reduction)
    check_gradients(F.cosine_embedding_loss, x(4, dtype=torch.float64), x(4, dtype=torch.float64), torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# triplet_margin_loss

@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 257), (6,)])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 1.5, INF])
@pytest.mark.parametrize("swap", [False, True])
def test_triplet_margin_loss_matches_torch(shape, p, swap):
    assert_same_as_torch(F.triplet_margin_loss, TF.triplet_margin_loss, x(*shape), x(*shape), x(*shape),
                         p=p, swap=swap, margin=2.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin,eps", [(1.0, 1e-6), (0.1, 0.0), (3.0, 0.5)])
def test_triplet_margin_loss_options_match_torch(reduction, margin, eps):
    assert_same_as_torch(F.triplet_margin_loss, TF.triplet_margin_loss, x(9, 4), x(9, 4), x(9, 4),
                         margin=margin, eps=eps, swap=True, reduction=reduction)


def test_triplet_margin_loss_broadcasts_like_torch():
    # one negative for every anchor; a single anchor against many positives
    assert_same_as_torch(F.triplet_margin_loss, TF.triplet_margin_loss, x(5, 3), x(5, 3), x(1, 3), swap=True)
    assert_same_as_torch(F.triplet_margin_loss, TF.triplet_margin_loss, x(1, 3), x(5, 3), x(1, 3), swap=True,
                         reduction="none")


def test_triplet_swap_splits_the_gradient_on_ties_like_torch():
    # a = p: d(a, n) = d(p, n) exactly: torch's minimum sends half of the gradient to each
    a = torch.randn(4, 3)
    assert_same_as_torch(F.triplet_margin_loss, TF.triplet_margin_loss, a.clone().requires_grad_(),
                         a.clone().requires_grad_(), x(4, 3), swap=True, margin=5.0, reduction="none",
                         grad_output=exact_dy((4,)))


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triplet_margin_loss_gradients(swap, reduction):
    a, p, n = (x(5, 3, dtype=torch.float64) for _ in range(3))
    # margin 1: some triplets active, some not (the kink is measure zero for random inputs)
    check_gradients(F.triplet_margin_loss, a, p, n, swap=swap, reduction=reduction)
    check_gradients(F.triplet_margin_loss, a, p, n, p=1.5, swap=swap, reduction=reduction)


# ---------------------------------------------------------------------------------------------
# triplet_margin_with_distance_loss

def l1(u, v):
    return (u - v).abs().sum(-1)


def cosine_distance(u, v):
    return 1 - TF.cosine_similarity(u, v)


DISTANCES = {
    "default": None,
    "TF.pairwise_distance": TF.pairwise_distance,  # routed to manualgrad's
    "nn.PairwiseDistance(p=1)": lambda: nn.PairwiseDistance(p=1.0),
    "cosine distance": cosine_distance,
    "l1": l1,
}


@pytest.mark.parametrize("distance", list(DISTANCES))
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triplet_margin_with_distance_loss_matches_torch(distance, swap, reduction):
    fn = DISTANCES[distance]
    fn = fn() if distance.startswith("nn.") else fn
    assert_same_as_torch(F.triplet_margin_with_distance_loss, TF.triplet_margin_with_distance_loss,
                         x(7, 5), x(7, 5), x(7, 5), distance_function=fn, swap=swap, reduction=reduction, margin=1.5)


def test_hinge_passes_the_gradient_at_its_kink_like_torch():
    # integer distances: d+ = 2, d- = 4, margin 2: z = 0 exactly; torch's clamp_min passes the gradient
    a, p, n = (torch.tensor(v, requires_grad=True) for v in ([[0.0, 0.0]], [[1.0, 1.0]], [[2.0, 2.0]]))
    out, _ = assert_same_as_torch(F.triplet_margin_with_distance_loss, TF.triplet_margin_with_distance_loss,
                                  a, p, n, distance_function=l1, margin=2.0, grad_output=torch.tensor(1.0))
    assert out[0] == 0
    (dp,) = torch.autograd.grad(F.triplet_margin_with_distance_loss(a, p, n, distance_function=l1, margin=2.0), p)
    assert (dp != 0).all()


@pytest.mark.parametrize("swap", [False, True])
def test_triplet_margin_with_distance_loss_gradients(swap):
    a, p, n = (x(5, 3, dtype=torch.float64) for _ in range(3))
    check_gradients(F.triplet_margin_with_distance_loss, a, p, n, swap=swap)
    check_gradients(F.triplet_margin_with_distance_loss, a, p, n, distance_function=cosine_distance, swap=swap,
                    margin=0.5, reduction="none")


def test_default_distance_backward_is_all_hand_written():
    a, p, n = x(5, 3), x(5, 3), x(5, 3)
    for loss in (F.triplet_margin_with_distance_loss(a, p, n, swap=True), F.triplet_margin_loss(a, p, n, swap=True),
                 F.cosine_embedding_loss(a, p, signs(5))):
        names = {type(node).__name__ for node in graph_nodes([loss.grad_fn])}
        assert {n for n in names if not n.endswith("FunctionBackward")} == {"AccumulateGrad"}, names


# ---------------------------------------------------------------------------------------------
# modules, bad input, autocast

@pytest.mark.parametrize(
    "make,inputs",
    [
        (lambda: nn.CosineEmbeddingLoss(margin=0.2, reduction="sum"), lambda: (x(6, 4), x(6, 4), signs(6))),
        (lambda: nn.TripletMarginLoss(margin=0.5, p=1.0, eps=1e-3, swap=True), lambda: (x(6, 4), x(6, 4), x(6, 4))),
        (lambda: nn.TripletMarginWithDistanceLoss(swap=True, reduction="none"), lambda: (x(6, 4), x(6, 4), x(6, 4))),
        (lambda: nn.TripletMarginWithDistanceLoss(distance_function=cosine_distance, margin=0.3),
         lambda: (x(6, 4), x(6, 4), x(6, 4))),
    ],
)
def test_converted_modules_match_torch(make, inputs):
    module = make()
    ours = manualgrad.convert(make(), strict=True)
    assert type(ours).__module__ == "manualgrad.nn.loss_metric" and repr(ours) == repr(module)
    assert_same_as_torch(ours, module, *inputs())


BAD = {
    "cosine: 2-D target": (TF.cosine_embedding_loss, F.cosine_embedding_loss, lambda: (x(3, 4), x(3, 4), torch.ones(3, 1)), {}),
    "cosine: 3-D inputs": (TF.cosine_embedding_loss, F.cosine_embedding_loss, lambda: (x(2, 3, 4), x(2, 3, 4), torch.ones(2)), {}),
    "cosine: 2-D inputs, 0-D target": (TF.cosine_embedding_loss, F.cosine_embedding_loss, lambda: (x(3, 4), x(3, 4), torch.tensor(1.0)), {}),
    "cosine: bad reduction": (TF.cosine_embedding_loss, F.cosine_embedding_loss, lambda: (x(3, 4), x(3, 4), torch.ones(3)), dict(reduction="avg")),
    "cosine: mismatched rows": (TF.cosine_embedding_loss, F.cosine_embedding_loss, lambda: (x(3, 4), x(2, 4), torch.ones(3)), {}),
    "triplet: margin 0": (TF.triplet_margin_loss, F.triplet_margin_loss, lambda: (x(3, 4), x(3, 4), x(3, 4)), dict(margin=0.0)),
    "triplet: dims differ": (TF.triplet_margin_loss, F.triplet_margin_loss, lambda: (x(3, 4), x(3, 4), x(4)), {}),
    "triplet: sizes differ": (TF.triplet_margin_loss, F.triplet_margin_loss, lambda: (x(3, 4), x(3, 5), x(3, 4)), {}),
    "triplet: bad reduction": (TF.triplet_margin_loss, F.triplet_margin_loss, lambda: (x(3, 4), x(3, 4), x(3, 4)), dict(reduction="avg")),
    "distance: margin < 0": (TF.triplet_margin_with_distance_loss, F.triplet_margin_with_distance_loss, lambda: (x(3, 4), x(3, 4), x(3, 4)), dict(margin=-1.0)),
    "distance: dims differ": (TF.triplet_margin_with_distance_loss, F.triplet_margin_with_distance_loss, lambda: (x(3, 4), x(4), x(3, 4)), {}),
    "distance: bad reduction": (TF.triplet_margin_with_distance_loss, F.triplet_margin_with_distance_loss, lambda: (x(3, 4), x(3, 4), x(3, 4)), dict(reduction="avg")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_like_torch(case):
    theirs, ours, make, kwargs = BAD[case]
    assert_raises_like_torch(ours, theirs, *make(), **kwargs)


@pytest.mark.parametrize(
    "name,inputs",
    [
        ("cosine_embedding_loss", lambda: (x(6, 5), x(6, 5), signs(6))),
        ("triplet_margin_loss", lambda: (x(6, 5), x(6, 5), x(6, 5))),
        ("triplet_margin_with_distance_loss", lambda: (x(6, 5), x(6, 5), x(6, 5))),
    ],
)
def test_bfloat16_autocast_gives_torchs_dtype_and_values(name, inputs):
    args = [t.detach().bfloat16().requires_grad_(t.requires_grad) for t in inputs()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = getattr(F, name)(*args), getattr(TF, name)(*args)
    assert ours.dtype == theirs.dtype  # float32 (the first two, on torch's lists), bfloat16 (the third)
    # on torch's float32 list the whole loss (distances too) runs in float32 from the bfloat16
    # values: float32 rounding apart; the third is torch's Python on bfloat16 ops
    tol = dict(rtol=1e-5, atol=1e-5) if theirs.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("loss", ["TripletMarginLoss", "TripletMarginWithDistanceLoss", "CosineEmbeddingLoss"])
def test_embedding_net_trains_like_torch(loss):
    """A small embedding net (Linear, ReLU, Linear) with each loss module, both
    converted with strict=True: three SGD steps, loss and every gradient like torch's."""
    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
        crit = {"TripletMarginLoss": lambda: nn.TripletMarginLoss(margin=0.5, swap=True),
                "TripletMarginWithDistanceLoss": lambda: nn.TripletMarginWithDistanceLoss(margin=0.5),
                "CosineEmbeddingLoss": lambda: nn.CosineEmbeddingLoss(margin=0.1)}[loss]()
        return nn.ModuleDict(dict(net=net, loss=crit))

    def step(m, batch):
        a, p, n = (m["net"](v) for v in batch)
        out = m["loss"](a, p, torch.tensor([1.0, -1.0] * 4)) if loss == "CosineEmbeddingLoss" else m["loss"](a, p, n)
        out.backward()
        return out.detach()

    theirs, ours = make(), manualgrad.convert(make(), strict=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (theirs, ours)]
    for _ in range(3):
        batch = [torch.randn(8, 6) for _ in range(3)]
        for opt in opts:
            opt.zero_grad()
        torch.testing.assert_close(step(ours, batch), step(theirs, batch), rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        for opt in opts:
            opt.step()
