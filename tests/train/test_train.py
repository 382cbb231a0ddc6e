"""End-to-end tests of `python -m train` on small real data (scikit-learn's 8x8 digits)."""
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from manualgrad.monitor.tensorboard import read_run
from train.checkpoint import CheckpointError, checkpoint_paths, load_checkpoint
from train.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = ["--dataset", "digits", "--no-monitor"]


def scalars(logdir):
    # the gradient monitor's per-layer runs (logdir/layers/<name>/) under their flat tags, grad/norm/1 ...
    acc = read_run(logdir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.trajectory
def test_train_loss_falls_and_the_log_dir_holds_the_expected_tags(tmp_path, capsys):
    result = main(SMALL + ["--epochs", "3", "--logdir", str(tmp_path / "tb")])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"final eval accuracy: {result['eval_accuracy']:.4f}"
    tags = scalars(tmp_path / "tb")
    for tag in ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "train/lr", "train/step_loss"):
        assert tag in tags, tag
    epoch_losses = [v for _, v in tags["train/loss"]]
    assert len(epoch_losses) == 3 and epoch_losses[-1] < 0.5 * epoch_losses[0]
    assert result["eval_accuracy"] > 0.85


@pytest.mark.trajectory
def test_manualgrad_and_torch_runs_agree_step_for_step(tmp_path):
    runs = {}
    for impl in ("manualgrad", "torch"):
        main(SMALL + ["--impl", impl, "--max-steps", "20", "--log-every", "1", "--logdir", str(tmp_path / impl)])
        runs[impl] = scalars(tmp_path / impl)["train/step_loss"]
    assert [s for s, _ in runs["manualgrad"]] == list(range(1, 21))
    for (step, a), (_, b) in zip(runs["manualgrad"], runs["torch"]):
        assert abs(a - b) <= 1e-5, f"step {step}: manualgrad loss {a}, torch loss {b}"


