"""manualgrad.optim against torch.optim: same trajectory, same state, same errors.

Every comparison trains two copies of one small MLP (5 -> 7 -> 3, float32, with an extra
parameter the loss never touches) on the same fixed batches, one with torch.optim.X and one
with manualgrad.optim.X, with fresh gradients from a real loss at every step.
"""
import copy
import importlib
import inspect
import itertools
import re

import pytest
import torch
from torch.optim import lr_scheduler

import manualgrad.optim as mo
from manualgrad.testing import assert_raises_like_torch

pytestmark = pytest.mark.trajectory  # follows a trajectory: run again under other CPUs' kernels

TWINS = {
    "SGD": (mo.SGD, torch.optim.SGD),
    "RMSprop": (mo.RMSprop, torch.optim.RMSprop),
    "Adam": (mo.Adam, torch.optim.Adam),
    "AdamW": (mo.AdamW, torch.optim.AdamW),
}

_data = torch.Generator().manual_seed(1234)
X = torch.randn(60, 16, 5, generator=_data)
Y = torch.randn(60, 16, 3, generator=_data)


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model.unused = torch.nn.Parameter(torch.randn(4))  # never in the loss: its .grad stays None
    return model.to(dtype)


def loss_at(model, t):
    x, y = X[t % len(X)], Y[t % len(Y)]
    return torch.nn.functional.mse_loss(model(x.to(model[0].weight.dtype)), y.to(model[0].weight.dtype))


def groups(model, lr=None):
    """Two parameter groups; the second overrides lr when given."""
    second = {"params": list(model[2].parameters())}
    if lr is not None:
        second["lr"] = lr
    return [{"params": [model[0].weight, model[0].bias, model.unused]}, second]


def train(model, opt, steps, start=0, scheduler=None, set_to_none=True):
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=set_to_none)
        loss_at(model, t).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_value(a, b, what):
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), f"{what}: {type(a).__name__}, torch has a tensor"
        assert (a.dtype, a.shape, a.device, a.layout) == (b.dtype, b.shape, b.device, b.layout), (
            f"{what}: {a.dtype} {tuple(a.shape)} {a.device} {a.layout}, torch: {b.dtype} {tuple(b.shape)} {b.device} "
            f"{b.layout}"
        )
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"{what}: {m}")
    elif isinstance(b, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), f"{what}: {a!r} != torch's {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_value(x, y, f"{what}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{what}: {a!r} != torch's {b!r}"


def assert_same_optimizer(mg_opt, th_opt):
    """state_dicts agree: param_groups key by key, state key by key (types, dtypes, values)."""
    mg, th = mg_opt.state_dict(), th_opt.state_dict()
    assert len(mg["param_groups"]) == len(th["param_groups"])
    for i, (g, h) in enumerate(zip(mg["param_groups"], th["param_groups"])):
        assert list(g) == list(h), f"group {i} keys {list(g)} != torch's {list(h)}"
        for key in h:
            assert_same_value(g[key], h[key], f"group {i} {key!r}")
    assert mg["state"].keys() == th["state"].keys(), f"state for params {list(mg['state'])}, torch {list(th['state'])}"
    for i in th["state"]:
        assert list(mg["state"][i]) == list(th["state"][i]), f"param {i} state keys"
        for key, value in th["state"][i].items():
            assert_same_value(mg["state"][i][key], value, f"param {i} state {key!r}")


def assert_same_params(mg_model, th_model, bitwise=False):
    """Parameters agree to 1e-6; with ``bitwise``, exactly (same operations in the same order)."""
    for (name, a), (_, b) in zip(mg_model.named_parameters(), th_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"parameter {name}: {m}")
        assert not bitwise or torch.equal(a, b), f"{name} is not bit-for-bit torch's: the order of operations differs"


def twin_runs(name, kwargs, steps=50, lr2=None, scheduler=None):
    """Train a model with each optimizer; return (mg_model, mg_opt, th_model, th_opt)."""
    mg_cls, th_cls = TWINS[name]
    th_model = make_model()
    mg_model = copy.deepcopy(th_model)
    th_opt = th_cls(groups(th_model, lr2), **kwargs)
    mg_opt = mg_cls(groups(mg_model, lr2), **kwargs)
    th_sched = scheduler(th_opt) if scheduler else None
    mg_sched = scheduler(mg_opt) if scheduler else None
    train(th_model, th_opt, steps, scheduler=th_sched)
    train(mg_model, mg_opt, steps, scheduler=mg_sched)
    return mg_model, mg_opt, th_model, th_opt


