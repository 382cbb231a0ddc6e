"""One forward+backward of a language-model head: 4096 tokens, hidden 1024, vocabulary 32768,
float32, mean cross-entropy. Three variants, each in its own process (so one's freed memory
does not hide another's peak):

    unfused     F.cross_entropy(F.linear(x, W), t)                       (torch)
    torch       F.linear_cross_entropy(x, W, t, options=LinearCrossEntropyOptions())  (torch, chunked)
    manualgrad  manualgrad.functional.linear_cross_entropy(x, W, t)
    gemms       only the three matrix products every exact method needs (logits x W^T, input
                gradient G W, weight gradient G^T x), on a stand-in G: a floor for the time

Prints the peak resident memory above the inputs (VmHWM after resetting it with
/proc/self/clear_refs, minus VmRSS once the inputs exist) and the wall time of the step. The
gradients alone (W 128 MB + x 16 MB) are the floor.

    python benchmarks/bench_lmhead.py [--tokens 4096] [--hidden 1024] [--vocab 32768]
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("unfused", "torch", "manualgrad", "gemms")


def _status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB -> bytes
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant, tokens, hidden, vocab):
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as TF

    import manualgrad.functional as F

    def run(x, w, t):
        if variant == "gemms":
            with torch.no_grad():
                g = x @ w.t()  #                                  logits (tokens, vocab)
                x.grad, w.grad = g @ w, g.t() @ x  #              (tokens, hidden), (vocab, hidden)
            return g[0, 0]
        if variant == "unfused":
            loss = TF.cross_entropy(TF.linear(x, w), t)
        elif variant == "torch":
            loss = TF.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions())
        else:
            loss = F.linear_cross_entropy(x, w, t)
        loss.backward()
        return loss

    # warm up the kernels and libraries on a small head, so their one-time memory is not counted
    torch.manual_seed(0)
    small = (torch.randn(64, 32, requires_grad=True), torch.randn(512, 32, requires_grad=True))
    run(*small, torch.randint(0, 512, (64,)))
    del small

    x = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    t = torch.randint(0, vocab, (tokens,))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    base = _status("VmRSS")
    start = time.perf_counter()
    loss = run(x, w, t)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - base
    print(json.dumps(dict(variant=variant, peak_mb=peak / 2**20, seconds=seconds, loss=loss.item(),
                          grad_w_norm=w.grad.norm().item(), grad_x_norm=x.grad.norm().item())))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.variant:
        child(args.variant, args.tokens, args.hidden, args.vocab)
        return

    floor = (args.vocab * args.hidden + args.tokens * args.hidden) * 4 / 2**20
    print(f"LM head: {args.tokens} tokens x hidden {args.hidden} x vocabulary {args.vocab}, float32; "
          f"gradient floor {floor:.0f} MB")
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = results[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"{variant:>10}: peak {r['peak_mb']:7.1f} MB above the inputs, {r['seconds']:6.2f} s, "
              f"loss {r['loss']:.6f}, |dW| {r['grad_w_norm']:.6f}, |dx| {r['grad_x_norm']:.6f}")
    mg, th, un = results["manualgrad"], results["torch"], results["unfused"]
    print(f"manualgrad peak / torch chunked peak: {mg['peak_mb'] / th['peak_mb']:.2f} (target <= 0.70)")
    print(f"manualgrad time / unfused time:       {mg['seconds'] / un['seconds']:.2f} (target <= 0.80)")
    print(f"three products alone / unfused time:  {results['gemms']['seconds'] / un['seconds']:.2f} "
          "(the floor of any exact method's ratio)")


if __name__ == "__main__":
    main()
