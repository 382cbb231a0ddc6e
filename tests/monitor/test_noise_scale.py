"""Gradient noise scale and direction stability logged by GradientMonitor, single process.

The problem (linear regression, its noise scale in closed form): y = x.w* + eps with
x ~ N(0, I_d), eps ~ N(0, s^2), loss 1/2 (x.w - y)^2 at a fixed w (no update), delta = w - w*.
The per-sample gradient is g = x (x.delta - eps), of mean G = delta and
E|g|^2 = E|x|^2 (x.delta)^2 + E|x|^2 eps^2 = (d + 2)|delta|^2 + d s^2 (Gaussian fourth
moments: E x_i^2 (x.delta)^2 = |delta|^2 + 2 delta_i^2), so
tr(Sigma) = E|g|^2 - |G|^2 = (d + 1)|delta|^2 + d s^2 and B_simple = tr(Sigma) / |delta|^2.
"""
import math

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from manualgrad.monitor import GradientMonitor, noise, stats
from tests.monitor.test_monitor import HostReads, read, scalar

D, S = 4, 1.0  # features, noise std
DELTA = torch.tensor([0.5, -0.5, 0.5, -0.5], dtype=torch.float64)  # |delta| = 1
TR_SIGMA = (D + 1) * DELTA.square().sum().item() + D * S**2  # 9
G_SQ = DELTA.square().sum().item()  # 1
B_SIMPLE = TR_SIGMA / G_SQ  # 9


def regression_batch(n, gen):
    """(x, y) with y = x.w* + eps, w* = 0 (so delta = w)."""
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    return x.float(), (S * torch.randn(n, generator=gen, dtype=torch.float64)).float()


def regression_model():
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(DELTA.float())
    return model


def micro_gradient(x, y):
    """The gradient of 1/2 mean (x.w - y)^2 at w = delta, computed here: X^T (X delta - y) / b."""
    x, y = x.double(), y.double()
    return x.T @ (x @ DELTA - y) / len(y)


def test_closed_form_trace_of_the_covariance_by_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    eps = S * torch.randn(n, generator=gen, dtype=torch.float64)
    g = x * (x @ DELTA - eps)[:, None]  # per-sample gradients (n, d)
    assert torch.allclose(g.mean(0), DELTA, atol=5 * 3 / math.sqrt(n))  # G = delta; sd(g_i) <= 3
    tr = g.var(0).sum().item()
    # the sample trace has sd ~ sqrt(Var|g - G|^2 / n); Var estimated from the same sample
    sd = (g - g.mean(0)).square().sum(1).std().item() / math.sqrt(n)
    assert abs(tr - TR_SIGMA) < 5 * sd, (tr, TR_SIGMA, sd)


def run_accumulation(tmp_path, steps, K, b, ema, seed=0, every=1, poison=None):
    """K micro-batches of b samples per step, loss / K, no update. Returns (logged, per-step micro gradients)."""
    gen = torch.Generator().manual_seed(seed)
    model = regression_model()
    writer = SummaryWriter(tmp_path)
    micro = []
    with GradientMonitor(model, writer, every=every, noise_ema=ema, cosine=False) as mon:
        for _ in range(steps):
            model.zero_grad()
            grads = []
            for _ in range(K):
                x, y = regression_batch(b, gen)
                scale = math.nan if len(micro) == poison else 1.0  # a NaN gradient at step `poison`
                (scale * 0.5 * (model(x).squeeze(1) - y).square().mean() / K).backward()
                grads.append(micro_gradient(x, y))
            micro.append(torch.stack(grads))
            mon.step()
    writer.close()
    return read(tmp_path), micro


def hand_estimates(micro, b):
    """Per step (|G|^2, tr(Sigma)) from its micro-batch gradients (each of b samples), computed here."""
    out = []
    for grads in micro:
        n = len(grads)
        small = grads.square().sum(1).mean()  # mean |G_small|^2, B_small = b
        big = grads.mean(0).square().sum()  # |G_big|^2, B_big = n b
        g_sq = (n * b * big - b * small) / (n * b - b)
        tr = (small - big) / (1 / b - 1 / (n * b))
        out.append((g_sq.item(), tr.item()))
    return torch.tensor(out, dtype=torch.float64)


def ema(values, beta):
    m, out = torch.zeros(values.shape[1:], dtype=torch.float64), []
    for t, v in enumerate(values, 1):
        m = beta * m + (1 - beta) * v
        out.append(m / (1 - beta**t))
    return torch.stack(out)


def test_logged_estimates_equal_a_hand_computation_from_the_micro_batch_gradients(tmp_path):
    K, b, beta, steps = 3, 5, 0.5, 4
    ea, micro = run_accumulation(tmp_path, steps, K, b, beta)
    expected = ema(hand_estimates(micro, b), beta)  # bias-corrected moving averages (g_sq, tr)
    for tag, col in (("noise/g_sq", 0), ("noise/tr_sigma", 1)):
        logged = scalar(ea, tag)
        assert sorted(logged) == list(range(steps))
        # float32 sums of squares of O(1) numbers and a difference of them: rtol 1e-4 covers it
        assert [logged[t] for t in range(steps)] == pytest.approx(expected[:, col].tolist(), rel=1e-4, abs=1e-5)
    ratio = scalar(ea, "noise/B_simple")
    assert [ratio[t] for t in range(steps)] == pytest.approx((expected[:, 1] / expected[:, 0]).tolist(), rel=1e-4)