def _product(**options):
    return [dict(zip(options, values)) for values in itertools.product(*options.values())]


def _sgd_valid(kw):
    return not kw["nesterov"] or (kw["momentum"] > 0 and kw["dampening"] == 0)


CASES = (
    [("SGD", dict(lr=0.05, **kw)) for kw in _product(
        momentum=[0, 0.9], dampening=[0, 0.3], weight_decay=[0, 0.1], nesterov=[False, True], maximize=[False, True])
     if _sgd_valid(kw)]
    + [("RMSprop", dict(lr=0.01, **kw)) for kw in _product(
        alpha=[0.9], weight_decay=[0, 0.1], momentum=[0, 0.9], centered=[False, True], maximize=[False, True])]
    + [("Adam", dict(lr=0.01, **kw)) for kw in _product(
        betas=[(0.8, 0.95)], weight_decay=[0, 0.1], amsgrad=[False, True], maximize=[False, True],
        decoupled_weight_decay=[False, True])]
    + [("AdamW", dict(lr=0.01, **kw)) for kw in _product(
        betas=[(0.8, 0.95)], weight_decay=[0, 0.1], amsgrad=[False, True], maximize=[False, True])]
)


def _case_id(case):
    name, kw = case
    return name + "-" + ",".join(f"{k}={v}" for k, v in kw.items() if k != "lr")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_optimizer_follows_torch_for_50_steps(case):
    name, kwargs = case
    mg_model, mg_opt, th_model, th_opt = twin_runs(name, kwargs, lr2=kwargs["lr"] / 2)
    assert_same_params(mg_model, th_model, bitwise=True)
    assert_same_optimizer(mg_opt, th_opt)
    assert mg_model.unused.grad is None and mg_opt.state_dict()["state"].get(2) is None  # skipped, no state
    assert not torch.equal(mg_model[0].weight, make_model()[0].weight), "nothing was trained"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("direction", ["torch->manualgrad", "manualgrad->torch"])
def test_state_dict_round_trips_and_training_continues(case, direction):
    name, kwargs = case
    mg_cls, th_cls = TWINS[name]
    first_cls, second_cls = (th_cls, mg_cls) if direction == "torch->manualgrad" else (mg_cls, th_cls)
    ref_model = make_model()
    ref_opt = first_cls(groups(ref_model, 0.004), **kwargs)
    train(ref_model, ref_opt, 10)
    model = copy.deepcopy(ref_model)
    opt = second_cls(groups(model), **kwargs)  # a different lr in group 1: the state_dict must bring it
    # deepcopy = save/load: load_state_dict keeps (does not copy) tensors that need no cast
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    mg_and_th = (opt, ref_opt) if direction == "torch->manualgrad" else (ref_opt, opt)
    assert_same_optimizer(*mg_and_th)
    train(ref_model, ref_opt, 10, start=10)
    train(model, opt, 10, start=10)
    assert_same_params(model, ref_model, bitwise=True)
    assert_same_optimizer(*mg_and_th)


SCHEDULERS = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=10, gamma=0.5),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=1e-3),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=50),  # also cycles momentum
}
SCHEDULED = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Adam": dict(lr=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("name", TWINS)
def test_optimizer_follows_torch_under_lr_scheduler(name, scheduler):
    mg_model, mg_opt, th_model, th_opt = twin_runs(name, SCHEDULED[name], scheduler=SCHEDULERS[scheduler])
    assert_same_params(mg_model, th_model)
    assert_same_optimizer(mg_opt, th_opt)  # includes the scheduled lr (and momentum/betas for OneCycleLR)
    assert mg_opt.param_groups[0]["lr"] != SCHEDULED[name]["lr"], "the scheduler did not change lr"


@pytest.mark.parametrize("name", TWINS)
def test_zero_grad_without_set_to_none_updates_params_with_zero_grad(name):
    # With zeroed (not None) grads the unused parameter takes part: weight decay moves it.
    kwargs = dict(lr=0.01, weight_decay=0.1)
    mg_cls, th_cls = TWINS[name]
    th_model = make_model()
    mg_model = copy.deepcopy(th_model)
    th_opt, mg_opt = th_cls(th_model.parameters(), **kwargs), mg_cls(mg_model.parameters(), **kwargs)
    th_model.unused.grad = torch.zeros_like(th_model.unused)
    mg_model.unused.grad = torch.zeros_like(mg_model.unused)
    train(th_model, th_opt, 20, set_to_none=False)
    train(mg_model, mg_opt, 20, set_to_none=False)
    assert_same_params(mg_model, th_model)
    assert_same_optimizer(mg_opt, th_opt)
    assert not torch.equal(mg_model.unused, make_model().unused)


