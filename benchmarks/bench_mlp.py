"""The seed MLP (784-1024-1024-1024-10, ReLU, cross-entropy), batch 512, one SGD step:
manualgrad.nn against torch.nn in the same process, alternating step by step.

Prints the median step time of each, their ratio (manualgrad / torch), and the unique bytes
each saves for backward (deduplicated by storage, parameters excluded).

    python benchmarks/bench_mlp.py [--steps 30] [--batch 512] [--attribute]

--attribute adds models in which only one family is manualgrad's (Linear, ReLU or
CrossEntropyLoss; the rest torch's), to see which one the step-time difference comes from.
"""
import argparse
import pathlib
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import manualgrad.nn as mnn  # noqa: E402
from manualgrad.testing import saved_bytes  # noqa: E402
from train.models import seed_mlp  # noqa: E402


def build(nn, seed):
    torch.manual_seed(seed)
    model = seed_mlp(nn=nn)
    return model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.01)


def step(model, loss_fn, opt, x, y):
    loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30, help="timed steps per implementation (median is reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--attribute", action="store_true", help="also time models with one manualgrad family each")
    args = p.parse_args()

    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    runs = {"manualgrad": build(mnn, 0), "torch": build(torch.nn, 0)}
    if args.attribute:
        for family in ("Linear", "ReLU", "CrossEntropyLoss"):
            mixed = {n: getattr(mnn if n == family else torch.nn, n) for n in ("Linear", "ReLU", "CrossEntropyLoss")}
            runs[f"{family} only"] = build(types.SimpleNamespace(**mixed), 0)

    for name, (model, loss_fn, _) in runs.items():
        nbytes, _ = saved_bytes(lambda: loss_fn(model(x), y), exclude=list(model.parameters()))
        runs[name] += (nbytes,)

    times = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name, (model, loss_fn, opt, _) in runs.items():
            t0 = time.perf_counter()
            step(model, loss_fn, opt, x, y)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"seed MLP 784-1024-1024-1024-10, batch {args.batch}, SGD step, "
          f"median of {args.steps} alternating steps, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name in runs:
        print(f"  {name:<22} {med[name] * 1e3:8.2f} ms/step   saved for backward {runs[name][3] / 2**20:7.2f} MiB")
    print(f"time ratio manualgrad/torch: {med['manualgrad'] / med['torch']:.3f}")
    for name in runs:
        if name.endswith(" only"):
            print(f"time ratio {name} (rest torch's)/torch: {med[name] / med['torch']:.3f}")
    print(f"saved-bytes ratio manualgrad/torch: {runs['manualgrad'][3] / runs['torch'][3]:.3f}")


if __name__ == "__main__":
    main()
