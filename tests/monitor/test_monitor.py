"""manualgrad.monitor.GradientMonitor: event files read back with TensorBoard's EventAccumulator
and compared with statistics computed independently here."""
import math
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.tensorboard import SummaryWriter

import manualgrad.monitor
import manualgrad.nn as mnn
from manualgrad.monitor import GradientMonitor, NonFiniteError
from manualgrad.monitor.tensorboard import read_run
from manualgrad.utils import clip_grad_norm_
from train.models import seed_mlp


def small_mlp(nn=torch.nn):
    # 13 -> 11 -> 9 -> 5: Linear, ReLU, Linear, Tanh, Linear (odd widths)
    torch.manual_seed(0)
    return torch.nn.Sequential(nn.Linear(13, 11), nn.ReLU(), nn.Linear(11, 9), torch.nn.Tanh(), nn.Linear(9, 5))


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 13, generator=g), torch.randint(0, 5, (n,), generator=g)


def read(logdir):
    """The run in ``logdir`` as an EventAccumulator, the per-layer runs' statistics included under
    their flat tags ``<stat>/<name>`` (e.g. ``grad/norm/0``), whatever the layout on disk."""
    return read_run(logdir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})


def scalar(ea, tag):
    """{step: value} of the scalar ``tag`` (e.g. ``grad/norm/0`` or ``global/grad_norm``)."""
    return {e.step: e.value for e in ea.Scalars(tag)}


LINEARS = ["0", "2", "4"]


@pytest.mark.parametrize("layout", [None, 12, 0], ids=["all-in-buffer", "mixed", "none-in-buffer"])
@pytest.mark.parametrize("nn", [torch.nn, mnn], ids=["torch", "manualgrad"])
def test_logged_statistics_equal_independent_ones(tmp_path, monkeypatch, nn, layout):
    # the norms of a logging step come from the check's buffer (stats.FiniteCheck) for tensors
    # of up to FLAT_MAX elements, per tensor for the others: here all, the biases only (11, 9
    # and 5 elements), none (the plain form). The weights' updates go through a scratch buffer
    # of _CHUNK elements: 143, 99 and 45 elements in 3, 2 and 1 pieces
    if layout is not None:
        monkeypatch.setattr(manualgrad.monitor.stats.FiniteCheck, "FLAT_MAX", layout)
        monkeypatch.setattr(GradientMonitor, "_CHUNK", 50)
    model = small_mlp(nn)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    writer = SummaryWriter(tmp_path)
    expected = []
    with GradientMonitor(model, writer, optimizer=opt, every=2, hist_every=2, activations=True) as mon:
        for step in range(3):
            x, y = batch(seed=step)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            # independently: per module, concatenate weight and bias
            mods = {n: model[int(n)] for n in LINEARS}
            grads = {n: torch.cat([m.weight.grad.flatten(), m.bias.grad.flatten()]) for n, m in mods.items()}
            before = {n: torch.cat([m.weight.flatten(), m.bias.flatten()]).detach().clone() for n, m in mods.items()}
            acts, h = {}, x
            with torch.no_grad():
                for i, layer in enumerate(model):
                    h = layer(h)
                    acts[str(i)] = h.clone()
            opt.step()
            after = {n: torch.cat([m.weight.flatten(), m.bias.flatten()]).detach() for n, m in mods.items()}
            expected.append((grads, before, after, acts))
    writer.close()
    assert mon.names == LINEARS

    ea = read(tmp_path)
    tags = set(ea.Tags()["scalars"])
    for stat in ["grad/norm", "grad/max_abs", "param/norm", "update/ratio", "update/log10_ratio"]:
        assert {f"{stat}/{n}" for n in LINEARS} <= tags
    for stat in ["act/mean", "act/std", "act/near_zero", "act/dead", "act/saturation", "act/grad_norm"]:
        assert {f"{stat}/{i}" for i in "01234"} <= tags
    assert {"global/grad_norm", "global/lr/group0", "global/nonfinite"} <= tags

    for step in (0, 2):  # first step always, then every 2
        grads, before, after, acts = expected[step]
        close = lambda tag, v: pytest.approx(float(v), rel=1e-5, abs=1e-7) == scalar(ea, tag)[step]  # noqa: E731
        for n in LINEARS:
            assert close(f"grad/norm/{n}", grads[n].norm())
            assert close(f"grad/max_abs/{n}", grads[n].abs().max())
            assert close(f"param/norm/{n}", before[n].norm())
            ratio = (after[n] - before[n]).norm() / before[n].norm()
            assert close(f"update/ratio/{n}", ratio)
            assert close(f"update/log10_ratio/{n}", math.log10(ratio))
        assert close("global/grad_norm", torch.cat(list(grads.values())).norm())
        assert close("global/lr/group0", 0.5)
        assert scalar(ea, "global/nonfinite")[step] == 0
        relu, tanh = acts["1"], acts["3"]
        assert close("act/mean/1", relu.mean()) and close("act/std/1", relu.std(correction=0))
        assert close("act/near_zero/1", (relu.abs() <= 1e-6).float().mean())
        assert close("act/dead/1", (relu == 0).all(0).float().mean())
        assert close("act/saturation/3", (tanh.abs() > 0.99).float().mean())
        assert close("act/saturation/1", 0.0)
    assert sorted(scalar(ea, "grad/norm/0")) == [0, 2]

    hist_tags = set(ea.Tags()["histograms"])
    assert {f"hist/{k}/{n}" for k in ("grad", "weight") for n in LINEARS} <= hist_tags
    assert {f"hist/act/{i}" for i in "01234"} <= hist_tags
    for step_event in ea.Histograms("hist/grad/2"):
        grads = expected[step_event.step][0]["2"]
        hv = step_event.histogram_value
        assert sum(hv.bucket) == grads.numel() == hv.num
        assert len(hv.bucket) == 64
        assert hv.min == pytest.approx(grads.min().item()) and hv.max == pytest.approx(grads.max().item())
        assert hv.sum == pytest.approx(grads.sum().item(), rel=1e-4, abs=1e-6)
        assert hv.sum_squares == pytest.approx((grads**2).sum().item(), rel=1e-4)
        # bucket counts match an independent 64-bin histogram over [min, max]
        ref = torch.histogram(grads.double(), bins=64, range=(hv.min, hv.max)).hist
        assert (torch.tensor(list(hv.bucket)) - ref).abs().sum() <= 2  # rounding at bin edges