@pytest.mark.parametrize("name", TWINS)
def test_tensor_lr_follows_torch(name):
    mg_model, mg_opt, th_model, th_opt = twin_runs(name, dict(lr=torch.tensor([0.01])), steps=20)
    assert_same_params(mg_model, th_model, bitwise=True)
    assert_same_optimizer(mg_opt, th_opt)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_tensor_betas_follow_torch(name):
    betas = (torch.tensor(0.8, dtype=torch.float64), torch.tensor([0.95]))
    mg_model, mg_opt, th_model, th_opt = twin_runs(name, dict(lr=0.01, betas=betas, amsgrad=True), steps=20)
    assert_same_params(mg_model, th_model, bitwise=True)
    assert_same_optimizer(mg_opt, th_opt)


@pytest.fixture
def default_float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("name", TWINS)
def test_step_dtype_follows_default_dtype_float64(name, default_float64):
    kwargs = dict(lr=0.01, momentum=0.9) if name in ("SGD", "RMSprop") else dict(lr=0.01)
    mg_model, mg_opt, th_model, th_opt = twin_runs(name, kwargs, steps=5)
    assert_same_params(mg_model, th_model, bitwise=True)
    assert_same_optimizer(mg_opt, th_opt)  # 'step' is float64 here


@pytest.mark.parametrize("name", TWINS)
def test_complex_parameters_follow_torch(name):
    kwargs = {
        "SGD": dict(lr=0.01, momentum=0.9, weight_decay=0.1),
        "RMSprop": dict(lr=0.01, momentum=0.9, weight_decay=0.1, centered=True),
        "Adam": dict(lr=0.01, weight_decay=0.1, amsgrad=True),
        "AdamW": dict(lr=0.01, weight_decay=0.1, amsgrad=True),
    }[name]
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 4, dtype=torch.complex64, generator=gen)
    x = torch.randn(8, 4, dtype=torch.complex64, generator=gen)
    y = torch.randn(8, 3, dtype=torch.complex64, generator=gen)
    results = []
    for cls in TWINS[name]:
        w = torch.nn.Parameter(w0.clone())
        opt = cls([w], **kwargs)
        for _ in range(10):
            opt.zero_grad()
            (x @ w.T - y).abs().pow(2).mean().backward()
            opt.step()
        results.append((w, opt))
    (mg_w, mg_opt), (th_w, th_opt) = results
    torch.testing.assert_close(mg_w, th_w, rtol=0, atol=1e-6)
    assert_same_optimizer(mg_opt, th_opt)


@pytest.mark.parametrize("name", TWINS)
def test_closure_is_called_with_grad_and_its_loss_returned(name):
    mg_cls, th_cls = TWINS[name]
    losses, models = [], []
    for cls in (mg_cls, th_cls):
        model = make_model()
        opt = cls(model.parameters(), lr=0.01)

        def closure():
            opt.zero_grad()
            loss = loss_at(model, 0)
            loss.backward()
            return loss

        losses.append([opt.step(closure) for _ in range(3)])
        models.append(model)
    assert [loss.item() for loss in losses[0]] == [loss.item() for loss in losses[1]]
    assert_same_params(*models)


@pytest.mark.parametrize("name", TWINS)
def test_step_does_not_call_torch_optim_functional_code(name, monkeypatch):
    # The update is manualgrad's own: torch's functional optimizers are made to fail.
    def fail(*args, **kwargs):
        raise AssertionError("called torch.optim's implementation")

    for fn in ["sgd", "rmsprop", "adam"]:  # torch.optim.X.step calls torch.optim.x.x
        monkeypatch.setattr(importlib.import_module(f"torch.optim.{fn}"), fn, fail)
    model = make_model()
    mg_opt = TWINS[name][0](model.parameters(), lr=0.01)
    train(model, mg_opt, 2)
    with pytest.raises(AssertionError, match="torch.optim's implementation"):  # the patch does bite torch
        train(make_model(), TWINS[name][1](make_model().parameters(), lr=0.01), 1)


@pytest.mark.parametrize("name", TWINS)
def test_signature_and_defaults_match_torch(name):
    mg_cls, th_cls = TWINS[name]
    mg_sig, th_sig = inspect.signature(mg_cls.__init__), inspect.signature(th_cls.__init__)
    describe = lambda sig: [(p.name, p.kind, p.default) for p in sig.parameters.values()]  # noqa: E731
    assert describe(mg_sig) == describe(th_sig)
    model = make_model()
    mg_opt, th_opt = mg_cls(model.parameters()), th_cls(model.parameters())
    assert mg_opt.defaults == th_opt.defaults
    assert isinstance(mg_opt, torch.optim.Optimizer)
    assert_same_optimizer(mg_opt, th_opt)


