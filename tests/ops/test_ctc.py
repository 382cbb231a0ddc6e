"""ctc_loss and CTCLoss: against torch in float32 on odd shapes with every option (padded and
concatenated targets, repeated labels, blank not 0, empty targets, impossible alignments with and
without zero_infinity, unbatched), a loss worked out by hand, float64 gradchecks with double
backward and forward mode (through a log_softmax: torch's gradient is the one wrt the logits, see
ops/ctc.py), vmap, autocast, and bad input like torch.

Tolerances: float32 rounds each of the <= 11 recursion steps a few times (eps 6e-8, losses and
gradients of order 1-10), so results agree with torch's kernel to ~1e-6; 1e-5 leaves a margin."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import manualgrad
import manualgrad.functional as F
import manualgrad.ops.ctc as ctc
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")

REDUCTIONS = ["mean", "sum", "none"]
TOL = dict(rtol=1e-5, atol=1e-5)


def log_probs(t, n, c, dtype=torch.float32):
    """(T, N, C) log-probabilities, a leaf (or (T, C) with n = None)."""
    shape = (t, c) if n is None else (t, n, c)
    return torch.randn(shape, dtype=dtype).log_softmax(-1).requires_grad_()


def dy(reduction, n):
    return exact_dy((n,) if reduction == "none" else ())


# (T, N, C), padded targets, input lengths, target lengths, blank: each row one of the cases
CASES = {
    "padded": ((7, 3, 5), [[1, 2, 3], [4, 1, 0], [2, 0, 0]], (7, 6, 5), (3, 2, 1), 0),
    "repeated labels": ((9, 2, 4), [[1, 1, 2, 2], [3, 3, 3, 0]], (9, 8), (4, 3), 0),  # a blank between repeats
    "blank last": ((6, 3, 4), [[0, 1, 2], [2, 2, 0], [1, 0, 0]], (6, 6, 4), (3, 2, 1), 3),
    "blank in the middle": ((8, 2, 5), [[0, 1, 3, 4], [4, 4, 1, 0]], (8, 7), (4, 3), 2),
    "empty targets": ((5, 3, 3), [[1, 2], [0, 0], [2, 0]], (5, 4, 1), (2, 0, 0), 0),
    # torch accepts them (as labels). Not as the last label: there torch's backward sets the gradient at
    # T_n - 1 from the final label's state alone, assuming it differs from the blank's
    "no targets at all": ((4, 2, 3), [[], []], (4, 3), (0, 0), 0),  # S = 0: l' is one blank
    "targets containing blank": ((6, 2, 4), [[0, 2, 1], [1, 0, 3]], (6, 6), (3, 3), 0),
    # 1 1 2 fits in 6 steps; 1 2 3 needs 3 > 2; 3 3 3 needs 5 > 4 (a blank between repeats)
    "impossible": ((6, 3, 4), [[1, 1, 2], [1, 2, 3], [3, 3, 3]], (6, 2, 4), (3, 3, 3), 0),
    "long": ((11, 1, 2), [[1, 1, 1, 1, 1]], (11,), (5,), 0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("layout", ["padded", "concatenated"])
def test_ctc_loss_matches_torch(case, reduction, zero_infinity, layout):
    (t, n, c), targets, il, tl, blank = CASES[case]
    targets = torch.tensor(targets, dtype=torch.long)
    if layout == "concatenated":
        targets = torch.cat([row[:k] for row, k in zip(targets, tl)])
    assert_same_as_torch(F.ctc_loss, TF.ctc_loss, log_probs(t, n, c), targets, il, tl, blank=blank,
                         reduction=reduction, zero_infinity=zero_infinity, grad_output=dy(reduction, n), **TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["tensor lengths", "int32 targets", "float targets", "unbatched",
                                  "unbatched concatenated", "unbatched impossible", "no time steps"])
def test_ctc_loss_argument_forms_match_torch(case, reduction):
    lp, targets = log_probs(7, 3, 5), torch.tensor([[1, 2, 3], [4, 1, 0], [2, 0, 0]])
    il, tl = torch.tensor([7, 6, 5]), torch.tensor([3, 2, 1])
    kw = dict(reduction=reduction, grad_output=dy(reduction, 3))
    if case == "int32 targets":
        targets = targets.int()
    elif case == "float targets":  # torch casts them to long
        targets = targets.float()
    elif case.startswith("unbatched"):
        lp, targets, il, tl = log_probs(6, None, 4), torch.tensor([1, 3, 3]), torch.tensor(6), torch.tensor(3)
        kw["grad_output"] = exact_dy(())
        if case == "unbatched concatenated":
            targets, tl = torch.tensor([2, 1]), torch.tensor(2)
        elif case == "unbatched impossible":
            il = torch.tensor(3)
            kw["zero_infinity"] = True
    elif case == "no time steps":  # T_n = 0: loss 0 for an empty target, like torch
        il, tl = torch.tensor([7, 0, 5]), torch.tensor([3, 0, 1])
    assert_same_as_torch(F.ctc_loss, TF.ctc_loss, lp, targets, il, tl, **kw, **TOL)


def test_ctc_loss_of_two_steps_and_one_label_is_the_sum_over_its_three_paths():
    # T = 2, target (1), blank 0: paths (1, 1), (0, 1), (1, 0)
    lp = torch.tensor([[[0.1, 0.7, 0.2]], [[0.3, 0.5, 0.2]]]).log()
    p = 0.7 * 0.5 + 0.1 * 0.5 + 0.7 * 0.3
    loss = F.ctc_loss(lp, torch.tensor([[1]]), (2,), (1,), reduction="none")
    torch.testing.assert_close(loss, torch.tensor([-math.log(p)]))
    # mean: divided by the target length 2 of the second sample, then averaged over the batch
    lp2 = torch.cat([lp, lp], 1)
    loss = F.ctc_loss(lp2, torch.tensor([[1, 0], [1, 2]]), (2, 2), (1, 2), reduction="mean")
    p12 = 0.7 * 0.2  # target (1, 2) in 2 steps: one path
    torch.testing.assert_close(loss, torch.tensor((-math.log(p) - math.log(p12) / 2) / 2))


FAST_CASES = {**CASES, "no time steps": ((5, 4, 3), [[1, 2], [1, 0], [2, 0], [1, 1]], (5, 0, 3, 0), (2, 0, 1, 2), 0)}


@pytest.mark.parametrize("case", FAST_CASES)
def test_ctc_fast_recursions_are_the_plain_ones(case):
    # the fast form (three calls per step; beta as alpha with time and states flipped) against the
    # recursions written out, in float64: -inf in the same places, the rest to rounding
    (t, n, c), targets, il, tl, blank = FAST_CASES[case]
    lp = log_probs(t, n, c, torch.float64).detach()
    targets, il, tl = torch.tensor(targets, dtype=torch.long), torch.tensor(il), torch.tensor(tl)
    ext, skip, valid = ctc.extended_labels(targets, tl, blank)
    log_alpha, nll = ctc.ctc_alpha(lp, ext, skip, valid, il, tl)
    log_beta = ctc.ctc_beta(lp, ext, skip, valid, il, tl)
    lpe = lp.gather(2, ext.expand(t, *ext.shape))
    fast_alpha, fast_nll, fast_beta = ctc.ctc_alpha_beta_fast(lpe, skip, valid, il, tl)
    torch.testing.assert_close(fast_alpha, log_alpha)
    torch.testing.assert_close(fast_nll, nll)
    torch.testing.assert_close(fast_beta, log_beta)
    # alpha alone (a forward with no gradient to come)
    torch.testing.assert_close(ctc.ctc_alpha_beta_fast(lpe, skip, valid, il, tl, with_beta=False)[:2],
                               (log_alpha, nll))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["padded", "concatenated"])
def test_ctc_loss_gradients(reduction, layout):
    # through a log_softmax: torch's gradient (and manualgrad's) is the one wrt its logits
    targets = torch.tensor([[1, 1], [2, 0], [0, 0]])
    if layout == "concatenated":
        targets = torch.tensor([1, 1, 2])
    check_gradients(lambda u, **kw: F.ctc_loss(u.log_softmax(2), **kw),
                    torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True), targets=targets,
                    input_lengths=(5, 4, 2), target_lengths=(2, 1, 0), blank=0, reduction=reduction)


def test_ctc_loss_gradients_blank_not_zero_zero_infinity_and_unbatched():
    # the second sample cannot fit (3 labels in 2 steps): loss and gradient 0 with zero_infinity
    check_gradients(lambda u, **kw: F.ctc_loss(u.log_softmax(2), **kw),
                    torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True),
                    targets=torch.tensor([[0, 1, 0], [1, 0, 1]]),
                    input_lengths=(4, 2), target_lengths=(2, 3), blank=2, reduction="sum", zero_infinity=True)
    check_gradients(lambda u, **kw: F.ctc_loss(u.log_softmax(1), **kw),
                    torch.randn(4, 3, dtype=torch.float64, requires_grad=True), targets=torch.tensor([2, 1]),
                    input_lengths=torch.tensor(4), target_lengths=torch.tensor(2), reduction="none")


def test_ctc_loss_vmap_over_log_probs_matches_torch_per_sample():
    targets, il, tl = torch.tensor([[1, 2, 2], [3, 0, 0]]), (6, 5), (3, 1)
    lps = torch.randn(3, 6, 2, 4).log_softmax(-1)
    dys = exact_dy((3, 2))

    def loss_and_grad(lp, d):
        loss, pull = torch.func.vjp(lambda l: F.ctc_loss(l, targets, il, tl, reduction="none"), lp)
        return loss, pull(d)[0]

    losses, grads = torch.func.vmap(loss_and_grad)(lps, dys)
    for lp, d, loss, grad in zip(lps, dys, losses, grads):
        lp = lp.clone().requires_grad_()
        expected = TF.ctc_loss(lp, targets, il, tl, reduction="none")
        torch.testing.assert_close(loss, expected, **TOL)
        torch.testing.assert_close(grad, torch.autograd.grad(expected, lp, d)[0], **TOL)


def test_ctc_loss_under_autocast_is_float32_like_torch():
    lp = log_probs(6, 2, 4).detach().bfloat16().requires_grad_()
    args = (torch.tensor([[1, 2], [3, 0]]), (6, 5), (2, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.ctc_loss(lp, *args)
        expected = TF.ctc_loss(lp, *args)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOL)
    (g,), (g_torch,) = torch.autograd.grad(out, lp), torch.autograd.grad(expected, lp)
    assert g.dtype == g_torch.dtype == torch.bfloat16
    torch.testing.assert_close(g, g_torch)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ctc_loss_module_matches_torch(reduction):
    mg, th = manualgrad.nn.CTCLoss(blank=4, reduction=reduction, zero_infinity=True), nn.CTCLoss(
        blank=4, reduction=reduction, zero_infinity=True)
    assert isinstance(mg, nn.CTCLoss) and repr(mg) == repr(th)
    targets = torch.tensor([[0, 1, 1], [2, 3, 0], [3, 3, 3]])
    assert_same_as_torch(mg, th, log_probs(5, 3, 5), targets, (5, 4, 3), (3, 2, 3), grad_output=dy(reduction, 3), **TOL)


def _bad(case):
    lp, targets, il, tl, kw = log_probs(5, 2, 4), torch.tensor([[1, 2, 2], [3, 1, 1]]), (5, 5), (3, 2), {}
    if case == "target length above S":
        tl = (3, 4)
    elif case == "input length above T":
        il = (6, 5)
    elif case == "negative input length":
        il = (-1, 5)
    elif case == "negative target length":
        tl = (3, -1)
    elif case == "concatenated of the wrong size":
        targets = torch.tensor([1, 2, 2, 3, 1, 1])
    elif case == "padded of the wrong batch":
        targets = targets[:1]
    elif case == "lengths of the wrong batch":
        il = (5,)
    elif case in ("blank = C", "blank < 0"):
        kw["blank"] = 4 if case == "blank = C" else -1
    elif case == "empty log_probs":
        lp = log_probs(0, 2, 4)
        il = (0, 0)
    elif case == "half":
        lp = lp.detach().half()
    elif case == "a tensor and a tuple of lengths":
        il = torch.tensor(il)
    elif case == "int lengths":
        lp, targets, il, tl = log_probs(5, None, 4), targets[0], 5, 3
    elif case == "float lengths":
        il = (5.0, 5.0)
    elif case == "float tensor lengths":
        il, tl = torch.tensor(il).float(), torch.tensor(tl)
    elif case == "bad reduction":
        kw["reduction"] = "batchmean"
    return (lp, targets, il, tl), kw


@pytest.mark.parametrize("case", [
    "target length above S", "input length above T", "negative input length", "negative target length",
    "concatenated of the wrong size", "padded of the wrong batch", "lengths of the wrong batch", "blank = C",
    "blank < 0", "empty log_probs", "half", "bad reduction", "a tensor and a tuple of lengths", "int lengths",
    "float lengths", "float tensor lengths",
])
def test_ctc_loss_bad_input_raises_like_torch(case):
    args, kw = _bad(case)
    assert_raises_like_torch(F.ctc_loss, TF.ctc_loss, *args, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ctc_loss_runs_on_meta_with_torchs_output_shape(reduction):
    # torch's forward runs on meta (tuple lengths), its backward has no meta kernel: the
    # gradient's shape is log_probs'
    lp = torch.randn(6, 3, 5, device="meta", requires_grad=True)
    args = (torch.tensor([[1, 2, 2], [4, 3, 0], [1, 0, 0]], device="meta"), (6, 5, 4), (3, 2, 1))
    out, expected = F.ctc_loss(lp, *args, reduction=reduction), TF.ctc_loss(lp, *args, reduction=reduction)
    assert (out.device.type, out.shape, out.dtype) == ("meta", expected.shape, expected.dtype)
    (g,) = torch.autograd.grad(out.sum(), lp)
    assert (g.device.type, g.shape) == ("meta", lp.shape)


def test_ctc_loss_is_reached_by_convert_and_by_enable():
    model = manualgrad.convert(nn.Sequential(nn.CTCLoss(blank=1, reduction="sum")), strict=True)
    assert type(model[0]) is manualgrad.nn.CTCLoss and model[0].blank == 1
    lp = log_probs(5, 2, 4)
    args = (torch.tensor([[2, 3], [3, 0]]), (5, 4), (2, 1))
    with manualgrad.enable():
        loss = TF.ctc_loss(lp, *args)
    assert type(loss.grad_fn).__name__ == "CTCLossFunctionBackward"
    torch.testing.assert_close(loss, TF.ctc_loss(lp, *args), **TOL)
