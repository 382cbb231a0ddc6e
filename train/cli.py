"""python -m train: train a network whose every layer runs a hand-written backward.

Examples:
    python -m train                                   # seed MLP, default recipe, MNIST if present else digits
    python -m train --impl torch                      # the identical network from torch.nn, same init
    python -m train --model mlp --dataset digits --epochs 30
    torchrun --nproc_per_node=2 -m train --batch-size 64   # DistributedDataParallel, gloo on CPU

The last line of every run is `final eval accuracy: 0.XXXX`.
"""
import argparse
import datetime
import pathlib
import sys

import torch

from manualgrad._extras import installed, message

from .data import SHARED_MNIST, mnist_available


class UsageError(Exception):
    """Bad arguments: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage first)
        raise UsageError(message)


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser():
    p = _Parser(prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp",
                   help="mlp: the seed network 784-1024-1024-1024-10 with ReLU; cnn: a small LeNet-style conv net")
    p.add_argument("--impl", choices=["manualgrad", "torch"], default="manualgrad",
                   help="build the network (and optimizer) from manualgrad or from torch.nn/torch.optim; "
                        "same initial weights either way")
    p.add_argument("--dataset", choices=["digits", "mnist"], default=None,
                   help="digits: scikit-learn's bundled 8x8 digits (offline); mnist: IDX files from --data-dir. "
                        "Default: mnist when its files are found, else digits")
    p.add_argument("--data-dir", default=None,
                   help=f"folder with the MNIST IDX files (torchvision's names), default {SHARED_MNIST} if it "
                        "exists, else data/mnist. With only the t10k files: first 8,000 train, last 2,000 evaluate")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "rmsprop", "adam", "adamw"], default="adamw")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (the peak, with onecycle)")
    p.add_argument("--weight-decay", type=_non_negative_float, default=0.01)
    p.add_argument("--label-smoothing", type=_fraction, default=0.1, metavar="E",
                   help="cross-entropy with label smoothing E (the evaluation loss is the plain one)")
    p.add_argument("--schedule", choices=["none", "onecycle", "cosine"], default="onecycle")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="per process and per micro-batch")
    p.add_argument("--epochs", type=_positive_int, default=None, help="default 8 on mnist, 30 on digits")
    p.add_argument("--shift", type=_non_negative_int, default=None, metavar="S",
                   help="augment: move each training image by up to S pixels in each direction, a fresh "
                        "draw every epoch (default 2 on mnist, 0 on digits)")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--accum-steps", type=_positive_int, default=1,
                   help="gradient accumulation: K micro-batches per optimizer step, the loss scaled by 1/K so "
                        "they equal one K-times-larger batch")
    p.add_argument("--clip-grad-norm", type=_positive_float, default=None, metavar="X",
                   help="clip the total gradient norm to X with manualgrad.utils.clip_grad_norm_")
    p.add_argument("--logdir", default=None, help="TensorBoard log dir (default runs/<timestamp>)")
    p.add_argument("--log-every", type=_positive_int, default=10, metavar="N",
                   help="write the training loss to TensorBoard every N optimizer steps (train/step_loss)")
    p.add_argument("--no-monitor", action="store_true", help="do not attach the gradient monitor")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here (the last two are kept)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                   help="checkpoint every N optimizer steps (default: at the end of each epoch)")
    p.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    default_dir = SHARED_MNIST if SHARED_MNIST.is_dir() else pathlib.Path("data/mnist")
    if args.data_dir is None:
        args.data_dir = default_dir
    else:
        args.data_dir = pathlib.Path(args.data_dir)
        if args.dataset == "mnist" and not args.data_dir.is_dir():
            raise UsageError(f"--data-dir {args.data_dir} does not exist")
    chosen = args.dataset is not None
    if args.dataset is None:
        args.dataset = "mnist" if mnist_available(args.data_dir) else "digits"
    if args.dataset == "digits" and not installed("sklearn"):
        why = "" if chosen else f" (the default: no MNIST files in {args.data_dir})"
        raise UsageError(message("sklearn", f"--dataset digits{why}"))
    if args.epochs is None:
        args.epochs = 8 if args.dataset == "mnist" else 30
    if args.shift is None:
        args.shift = 2 if args.dataset == "mnist" else 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if args.resume and args.checkpoint_dir is None:
        raise UsageError("--resume needs --checkpoint-dir")
    if args.logdir is None:
        args.logdir = pathlib.Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


def main(argv=None):
    from .loop import TrainingError, run

    try:
        args = parse_args(argv)
        return run(args)
    except UsageError as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingError as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
