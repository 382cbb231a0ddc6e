"""make demo: the seed MLP (784-1024-1024-1024-10, ReLU) built from manualgrad modules, one
short epoch on real data, printing the loss as it falls.

Real MNIST when its IDX files are found (../shared/data/mnist by default), else
scikit-learn's bundled 8x8 digits (the MLP's input is then 64 wide).
"""
import argparse
import time

import torch

import manualgrad.nn as mnn

from .data import load_digits, load_mnist, mnist_available


def seed_mlp(in_features=784, width=1024, depth=3, classes=10, nn=mnn):
    """The seed network from ``nn`` (manualgrad.nn or torch.nn). Flatten is a view: no Function."""
    layers = [torch.nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with MNIST IDX files (default ../shared/data/mnist)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=None, help="stop the epoch early after this many steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    if mnist_available(args.data_dir):
        (xtr, ytr), (xev, yev) = load_mnist(args.data_dir, download=False)
        name = "MNIST"
    else:
        print("MNIST IDX files not found: using scikit-learn's 8x8 digits")
        (xtr, ytr), (xev, yev) = load_digits()
        name = "digits"
    model = seed_mlp(in_features=xtr[0].numel())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = mnn.CrossEntropyLoss()
    print(f"seed MLP on {name}: {len(ytr)} train / {len(yev)} eval images, every layer a manualgrad Function")

    perm = torch.randperm(len(ytr))
    steps = len(ytr) // args.batch_size if args.max_steps is None else min(args.max_steps, len(ytr) // args.batch_size)
    every = max(1, steps // 10)
    t0 = time.perf_counter()
    running = 0.0
    for step in range(steps):
        idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
        loss = loss_fn(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % every == 0 or step == 0:
            n = 1 if step == 0 else every
            print(f"step {step + 1:4d}/{steps}  loss {running / n:.4f}")
            running = 0.0
    with torch.no_grad():
        acc = (model(xev).argmax(-1) == yev).float().mean().item()
    print(f"{steps} steps in {time.perf_counter() - t0:.1f}s")
    print(f"final eval accuracy: {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
