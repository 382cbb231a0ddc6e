"""The dashboard: one TensorBoard run per layer (TensorBoard colours lines by run, so each layer
gets its own colour and legend entry), the custom-scalars layout over those runs, the runs read
back under the flat tags ``<stat>/<name>``, and ``python -m manualgrad.monitor.plot``'s picture."""
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from manualgrad.monitor import GradientMonitor
from manualgrad.monitor import monitor as monitor_module
from manualgrad.monitor import tensorboard as tb

from .test_monitor import LINEARS, batch, read, scalar, small_mlp

MODULE_TAGS = {"grad/norm", "grad/max_abs", "param/norm", "update/ratio", "update/log10_ratio"}


def raw(logdir):
    """{tag: {step: value}} of the event files in ``logdir`` itself (one TensorBoard run)."""
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}


def sgd_steps(model, opt, steps):
    for step in range(steps):
        x, y = batch(seed=step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_each_layer_is_a_run_of_its_own_holding_its_statistics(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    writer = SummaryWriter(tmp_path)
    norms = []  # ||g|| of module '2' (weight and bias), computed here
    with GradientMonitor(model, writer, optimizer=opt, every=1):
        for step in range(2):
            x, y = batch(seed=step)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            norms.append(torch.cat([model[2].weight.grad.flatten(), model[2].bias.grad.flatten()]).norm().item())
            opt.step()
    writer.close()
    assert sorted(os.listdir(tmp_path / "layers")) == LINEARS
    for n in LINEARS:  # these, and any other module statistic the monitor logs
        assert MODULE_TAGS <= set(raw(tmp_path / "layers" / n)) <= set(tb.MODULE_STATS), n
    # the writer's own run keeps the global statistics only
    assert {"global/grad_norm", "global/lr/group0", "global/nonfinite"} <= set(raw(tmp_path))
    assert all(t.startswith("global/") for t in raw(tmp_path)), sorted(raw(tmp_path))
    logged = raw(tmp_path / "layers" / "2")["grad/norm"]
    assert sorted(logged) == [0, 1] and [logged[0], logged[1]] == pytest.approx(norms, rel=1e-5)
    # and read back under the flat tags
    assert scalar(read(tmp_path), "grad/norm/2") == logged


class Awkward(torch.nn.Module):
    """Module names with a slash, a space, a percent sign, a non-ASCII letter, and a nested one."""

    def __init__(self):
        super().__init__()
        self.parts = torch.nn.ModuleDict({k: torch.nn.Linear(3, 3) for k in ["a/b", "c d", "50%", "ü"]})
        self.blocks = torch.nn.Sequential(torch.nn.Linear(3, 2))

    def forward(self, x):
        for m in self.parts.values():
            x = m(x)
        return self.blocks(x)


def test_module_names_become_one_directory_each_and_map_back(tmp_path):
    model = Awkward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path)
    with GradientMonitor(model, writer, optimizer=opt, every=1) as mon:
        opt.zero_grad()
        model(torch.randn(4, 3)).square().mean().backward()
        opt.step()
    writer.close()
    names = ["parts.a/b", "parts.c d", "parts.50%", "parts.ü", "blocks.0"]
    assert mon.names == names
    dirs = sorted(os.listdir(tmp_path / "layers"))
    # percent-encoding worked out by hand: '/' %2F, ' ' %20, '%' %25, 'ü' (UTF-8 C3 BC) %C3%BC
    assert dirs == sorted(["parts.a%2Fb", "parts.c%20d", "parts.50%25", "parts.%C3%BC", "blocks.0"])
    assert sorted(tb.layer_name(d) for d in dirs) == sorted(names)
    flat = {t for t in read(tmp_path).Tags()["scalars"] if t.startswith("grad/norm/")}
    assert flat == {f"grad/norm/{n}" for n in names}


@given(st.text(min_size=1))
def test_layer_dir_is_one_path_component_under_layers_and_maps_back(name):
    path = tb.layer_dir(os.path.join("logdir"), name)
    parent, d = os.path.split(path)
    assert parent == os.path.join("logdir", "layers")
    assert d not in ("", ".", "..") and "/" not in d and "\\" not in d and "\0" not in d
    assert tb.layer_name(d) == name


def test_writer_without_a_log_directory_gets_the_flat_tags():
    class Recording:
        def __init__(self):
            self.tags = set()

        def add_scalar(self, tag, value, global_step=None):
            self.tags.add(tag)

        def add_custom_scalars(self, layout):
            pass

        def flush(self):
            pass

    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = Recording()
    with GradientMonitor(model, writer, optimizer=opt, hist_every=0):
        sgd_steps(model, opt, 1)
    assert {f"{s}/{n}" for s in MODULE_TAGS for n in LINEARS} | {"global/grad_norm"} <= writer.tags


def test_layer_runs_are_written_out_when_the_monitor_closes(tmp_path, monkeypatch):
    # no timed flush: what the layer runs hold reaches the disk at close(), the writer still open
    monkeypatch.setattr(tb._LayerRuns, "max_delay", math.inf)
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path, flush_secs=3600)
    mon = GradientMonitor(model, writer, optimizer=opt, every=1)
    sgd_steps(model, opt, 3)
    assert "grad/norm/0" not in read(tmp_path).Tags()["scalars"]  # held in memory so far
    mon.close()
    assert sorted(scalar(read(tmp_path), "grad/norm/0")) == [0, 1, 2]
    assert sorted(scalar(read(tmp_path), "update/ratio/4")) == [0, 1, 2]
    writer.close()