# --- errors -----------------------------------------------------------------------------------

BAD = [
    ("SGD", dict(lr=-1)),
    ("SGD", dict(momentum=-0.5)),
    ("SGD", dict(weight_decay=-1)),
    ("SGD", dict(nesterov=True)),
    ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1)),
    ("SGD", dict(lr=torch.tensor([0.1, 0.2]))),
    ("RMSprop", dict(lr=-1)),
    ("RMSprop", dict(eps=-1)),
    ("RMSprop", dict(momentum=-1)),
    ("RMSprop", dict(weight_decay=-1)),
    ("RMSprop", dict(alpha=-1)),
    ("RMSprop", dict(lr=torch.tensor([0.1, 0.2]))),
    ("Adam", dict(lr=-1)),
    ("Adam", dict(eps=-1)),
    ("Adam", dict(betas=(1.0, 0.999))),
    ("Adam", dict(betas=(-0.1, 0.9))),
    ("Adam", dict(betas=(0.9, 1.0))),
    ("Adam", dict(weight_decay=-1)),
    ("Adam", dict(betas=(0.9, torch.tensor(0.999)))),
    ("Adam", dict(betas=(0, 0.999))),  # torch: an int beta is neither a float nor a Tensor
    ("Adam", dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor(0.999)))),
    ("Adam", dict(lr=torch.tensor([0.1, 0.2]))),
    ("Adam", dict(lr=torch.tensor(0.1), foreach=True)),  # ValueError before NotImplementedError, like torch
    ("AdamW", dict(lr=-1)),
    ("AdamW", dict(betas=(0.9, 1.5))),
    ("AdamW", dict(weight_decay=-0.1)),
]


def _bad_id(value):
    return value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in value.items())


@pytest.mark.parametrize("name,kwargs", BAD, ids=_bad_id)
def test_bad_hyperparameters_raise_like_torch(name, kwargs):
    mg_cls, th_cls = TWINS[name]
    params = list(make_model().parameters())
    with pytest.raises(Exception) as th_error:
        th_cls(params, **kwargs)
    assert_raises_like_torch(mg_cls, th_cls, params, match=f"^{re.escape(str(th_error.value))}$", **kwargs)


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("params", [[], torch.zeros(3, requires_grad=True)], ids=["empty", "tensor"])
def test_bad_params_raise_like_torch(name, params):
    assert_raises_like_torch(TWINS[name][0], TWINS[name][1], params)


UNSUPPORTED = {
    "SGD": ["foreach", "differentiable", "fused"],
    "RMSprop": ["capturable", "foreach", "differentiable"],
    "Adam": ["foreach", "capturable", "differentiable", "fused"],
    "AdamW": ["foreach", "capturable", "differentiable", "fused"],
}
UNSUPPORTED_CASES = [(name, option) for name, options in UNSUPPORTED.items() for option in options]


@pytest.mark.parametrize("name,option", UNSUPPORTED_CASES)
def test_unsupported_option_raises_not_implemented(name, option):
    mg_cls, th_cls = TWINS[name]
    th_cls(make_model().parameters(), **{option: True})  # a real torch option, accepted by torch
    with pytest.raises(NotImplementedError, match=option):
        mg_cls(make_model().parameters(), **{option: True})
    with pytest.raises(NotImplementedError, match=option):  # per parameter group too
        mg_cls([{"params": make_model().parameters(), option: True}])
    opt = mg_cls(make_model().parameters())
    with pytest.raises(NotImplementedError, match=option):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], option: True})
    th_opt = th_cls(make_model().parameters(), **{option: True})
    with pytest.raises(NotImplementedError, match=option):  # or brought in by a torch state_dict
        mg_cls(make_model().parameters()).load_state_dict(th_opt.state_dict())


@pytest.mark.parametrize("name", TWINS)
def test_unsupported_options_accept_their_defaults(name):
    mg_cls, th_cls = TWINS[name]
    signature = inspect.signature(th_cls.__init__).parameters
    defaults = {option: signature[option].default for option in UNSUPPORTED[name]}  # None or False
    for kwargs in (defaults, {option: False for option in UNSUPPORTED[name]}):
        mg_model, mg_opt, th_model, th_opt = twin_runs(name, dict(lr=0.01, **kwargs), steps=3)
        assert_same_params(mg_model, th_model)
        assert_same_optimizer(mg_opt, th_opt)