def test_custom_scalars_layout_charts_match_logged_tags(tmp_path):
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2

    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path)
    with GradientMonitor(model, writer, optimizer=opt):
        x, y = batch()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    writer.close()
    ea = read(tmp_path)
    (event,) = ea.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    charts = {c.title: c.multiline.tag for cat in layout.category for c in cat.chart}
    # the tags as TensorBoard sees them: the writer's run, and one run per layer
    runs = {".": ea.main.Tags()["scalars"]} | {f"layers/{n}": ea.layers[n].Tags()["scalars"] for n in ea.layers}
    assert sorted(runs) == [".", "layers/0", "layers/2", "layers/4"]

    def matched(title):
        (regex,) = charts[title]
        return {(run, t) for run, tags in runs.items() for t in tags if re.search(regex, t)}

    assert matched("gradient L2 norm") == {(f"layers/{n}", "grad/norm") for n in LINEARS}
    assert matched("update:data ratio ||dθ||/||θ|| (1e-3 is typical)") == {(f"layers/{n}", "update/ratio") for n in LINEARS}
    assert matched("total gradient L2 norm") == {(".", "global/grad_norm")}


def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path)
    norms = []
    with GradientMonitor(model, writer, optimizer=opt, every=1):
        for step in range(3):
            opt.zero_grad()
            for micro in range(4):
                x, y = batch(seed=10 * step + micro)
                (torch.nn.functional.cross_entropy(model(x), y) / 4).backward()
            norms.append(torch.cat([model[0].weight.grad.flatten(), model[0].bias.grad.flatten()]).norm().item())
            opt.step()
    writer.close()
    logged = scalar(read(tmp_path), "grad/norm/0")
    assert sorted(logged) == [0, 1, 2]
    assert [logged[s] for s in range(3)] == pytest.approx(norms, rel=1e-5)


def test_step_without_optimizer_logs_first_step_then_every(tmp_path):
    model = small_mlp()
    writer = SummaryWriter(tmp_path)
    with GradientMonitor(model, writer, every=3) as mon:
        for step in range(7):
            model.zero_grad()
            x, y = batch(seed=step)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            mon.step()
    writer.close()
    ea = read(tmp_path)
    assert sorted(scalar(ea, "grad/norm/4")) == [0, 3, 6]
    assert not any(t.startswith("update/") for t in ea.Tags()["scalars"])  # no optimizer, no update


