"""GradientMonitor overhead: the same training step with and without the monitor, in the same
process, alternating step by step. The monitor logs to a SummaryWriter in a temporary directory.

Two models: ``small`` (64-128-128-10 MLP with ReLU, SGD, batch 256: a step of about 0.7 ms on
one CPU thread, where the monitor's fixed per-step cost shows) and ``seed`` (the seed MLP
784-1024-1024-1024-10, Adam, batch 128). Two cadences: the default (every=50, hist_every=1000:
target <= 1.03x) and scalars every step (every=1, no histograms: target <= 1.25x). Two
NaN-origin modes: ``parameters`` (the default: every gradient and parameter checked every step) and
``trace`` (every module and manualgrad Function call traced too). The ratio is the monitored
run's CPU time (the process's, so the SummaryWriter's thread counts) over the plain run's, over
all timed steps: the logging steps are amortised as in a run, and CPU time rather than wall time
keeps the ratio usable on a machine shared with other work. ``--floor`` also times what the
monitor cannot go below without it: the per-step sums of parameters and gradients, the monitor's
check of gradients and parameters alone in optimizer hooks, hooks on every module (with and
without summing the activations), one logging step's events (the writer's and the layer runs').

    python benchmarks/bench_monitor.py [--models small seed] [--steps 1000] [--floor] [--activations]
"""
import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import manualgrad.nn as mnn  # noqa: E402
from manualgrad.monitor import GradientMonitor  # noqa: E402
from manualgrad.monitor.stats import FiniteCheck  # noqa: E402
from train.models import seed_mlp  # noqa: E402


def small_mlp(nn=mnn):
    return torch.nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


MODELS = {  # name: (builder, input features, batch, optimizer)
    "small": (small_mlp, 64, 256, lambda p: torch.optim.SGD(p, lr=1e-2)),
    "seed": (seed_mlp, 784, 128, lambda p: torch.optim.Adam(p, lr=1e-3)),
}


def build(name, seed):
    builder, _, _, make_opt = MODELS[name]
    torch.manual_seed(seed)
    model = builder(nn=mnn)
    return model, make_opt(model.parameters())


def step(model, opt, loss_fn, x, y):
    loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run(name, cadence, steps, warmup, activations, origin="trace"):
    from torch.utils.tensorboard import SummaryWriter

    _, features, batch, _ = MODELS[name]
    loss_fn = mnn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(8, batch, features, generator=g)
    ys = torch.randint(0, 10, (8, batch), generator=g)
    plain, (watched, wopt) = build(name, 0), build(name, 0)
    with tempfile.TemporaryDirectory() as d:
        writer = SummaryWriter(d)
        with GradientMonitor(watched, writer, optimizer=wopt, activations=activations, origin=origin, **cadence):
            times = {"plain": 0.0, "monitor": 0.0}
            for i in range(warmup + steps):
                x, y = xs[i % 8], ys[i % 8]
                order = (("plain", plain), ("monitor", (watched, wopt)))
                if i % 2:
                    order = order[::-1]  # alternate who goes first
                for who, (model, opt) in order:
                    t0 = time.process_time()
                    step(model, opt, loss_fn, x, y)
                    if i >= warmup:
                        times[who] += time.process_time() - t0
        writer.close()
    return times


