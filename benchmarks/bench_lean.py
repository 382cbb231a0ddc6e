"""What a training step keeps for backward, and what it costs: torch, torch with selective
activation checkpointing (SAC), manualgrad, and manualgrad under ``manualgrad.lean()``.

Models (benchmarks/models.py), float32 on the CPU:
    gpt     GPT d 512, 8 heads, 4 layers, context 256, vocabulary 256, batch 8
    resnet  ResNet 32 -> 64 channels, batch 32 of 3x32x32, 10 classes

Variants:
    torch          the torch.nn model
    torch+SAC      each block (decoder block; stem and residual blocks) under
                   torch.utils.checkpoint with create_selective_checkpoint_contexts and a policy
                   that recomputes every pointwise op (torch.Tag.pointwise) and saves the rest
    torch+SAC-mm   the same with the common policy: save matrix products, convolutions,
                   attention and batch_norm, recompute the rest
    manualgrad     manualgrad.convert(model, strict=True)
    manualgrad+lean  the same, forward inside manualgrad.lean()

Columns:
    saved MiB      unique bytes kept for backward (testing.saved_bytes: every saved tensor's storage
                   once, parameters excluded). SAC keeps its tensors inside checkpoint's own
                   hooks, out of saved_bytes' sight: no figure.
    resident MiB   growth of the process's resident memory over the forward (VmRSS after minus
                   before, after a warm-up step), each variant in its own process, with glibc told
                   to mmap every allocation above 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed
                   tensors leave the resident set: what the forward leaves alive for backward,
                   plus the loss.
    ms/step        median fwd+bwd CPU time of --steps steps, variants alternating in one process,
                   one thread (torch.set_num_threads(1)). The machine is shared: absolute times
                   are noisy, ratios from the alternation less so.
    max batch      the largest batch whose resident growth fits --budget (default 1 GiB), from the
                   growth per sample (it is linear in the batch).

    python benchmarks/bench_lean.py [--models gpt resnet] [--steps 5] [--warmup 1] [--budget-gib 1]

Measured here (session 5, 7 steps, after the blocked causal attention backward; the README
has the tables):
    GPT     lean / torch: saved 0.624, time 1.021; lean / torch+SAC: resident 0.421, time 0.998;
            lean / torch+SAC-mm: resident 0.891, time 0.997; max batch 49 vs torch's 30.
    ResNet  lean / torch: saved 0.692, time 1.319 (manualgrad alone 1.168).
"""
import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import manualgrad  # noqa: E402
from benchmarks.models import BasicBlock, DecoderBlock, gpt_small, resnet_small  # noqa: E402
from manualgrad.testing import saved_bytes  # noqa: E402

VARIANTS = ("torch", "torch+SAC", "torch+SAC-mm", "manualgrad", "manualgrad+lean")


def gpt_case(batch=8):
    model = gpt_small(vocab=256, d=512, heads=8, layers=4, ctx=256)
    idx, targets = torch.randint(0, 256, (batch, 256)), torch.randint(0, 256, (batch, 256))
    return f"GPT d 512, 8 heads, 4 layers, ctx 256, vocab 256, batch {batch}", model, lambda m: m(idx, targets)


def resnet_case(batch=32):
    model = resnet_small(channels=(32, 64))
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    return f"ResNet 32-64 ch, batch {batch} x 3x32x32", model, lambda m: loss_fn(m(x), y)


CASES = {"gpt": (gpt_case, 8), "resnet": (resnet_case, 32)}


def _recompute_pointwise(ctx, op, *args, **kwargs):
    """The issue's policy: recompute every pointwise op, save every other op's output."""
    from torch.utils.checkpoint import CheckpointPolicy

    pointwise = torch.Tag.pointwise in getattr(op, "tags", ())
    return CheckpointPolicy.PREFER_RECOMPUTE if pointwise else CheckpointPolicy.MUST_SAVE


def _save_compute(ctx, op, *args, **kwargs):
    """The common policy (torchtitan's, say): save the outputs of the ops with FLOPs (matrix
    products, convolutions, attention) and batch_norm (whose recomputation would update the
    running statistics a second time); recompute everything else (pointwise ops, norms, views)."""
    from torch.utils.checkpoint import CheckpointPolicy

    name = op.name() if hasattr(op, "name") else str(op)
    heavy = any(k in name for k in ("mm", "matmul", "convolution", "scaled_dot_product", "batch_norm"))
    return CheckpointPolicy.MUST_SAVE if heavy else CheckpointPolicy.PREFER_RECOMPUTE


