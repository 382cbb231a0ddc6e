"""Checkpoints that survive a crash.

Each is written to a temporary file, fsync'ed and renamed into place (a rename is atomic), so
a process killed at any moment leaves either the previous checkpoint or the new one, never a
half-written file under a checkpoint's name. The last two are kept. Loading uses
``torch.load(weights_only=True)``: a tampered file cannot run code; like a truncated or
corrupt one it gets a clear error naming the file, and resume falls back to the previous one.
"""
import os
import pathlib
import re

import torch

PATTERN = re.compile(r"^ckpt-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_paths(directory):
    """Checkpoint files in ``directory``, newest (highest step) first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(directory, state, step, keep=2):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{step:09d}.pt"
    tmp = directory / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself reaches the disk
    finally:
        os.close(dir_fd)
    for old in checkpoint_paths(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path):
    """Load one checkpoint safely, or raise CheckpointError naming the file and the problem."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, forbidden global: all one error
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable or not a checkpoint ({reason})") from e
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} does not hold a training state")
    return state


def load_latest(directory, log=print):
    """The newest readable checkpoint in ``directory`` as (path, state), falling back past
    unreadable ones (each is reported through ``log``); (None, None) if there are none."""
    paths = checkpoint_paths(directory)
    errors = []
    for path in paths:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
    if errors:
        raise CheckpointError("no readable checkpoint in " + str(directory) + ": " + "; ".join(errors))
    return None, None
