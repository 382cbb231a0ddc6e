"""GradientMonitor overhead on the seed MLP (784-1024-1024-1024-10, ReLU), Adam, batch 128:
the same training step with and without the monitor, in the same process, alternating step by
step. The monitor logs to a SummaryWriter in a temporary directory.

Two cadences: the default (every=50, hist_every=1000: targets <= 1.03x) and scalars every
step (every=1, no histograms: target <= 1.25x). The ratio is total monitored time over total
plain time across all timed steps, so the cost of the logging steps is amortised as in a run.

    python benchmarks/bench_monitor.py [--steps 1000] [--batch 128] [--activations]
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
from train.models import seed_mlp  # noqa: E402


def build(seed):
    torch.manual_seed(seed)
    model = seed_mlp(nn=mnn)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def step(model, opt, loss_fn, x, y):
    loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run(cadence, steps, batch, warmup, activations):
    from torch.utils.tensorboard import SummaryWriter

    loss_fn = mnn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(8, batch, 784, generator=g)
    ys = torch.randint(0, 10, (8, batch), generator=g)
    plain, (watched, wopt) = build(0), build(0)
    with tempfile.TemporaryDirectory() as d:
        writer = SummaryWriter(d)
        with GradientMonitor(watched, writer, optimizer=wopt, activations=activations, **cadence):
            times = {"plain": 0.0, "monitor": 0.0}
            for i in range(warmup + steps):
                x, y = xs[i % 8], ys[i % 8]
                order = (("plain", plain), ("monitor", (watched, wopt)))
                if i % 2:
                    order = order[::-1]  # alternate who goes first
                for name, (model, opt) in order:
                    t0 = time.perf_counter()
                    step(model, opt, loss_fn, x, y)
                    if i >= warmup:
                        times[name] += time.perf_counter() - t0
        writer.close()
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="timed steps per configuration (each side)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--activations", action="store_true", help="also monitor activations")
    args = p.parse_args()
    print(f"seed MLP, Adam, batch {args.batch}, {args.steps} timed steps each, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, activations={args.activations}")
    for label, cadence, target in [
        ("every=50, hist_every=1000", dict(every=50, hist_every=1000), 1.03),
        ("every=1, no histograms  ", dict(every=1, hist_every=0), 1.25),
    ]:
        t = run(cadence, args.steps, args.batch, args.warmup, args.activations)
        ratio = t["monitor"] / t["plain"]
        print(f"{label}: plain {1e3 * t['plain'] / args.steps:7.2f} ms/step  monitor "
              f"{1e3 * t['monitor'] / args.steps:7.2f} ms/step  ratio {ratio:.3f}x  (target <= {target}x)")


if __name__ == "__main__":
    main()