def test_clipping_with_manualgrad_clip_grad_norm_is_logged(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path)
    other = torch.nn.Parameter(torch.ones(3))  # clipping another model is not counted
    other.grad = torch.ones(3)
    with GradientMonitor(model, writer, optimizer=opt, every=2):
        for step, max_norm in enumerate([1e-3, 1e6, 1e-3, 1e6]):
            opt.zero_grad()
            x, y = batch(seed=step)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            total = clip_grad_norm_(model.parameters(), max_norm)
            clip_grad_norm_([other], 1e-3)
            if step == 2:
                coef, norm_before = min(max_norm / (total.item() + 1e-6), 1.0), total.item()
            opt.step()
    writer.close()
    ea = read(tmp_path)
    assert scalar(ea, "global/clip_fraction") == {0: 1.0, 2: 0.5}  # step 0 alone; steps 1-2
    assert scalar(ea, "global/clip_coef")[2] == pytest.approx(coef, rel=1e-5)
    assert scalar(ea, "global/clip_norm_before")[2] == pytest.approx(norm_before, rel=1e-6)
    # the logged grad norm is that of the final (clipped) gradients
    assert scalar(ea, "global/grad_norm")[2] == pytest.approx(1e-3, rel=1e-3)


def test_learning_rates_of_tensor_and_float_groups_and_a_zero_update_are_logged(tmp_path):
    # group 0's lr is a tensor (read back with the statistics), group 1's a float, and 0: the
    # modules of group 1 do not move, so their update ratio is 0 and its log10 -inf
    model = small_mlp()
    first = list(model[0].parameters())
    rest = [p for m in (model[2], model[4]) for p in m.parameters()]
    opt = torch.optim.SGD([{"params": first, "lr": torch.tensor(0.25)}, {"params": rest, "lr": 0.0}])
    writer = SummaryWriter(tmp_path)
    with GradientMonitor(model, writer, optimizer=opt, every=2):
        for step in range(3):
            opt.zero_grad()
            x, y = batch(seed=step)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if step == 2:
                expected = (0.25 * torch.cat([p.grad.flatten() for p in first])).norm() / torch.cat(
                    [p.detach().flatten() for p in first]).norm()
            opt.step()
    writer.close()
    ea = read(tmp_path)
    assert scalar(ea, "global/lr/group0") == {0: 0.25, 2: 0.25}
    assert scalar(ea, "global/lr/group1") == {0: 0.0, 2: 0.0}
    assert scalar(ea, "update/ratio/0")[2] == pytest.approx(expected.item(), rel=1e-5)
    assert scalar(ea, "update/log10_ratio/0")[2] == pytest.approx(math.log10(expected.item()), rel=1e-5)
    for n in ("2", "4"):
        assert scalar(ea, f"update/ratio/{n}") == {0: 0.0, 2: 0.0}
        assert scalar(ea, f"update/log10_ratio/{n}") == {0: -math.inf, 2: -math.inf}


class DefinedOutOfOrder(torch.nn.Module):
    """``late`` is defined first but runs second: forward order is early, late."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.late = torch.nn.Linear(6, 5)
        self.early = torch.nn.Linear(7, 6)

    def forward(self, x):
        return self.late(torch.relu(self.early(x)))


class Frozen(torch.optim.Optimizer):
    """An optimizer whose step changes nothing (a NaN gradient cannot reach the weights)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None):
        pass


def train(model, opt, steps, poison=None, x=None):
    x = torch.randn(4, 7) if x is None else x
    for step in range(steps):
        if poison is not None:
            poison(step)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_nan_gradient_in_one_layer_is_reported_with_its_name(tmp_path):
    model = DefinedOutOfOrder()
    opt = Frozen(model.parameters())
    writer = SummaryWriter(tmp_path)
    state = {"on": False}
    model.late.weight.register_hook(lambda g: g * math.nan if state["on"] else g)
    with GradientMonitor(model, writer, optimizer=opt, every=5) as mon:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, opt, 4, poison=lambda s: state.update(on=(s == 2)))
            assert not caught  # nothing said before the logging point
            train(model, opt, 2)  # step 5 is logged
    writer.close()
    (w,) = [c for c in caught if "non-finite" in str(c.message)]
    assert "gradient in module 'late' first at step 2" in str(w.message)
    assert mon.first_nonfinite == ("late", "gradient", 2)
    nonfinite = scalar(read(tmp_path), "global/nonfinite")
    assert nonfinite == {0: 0.0, 5: 1.0}