GRAD_HYPER = [
    ("SGD", "lr"), ("SGD", "weight_decay"), ("RMSprop", "lr"), ("Adam", "lr"), ("Adam", "betas"), ("AdamW", "lr"),
    ("AdamW", "betas"),
]


@pytest.mark.parametrize("name,key", GRAD_HYPER)
def test_hyperparameter_tensor_that_requires_grad_raises_not_implemented(name, key):
    value = torch.tensor(0.01, requires_grad=True)
    if key == "betas":
        value = (torch.tensor(0.9), torch.tensor(0.999, requires_grad=True))
    TWINS[name][1](make_model().parameters(), **{key: value})  # torch accepts it
    with pytest.raises(NotImplementedError, match=key):
        TWINS[name][0](make_model().parameters(), **{key: value})
    accepted = (torch.tensor(0.9), torch.tensor(0.999)) if key == "betas" else value.detach()
    TWINS[name][0](make_model().parameters(), **{key: accepted})  # without requires_grad it is fine


def _sparse_run(cls, kwargs):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters(), **kwargs)
    for t in range(5):
        opt.zero_grad()
        emb(torch.tensor([1, 2, 2, t])).pow(2).sum().backward()
        opt.step()
    return emb, opt


@pytest.mark.parametrize("name", ["RMSprop", "Adam", "AdamW"])
def test_sparse_gradients_raise_like_torch(name):
    mg_cls, th_cls = TWINS[name]
    with pytest.raises(RuntimeError) as th_error:
        _sparse_run(th_cls, dict(lr=0.1))
    with pytest.raises(RuntimeError, match=f"^{re.escape(str(th_error.value))}$"):
        _sparse_run(mg_cls, dict(lr=0.1))


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                    dict(momentum=0.9, dampening=0.5, maximize=True)], ids=str)
def test_sgd_sparse_gradients_follow_torch(kwargs):
    mg_emb, mg_opt = _sparse_run(mo.SGD, dict(lr=0.1, **kwargs))
    th_emb, th_opt = _sparse_run(torch.optim.SGD, dict(lr=0.1, **kwargs))
    torch.testing.assert_close(mg_emb.weight, th_emb.weight, rtol=0, atol=1e-6)
    assert_same_optimizer(mg_opt, th_opt)  # a sparse momentum buffer, as in torch


def test_sgd_sparse_gradients_with_weight_decay_raise_like_torch():
    with pytest.raises(RuntimeError) as th_error:
        _sparse_run(torch.optim.SGD, dict(lr=0.1, weight_decay=0.1))
    with pytest.raises(RuntimeError, match=re.escape(str(th_error.value))):
        _sparse_run(mo.SGD, dict(lr=0.1, weight_decay=0.1))


# Keys that torch's __setstate__ fills in for checkpoints from older torch versions.
OLD_KEYS = {
    "SGD": ["nesterov", "maximize", "foreach", "differentiable", "fused"],
    "RMSprop": ["momentum", "centered", "foreach", "maximize", "differentiable", "capturable"],
    "Adam": ["amsgrad", "maximize", "foreach", "capturable", "differentiable", "decoupled_weight_decay", "fused"],
    "AdamW": ["amsgrad", "maximize", "foreach", "capturable", "differentiable", "decoupled_weight_decay", "fused"],
}


@pytest.mark.parametrize("name", TWINS)
def test_old_checkpoint_is_upgraded_like_torch(name):
    # An old state_dict: group keys missing, 'step' a Python number. Both fill in the same.
    mg_cls, th_cls = TWINS[name]
    kwargs = dict(lr=0.01, momentum=0.9) if name in ("SGD", "RMSprop") else dict(lr=0.01)
    model = make_model()
    ref = th_cls(model.parameters(), **kwargs)
    train(model, ref, 3)
    old = copy.deepcopy(ref.state_dict())
    for group in old["param_groups"]:
        for key in OLD_KEYS[name]:
            del group[key]
    for state in old["state"].values():
        if "step" in state:
            state["step"] = float(state["step"])
    th_opt, mg_opt = th_cls(model.parameters(), **kwargs), mg_cls(model.parameters(), **kwargs)
    th_opt.load_state_dict(copy.deepcopy(old))
    mg_opt.load_state_dict(copy.deepcopy(old))
    assert_same_optimizer(mg_opt, th_opt)
