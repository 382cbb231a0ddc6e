"""Forward + backward (or, with --backward-only, backward) time of manualgrad's normalization, activation, convolution and padding ops against torch's.

Prints ours / torch for each op at a realistic size (single thread by default). Each rep times
one forward and backward of ours and of torch in alternation; the ratio is of the medians, so a
neighbour that loads the CPU for a while hits both sides alike.

Two things make single-op ratios swing between runs, and both are off by default:
- wall time counts whatever else runs on the machine: the clock is the process's CPU time
  (``--clock wall`` for wall time);
- glibc returns freed multi-MB buffers to the kernel, so whichever side gets a fresh buffer pays
  1,000-3,000 page faults per rep (a 0.3x and a 1.9x for the same case in back-to-back runs):
  the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
  set so freed buffers are reused, as they are in a training loop (``--fresh-buffers`` leaves
  glibc's defaults).

    python benchmarks/bench_ops.py [--reps 200] [--threads 1] [--only NAME] [--backward-only]
                                   [--clock cpu|wall] [--fresh-buffers]
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.testing import saved_bytes


def cases():
    def ln_inputs():
        x = torch.randn(64, 128, 256, requires_grad=True)
        w = torch.randn(256, requires_grad=True)
        b = torch.randn(256, requires_grad=True)
        return (x, w, b)

    def gn_inputs():
        x = torch.randn(32, 64, 16, 16, requires_grad=True)
        w = torch.randn(64, requires_grad=True)
        b = torch.randn(64, requires_grad=True)
        return (x, w, b)

    def bn_inputs(shape=(32, 64, 16, 16)):
        def make():
            x = torch.randn(shape, requires_grad=True)
            w = torch.randn(shape[1], requires_grad=True)
            b = torch.randn(shape[1], requires_grad=True)
            return (x, w, b)
        return make

    def act_inputs():
        return (torch.randn(64, 128, 1024, requires_grad=True),)

    def bn(mod, c=64):
        return lambda x, w, b: mod.batch_norm(x, torch.zeros(c), torch.ones(c), w, b, True, 0.1, 1e-5)

    def pool_inputs(shape):
        return lambda: (torch.randn(shape, requires_grad=True),)

    def grid_inputs():
        theta = torch.eye(2, 3).expand(16, 2, 3) + 0.1 * torch.randn(16, 2, 3)
        grid = TF.affine_grid(theta, (16, 32, 32, 32), align_corners=False)
        return (torch.randn(16, 32, 32, 32, requires_grad=True), grid.requires_grad_())

    g = torch.Generator().manual_seed(0)
    ctc_targets = (torch.randint(1, 30, (8, 20), generator=g), torch.full((8,), 100), torch.full((8,), 20))

    def ctc_inputs():
        return (torch.randn(100, 8, 30).log_softmax(2).detach().requires_grad_(),)

    bag_idx = torch.randint(0, 100_000, (4096 * 20,), generator=g)
    bag_off = torch.arange(0, 4096 * 20, 20)

    def conv(x_shape, w_shape, x_grad=True):
        # the ResNet's convolutions (benchmarks/bench_blocks.py); the stem's input needs no gradient
        return lambda: (torch.randn(x_shape, requires_grad=x_grad), torch.randn(w_shape, requires_grad=True))

    def conv_case(name, x_shape, w_shape, x_grad=True, **kw):
        return (f"conv2d {name}", lambda x, w: F.conv2d(x, w, **kw), lambda x, w: TF.conv2d(x, w, **kw),
                conv(x_shape, w_shape, x_grad))

    return [
        conv_case("3->32 3x3 (32,3,32,32), no dx", (32, 3, 32, 32), (32, 3, 3, 3), False, padding=1),
        conv_case("32->32 3x3 (32,32,16,16)", (32, 32, 16, 16), (32, 32, 3, 3), padding=1),
        conv_case("32->64 3x3 s2 (32,32,16,16)", (32, 32, 16, 16), (64, 32, 3, 3), stride=2, padding=1),
        conv_case("64->64 3x3 (32,64,8,8)", (32, 64, 8, 8), (64, 64, 3, 3), padding=1),
        conv_case("32->64 1x1 s2 (32,32,16,16)", (32, 32, 16, 16), (64, 32, 1, 1), stride=2),
        ("layer_norm (64,128,256)", lambda x, w, b: F.layer_norm(x, (256,), w, b),
         lambda x, w, b: TF.layer_norm(x, (256,), w, b), ln_inputs),
        ("group_norm (32,64,16,16) G=8", lambda x, w, b: F.group_norm(x, 8, w, b),
         lambda x, w, b: TF.group_norm(x, 8, w, b), gn_inputs),
        ("batch_norm train (32,64,16,16)", bn(F), bn(TF), bn_inputs()),
        # the ResNet's (benchmarks/bench_blocks.py): the stem's, then the blocks' largest
        ("batch_norm train (32,32,32,32)", bn(F, 32), bn(TF, 32), bn_inputs((32, 32, 32, 32))),
        ("batch_norm train (32,32,16,16)", bn(F, 32), bn(TF, 32), bn_inputs((32, 32, 16, 16))),
        ("max_pool2d 2 (32,32,32,32)", lambda x: F.max_pool2d(x, 2), lambda x: TF.max_pool2d(x, 2),
         pool_inputs((32, 32, 32, 32))),
        ("max_pool2d 3 s2 p1 (32,64,32,32)", lambda x: F.max_pool2d(x, 3, 2, 1),
         lambda x: TF.max_pool2d(x, 3, 2, 1), pool_inputs((32, 64, 32, 32))),
        ("gelu none (64,128,1024)", lambda x: F.gelu(x), lambda x: TF.gelu(x), act_inputs),
        ("gelu tanh (64,128,1024)", lambda x: F.gelu(x, approximate="tanh"),
         lambda x: TF.gelu(x, approximate="tanh"), act_inputs),
        ("silu (64,128,1024)", lambda x: F.silu(x), lambda x: TF.silu(x), act_inputs),
        ("elu (64,128,1024)", lambda x: F.elu(x), lambda x: TF.elu(x), act_inputs),
        ("leaky_relu (64,128,1024)", lambda x: F.leaky_relu(x), lambda x: TF.leaky_relu(x), act_inputs),
        ("softplus (64,128,1024)", lambda x: F.softplus(x), lambda x: TF.softplus(x), act_inputs),
        # reflect padding as in image-to-image generators: ReflectionPad2d(1) inside the residual
        # blocks, ReflectionPad2d(3) before the 7x7 stem
        ("pad reflect 1 (32,64,32,32)", lambda x: F.pad(x, (1, 1, 1, 1), "reflect"),
         lambda x: TF.pad(x, (1, 1, 1, 1), "reflect"), pool_inputs((32, 64, 32, 32))),
        ("pad reflect 3 (8,3,128,128)", lambda x: F.pad(x, (3, 3, 3, 3), "reflect"),
         lambda x: TF.pad(x, (3, 3, 3, 3), "reflect"), pool_inputs((8, 3, 128, 128))),
        # a DCGAN generator's middle layer (ConvTranspose2d(128, 64, 4, 2, 1)) and a 3-D CNN's
        # conv and pooling
        ("conv_transpose2d 128->64 4x4 s2 (32,128,8,8)",
         lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1),
         lambda x, w: TF.conv_transpose2d(x, w, stride=2, padding=1), conv((32, 128, 8, 8), (128, 64, 4, 4))),
        ("conv3d 16->32 3x3x3 (8,16,16,16,16)", lambda x, w: F.conv3d(x, w, padding=1),
         lambda x, w: TF.conv3d(x, w, padding=1), conv((8, 16, 16, 16, 16), (32, 16, 3, 3, 3))),
        ("max_pool3d 2 (8,32,16,16,16)", lambda x: F.max_pool3d(x, 2), lambda x: TF.max_pool3d(x, 2),
         pool_inputs((8, 32, 16, 16, 16))),
        # a U-Net decoder's upsampling and a spatial transformer's sampler
        ("interpolate bilinear x2 (16,64,32,32)",
         lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
         lambda x: TF.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
         pool_inputs((16, 64, 32, 32))),
        ("interpolate nearest x2 (16,64,32,32)", lambda x: F.interpolate(x, scale_factor=2),
         lambda x: TF.interpolate(x, scale_factor=2), pool_inputs((16, 64, 32, 32))),
        ("grid_sample bilinear (16,32,32,32)", lambda x, g: F.grid_sample(x, g, align_corners=False),
         lambda x, g: TF.grid_sample(x, g, align_corners=False), grid_inputs),
        ("instance_norm affine (16,64,32,32)", lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
         lambda x, w, b: TF.instance_norm(x, weight=w, bias=b), bn_inputs((16, 64, 32, 32))),
        # the rest of torch.nn: a speech model's loss, a recommender's bags, PReLU, contrastive heads
        ("ctc_loss T=100 N=8 C=30 S=20", lambda lp: F.ctc_loss(lp, *ctc_targets),
         lambda lp: TF.ctc_loss(lp, *ctc_targets), ctc_inputs),
        ("embedding_bag sum (100k,64) 4096 bags", lambda w: F.embedding_bag(bag_idx, w, bag_off, mode="sum"),
         lambda w: TF.embedding_bag(bag_idx, w, bag_off, mode="sum"), lambda: (torch.randn(100_000, 64, requires_grad=True),)),
        ("prelu 64 channels (32,64,32,32)", lambda x, w: F.prelu(x, w), lambda x, w: TF.prelu(x, w),
         lambda: (torch.randn(32, 64, 32, 32, requires_grad=True), torch.full((64,), 0.25, requires_grad=True))),
        ("normalize + cosine_similarity (4096,256)", lambda a, b: F.cosine_similarity(F.normalize(a), b),
         lambda a, b: TF.cosine_similarity(TF.normalize(a), b),
         lambda: (torch.randn(4096, 256, requires_grad=True), torch.randn(4096, 256, requires_grad=True))),
    ]


_clock = time.process_time


def _time(fn, inputs, dy, backward_only=False):
    for t in inputs:
        t.grad = None
    t0 = _clock()
    y = fn(*inputs)
    if backward_only:
        t0 = _clock()
    y.backward(dy)
    return _clock() - t0


_STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="")
    p.add_argument("--backward-only", action="store_true", help="time the backward alone, not the forward")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time (default) or wall time")
    p.add_argument("--fresh-buffers", action="store_true", help="keep glibc's default buffer release (page faults)")
    args = p.parse_args()
    if not args.fresh_buffers and any(os.environ.get(k) != v for k, v in _STEADY_MALLOC.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **_STEADY_MALLOC})
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'op':42s} {'ours ms':>9s} {'torch ms':>9s} {'ratio':>7s} {'saved, ours/torch':>18s}")
    for name, ours, ref, make in cases():
        if args.only and args.only not in name:
            continue
        inputs = make()
        with torch.no_grad():
            dy = torch.randn_like(ref(*inputs))
        for _ in range(3):
            _time(ours, inputs, dy)
            _time(ref, inputs, dy)
        to, tt = [], []
        for _ in range(args.reps):
            to.append(_time(ours, inputs, dy, args.backward_only))
            tt.append(_time(ref, inputs, dy, args.backward_only))
        mo, mt = statistics.median(to), statistics.median(tt)
        # unique bytes saved for backward, the inputs themselves left out (they exist anyway)
        so, st = (saved_bytes(f, *inputs, exclude=inputs)[0] for f in (ours, ref))
        saved = f"{so / st:.2f}" if st else ("0 / 0" if so == 0 else f"{so} B / 0")
        print(f"{name:42s} {mo * 1e3:9.2f} {mt * 1e3:9.2f} {mo / mt:7.2f} {saved:>18s}")


if __name__ == "__main__":
    main()
