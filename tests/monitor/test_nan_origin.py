"""GradientMonitor names where the first non-finite value is born: planted faults, each with
the exact origin (module, kind, step) worked out by hand, on torch and manualgrad models."""
import math
import warnings

import pytest
import torch

import manualgrad.nn as mnn
from manualgrad.monitor import GradientMonitor, NonFiniteError
from tests.monitor.test_monitor import HostReads
from tests.ports import leave, spawn


class NullWriter:
    def add_custom_scalars(self, layout):
        pass

    def add_scalar(self, *args, **kwargs):
        pass

    def add_histogram_raw(self, *args, **kwargs):
        pass

    def flush(self):
        pass


class Sqrt(torch.nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


def issue_mlp(nn, extra=None):
    # the issue's 64-128-128-10 MLP, narrower: '0' Linear, '1' ReLU, '2' Linear, '3' ReLU,
    # ['4' extra], then the last Linear
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()]
    if extra is not None:
        layers.append(extra)
    layers.append(nn.Linear(16, 4))
    return torch.nn.Sequential(*layers)


def run(model, steps, every=1, before_step=None, x=None, loss=None, opt=None, lr=0.1, **kw):
    """SGD steps on a fixed batch under a monitor that raises; returns (monitor, error or None)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g) if x is None else x
    y = torch.randint(0, 4, (32,), generator=g)
    loss = loss or torch.nn.functional.cross_entropy
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr)
    mon = GradientMonitor(model, NullWriter(), optimizer=opt, every=every, hist_every=0, on_nonfinite="raise", **kw)
    err = None
    with mon:
        try:
            for step in range(steps):
                xs = before_step(step, model, x) if before_step is not None else None
                xs = x if xs is None else xs
                opt.zero_grad()
                loss(model(xs), y).backward()
                opt.step()
        except NonFiniteError as e:
            err = e
    return mon, err


NNS = pytest.mark.parametrize("nn", [torch.nn, mnn], ids=["torch", "manualgrad"])


@NNS
def test_nan_weight_of_module_2_is_named_as_a_parameter_origin(nn):
    # the issue's first example: the weight of module '2' set to NaN before step 3
    mon, err = run(issue_mlp(nn), 5, before_step=write_at(3, 2, "weight", (1, 5), math.nan))
    assert err is not None
    origin = mon.first_nonfinite
    assert origin[:3] == ("2", "parameter", 3)
    assert "module '2'" in str(err) and "parameter" in str(err) and "step 3" in str(err)
    assert "weight[1, 5]" in str(err)  # the offending index


@NNS
def test_sqrt_after_relu_is_named_as_a_backward_origin(nn):
    # the issue's second example: sqrt(relu(h)) is finite, but d sqrt/dh = 1/(2 sqrt(h)) is
    # infinite where relu(h) = 0: an Inf born in the backward of the Sqrt module '4' (torch's
    # ReLU backward then selects 0 there; manualgrad's multiplies, inf * 0: NaN gradients
    # for '2' and '0', which the old report named)
    mon, err = run(issue_mlp(nn, extra=Sqrt()), 3, origin="trace")
    origin = mon.first_nonfinite
    assert origin[:3] == ("4", "backward", 0)
    assert "backward" in str(err) and "module '4'" in str(err) and "= inf" in str(err)


# -- the planted-fault suite -------------------------------------------------------------------


class Exp(torch.nn.Module):
    def forward(self, x):
        return torch.exp(x)


class RootAbs(torch.autograd.Function):
    """y = sqrt(|x|): finite everywhere; dy/dx = sign(x) / (2 sqrt(|x|)) divides 0 by 0 at x = 0."""

    @staticmethod
    def forward(x):
        return x.abs().sqrt()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        # dx = dy sign(y... x) / (2 y): 0 / 0 where x = 0 (after a ReLU: half the entries)
        return dy * torch.sign(y) / (2 * y)


class RootAbsModule(torch.nn.Module):
    def __init__(self, through_manualgrad):
        super().__init__()
        self.through_manualgrad = through_manualgrad

    def forward(self, x):
        if self.through_manualgrad:  # every manualgrad Function goes through this apply
            from manualgrad.ops._apply import apply

            return apply(RootAbs, x)
        return RootAbs.apply(x)


def write_at(k, module, param, index, value, through_data=False):
    """before_step: model[module].<param>[index] = value before step k (under no_grad, or
    through ``.data``)."""
    def before(step, model, x):
        if step == k:
            t = getattr(model[module], param)
            with torch.no_grad():
                (t.data if through_data else t)[index] = value
    return before


def scale_input_at(k, factor):
    def before(step, model, x):
        return x * factor if step == k else x
    return before


def inf_entry_at(k):
    def before(step, model, x):
        if step == k:
            x = x.clone()
            x[3, 2] = math.inf
            return x
    return before


def log_softmax_by_hand(scale_at):
    """-mean log softmax(z)[y] computed as log(softmax), with z scaled by 1e4 at one step:
    softmax underflows to exactly 0, log(0) = -inf, and its backward divides 0 by 0."""
    state = {"step": -1}

    def loss(out, y):
        state["step"] += 1
        z = out * 1e4 if state["step"] == scale_at else out
        return -torch.log(torch.softmax(z, -1)).gather(1, y[:, None]).mean()
    return loss


# name: (model builder(nn), run kwargs (made per run), expected (module, kind, step), op for
# manualgrad models)
# Every expectation is worked out by hand in the comment next to it.
SCENARIOS = {
    # a weight set to NaN before step 2: the parameter of '2' (not its output, not '0')
    "nan_bias": (lambda nn: issue_mlp(nn), lambda: dict(steps=4, before_step=write_at(2, 2, "bias", 7, math.nan)), ("2", "parameter", 2), None),
    # inputs x1e3 at step 1: Linear '2' outputs ~1e3, finite; exp(1e3) = inf: born in '4'
    "exp_overflow": (lambda nn: issue_mlp(nn, extra=Exp()), lambda: dict(steps=3, before_step=scale_input_at(1, 1e3)),
                     ("4", "forward", 1), None),
    # log(softmax(1e4 z)) at step 2: the model's output is finite, its gradient is NaN
    "log0_in_loss": (lambda nn: issue_mlp(nn), lambda: dict(steps=4, loss=log_softmax_by_hand(2)), ("model", "loss", 2), None),
    # sqrt after ReLU: inf slope at 0 from the first step
    "sqrt_backward": (lambda nn: issue_mlp(nn, extra=Sqrt()), lambda: dict(steps=2), ("4", "backward", 0), None),
    # a custom Function whose backward divides 0 by 0 (after a ReLU): born in its backward
    "custom_div0": (lambda nn: issue_mlp(nn, extra=RootAbsModule(nn is mnn)), lambda: dict(steps=2),
                    ("4", "backward", 0), "RootAbs"),
    # an Inf in the batch at step 3: the model's input
    "inf_input": (lambda nn: issue_mlp(nn), lambda: dict(steps=5, before_step=inf_entry_at(3)), ("model", "input", 3), None),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
@NNS
def test_planted_fault_is_traced_to_where_it_is_born(nn, name):
    build, make_kwargs, expected, op = SCENARIOS[name]
    kwargs = make_kwargs()
    mon, err = run(build(nn), kwargs.pop("steps"), origin="trace", **kwargs)
    assert err is not None, "no report"
    origin = mon.first_nonfinite
    assert origin == expected, str(err)
    assert origin.op == (op if nn is mnn else None)
    assert str(err) == origin.message and f"step {expected[2]}" in str(err)


def test_forward_overflow_in_a_manualgrad_loss_names_the_function_outside_the_model():
    # mse of outputs x1e20 at step 1: (1e20)^2 overflows in manualgrad's loss Function
    from manualgrad import functional as MF

    state = {"step": -1}

    def loss(out, y):
        state["step"] += 1
        return MF.mse_loss(out * (1e20 if state["step"] == 1 else 1.0), torch.zeros_like(out))

    mon, err = run(issue_mlp(mnn), 3, loss=loss, origin="trace")
    origin = mon.first_nonfinite
    assert origin == ("(outside the monitored model)", "forward", 1) and origin.op == "RegressionLossFunction"


@NNS
def test_learning_rate_explosion_is_traced_to_the_first_overflowing_module(nn):
    # lr 0.1, then 1e30 from step 2. Step 2's update moves every parameter by 1e30 |g|,
    # finite (|g| < 1); at step 3 Linear '0' gives ~1e31 (8 inputs ~1), finite; Linear '2'
    # sums 16 products of ~1e30 x ~1e31 = 1e61 > 3.4e38: inf. Checked on a replica below.
    model = issue_mlp(nn)
    replica = issue_mlp(torch.nn)
    replica.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def explode(step, m, x):
        if step == 2:
            opt.param_groups[0]["lr"] = 1e30

    mon, err = run(model, 5, before_step=explode, opt=opt, origin="trace")
    assert mon.first_nonfinite == ("2", "forward", 3), str(err)

    # the replica, trained the same way by hand, agrees
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    for step in range(3):
        replica.zero_grad()
        torch.nn.functional.cross_entropy(replica(x), y).backward()
        with torch.no_grad():
            for p in replica.parameters():
                p -= (0.1 if step < 2 else 1e30) * p.grad
    assert all(torch.isfinite(p).all() for p in replica.parameters())  # not a parameter origin
    h0 = replica[0](x)
    assert torch.isfinite(h0).all() and not torch.isfinite(replica[2](replica[1](h0))).all()


@NNS
def test_parameters_mode_names_a_parameter_and_otherwise_the_step_and_modules(nn):
    mon, err = run(issue_mlp(nn), 4, before_step=write_at(2, 4, "weight", (3, 1), math.inf), origin="parameters")
    assert mon.first_nonfinite == ("4", "parameter", 2) and "weight[3, 1] = inf" in str(err)
    mon, err = run(issue_mlp(nn, extra=Exp()), 3, before_step=scale_input_at(1, 1e3), origin="parameters")
    assert mon.first_nonfinite == ("0', '2', '5", "gradient", 1), str(err)
    assert "modules '0', '2', '5'" in str(err) and "origin='trace' names where" in str(err)


@NNS
def test_parameters_mode_names_a_parameter_made_non_finite_between_logging_steps(nn):
    # logging every 5 steps; a weight goes non-finite in two ways a parameters' version counter
    # does not see: a write through .data before step 2, and the optimizer's own update at step 1
    # overflowing (finite gradients up to ~9, times lr 1e38 > 3.4e38). Either is a parameter
    # origin at step 2, whose forward first uses it, not "a gradient non-finite while every
    # parameter was finite".
    poison = write_at(2, 4, "weight", (3, 1), math.nan, through_data=True)
    mon, err = run(issue_mlp(nn), 6, every=5, before_step=poison, origin="parameters")
    assert mon.first_nonfinite == ("4", "parameter", 2) and "parameter in module '4'" in str(err), str(err)

    model = issue_mlp(nn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def overflow_at_1(step, model, x):
        opt.param_groups[0]["lr"] = 1e38 if step == 1 else 0.1
        return x * 100 if step == 1 else x  # the weights' gradients 3.7-8.8 there: finite

    replica = issue_mlp(torch.nn)
    replica.load_state_dict(model.state_dict())
    mon, err = run(model, 6, every=5, before_step=overflow_at_1, opt=opt, origin="parameters")
    assert tuple(mon.first_nonfinite)[1:] == ("parameter", 2) and "non-finite parameter in module" in str(err), str(err)
    # the replica, by hand: finite gradients at step 1, non-finite weights after its update
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    for step, (scale, lr) in enumerate([(1, 0.1), (100, 1e38)]):
        replica.zero_grad()
        torch.nn.functional.cross_entropy(replica(x * scale), y).backward()
        assert all(torch.isfinite(p.grad).all() for p in replica.parameters())
        with torch.no_grad():
            for p in replica.parameters():
                p.add_(p.grad, alpha=-lr)
    assert not torch.isfinite(replica[4].weight).all()


class NanToNum(torch.nn.Module):
    def forward(self, x):
        return torch.nan_to_num(x)


@NNS
def test_parameters_mode_with_activations_names_a_non_finite_activation_while_gradients_stay_finite(nn):
    # a NaN in the input at step 2 makes ReLU '0''s output NaN; nan_to_num cleans it before the
    # Linear, and nothing flows back into '0' (no parameters, input without grad): every
    # parameter and gradient stays finite, only the hooked activation of '0' is not. Logged
    # every 4 steps: reported at step 4 as born at step 2.
    def nan_input(step, model, x):
        if step == 2:
            x = x.clone()
            x[5, 3] = math.nan
            return x

    torch.manual_seed(0)
    model = torch.nn.Sequential(nn.ReLU(), NanToNum(), nn.Linear(8, 4))
    mon, err = run(model, 5, every=4, before_step=nan_input, activations=True)
    assert all(torch.isfinite(p).all() and torch.isfinite(p.grad).all() for p in model.parameters())
    assert mon.first_nonfinite == ("0", "forward", 2), str(err)
    assert "activation non-finite" in str(err) and "reported at step 4" in str(err)


def test_report_at_a_later_logging_step_names_the_first_step_and_warns():
    # every=4: the fault at step 1 is reported at step 4 (the first logging step after it)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = issue_mlp(mnn, extra=Exp())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        with GradientMonitor(model, NullWriter(), optimizer=opt, every=4, origin="trace") as mon:
            for step in range(6):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x * (1e3 if step == 1 else 1)), y).backward()
                opt.step()
    (w,) = [str(c.message) for c in caught if "non-finite" in str(c.message)]
    assert mon.first_nonfinite == ("4", "forward", 1)
    assert "first at step 1" in w and "reported at step 4" in w


# -- one DDP rank --------------------------------------------------------------------------------


def _ddp_worker(rank, port, outdir):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {}
    for nn in (torch.nn, mnn):
        model = issue_mlp(nn, extra=Exp())  # same seed: the same model on both ranks
        ddp = DDP(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(2, 16, 8, generator=g)[rank], torch.randint(0, 4, (2, 16), generator=g)[rank]
        mon = GradientMonitor(model, NullWriter(), optimizer=opt, every=1, on_nonfinite="raise", origin="trace")
        try:
            for step in range(4):
                # rank 1's batch x1e3 at step 2: exp overflows in '4' there only; the
                # all-reduce then makes rank 0's gradients NaN too
                xs = x * 1e3 if (rank == 1 and step == 2) else x
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(xs), y).backward()
                opt.step()
        except NonFiniteError as e:
            o = mon.first_nonfinite
            results[nn.__name__] = (tuple(o), o.rank, str(e))
        mon.close()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    leave()


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch built without the gloo backend")
def test_nan_born_on_one_ddp_rank_is_named_on_every_rank(tmp_path):
    import os

    spawn(_ddp_worker, (str(tmp_path),), nprocs=2)
    for rank in (0, 1):
        results = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        for nn in ("torch.nn", "manualgrad.nn"):
            origin, origin_rank, message = results[nn]
            assert origin == ("4", "forward", 2) and origin_rank == 1, message
            assert "on rank 1" in message


# -- tracing stays cheap to reason about: no host sync, no graph break ---------------------------


def test_tracing_reads_nothing_on_the_host_between_logging_steps():
    for nn in (torch.nn, mnn):
        model = issue_mlp(nn, extra=Exp())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        per_step = []
        with GradientMonitor(model, NullWriter(), optimizer=opt, every=3, origin="trace"):
            for step in range(6):
                with HostReads() as c:  # the whole step: forward and backward hooks, then the update
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                per_step.append(c.calls)
        # the logging steps' one transfer, else nothing
        assert per_step == [["cpu"], [], []] * 2, nn.__name__


def test_tracing_adds_no_graph_breaks_to_a_torch_model_under_compile():
    model = issue_mlp(torch.nn, extra=Exp())
    x = torch.randn(4, 8)
    torch._dynamo.reset()
    alone = torch._dynamo.explain(model)(x)
    with GradientMonitor(model, NullWriter(), origin="trace"):
        torch._dynamo.reset()
        traced = torch._dynamo.explain(model)(x)
    assert (traced.graph_count, traced.graph_break_count) == (alone.graph_count, alone.graph_break_count) == (1, 0)


def test_tracing_past_its_memory_bound_finds_the_same_origins(monkeypatch):
    # every tensor summed and dropped as soon as it is seen: the same births, by the same rules
    import manualgrad.monitor.origin as origin_module

    monkeypatch.setattr(origin_module, "FLUSH_ELEMENTS", 100)
    for nn in (torch.nn, mnn):
        for name in ("exp_overflow", "log0_in_loss", "sqrt_backward", "custom_div0", "inf_input"):
            build, make_kwargs, expected, op = SCENARIOS[name]
            kwargs = make_kwargs()
            mon, err = run(build(nn), kwargs.pop("steps"), origin="trace", **kwargs)
            assert mon.first_nonfinite == expected and mon.first_nonfinite.op == (op if nn is mnn else None), name


def test_nonfinite_count_per_module_is_logged(tmp_path):
    # a NaN gradient hook on '4' at steps 2 and 3 (a frozen optimizer keeps the weights
    # finite): nonfinite/4 counts 2 steps at the log of step 5, the other modules 0
    from torch.utils.tensorboard import SummaryWriter

    from tests.monitor.test_monitor import Frozen, read, scalar

    model = issue_mlp(torch.nn)
    opt = Frozen(model.parameters())
    state = {"on": False}
    model[4].weight.register_hook(lambda g: g * math.nan if state["on"] else g)
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    writer = SummaryWriter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradientMonitor(model, writer, optimizer=opt, every=5):
            for step in range(6):
                state["on"] = step in (2, 3)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    writer.close()
    ea = read(tmp_path)
    assert scalar(ea, "nonfinite/4") == {0: 0.0, 5: 2.0}
    assert scalar(ea, "nonfinite/0") == scalar(ea, "nonfinite/2") == {0: 0.0, 5: 0.0}
    assert scalar(ea, "global/nonfinite") == {0: 0.0, 5: 2.0}
