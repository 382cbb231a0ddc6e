"""A screenshot of the monitor's TensorBoard dashboard, as a browser draws it (not run by `make test`).

    python scripts/dashboard_screenshot.py -o dashboard.png [--page custom_scalars|scalars|timeseries]

Trains a small MLP for a few hundred steps under GradientMonitor (into --logdir, a temporary
directory by default), starts TensorBoard on 127.0.0.1, waits until it serves the per-layer runs,
opens the page in headless Chromium and saves a PNG. Needs Chromium (Debian: `apt-get install
chromium`; --chromium to point elsewhere). TensorBoard draws its pages in the browser, so
Chromium is given --virtual-time-budget milliseconds of page time before the picture is taken.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from manualgrad.monitor import GradientMonitor  # noqa: E402


def train(logdir, steps=300, every=5, micro_batches=2):
    """A 32-64-64-64-64-10 MLP (5 Linears) on a fixed random teacher, SGD with momentum, each
    step accumulated over two micro-batches of 64 (what the monitor estimates the gradient noise
    scale from). The layers' gradient norms and update ratios differ, so the lines separate."""
    torch.manual_seed(0)
    widths = [32, 64, 64, 64, 64, 10]
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)
    teacher = torch.nn.Linear(32, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    writer = SummaryWriter(logdir)
    with GradientMonitor(model, writer, optimizer=opt, every=every, hist_every=100):
        for step in range(steps):
            opt.zero_grad()
            total = 0.0
            for _ in range(micro_batches):
                x = torch.randn(64, 32)
                with torch.no_grad():
                    y = teacher(x).argmax(1)
                loss = torch.nn.functional.cross_entropy(model(x), y) / micro_batches
                loss.backward()
                total += loss.item()
            opt.step()
            writer.add_scalar("train/loss", total, step)
    writer.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(port, server, timeout=60):
    """Until TensorBoard serves the per-layer runs (run names containing 'layers/')."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("tensorboard exited early")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=2) as r:
                runs = json.load(r)
            if any("layers/" in run for run in runs):
                return sorted(runs)
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"tensorboard did not serve the layer runs within {timeout} s")


def screenshot(url, out, chromium, size, budget_ms):
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={os.path.abspath(out)}", url]
        subprocess.run(cmd, check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", default="dashboard.png", help="the PNG to write (default dashboard.png)")
    p.add_argument("--logdir", help="train into this directory (default: a temporary one, removed after)")
    p.add_argument("--page", default="custom_scalars", choices=["custom_scalars", "scalars", "timeseries"])
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--window-size", default="1600,1400", help="width,height in pixels")
    p.add_argument("--budget", type=int, default=20000, help="virtual time for the page to draw, ms")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    if not os.path.exists(args.chromium):
        raise SystemExit(f"no Chromium at {args.chromium!r} (Debian: apt-get install chromium)")

    tmp = None if args.logdir else tempfile.mkdtemp(prefix="dashboard-")
    root = args.logdir or tmp
    try:
        train(os.path.join(root, "mlp"), steps=args.steps)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", root, "--port", str(port),
             "--host", "127.0.0.1", "--reload_interval", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            runs = wait_for_runs(port, server)
            print("runs served:", ", ".join(runs))
            screenshot(f"http://127.0.0.1:{port}/?darkMode=false#{args.page}", args.out, args.chromium,
                       args.window_size, args.budget)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(args.out)


if __name__ == "__main__":
    main()
