"""A real TensorBoard server, started on 127.0.0.1, serves the scalar tags the monitor wrote."""
import json
import socket
import subprocess
import sys
import time
import urllib.request

import torch
from torch.utils.tensorboard import SummaryWriter

import manualgrad.monitor


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_serves_the_run_scalar_tags(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path / "run1")
    with manualgrad.monitor.GradientMonitor(model, writer, optimizer=opt, every=1):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(6, 5)).square().mean().backward()
            opt.step()
    writer.close()

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--port", str(port),
         "--host", "127.0.0.1", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline, tags = time.monotonic() + 45, {}
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
                with urllib.request.urlopen(url, timeout=2) as r:
                    tags = json.load(r)
                if tags.get("run1"):
                    break
            except OSError:
                pass
            assert server.poll() is None, "tensorboard exited early"
            time.sleep(0.3)
        served = set(tags.get("run1", {}))
        expected = {f"{stat}/{n}" for stat in ("grad/norm", "grad/max_abs", "param/norm", "update/ratio") for n in "02"}
        assert expected | {"global/grad_norm", "global/lr/group0", "global/nonfinite"} <= served, sorted(served)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