def test_first_nonfinite_keeps_the_runs_first_report_when_later_ones_follow(tmp_path):
    # `late` goes NaN at step 2, `early` at step 6: first_nonfinite stays ('late', 2).
    model = DefinedOutOfOrder()
    opt = Frozen(model.parameters())
    writer = SummaryWriter(tmp_path)
    state = {"late": False, "early": False}
    model.late.weight.register_hook(lambda g: g * math.nan if state["late"] else g)
    model.early.weight.register_hook(lambda g: g * math.nan if state["early"] else g)
    with GradientMonitor(model, writer, optimizer=opt, every=5) as mon:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, opt, 5, poison=lambda s: state.update(late=(s == 2)))
            train(model, opt, 6, poison=lambda s: state.update(late=False, early=(s == 1)))  # step 10 is logged
    writer.close()
    reports = [str(c.message) for c in caught if "non-finite" in str(c.message)]
    assert len(reports) == 2 and "'early'" in reports[1]  # the later report names `early`...
    assert mon.first_nonfinite == ("late", "gradient", 2)  # ...the first one stays


@pytest.mark.parametrize("activations", [False, True])
def test_nan_weight_is_reported_as_a_parameter_of_its_module(tmp_path, activations):
    # NaN weight in `early`: its output, then `late`'s output and both gradients go NaN; the
    # origin is the parameter (tests/monitor/test_nan_origin.py has the other kinds)
    model = DefinedOutOfOrder()
    opt = Frozen(model.parameters())
    writer = SummaryWriter(tmp_path)
    with GradientMonitor(model, writer, optimizer=opt, every=3, activations=activations, on_nonfinite="raise") as mon:
        train(model, opt, 1)
        with torch.no_grad():
            model.early.weight[0, 0] = math.nan
        with pytest.raises(NonFiniteError, match="early"):
            train(model, opt, 3)
    writer.close()
    assert mon.first_nonfinite == ("early", "parameter", 1)


def test_close_removes_every_hook_and_allows_reattaching(tmp_path):
    from manualgrad import utils

    model = small_mlp(mnn)
    opt = torch.optim.Adam(model.parameters())
    writer = SummaryWriter(tmp_path)
    n_listeners = len(utils._clip_listeners)
    mon = GradientMonitor(model, writer, optimizer=opt, activations=True)
    assert any(m._forward_hooks for m in model.modules()) and opt._optimizer_step_pre_hooks
    with pytest.raises(RuntimeError, match="already attached"):
        GradientMonitor(model, writer)
    with pytest.raises(RuntimeError, match="already attached to this optimizer"):
        GradientMonitor(small_mlp(), writer, optimizer=opt)
    train_x, y = batch()
    torch.nn.functional.cross_entropy(model(train_x), y).backward()
    opt.step()
    mon.close()
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert len(utils._clip_listeners) == n_listeners
    with GradientMonitor(model, writer, optimizer=opt):  # attaching again after close is fine
        pass
    writer.close()


