"""A ResNet-style CNN and a GPT-style decoder (benchmarks/models.py), forward + backward:
``manualgrad.convert(model, strict=True)`` against the same torch.nn model, in one process,
alternating step by step, float32 on the CPU.

Prints for each model the median fwd+bwd time of each, their ratio (manualgrad / torch; the
issue's target is <= 1.10), and the unique bytes each saves for backward (deduplicated by
storage, parameters excluded; target: no more than torch).

    python benchmarks/bench_blocks.py [--steps 20] [--warmup 3] [--models resnet gpt] [--attribute]

--attribute adds, per model, copies in which only one torch.nn class is swapped for its
manualgrad twin (Conv2d only, BatchNorm2d only, ...; the rest torch's), each timed in the same
alternation: which layers the step-time difference comes from, and by how much.
"""
import argparse
import copy
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import manualgrad  # noqa: E402
from benchmarks.models import gpt_small, resnet_small  # noqa: E402
from manualgrad.testing import saved_bytes  # noqa: E402


def resnet_case(batch=32):
    """ResNet, 32 -> 64 channels, batch 32 of 3x32x32, 10 classes."""
    model = resnet_small(channels=(32, 64))
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return f"ResNet 32-64 ch, batch {batch} x 3x32x32", model, lambda m, lf: lf(m(x), y), loss_fn


def gpt_case(batch=8):
    """GPT, ctx 128, d 256, 4 heads, 2 layers, vocabulary 4096."""
    model = gpt_small(vocab=4096, d=256, heads=4, layers=2, ctx=128)
    idx, targets = torch.randint(0, 4096, (batch, 128)), torch.randint(0, 4096, (batch, 128))
    return f"GPT d256 4 heads 2 layers ctx 128 vocab 4096, batch {batch}", model, lambda m, lf: m(idx, targets), None


CASES = {"resnet": resnet_case, "gpt": gpt_case}


def convert_only(module, family):
    """A copy of module with only its torch.nn ``family`` modules swapped for manualgrad's twins."""
    module = copy.deepcopy(module)
    twin = getattr(manualgrad.nn, family)
    for m in module.modules():
        if type(m) is twin.__bases__[0]:
            m.__class__ = twin
    return module


def families(*modules):
    """The torch.nn classes in these modules that manualgrad has a twin for (views excepted)."""
    supported = manualgrad.supported_modules()
    names = {type(m).__name__ for mod in modules if mod is not None for m in mod.modules() if type(m) in supported}
    return sorted(names - {"Flatten", "Unflatten"})


def bench(case, steps, warmup, attribute=False):
    torch.manual_seed(0)
    title, model, loss_of, loss_fn = CASES[case]()
    runs = {
        "manualgrad": (manualgrad.convert(copy.deepcopy(model), strict=True),
                       manualgrad.convert(copy.deepcopy(loss_fn), strict=True) if loss_fn is not None else None),
        "torch": (model, loss_fn),
    }
    if attribute:
        for family in families(model, loss_fn):
            runs[f"{family} only"] = (convert_only(model, family),
                                      convert_only(loss_fn, family) if loss_fn is not None else None)
    nbytes = {}
    for name, (m, lf) in runs.items():
        nbytes[name], _ = saved_bytes(lambda: loss_of(m, lf), exclude=list(m.parameters()))

    times = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, (m, lf) in runs.items():
            m.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss_of(m, lf).backward()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    print(f"{title}: fwd+bwd, median of {steps} alternating steps")
    for name in runs:
        print(f"  {name:<24} {med[name] * 1e3:8.2f} ms/step   saved for backward {nbytes[name] / 2**20:7.2f} MiB")
    print(f"  time ratio manualgrad/torch: {med['manualgrad'] / med['torch']:.3f}")
    for name in runs:
        if name.endswith(" only"):
            print(f"  time ratio {name} (rest torch's)/torch: {med[name] / med['torch']:.3f}")
    print(f"  saved-bytes ratio manualgrad/torch: {nbytes['manualgrad'] / nbytes['torch']:.3f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation (median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--attribute", action="store_true", help="also time copies with one manualgrad family each")
    args = p.parse_args()
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32 CPU")
    for case in args.models:
        bench(case, args.steps, args.warmup, args.attribute)


if __name__ == "__main__":
    main()
