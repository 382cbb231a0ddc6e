"""LSTM, GRU and RNN layers, forward + backward: manualgrad.nn against torch.nn, same weights, in one
process, alternating step by step, float32 on the CPU.

Default (issue 12): 2 layers, input 256, hidden 256, sequence 64, batch 32; the loss is the sum
of the output sequence times a fixed random tensor, so every step's output gets a gradient.
Prints per layer type the median fwd+bwd time of each, their ratio (manualgrad / torch; target
<= 1.25) and the unique bytes each saves for backward (deduplicated by storage, parameters and
input excluded; target: no more than torch). Note: torch runs its LSTM on oneDNN on the CPU
(one fused kernel per layer), its GRU and RNN as per-step ATen ops.

Where the LSTM's time goes (default sizes, 1 thread, ours/torch alternating in one process, an
AVX-512 AMD EPYC shared with other jobs, so +-5%). Before: 2.2-2.3x torch (its oneDNN LSTM), 1.08x
torch's per-step ATen LSTM (oneDNN off). The gap was the products: MKL's sgemm runs at about half
oneDNN's speed on this CPU (the per-step 32 x 256 by 256 x 1024: 161 us vs 78-85 us with oneDNN's
packed weight; a 2048 x 256 by 256 x 1024 over all steps: 9.0 ms vs 3.8-4.3 ms). Now: LSTM
1.16-1.27x (CPU time, several runs; this bench's wall time 1.20-1.22x), GRU 1.01x, RNN 0.92-0.95x.
The LSTM runs ops/recurrent_fast.py on a padded float32 batch: every product on oneDNN
(torch.ops.mkldnn._linear_pointwise, forward-only, as torch's own LSTM), one sigmoid for the four
gates, outputs written in place (8 elementwise ops and one product per step forward, 4 and one
backward). Of ours (about 83-95 ms CPU time to torch's 71-74):
- the products, the same ones torch's fused kernel computes: 0.87-0.88x torch on their own
  (per layer: input projection, 64 + 64 per-step products, dx, dW_ih, dW_hh; oneDNN costs about
  10 us per call on top of the flops, 2.6 ms over 256 per-step calls);
- per layer about 2 ms forward elementwise (the step's gates arrive cold from the input
  projection) and 7 ms backward: the local derivatives of all steps (1.8 ms, ~14 passes over
  (N, H)), contiguous transposes for the weight gradients (dG^T, x^T, h^T: 1.5-2 ms), the
  per-step elementwise (1.8 ms), weight packing and views (0.9 ms), db (0.5 ms).
The Python + dispatch floor is small by comparison: 1,536 elementwise ops x 0.75-1.5 us = 1.2-2.3 ms.
With oneDNN off (torch.backends.mkldnn.flags(enabled=False)) the fast form uses torch.addmm / mm
and runs at 1.94-1.97x torch's oneDNN LSTM (the reference form: 2.08-2.11x), about 0.94x torch's per-step ATen LSTM.

    python benchmarks/bench_rnn.py [--steps 20] [--warmup 3] [--threads 1] [--layers LSTM GRU RNN]
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
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the figures are for 1)")
    p.add_argument("--layers", nargs="+", choices=["LSTM", "GRU", "RNN"], default=["LSTM", "GRU", "RNN"])
    p.add_argument("--input", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32 CPU")
    for name in args.layers:
        bench(name, args)


if __name__ == "__main__":
    main()
