"""The training loop behind ``python -m train``: a completely standard PyTorch loop.

Single process or DistributedDataParallel under torchrun (gloo on CPU, nccl on GPU), with a
DistributedSampler in both cases so that N processes with batch B see exactly the batches
one process with batch N*B sees. Only rank 0 logs, evaluates and writes checkpoints.
"""
import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist

import manualgrad
import manualgrad.utils
from manualgrad.monitor import GradientMonitor

from .checkpoint import CheckpointError, load_latest, save_checkpoint
from .cli import UsageError
from .data import epoch_shifts, load_digits, load_mnist, shift_images
from .models import build_model, modules_for


class TrainingError(Exception):
    """A run that cannot go on (e.g. no readable checkpoint to resume): one line, exit 1."""


# The arguments a checkpoint must agree with to be resumed.
RESUME_KEYS = ("model", "impl", "dataset", "optimizer", "schedule", "batch_size", "accum_steps", "epochs", "seed",
               "shift")


def _distributed(device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _load_data(args, log):
    if args.dataset == "digits":
        return load_digits(seed=0)
    try:
        return load_mnist(args.data_dir, download=True, log=log)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


def make_optimizer(name, impl, params, lr, weight_decay):
    optim = manualgrad.optim if impl == "manualgrad" else torch.optim
    if name == "sgd":
        return optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "rmsprop":
        return optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_schedule(name, optimizer, lr, total_steps):
    if name == "onecycle":
        has_momentum = "betas" in optimizer.defaults or optimizer.defaults.get("momentum", 0) > 0
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, cycle_momentum=has_momentum
        )
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