@pytest.mark.trajectory
def test_gradient_accumulation_equals_one_larger_batch(tmp_path):
    # --shift 1: the augmentation draws per image, not per batch, so it does not break the equality
    common = SMALL + ["--optimizer", "sgd", "--schedule", "none", "--lr", "0.1", "--max-steps", "4", "--shift", "1"]
    accumulated = main(common + ["--batch-size", "32", "--accum-steps", "4", "--logdir", str(tmp_path / "a")])
    large = main(common + ["--batch-size", "128", "--logdir", str(tmp_path / "b")])
    for name, p in params(large["model"]).items():
        torch.testing.assert_close(params(accumulated["model"])[name], p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.trajectory
def test_clip_grad_norm_option_changes_the_run(tmp_path):
    common = SMALL + ["--optimizer", "sgd", "--schedule", "none", "--lr", "0.5", "--weight-decay", "0", "--max-steps", "3"]
    clipped = main(common + ["--clip-grad-norm", "0.01", "--logdir", str(tmp_path / "a")])
    free = main(common + ["--logdir", str(tmp_path / "b")])
    start = main(common + ["--max-steps", "1", "--lr", "1e-12", "--logdir", str(tmp_path / "c")])
    w = "1.weight"
    moved_clipped = (params(clipped["model"])[w] - params(start["model"])[w]).norm()
    moved_free = (params(free["model"])[w] - params(start["model"])[w]).norm()
    # 3 steps of lr 0.5 with the total norm clipped to 0.01 move the weights by at most ~0.015.
    assert moved_clipped < 0.02 < moved_free


def _train_subprocess(args, **kw):
    # Same thread count as this process: the comparisons with in-process runs are bitwise.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, **kw)


@pytest.mark.trajectory
def test_resume_after_sigkill_finishes_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    run = SMALL + ["--max-steps", "30", "--checkpoint-every", "1", "--shift", "1", "--checkpoint-dir", str(tmp_path / "ck")]
    proc = _train_subprocess(run + ["--logdir", str(tmp_path / "tb1")], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            paths = checkpoint_paths(tmp_path / "ck")
            if paths and int(paths[0].name[5:14]) >= 8:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # at an arbitrary point, possibly mid-write
    finally:
        proc.kill()
        proc.wait()
    killed_at = int(checkpoint_paths(tmp_path / "ck")[0].name[5:14])
    assert 8 <= killed_at < 30
    resumed = main(run + ["--resume", "--logdir", str(tmp_path / "tb2")])
    straight = main(SMALL + ["--max-steps", "30", "--shift", "1", "--logdir", str(tmp_path / "tb3")])
    assert resumed["step"] == straight["step"] == 30
    for name, p in params(straight["model"]).items():
        assert torch.equal(params(resumed["model"])[name], p), name


def test_only_the_last_two_checkpoints_are_kept(tmp_path):
    main(SMALL + ["--max-steps", "5", "--checkpoint-every", "1", "--checkpoint-dir", str(tmp_path), "--logdir", str(tmp_path / "tb")])
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-000000005.pt", "ckpt-000000004.pt"]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.trajectory
def test_a_corrupt_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(tmp_path, capsys):
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    main(SMALL + ["--max-steps", "4", "--checkpoint-every", "2", "--logdir", str(tmp_path / "a")] + ck)
    newest = checkpoint_paths(tmp_path / "ck")[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    capsys.readouterr()
    resumed = main(SMALL + ["--max-steps", "6", "--checkpoint-every", "2", "--resume", "--logdir", str(tmp_path / "b")] + ck)
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is unreadable" in out and "resumed from" in out and "at step 2" in out
    straight = main(SMALL + ["--max-steps", "6", "--logdir", str(tmp_path / "c")])
    for name, p in params(straight["model"]).items():
        assert torch.equal(params(resumed["model"])[name], p), name


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_checkpoint_never_runs_code_and_gets_a_clear_error(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "ckpt-000000001.pt"
    torch.save({"model": _Exploit(marker), "step": 1}, bad)
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} is unreadable"):
        load_checkpoint(bad)
    assert not marker.exists()
    with open(tmp_path / "plain.pt", "wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump(_Exploit(marker), f)
    with pytest.raises(CheckpointError, match="plain.pt is unreadable"):
        load_checkpoint(tmp_path / "plain.pt")
    assert not marker.exists()


def test_resume_with_only_corrupt_checkpoints_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "ckpt-000000003.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        main(SMALL + ["--resume", "--checkpoint-dir", str(tmp_path), "--logdir", str(tmp_path / "tb")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable checkpoint" in err[0] and "ckpt-000000003.pt" in err[0]


@pytest.mark.parametrize(
    "argv,says",
    [
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        (["--dataset", "mnist", "--data-dir", "/no/such/dir"], "--data-dir /no/such/dir does not exist"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--lr", "-1"], "--lr: must be a positive number"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


@pytest.mark.parametrize(
    "argv,says",
    [
        (["--dataset", "digits"], "--dataset digits needs scikit-learn: pip install 'manualgrad[digits]'"),
        ([], "--dataset digits (the default: no MNIST files in {tmp}) needs scikit-learn: pip install 'manualgrad[digits]'"),
    ],
)
def test_digits_without_scikit_learn_is_one_line_naming_the_extra(argv, says, tmp_path, uninstalled, capsys):
    uninstalled("sklearn")
    with pytest.raises(SystemExit) as e:
        main(argv + ["--data-dir", str(tmp_path), "--logdir", str(tmp_path / "tb")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m train: error: " + says.format(tmp=tmp_path)]


def test_command_line_exit_code_and_message_for_a_missing_mnist_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--logdir", str(tmp_path / "tb")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "t10k-images-idx3-ubyte.gz" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.trajectory
def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(tmp_path):
    # --shift 1: each image's shift depends on (seed, epoch, image), not on the process
    steps = ["--max-steps", "20", "--checkpoint-every", "20", "--shift", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train"]
    # With the gradient monitor attached on both ranks: its logging steps reduce across ranks.
    proc = subprocess.run(
        cmd + ["--dataset", "digits"] + steps + ["--batch-size", "32", "--checkpoint-dir", str(tmp_path / "ddp"), "--logdir", str(tmp_path / "tb")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("final eval accuracy: ")  # rank 0 only
    # Only rank 0 writes TensorBoard events, the monitor's included (it ran on both ranks).
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    assert len(list((tmp_path / "tb" / "layers").glob("*/events.out.tfevents.*"))) == 4  # the seed MLP's 4 Linears
    tags = scalars(tmp_path / "tb")
    assert "grad/norm/1" in tags and "update/ratio/1" in tags and "eval/accuracy" in tags
    ddp = load_checkpoint(checkpoint_paths(tmp_path / "ddp")[0])["model"]
    single = main(SMALL + steps + ["--batch-size", "64", "--checkpoint-dir", str(tmp_path / "one"), "--logdir", str(tmp_path / "tb1")])
    for name, p in params(single["model"]).items():
        torch.testing.assert_close(ddp[name], p, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.trajectory
def test_default_recipe_reaches_97_percent_on_digits(tmp_path):
    result = main(SMALL + ["--logdir", str(tmp_path)])
    assert result["eval_accuracy"] >= 0.97


@pytest.mark.slow
@pytest.mark.trajectory
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_recipe_reaches_97_percent_on_real_mnist_in_8_epochs(mnist_dir, seed, tmp_path):
    result = main(["--dataset", "mnist", "--data-dir", str(mnist_dir), "--seed", str(seed), "--no-monitor",
                   "--logdir", str(tmp_path)])
    assert result["eval_accuracy"] >= 0.970


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    import io

    from train.loop import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar, plain = Terminal(), io.StringIO()
    for stream in (bar, plain):
        p = Progress(True, stream)
        for batch in range(1, 11):
            p.update(0, 2, batch, 10, torch.tensor(2.0 / batch), 128)
        p.end_epoch()
    assert bar.getvalue().count("\r[") == 10 and "[########################] epoch 1/2  step 10/10  loss 0.2000" in bar.getvalue()
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and len(lines) == 5  # every 2nd of 10 steps
    assert lines[-1].startswith("epoch 1/2  step 10/10  loss 0.2000")