def test_layer_runs_are_on_disk_during_training_after_the_flush_delay(tmp_path, monkeypatch):
    monkeypatch.setattr(tb._LayerRuns, "max_delay", 0.0)  # every write is past the delay
    monkeypatch.setattr(monitor_module, "_WRITE_SECS", 0.0)  # and the monitor's burst delay too
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path, flush_secs=3600)
    with GradientMonitor(model, writer, optimizer=opt, every=1):
        sgd_steps(model, opt, 2)
        assert sorted(scalar(read(tmp_path), "grad/norm/0")) == [0, 1]  # the monitor still open
    writer.close()


def test_a_script_that_never_closes_the_monitor_still_writes_every_layer_value(tmp_path):
    script = f"""
import torch
from torch.utils.tensorboard import SummaryWriter
from manualgrad.monitor import GradientMonitor
from tests.monitor.test_dashboard import sgd_steps
from tests.monitor.test_monitor import small_mlp
model = small_mlp()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
writer = SummaryWriter({str(tmp_path)!r}, flush_secs=3600)
mon = GradientMonitor(model, writer, optimizer=opt, every=1)
sgd_steps(model, opt, 3)
writer.close()  # and the monitor is left open
"""
    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    subprocess.run([sys.executable, "-c", script], cwd=root, env=env, check=True, timeout=120)
    assert sorted(scalar(read(tmp_path), "grad/norm/2")) == [0, 1, 2]


@pytest.fixture
def dashboard_stats(monkeypatch):
    """The per-layer statistics the dashboard charts besides grad/norm and update/ratio, as the
    monitor declares them (one line each in MODULE_STATS / GLOBAL_STATS; set here so this file
    does not depend on which of them the monitor logs yet)."""
    monkeypatch.setitem(tb.MODULE_STATS, "nonfinite", "non-finite values per layer since the last log")
    monkeypatch.setitem(tb.MODULE_STATS, "noise/B_simple", "gradient noise scale B_simple per layer")
    monkeypatch.setitem(tb.GLOBAL_STATS, "noise/B_simple", "gradient noise scale B_simple")


DASH = ["grad/norm", "update/ratio", "nonfinite", "noise/B_simple"]


def write_dashboard_run(logdir, names, steps=3):
    """Every DASH statistic for each of ``names``, value = 1 + layer index + step / 10 (the
    nonfinite count: layer index), plus the global noise scale and gradient norm."""
    writer = SummaryWriter(logdir)
    writer.add_custom_scalars(tb.custom_layout(set(DASH) | {"global/grad_norm", "global/nonfinite"}))
    for step in range(steps):
        tags, values = [], []
        for stat in DASH:
            for i, n in enumerate(names):
                tags.append(tb.tag(stat, n))
                values.append(float(i) if stat == "nonfinite" else 1 + i + step / 10)
        tb.write_scalars(writer, step, tags + ["noise/B_simple", "global/grad_norm"], values + [100.0 + step, 7.0])
    tb.close_layer_runs(writer)
    writer.close()


