"""A real TensorBoard server, started on 127.0.0.1, serves the scalar tags the monitor wrote: the
global ones in the run, each layer's in a run of its own (its own colour and legend entry), and
the custom-scalars charts find every layer's line."""
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import torch
from torch.utils.tensorboard import SummaryWriter

import manualgrad.monitor
from manualgrad.monitor.tensorboard import MODULE_STATS
from tests.ports import free_port


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
    def get(path, **query):
        url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)

    layer_runs = {"run1/layers/0", "run1/layers/2"}
    try:
        deadline, tags = time.monotonic() + 45, {}
        while time.monotonic() < deadline:
            try:
                tags = get("/data/plugin/scalars/tags")
                if {"run1"} | layer_runs <= set(tags):
                    break
            except OSError:
                pass
            assert server.poll() is None, "tensorboard exited early"
            time.sleep(0.3)
        assert set(tags) == {"run1"} | layer_runs, sorted(tags)
        served = set(tags["run1"])
        assert {"global/grad_norm", "global/lr/group0", "global/nonfinite"} <= served, sorted(served)
        assert not any(t.startswith(("grad/", "param/", "update/")) for t in served), sorted(served)
        module_tags = {"grad/norm", "grad/max_abs", "param/norm", "update/ratio", "update/log10_ratio"}
        for run in layer_runs:  # these, and any other module statistic the monitor logs
            assert module_tags <= set(tags[run]) <= set(MODULE_STATS), (run, sorted(tags[run]))

        # the custom-scalars page: the layout, then each run's lines of the "gradient L2 norm" chart
        layout = get("/data/plugin/custom_scalars/layout")
        charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
        (regex,) = charts["gradient L2 norm"]
        for run in layer_runs:
            lines = get("/data/plugin/custom_scalars/scalars", run=run, tag=regex)
            assert lines["regex_valid"] and list(lines["tag_to_events"]) == ["grad/norm"], (run, lines)
            assert [step for _, step, _ in lines["tag_to_events"]["grad/norm"]] == [0, 1]
        assert get("/data/plugin/custom_scalars/scalars", run="run1", tag=regex)["tag_to_events"] == {}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