def floor(name, steps, warmup):
    """Floors ((0)-(c) without the monitor): (0) one float32 sum per parameter and per gradient (what
    every step checked before session 6); (0') the check of a non-logging step, gradients and
    parameters (one stats.FiniteCheck in an optimizer step pre-hook, the step's rows kept and
    stacked every 50 steps, with a post-hook doing nothing); (a) a forward hook on every module and a tensor hook on
    every activation, doing nothing; (b) the same hooks keeping references, then one float32
    sum per activation and activation gradient (what origin='trace' reads); (c) one event of
    the scalars logged per step handed to a SummaryWriter (its thread computes the record's
    CRC in pure Python: ~150 us per KB); (d) the monitor at every=10^9: its every-step check and
    bookkeeping without logging steps. CPU time against the plain step, each variant alternating
    with a plain twin of its own."""
    _, features, batch, _ = MODELS[name]
    loss_fn = mnn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, features, generator=g), torch.randint(0, 10, (batch,), generator=g)
    kept = []

    def keep_hook(module, args, out):
        kept.append(out)
        if out.requires_grad:
            out.register_hook(kept.append)

    def noop_hook(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda grad: None)

    from torch.utils.tensorboard import SummaryWriter

    from manualgrad.monitor import tensorboard as tb

    def make(label, hook):
        model, opt = build(name, 0)
        if hook is not None:
            for m in model.modules():
                m.register_forward_hook(hook)
        if label == "gradient + parameter check":
            params, rows = list(model.parameters()), []
            check = FiniteCheck([p.detach() for p in params] * 2, x.device)

            def pre(opt, args, kwargs, params=params, rows=rows, check=check):
                rows.append(check([p.grad for p in params] + params))
                if len(rows) == 50:
                    torch.stack(rows); rows.clear()

            opt.register_step_pre_hook(pre)
            opt.register_step_post_hook(lambda opt, args, kwargs: None)
        return model, opt

    # (c) the scalars the monitor logs per step (every=1), as one event, with nothing computed
    n_mod = sum(1 for m in build(name, 0)[0].modules() if not list(m.children()) and list(m.parameters()))
    tags = [f"{stat}/{k}" for stat in ("grad/norm", "grad/max_abs", "param/norm", "update/ratio",
                                       "update/log10_ratio", "nonfinite") for k in range(n_mod)]
    tags += ["global/grad_norm", "global/lr/group0", "global/nonfinite"]
    values = [0.5] * len(tags)
    variants = (("parameter + gradient sums", None), ("gradient + parameter check", None),
                ("hooks only", noop_hook), ("hooks + sums", keep_hook), ("one writer event", None))
    ratios, plain_total = {}, 0.0
    with tempfile.TemporaryDirectory() as d:
        writer = SummaryWriter(d)
        # each variant against a plain twin, the two alternating (as ``run`` times the monitor:
        # more models in one loop would leave every step's caches colder)
        for label, hook in variants:
            runs = {"plain": make("plain", None), label: make(label, hook)}
            times = dict.fromkeys(runs, 0.0)
            for i in range(warmup + steps):
                for who, (model, opt) in (runs.items() if i % 2 else reversed(runs.items())):
                    t0 = time.process_time()
                    loss = loss_fn(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if who == "hooks + sums":
                        [t.sum(dtype=torch.float32) for t in kept]
                        kept.clear()
                    if who == "parameter + gradient sums":  # what every step checks in any mode
                        with torch.no_grad():
                            [t.sum(dtype=torch.float32) for p in model.parameters() for t in (p, p.grad)]
                    opt.step()
                    if who == "one writer event":
                        tb.write_scalars(writer, i, tags, values)
                    if i >= warmup:
                        times[who] += time.process_time() - t0
            kept.clear()
            ratios[label] = times[label] / times["plain"]
            plain_total += times["plain"]
        tb.close_layer_runs(writer)  # before the directory goes
        writer.close()
    # the monitor without its logging steps: every=10^9 logs step 0 only (its per-step check and
    # bookkeeping alone)
    t = run(name, dict(every=10**9, hist_every=0), steps, warmup, False, "parameters")
    ratios["monitor, never logging"] = t["monitor"] / t["plain"]
    return ratios, 1e3 * plain_total / (steps * len(variants))


CADENCES = [
    ("every=50, hist_every=1000", dict(every=50, hist_every=1000), 1.03),
    ("every=1, no histograms  ", dict(every=1, hist_every=0), 1.25),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--cadences", nargs="+", type=int, choices=range(len(CADENCES)), default=range(len(CADENCES)),
                   help="indices into the cadence list (0: default, 1: every step)")
    p.add_argument("--steps", type=int, default=1000, help="timed steps per configuration (each side)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--activations", action="store_true", help="also monitor activations")
    p.add_argument("--floor", action="store_true", help="also time the floor of per-step tracing (hooks, sums)")
    p.add_argument("--origin", nargs="+", choices=["trace", "parameters"], default=["trace", "parameters"],
                   help="NaN-origin tracing modes to measure")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {args.steps} timed steps each, "
          f"activations={args.activations}")
    for name in args.models:
        _, features, batch, _ = MODELS[name]
        if args.floor:
            ratios, plain_ms = floor(name, args.steps, args.warmup)
            print(f"{name:5s} (batch {batch}) floors: plain {plain_ms:.3f} ms/step, "
                  + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items() if k != "plain"), flush=True)
        for c in args.cadences:
          for origin in args.origin:
            label, cadence, target = CADENCES[c]
            t = run(name, cadence, args.steps, args.warmup, args.activations, origin)
            ratio = t["monitor"] / t["plain"]
            print(f"{name:5s} (batch {batch}) {label} origin={origin:12s}: plain {1e3 * t['plain'] / args.steps:7.3f} ms/step  monitor "
                  f"{1e3 * t['monitor'] / args.steps:7.3f} ms/step  ratio {ratio:.3f}x  (target <= {target}x)", flush=True)


if __name__ == "__main__":
    main()