def test_layout_charts_each_layers_norm_ratio_nonfinite_and_noise_scale(tmp_path, dashboard_stats):
    from tensorboard.plugins.custom_scalar import layout_pb2

    write_dashboard_run(tmp_path, ["0", "blocks.1"])
    run = read(tmp_path)
    runs = {".": set(run.main.Tags()["scalars"])} | {f"layers/{n}": set(ea.Tags()["scalars"]) for n, ea in run.layers.items()}
    assert runs == {".": {"noise/B_simple", "global/grad_norm"}, "layers/0": set(DASH), "layers/blocks.1": set(DASH)}
    assert scalar(run, "nonfinite/blocks.1") == {0: 1.0, 1: 1.0, 2: 1.0}
    assert scalar(run, "noise/B_simple/0") == pytest.approx({0: 1.0, 1: 1.1, 2: 1.2})
    assert scalar(run, "noise/B_simple") == {0: 100.0, 1: 101.0, 2: 102.0}

    (event,) = run.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    per_layer, global_ = layout.category
    # the dashboard's charts first, in its order
    assert [c.title for c in per_layer.chart] == [tb.MODULE_STATS[s] for s in DASH]
    for stat, chart in zip(DASH, per_layer.chart):
        (regex,) = chart.multiline.tag
        matched = {(r, t) for r, tags in runs.items() for t in tags if re.search(regex, t)}
        layer_lines = {("layers/0", stat), ("layers/blocks.1", stat)}
        # the noise scale chart has the whole model's line too (the writer's own run)
        assert matched == (layer_lines | {(".", stat)} if stat == "noise/B_simple" else layer_lines)
    assert [c.title for c in global_.chart] == ["total gradient L2 norm", "non-finite module-steps since the last log"]


def legends(fig):
    """{axes title: {legend label: line colour}}."""
    out = {}
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            colour = {line.get_label(): line.get_color() for line in ax.get_lines()}
            out[ax.get_title()] = {t.get_text(): colour.get(t.get_text()) for t in legend.get_texts()}
    return out


def test_plot_gives_each_layer_one_colour_and_a_legend_entry_in_every_panel(tmp_path, dashboard_stats):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from manualgrad.monitor import plot

    names = [f"blocks.{i}" for i in range(12)]  # more than tab10's colours; 'blocks.10' after 'blocks.9'
    write_dashboard_run(tmp_path, names)
    fig = plot.draw_run(str(tmp_path))
    try:
        panels = legends(fig)
    finally:
        plt.close(fig)
    titles = [title for _, _, title in plot.PANELS.values()]
    assert list(panels) == titles
    colours = panels[titles[0]]
    assert list(colours) == names
    assert len(set(colours.values())) == len(names)  # one colour per layer...
    for title in titles:  # ...the same in every panel, each layer named in every legend
        extra = {"1e-3 (typical)"} if "update" in title else {"whole model"} if "noise" in title else set()
        assert set(panels[title]) == set(names) | extra, title
        assert {n: panels[title][n] for n in names} == colours, title

    out = tmp_path / "dashboard.png"
    plot.main([str(tmp_path), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_monitored_run_names_every_layer(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from manualgrad.monitor import plot

    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path)
    with GradientMonitor(model, writer, optimizer=opt, every=1):
        sgd_steps(model, opt, 3)
    writer.close()
    fig = plot.draw_run(str(tmp_path))
    try:
        panels = legends(fig)
    finally:
        plt.close(fig)
    assert set(panels["gradient L2 norm per layer"]) == set(LINEARS)
    assert set(panels["update:data ratio per layer"]) == set(LINEARS) | {"1e-3 (typical)"}
    assert len(set(panels["gradient L2 norm per layer"].values())) == 3


def test_plot_reads_a_run_with_the_flat_tags_of_earlier_versions(tmp_path):
    pytest.importorskip("matplotlib")
    from manualgrad.monitor import plot

    writer = SummaryWriter(tmp_path)
    for step in range(2):
        for n in LINEARS:
            writer.add_scalar(f"grad/norm/{n}", 1.0 + step, step)
    writer.close()
    scalars = plot.read_scalars(str(tmp_path))
    assert scalars["grad/norm/2"] == ([0, 1], [1.0, 2.0])
    fig = plot.draw_run(str(tmp_path))
    assert set(legends(fig)["gradient L2 norm per layer"]) == set(LINEARS)
