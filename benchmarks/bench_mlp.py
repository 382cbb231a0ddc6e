"""The seed MLP (784-1024-1024-1024-10, ReLU, cross-entropy), batch 512, one SGD step:
manualgrad.nn against torch.nn in the same process, alternating step by step.

Prints the median step time of each, their ratio (manualgrad / torch), and the unique bytes
each saves for backward (deduplicated by storage, parameters excluded).

    python benchmarks/bench_mlp.py [--steps 30] [--batch 512] [--attribute]

--attribute adds models in which only one family is manualgrad's (Linear, ReLU or
CrossEntropyLoss; the rest torch's), to see which one the step-time difference comes from.

--floor adds a model whose Linear, ReLU and loss are pass-through autograd Functions: torch's
own kernels forward and backward (addmm; mm and sum; relu, threshold_backward; log_softmax,
nll_loss and their backward kernels), called through
manualgrad's ``apply`` like every manualgrad op. Its ratio is what the Python Function
machinery alone costs, whatever the backward computes: a floor for any implementation made of
torch.autograd.Functions.
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
from manualgrad.ops._apply import apply  # noqa: E402
from manualgrad.testing import saved_bytes  # noqa: E402
from train.models import seed_mlp  # noqa: E402


class _TorchLinear(torch.autograd.Function):
    """y = x W^T + b with torch's kernels both ways, in the order of torch's AddmmBackward0."""

    @staticmethod
    def forward(x, w, b):
        return torch.addmm(b, x, w.t())

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        db = dy.sum(0) if need[2] else None
        dx = dy.mm(w) if need[0] else None
        dw = dy.t().mm(x) if need[1] else None
        return dx, dw, db


class _TorchReLU(torch.autograd.Function):
    """relu with torch's kernels both ways (threshold_backward: torch's own ReLU backward)."""

    @staticmethod
    def forward(x):
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(dy, y, 0)


class _TorchCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over class indices with torch's kernels both ways (log_softmax, nll_loss
    and their backward kernels)."""

    @staticmethod
    def forward(x, target):
        logp = torch.log_softmax(x, 1)
        return torch.nn.functional.nll_loss(logp, target), logp

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[1], output[1])

    @staticmethod
    def backward(ctx, dloss, _):
        target, logp = ctx.saved_tensors
        dlogp = torch.ops.aten.nll_loss_backward(dloss, logp, target, None, 1, -100, dloss.new_tensor(float(len(target))))
        return torch.ops.aten._log_softmax_backward_data(dlogp, logp, 1, logp.dtype), None


class _PassCrossEntropyLoss(torch.nn.CrossEntropyLoss):
    def forward(self, input, target):
        return apply(_TorchCrossEntropy, input, target)[0]


class _PassLinear(torch.nn.Linear):
    def forward(self, input):
        return apply(_TorchLinear, input, self.weight, self.bias)


class _PassReLU(torch.nn.ReLU):
    def forward(self, input):
        return apply(_TorchReLU, input)


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
    p.add_argument("--floor", action="store_true", help="also time pass-through Functions running torch's kernels")
    args = p.parse_args()

    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    runs = {"manualgrad": build(mnn, 0), "torch": build(torch.nn, 0)}
    if args.attribute:
        for family in ("Linear", "ReLU", "CrossEntropyLoss"):
            mixed = {n: getattr(mnn if n == family else torch.nn, n) for n in ("Linear", "ReLU", "CrossEntropyLoss")}
            runs[f"{family} only"] = build(types.SimpleNamespace(**mixed), 0)
    if args.floor:
        floor_nn = types.SimpleNamespace(Linear=_PassLinear, ReLU=_PassReLU, CrossEntropyLoss=_PassCrossEntropyLoss)
        runs["torch kernels in Functions"] = build(floor_nn, 0)

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
        elif name == "torch kernels in Functions":
            print(f"time ratio torch's own kernels in pass-through Functions/torch: {med[name] / med['torch']:.3f}")
    print(f"saved-bytes ratio manualgrad/torch: {runs['manualgrad'][3] / runs['torch'][3]:.3f}")


if __name__ == "__main__":
    main()
