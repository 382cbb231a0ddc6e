"""LSTM, GRU and RNN layers, forward + backward: manualgrad.nn against torch.nn, same weights, in one
process, alternating step by step, float32 on the CPU.

Default (issue 12): 2 layers, input 256, hidden 256, sequence 64, batch 32; the loss is the sum
of the output sequence times a fixed random tensor, so every step's output gets a gradient.
Prints per layer type the median fwd+bwd time of each, their ratio (manualgrad / torch; target
<= 1.25) and the unique bytes each saves for backward (deduplicated by storage, parameters and
input excluded; target: no more than torch). Note: torch runs its LSTM on oneDNN on the CPU
(one fused kernel per layer), its GRU and RNN as per-step ATen ops.

Where the LSTM's gap is (default sizes, 1 thread, CPU time, ours/torch alternating in one process,
an AVX-512 machine): LSTM 2.2-2.3x torch, but 1.08x torch with oneDNN switched off
(torch.backends.mkldnn.flags(enabled=False), torch's per-step ATen LSTM); GRU 1.02x, RNN 0.95x.
About 3/4 of our step is matmuls, the same products and flops as torch's, at MKL sgemm's speed;
oneDNN's fused kernel runs the per-step product (32 x 256 by 256 x 1024) about 2x faster with
its packed weights (torch.ops.mkldnn._linear_pointwise: 0.086 ms vs F.linear 0.174 ms). Removing
the backward's per-step cat (a preallocated gate-gradient buffer) measured no gain.

    python benchmarks/bench_rnn.py [--steps 20] [--warmup 3] [--layers LSTM GRU RNN]
        [--input 256] [--hidden 256] [--seq 64] [--batch 32] [--num-layers 2]
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import manualgrad  # noqa: E402
from manualgrad.testing import saved_bytes  # noqa: E402


def bench(name, args):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(args.input, args.hidden, num_layers=args.num_layers)
    ours = getattr(manualgrad.nn, name)(args.input, args.hidden, num_layers=args.num_layers)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(args.seq, args.batch, args.input, requires_grad=True)
    weight = torch.randn(args.seq, args.batch, args.hidden)

    def loss(m):
        return (m(x)[0] * weight).sum()

    runs = {"manualgrad": ours, "torch": theirs}
    nbytes = {k: saved_bytes(lambda: loss(m), exclude=list(m.parameters()) + [x])[0] for k, m in runs.items()}
    times = {k: [] for k in runs}
    for i in range(args.warmup + args.steps):
        for k, m in runs.items():
            m.zero_grad(set_to_none=True)
            x.grad = None
            t0 = time.perf_counter()
            loss(m).backward()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[k].append(dt)
    med = {k: statistics.median(ts) for k, ts in times.items()}
    print(f"{name} {args.num_layers} layers, input {args.input}, hidden {args.hidden}, seq {args.seq}, "
          f"batch {args.batch}: fwd+bwd, median of {args.steps} alternating steps")
    for k in runs:
        print(f"  {k:<12} {med[k] * 1e3:8.2f} ms/step   saved for backward {nbytes[k] / 2**20:7.2f} MiB")
    print(f"  time ratio manualgrad/torch: {med['manualgrad'] / med['torch']:.3f}   "
          f"saved-bytes ratio: {nbytes['manualgrad'] / nbytes['torch']:.3f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation (median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", nargs="+", choices=["LSTM", "GRU", "RNN"], default=["LSTM", "GRU", "RNN"])
    p.add_argument("--input", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=2)
    args = p.parse_args()
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32 CPU")
    for name in args.layers:
        bench(name, args)


if __name__ == "__main__":
    main()