def test_a_non_finite_step_is_left_out_of_the_moving_averages(tmp_path):
    K, b, beta, steps = 2, 4, 0.5, 5
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        ea, micro = run_accumulation(tmp_path, steps, K, b, beta, poison=2)
    kept = [0, 1, 3, 4]
    expected = ema(hand_estimates([micro[t] for t in kept], b), beta)  # as if step 2 never happened
    expected = torch.cat([expected[:2], expected[1:2], expected[2:]])  # step 2 repeats step 1
    ratio, g_sq = scalar(ea, "noise/B_simple"), scalar(ea, "noise/g_sq")
    assert [ratio[t] for t in range(steps)] == pytest.approx((expected[:, 1] / expected[:, 0]).tolist(), rel=1e-4)
    assert [g_sq[t] for t in range(steps)] == pytest.approx(expected[:, 0].tolist(), rel=1e-4, abs=1e-5)


def delta_method_sd(per_step, weights, g_true, tr_true):
    """sd of sum(w tr) / sum(w g) for i.i.d. per-step (g, tr) pairs, to first order."""
    cov = torch.cov(per_step.T)  # [[var g, cov], [cov, var tr]]
    w2 = (weights / weights.sum()).square().sum()
    grad = torch.tensor([-tr_true / g_true**2, 1 / g_true], dtype=torch.float64)  # d(T/G)/d(G, T)
    return math.sqrt(w2 * (grad @ cov @ grad))


def assert_logged_b_simple_near_the_closed_form(ea, per_step, beta):
    """The last logged B_simple, a ratio of moving averages (decay beta) of the per-step
    estimates: within 4 sd of the closed form (delta method, sd from the per-step spread), with
    the sd small enough to tell 9 from, say, the 4 of a missing factor."""
    steps = len(per_step)
    weights = beta ** torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    sd = delta_method_sd(per_step, weights, G_SQ, TR_SIGMA)
    logged = scalar(ea, "noise/B_simple")[steps - 1]
    assert sd < 0.15 * B_SIMPLE
    assert abs(logged - B_SIMPLE) < 4 * sd, (logged, B_SIMPLE, sd)


def test_noise_scale_from_gradient_accumulation_lands_on_the_closed_form(tmp_path):
    K, b, beta, steps = 4, 8, 0.99, 600
    ea, micro = run_accumulation(tmp_path, steps, K, b, beta)
    per_step = hand_estimates(micro, b)
    # the per-step estimators are unbiased: their means are within 4 standard errors of the truth
    mean, se = per_step.mean(0), per_step.std(0) / math.sqrt(steps)
    assert abs(mean[0] - G_SQ) < 4 * se[0] and abs(mean[1] - TR_SIGMA) < 4 * se[1], (mean, se)
    assert_logged_b_simple_near_the_closed_form(ea, per_step, beta)


def test_one_micro_batch_on_one_rank_logs_no_noise_scale(tmp_path):
    ea, _ = run_accumulation(tmp_path, 3, K=1, b=8, ema=0.9)
    assert not any(t.startswith("noise/") for t in ea.Tags()["scalars"])
    assert "grad/norm/model" in ea.Tags()["scalars"]


def watch_hooks(tmp_path, model, steps, backwards, seen, **monitor_kw):
    """``steps`` monitored steps (no update) of ``backwards(step)`` micro-batches of 4 samples;
    ``seen(model)`` recorded before each. Returns those and the logged noise/B_simple steps."""
    writer = SummaryWriter(tmp_path)
    gen = torch.Generator().manual_seed(0)
    out = []
    with GradientMonitor(model, writer, **monitor_kw) as mon:
        for step in range(steps):
            out.append(seen(model))
            for _ in range(backwards(step)):
                x, y = regression_batch(4, gen)
                (model(x).squeeze(1) - y).square().mean().backward()
            mon.step()
            model.zero_grad()
    writer.close()
    return out, sorted(scalar(read(tmp_path), "noise/B_simple"))


def test_noise_hooks_exist_on_logging_steps_only(tmp_path):
    model = regression_model()
    armed, logged = watch_hooks(tmp_path, model, 6, lambda step: 2, lambda m: bool(m.weight._backward_hooks), every=3)
    assert armed == [True, False, False, True, False, False]
    assert not model.weight._backward_hooks and not model._forward_pre_hooks  # close() removed them
    assert logged == [0, 3]


def test_unbiased_estimators_recover_known_norms():
    # E|g_B|^2 = |G|^2 + tr/B at two sizes gives back |G|^2 and tr exactly
    g_sq, tr = noise.estimates(torch.tensor(2.0 + 9.0 / 4), torch.tensor(2.0 + 9.0 / 32), 4, 32)
    assert g_sq.item() == pytest.approx(2.0) and tr.item() == pytest.approx(9.0)