POLICIES = {"torch+SAC": _recompute_pointwise, "torch+SAC-mm": _save_compute}


def with_sac(model, policy):
    """Every DecoderBlock / BasicBlock (and the ResNet stem) runs under selective checkpointing."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    # (the cache may be written after it is filled: a ResNet's in-place relu writes batch_norm's output)
    context_fn = functools.partial(create_selective_checkpoint_contexts, policy, allow_cache_entry_mutation=True)
    targets = [m for m in model.modules() if isinstance(m, (DecoderBlock, BasicBlock))]
    if hasattr(model, "stem"):
        targets.append(model.stem)
    for m in targets:
        forward = m.forward
        m.forward = functools.partial(checkpoint, forward, use_reentrant=False, context_fn=context_fn)
    return model


def build(variant, model):
    if variant in POLICIES:
        return with_sac(model, POLICIES[variant])
    if variant.startswith("manualgrad"):
        return manualgrad.convert(model, strict=True)
    return model


def forward(variant, model, loss_of):
    if variant == "manualgrad+lean":
        with manualgrad.lean():
            return loss_of(model)
    return loss_of(model)


def _rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(case, variant, batch):
    """One variant in this process: resident growth over the forward, saved bytes."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _, model, loss_of = CASES[case][0](batch)
    model = build(variant, model)
    forward(variant, model, loss_of).backward()  # warm-up: kernels, libraries, gradient buffers
    before = _rss()
    loss = forward(variant, model, loss_of)
    grown = _rss() - before
    loss.backward()
    del loss
    nbytes = None
    if variant not in POLICIES:
        region = manualgrad.lean if variant == "manualgrad+lean" else torch.enable_grad
        with region():
            nbytes, _ = saved_bytes(lambda: loss_of(model), exclude=list(model.parameters()))
    print(json.dumps(dict(resident=grown, saved=nbytes)))


def timings(case, batch, steps, warmup):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _, model, loss_of = CASES[case][0](batch)
    import copy

    models = {v: build(v, copy.deepcopy(model)) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    grads = {}
    for i in range(warmup + steps):
        for v, m in models.items():
            m.zero_grad(set_to_none=True)
            t0 = time.process_time()
            forward(v, m, loss_of).backward()
            dt = time.process_time() - t0
            if i >= warmup:
                times[v].append(dt)
            grads[v] = [p.grad for p in m.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(grads["manualgrad"], grads["manualgrad+lean"]))
    return {v: statistics.median(t) for v, t in times.items()}, same


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", choices=sorted(CASES), default=["gpt", "resnet"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-gib", type=float, default=1.0)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # case variant batch
    args = p.parse_args()
    if args.child:
        case, variant, batch = args.child
        child(case, variant, int(batch))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    budget = args.budget_gib * 2**30
    for case in args.models:
        make, batch = CASES[case]
        title = make(batch)[0]
        mem = {}
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--child", case, v, str(batch)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            mem[v] = json.loads(out.strip().splitlines()[-1])
        ms, same = timings(case, batch, args.steps, args.warmup)
        print(f"{title}: fwd+bwd median of {args.steps} alternating steps (CPU time, 1 thread)")
        print(f"  {'variant':<16} {'saved MiB':>10} {'resident MiB':>13} {'ms/step':>9} {'max batch':>10}")
        for v in VARIANTS:
            saved = mem[v]["saved"]
            res = mem[v]["resident"]
            print(f"  {v:<16} {'-' if saved is None else f'{saved / 2**20:.1f}':>10} {res / 2**20:13.1f} "
                  f"{ms[v] * 1e3:9.1f} {int(budget // (res / batch)):10d}")
        t, lean = mem["torch"], mem["manualgrad+lean"]
        print(f"  lean / torch: saved {lean['saved'] / t['saved']:.3f}, resident {lean['resident'] / t['resident']:.3f}, "
              f"time {ms['manualgrad+lean'] / ms['torch']:.3f}")
        for v in POLICIES:
            print(f"  lean / {v}: resident {lean['resident'] / mem[v]['resident']:.3f}, "
                  f"time {ms['manualgrad+lean'] / ms[v]:.3f}")
        print(f"  manualgrad / torch: saved {mem['manualgrad']['saved'] / t['saved']:.3f}, "
              f"time {ms['manualgrad'] / ms['torch']:.3f}")
        print(f"  gradients under lean() equal manualgrad's bit for bit: {same}")


if __name__ == "__main__":
    main()