class Progress:
    """A progress bar with loss and throughput on a terminal, plain log lines otherwise."""

    def __init__(self, enabled, stream=None):
        self.enabled, self.stream = enabled, stream if stream is not None else sys.stdout
        self.tty = enabled and self.stream.isatty()
        self.t0, self.images = time.perf_counter(), 0

    def update(self, epoch, epochs, batch, batches, loss, images):
        """``loss`` is a tensor, read (a host sync) only when a line is printed."""
        if not self.enabled:
            return
        self.images += images
        if not (self.tty or batch == batches or batch % max(1, batches // 5) == 0):
            return
        rate = self.images / max(time.perf_counter() - self.t0, 1e-9)
        text = f"epoch {epoch + 1}/{epochs}  step {batch}/{batches}  loss {loss.item():.4f}  {rate:,.0f} img/s"
        if self.tty:
            width = 24
            done = int(width * batch / max(batches, 1))
            print(f"\r[{'#' * done}{'.' * (width - done)}] {text}", end="", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)

    def end_epoch(self):
        if self.tty:
            print(file=self.stream)
        self.t0, self.images = time.perf_counter(), 0


@torch.no_grad()
def evaluate(model, x, y, device, batch_size=1000):
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        loss_sum += torch.nn.functional.cross_entropy(out, yb, reduction="sum")
        correct += (out.argmax(-1) == yb).sum()
    model.train(was_training)
    return loss_sum.item() / len(y), correct.item() / len(y)


def run(args):
    rank, world = _distributed(args.device)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    (xtr, ytr), (xev, yev) = _load_data(args, log)
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model, args.impl, tuple(xtr.shape[1:])).to(device)
    except NotImplementedError as e:
        raise UsageError(str(e)) from None
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss_fn = modules_for(args.impl).CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = make_optimizer(args.optimizer, args.impl, model.parameters(), args.lr, args.weight_decay)

    sampler = torch.utils.data.DistributedSampler(
        range(len(ytr)), num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True
    )
    micro_per_epoch = len(sampler) // args.batch_size
    steps_per_epoch = micro_per_epoch // args.accum_steps
    if steps_per_epoch == 0:
        raise UsageError(
            f"--batch-size {args.batch_size} x --accum-steps {args.accum_steps} is larger than the "
            f"{len(sampler)} training images a process sees"
        )
    # The schedule spans every epoch; --max-steps only stops early (so a resumed run with a
    # larger --max-steps continues the same schedule).
    schedule = make_schedule(args.schedule, optimizer, args.lr, steps_per_epoch * args.epochs)

    step, start_epoch, start_micro = 0, 0, 0
    if args.resume:
        try:
            path, state = load_latest(args.checkpoint_dir, log=log)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        if state is not None:
            saved = state["args"]
            wrong = [k for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
            if wrong:
                raise UsageError(
                    f"checkpoint {path} was written with other settings ({', '.join(wrong)}); "
                    "resume with the same arguments"
                )
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if schedule is not None:
                schedule.load_state_dict(state["schedule"])
            torch.set_rng_state(state["rng"])
            step, start_epoch, start_micro = state["step"], state["epoch"], state["micro"]
            log(f"resumed from {path} at step {step} (epoch {start_epoch + 1})")

    writer = monitor = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(args.logdir))
    if not args.no_monitor:
        # On every rank: it reduces its statistics across ranks on logging steps; rank 0 writes.
        monitor = GradientMonitor(model, writer, optimizer=optimizer)
    what = f"{args.model} ({args.impl})"
    log(f"training {what} on {args.dataset}: {len(ytr)} train / {len(yev)} eval images, "
        f"{args.optimizer} lr {args.lr:g}, {args.schedule} schedule, batch {args.batch_size}"
        f"{f' x {world} processes' if world > 1 else ''}"
        f"{f' x {args.accum_steps} accumulated' if args.accum_steps > 1 else ''}, {args.epochs} epochs"
        f"{f', label smoothing {args.label_smoothing:g}' if args.label_smoothing else ''}"
        f"{f', shifts up to {args.shift} px' if args.shift else ''}")

    def checkpoint(epoch, micro):
        if is_main and args.checkpoint_dir is not None:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict() if schedule is not None else None,
                "rng": torch.get_rng_state(),
                "step": step,
                "epoch": epoch,
                "micro": micro,
                "args": {k: getattr(args, k) for k in RESUME_KEYS},
            }
            save_checkpoint(args.checkpoint_dir, state, step)

    progress = Progress(is_main)
    eval_acc = None
    net.train()
    done = args.max_steps is not None and step >= args.max_steps
    for epoch in range(start_epoch, args.epochs):
        if done:
            break
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        shifts = epoch_shifts(len(ytr), args.shift, args.seed, epoch) if args.shift else None
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        first = start_micro if epoch == start_epoch else 0
        for micro in range(first, steps_per_epoch * args.accum_steps):
            idx = order[micro * args.batch_size : (micro + 1) * args.batch_size]
            xb = xtr[idx] if shifts is None else shift_images(xtr[idx], shifts[idx])
            xb, yb = xb.to(device, non_blocking=True), ytr[idx].to(device, non_blocking=True)
            last_micro = (micro + 1) % args.accum_steps == 0
            sync = net.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                out = net(xb)
                loss = loss_fn(out, yb)
                # K micro-batch means, each / K: the mean over one K-times-larger batch.
                (loss / args.accum_steps if args.accum_steps > 1 else loss).backward()
            loss_sum += loss.detach() * len(yb)
            correct += (out.detach().argmax(-1) == yb).sum()
            seen += len(yb)
            if not last_micro:
                continue
            if args.clip_grad_norm is not None:
                manualgrad.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if schedule is not None:
                schedule.step()
            step += 1
            if is_main:
                progress.update(epoch, args.epochs, (micro + 1) // args.accum_steps, steps_per_epoch,
                                loss.detach(), len(yb) * args.accum_steps * world)
                if step % args.log_every == 0:
                    writer.add_scalar("train/step_loss", loss.item(), step)
            done = args.max_steps is not None and step >= args.max_steps
            if args.checkpoint_every is not None and step % args.checkpoint_every == 0:
                checkpoint(epoch, micro + 1)
            if done:
                break
        progress.end_epoch()
        if is_main:
            train_loss, train_acc = loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)
            eval_loss, eval_acc = evaluate(model, xev, yev, device)
            for tag, value in [("train/loss", train_loss), ("train/accuracy", train_acc),
                               ("eval/loss", eval_loss), ("eval/accuracy", eval_acc),
                               ("train/lr", optimizer.param_groups[0]["lr"])]:
                writer.add_scalar(tag, value, step)
            writer.flush()
            log(f"epoch {epoch + 1}/{args.epochs}  step {step}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                f"eval loss {eval_loss:.4f} acc {eval_acc:.4f}")
        if args.checkpoint_every is None and not done:
            checkpoint(epoch + 1, 0)

    if monitor is not None:
        monitor.close()
    if is_main:
        if eval_acc is None:  # resumed after the last epoch: evaluate what was trained
            eval_acc = evaluate(model, xev, yev, device)[1]
        writer.close()
        log(f"final eval accuracy: {eval_acc:.4f}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return {"eval_accuracy": eval_acc, "step": step, "model": model}