def test_include_exclude_select_modules(tmp_path):
    model = small_mlp()
    writer = SummaryWriter(tmp_path)
    with GradientMonitor(model, writer, exclude=r"^4$") as mon:
        assert mon.names == ["0", "2"]
    with GradientMonitor(model, writer, include=r"^model$") as mon:
        assert mon.names == ["model"]
    writer.close()


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's values on the host (``calls``: their names). On a
    CPU-only machine ``.cpu()`` stands in for the device-to-host copy: every value read on the
    host must come out of a tensor that went through it, and reads of such tensors are free."""

    SYNCING = {torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
               torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.calls, self.on_host = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.SYNCING and not any(args[0] is t for t in self.on_host):
            self.calls.append(func.__name__)
        if func is torch.Tensor.cpu:
            self.on_host.append(out)
        return out


def test_no_host_transfer_except_one_per_logging_step(tmp_path):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path)
    per_step = []
    with GradientMonitor(model, writer, optimizer=opt, every=3, hist_every=3, activations=True):
        for step in range(6):
            x, y = batch(seed=step)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            clip_grad_norm_(model.parameters(), 1.0)
            with HostReads() as c:
                opt.step()
            per_step.append(c.calls)
    writer.close()
    assert per_step == [["cpu"], [], [], ["cpu"], [], []]


def graphs(model, x):
    torch._dynamo.reset()
    e = torch._dynamo.explain(model)(x)
    return e.graph_count, e.graph_break_count


def test_default_monitor_adds_no_graph_breaks_under_compile():
    x = batch()[0]
    for nn in (torch.nn, mnn):  # manualgrad's Functions break the graph on their own: same count
        model = small_mlp(nn)
        alone = graphs(model, x)
        with GradientMonitor(model, _NullWriter(), hist_every=1):
            assert graphs(model, x) == alone, nn.__name__
        if nn is torch.nn:
            assert alone == (1, 0)


def test_activation_hooks_add_no_graph_breaks_to_a_torch_model_under_compile():
    # the forward of a logged step with histograms: every statistic is computed in the hooks
    model = small_mlp(torch.nn)
    with GradientMonitor(model, _NullWriter(), activations=True, hist_every=1) as mon:
        assert mon._log_now and mon._hist_now
        assert graphs(model, batch()[0]) == (1, 0)


def test_plot_writes_a_picture(tmp_path):
    from manualgrad.monitor import plot

    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path / "run")
    with GradientMonitor(model, writer, optimizer=opt, every=1, activations=True):
        train_steps = 4
        for step in range(train_steps):
            x, y = batch(seed=step)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    writer.close()
    out = tmp_path / "out.png"
    plot.main([str(tmp_path / "run"), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_without_matplotlib_is_one_line_naming_the_extra(tmp_path, uninstalled):
    from manualgrad.monitor import plot

    uninstalled("matplotlib")
    with pytest.raises(ModuleNotFoundError, match=r"^plotting a run needs matplotlib: pip install 'manualgrad\[plot\]'$"):
        plot.plot_run(str(tmp_path), str(tmp_path / "out.png"))
    with pytest.raises(SystemExit) as e:  # python -m manualgrad.monitor.plot: this line on stderr, exit code 1
        plot.main([str(tmp_path), "-o", str(tmp_path / "out.png")])
    assert e.value.code == "python -m manualgrad.monitor.plot: error: plotting a run needs matplotlib: pip install 'manualgrad[plot]'"


def test_seed_mlp_module_names():
    # the seed MLP from the demo is monitored per Linear (Flatten and ReLU have no parameters)
    model = seed_mlp(in_features=64, width=16)
    mon = GradientMonitor(model, _NullWriter())
    try:
        assert mon.names == ["1", "3", "5", "7"]
    finally:
        mon.close()


class _NullWriter:
    def add_custom_scalars(self, layout):
        self.layout = layout

    def flush(self):
        pass


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="on_nonfinite"):
        GradientMonitor(small_mlp(), _NullWriter(), on_nonfinite="ignore")
    assert manualgrad.monitor.GradientMonitor is GradientMonitor


def test_huge_finite_values_report_nothing(tmp_path):
    # finite gradients whose plain float32 sums overflow: one element of 2e38 in two of them
    # (their total), and 45 elements of 1e37 in one row of the check's buffer (its own sum,
    # 4.5e38). The check's sums of x 2^-100 stay finite: nothing is reported, and a logging
    # step reads back once
    model = small_mlp()
    opt = Frozen(model.parameters())

    def big(g):
        g = torch.zeros_like(g)
        g.view(-1)[0] = 2e38
        return g

    model[0].weight.register_hook(big)
    model[2].weight.register_hook(big)
    model[4].weight.register_hook(lambda g: torch.full_like(g, 1e37))
    writer = SummaryWriter(tmp_path)
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no report
        with GradientMonitor(model, writer, optimizer=opt, every=1, cosine=False) as mon:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            assert not math.isfinite(model[4].weight.grad.sum().item())  # what a plain sum gives
            with HostReads() as c:
                opt.step()
    writer.close()
    assert c.calls == ["cpu"]
    assert mon.first_nonfinite is None
    ea = read(tmp_path)
    assert scalar(ea, "global/nonfinite") == {0: 0.0}
    assert all(scalar(ea, f"nonfinite/{n}") == {0: 0.0} for n in LINEARS)
    assert scalar(ea, "grad/max_abs/0") == {0: torch.tensor(2e38).item()}  # (float32)