@pytest.mark.parametrize("flat_max", [None, 4, 0], ids=["all-in-buffer", "mixed", "none-in-buffer"])
def test_cosine_with_the_previous_logged_gradient_equals_a_hand_computation(tmp_path, monkeypatch, flat_max):
    # the dots come from the gradient check's buffer (stats.FiniteCheck) for tensors of up to
    # FLAT_MAX elements, one by one for the others: here all, the biases (4 and 3) only, none
    if flat_max is not None:
        monkeypatch.setattr(stats.FiniteCheck, "FLAT_MAX", flat_max)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    writer = SummaryWriter(tmp_path)
    logged_grads = {}
    with GradientMonitor(model, writer, optimizer=opt, every=2):
        for step in range(5):
            opt.zero_grad()
            x = torch.randn(6, 5)
            model(x).square().mean().backward()
            if step % 2 == 0:
                logged_grads[step] = {n: torch.cat([model[int(n)].weight.grad.flatten(), model[int(n)].bias.grad.flatten()])
                                      for n in ("0", "2")}
            opt.step()
    writer.close()
    ea = read(tmp_path)
    for n in ("0", "2"):
        cos = scalar(ea, f"grad/cosine_prev/{n}")
        assert sorted(cos) == [2, 4]  # nothing at the first logging step
        for step, prev in ((2, 0), (4, 2)):
            g, q = logged_grads[step][n].double(), logged_grads[prev][n].double()
            assert cos[step] == pytest.approx((g @ q / (g.norm() * q.norm())).item(), rel=1e-5, abs=1e-6)


def test_noise_scale_and_cosine_read_nothing_on_the_host_but_the_one_transfer(tmp_path):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path)
    per_step = []
    with GradientMonitor(model, writer, optimizer=opt, every=3):
        for _ in range(7):
            with HostReads() as c:  # the whole step: forwards, backwards (the hooks), the update
                opt.zero_grad()
                for _ in range(2):
                    x, y = regression_batch(4, gen)
                    (0.5 * (model(x).squeeze(1) - y).square().mean() / 2).backward()
                opt.step()
            per_step.append(c.calls)
    writer.close()
    assert per_step == [["cpu"], [], [], ["cpu"], [], [], ["cpu"]]
    tags = read(tmp_path).Tags()["scalars"]
    assert "noise/B_simple" in tags and "grad/cosine_prev/2" in tags  # both were measured


def test_under_compile_the_noise_scale_needs_batch_size_and_then_equals_eager(tmp_path):
    def run(compiled, batch_size, logdir):
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(0)
        model = regression_model()
        forward = torch.compile(model) if compiled else model
        writer = SummaryWriter(logdir)
        with GradientMonitor(model, writer, every=2, batch_size=batch_size) as mon:
            for _ in range(5):
                model.zero_grad()
                for _ in range(2):
                    x, y = regression_batch(4, gen)
                    (0.5 * (forward(x).squeeze(1) - y).square().mean() / 2).backward()
                mon.step()
        writer.close()
        return read(logdir)

    eager = scalar(run(False, None, tmp_path / "eager"), "noise/B_simple")
    assert sorted(eager) == [0, 2, 4]
    assert scalar(run(True, 4, tmp_path / "given"), "noise/B_simple") == pytest.approx(eager, rel=1e-5)
    with pytest.warns(RuntimeWarning, match="pass batch_size="):
        ea = run(True, None, tmp_path / "hidden")
    assert not any(t.startswith("noise/") for t in ea.Tags()["scalars"])


def test_batch_size_hook_leaves_a_one_backward_run_and_returns_with_accumulation(tmp_path):
    # one process: the model's batch-size hook goes at the first logging step with one backward
    # (no noise scale possible there), comes back at the first logging step with two backwards
    # (that step has no batch size, so no noise scale) and stays; from the next logging step on
    # the noise scale is logged
    hooked, logged = watch_hooks(tmp_path, regression_model(), 8, lambda step: 1 if step < 4 else 2,
                                 lambda m: bool(m._forward_pre_hooks), every=2)
    assert hooked == [True, False, False, False, False, True, True, True]
    assert logged == [6]


def test_after_one_backward_one_parameter_hook_counts_backwards_until_accumulation_appears(tmp_path):
    # batch_size given (no model hook): after the logging step 0 with one backward, logging
    # steps hook the first parameter only (to count backward passes); step 4 has two: its
    # micro-batch norms were not taken (no noise scale), every hook is back from step 6 on
    torch.manual_seed(0)
    hooked, logged = watch_hooks(tmp_path, torch.nn.Linear(D, 1), 8, lambda step: 1 if step < 4 else 2,
                                 lambda m: [len(p._backward_hooks or {}) for p in (m.weight, m.bias)],
                                 every=2, batch_size=4)
    assert hooked == [[1, 1], [0, 0], [1, 0], [0, 0], [1, 0], [0, 0], [1, 1], [0, 0]]
    assert logged == [6]
