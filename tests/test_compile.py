"""torch.compile on converted models: no graph breaks, and the same loss and gradients as eager.

Dynamo refuses to trace an autograd.Function with a custom jvp; manualgrad's ``apply`` runs
each Function's jvp-less twin under compile (ops/_apply.py), so forward and the hand-written
backward are traced whole. ``aot_eager`` traces forward and backward through AOTAutograd (the
hand-written backward becomes the compiled backward graph) without inductor's C++ build time;
one test runs inductor end to end.
"""
import copy
import os

import pytest
import torch

import manualgrad
import manualgrad.functional as MF
from benchmarks.models import gpt_small, resnet_small
from train.models import seed_mlp


def _mlp_case():
    model = seed_mlp(in_features=20, width=32, depth=3, classes=10)  # manualgrad modules already
    x, y = torch.randn(8, 20), torch.randint(0, 10, (8,))
    return model, (lambda m: MF.cross_entropy(m(x), y))


def _gpt_case():
    model = manualgrad.convert(gpt_small(vocab=64, d=32, heads=4, layers=2, ctx=16), strict=True)
    x, y = torch.randint(0, 64, (3, 13)), torch.randint(0, 64, (3, 13))
    return model, (lambda m: m(x, y))


def _resnet_case():
    model = manualgrad.convert(resnet_small(), strict=True)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    return model, (lambda m: MF.cross_entropy(m(x), y))


CASES = {"seed_mlp": _mlp_case, "gpt": _gpt_case, "resnet": _resnet_case}


def _assert_no_graph_break(fn):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)()
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def _assert_compiled_matches_eager(model, loss_fn):
    """loss_fn(model) eager against torch.compile(loss_fn)(copy): loss, gradients, buffers."""
    torch._dynamo.reset()
    compiled_model = copy.deepcopy(model)
    loss = loss_fn(model)
    loss.backward()
    compiled_loss = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(compiled_model)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    params, compiled_params = dict(model.named_parameters()), dict(compiled_model.named_parameters())
    assert params.keys() == compiled_params.keys()
    for name, p in params.items():
        torch.testing.assert_close(compiled_params[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # batch-norm running stats are updated by the compiled forward too
    for (name, b), (_, cb) in zip(model.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(cb, b, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_dynamo_explain_reports_zero_graph_breaks(case):
    model, loss_fn = CASES[case]()
    _assert_no_graph_break(lambda: loss_fn(model))


@pytest.mark.parametrize("case", CASES)
def test_compiled_converted_model_gives_eager_loss_and_gradients(case):
    _assert_compiled_matches_eager(*CASES[case]())


def test_inductor_compiles_the_seed_mlp_forward_and_hand_written_backward():
    torch._dynamo.reset()
    model, loss_fn = _mlp_case()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)  # inductor: a C++ kernel build
    for m in (reference, compiled):
        loss_fn(m).backward()
    for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_function_keeps_eager_forward_ad_and_jvp_outside_compile():
    # The traceable twin drops only jvp, and only under compile: eager forward-mode AD still
    # runs the hand-written jvp of the very same Function.
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    with fwAD.dual_level():
        y = MF.gelu(fwAD.make_dual(x, t))
        tangent = fwAD.unpack_dual(y).tangent
    _, expected = torch.func.jvp(torch.nn.functional.gelu, (x,), (t,))
    torch.testing.assert_close(tangent, expected)
    compiled = torch.compile(MF.gelu, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.nn.functional.gelu(x))


def test_compiled_backward_is_the_hand_written_one(monkeypatch):
    # Scale the hand-written relu backward by 3: if the compiled graph ran it, the compiled
    # gradient is 3x torch's; if Dynamo had fallen back to differentiating the forward, 1x.
    import manualgrad.ops.activation as activation

    torch._dynamo.reset()
    real = activation.relu_backward
    monkeypatch.setattr(activation, "relu_backward", lambda dy, y: 3 * real(dy, y))
    x = torch.randn(6, 5, requires_grad=True)
    torch.compile(MF.relu, backend="aot_eager", fullgraph=True)(x).sum().backward()
    torch.testing.assert_close(x.grad, 3 * (x > 0).to(x.dtype))
    torch._dynamo.reset()


def test_every_manualgrad_function_has_its_own_traceable_twin():
    from manualgrad.ops._apply import _subclasses

    functions = [f for f in _subclasses(torch.autograd.Function) if f.__module__.startswith("manualgrad.")]
    assert len(functions) > 30
    missing = [f.__qualname__ for f in functions if "_traceable_apply" not in f.__dict__]
    assert not missing


def _torch_mlp_case():
    model = seed_mlp(in_features=20, width=32, depth=3, classes=10, nn=torch.nn)  # plain torch.nn
    x, y = torch.randn(8, 20), torch.randint(0, 10, (8,))
    return model, (lambda m: torch.nn.functional.cross_entropy(m(x), y))


def _torch_gpt_case():
    model = gpt_small(vocab=64, d=32, heads=4, layers=2, ctx=16)  # plain torch.nn
    x, y = torch.randint(0, 64, (3, 13)), torch.randint(0, 64, (3, 13))
    return model, (lambda m: m(x, y))


MODE_CASES = {"seed_mlp": _torch_mlp_case, "gpt": _torch_gpt_case, "converted_gpt": _gpt_case}


def _under_mode(loss_fn):
    def run(m):
        with manualgrad.enable():
            return loss_fn(m)
    return run


@pytest.mark.parametrize("case", MODE_CASES)
def test_under_the_function_mode_dynamo_explain_reports_zero_graph_breaks(case):
    model, loss_fn = MODE_CASES[case]()
    _assert_no_graph_break(lambda: _under_mode(loss_fn)(model))


@pytest.mark.parametrize("case", MODE_CASES)
def test_compiled_under_the_function_mode_gives_eager_loss_and_gradients(case):
    model, loss_fn = MODE_CASES[case]()
    _assert_compiled_matches_eager(model, _under_mode(loss_fn))


def test_a_function_defined_outside_the_package_compiles_after_its_first_eager_call():
    from manualgrad.ops._apply import INPUT, apply

    class Cube(torch.autograd.Function):  # custom jvp: Dynamo would refuse it as it is
        autocast = INPUT

        @staticmethod
        def forward(x):
            return x ** 3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, dy):
            (x,) = ctx.saved_tensors
            return 3 * x.square() * dy

        @staticmethod
        def jvp(ctx, dx):
            (x,) = ctx.saved_tensors
            return 3 * x.square() * dx

    torch._dynamo.reset()
    x = torch.randn(6, requires_grad=True)
    apply(Cube, x)  # eager: registers its traceable twin
    explanation = torch._dynamo.explain(lambda t: apply(Cube, t).sum())(x)
    assert explanation.graph_break_count == 0
    torch.compile(lambda t: apply(Cube, t).sum(), backend="aot_eager", fullgraph=True)(x).backward()
    torch.testing.assert_close(x.grad, 3 * x.detach().square())


def test_inductor_cache_is_one_directory_per_cpu_capability():
    # tests/conftest.py: torch's inductor leaves ATEN_CPU_CAPABILITY out of its cache keys, so a
    # kernel compiled under another capability must never be found in this run's cache
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from tests import conftest
    if conftest.INDUCTOR_CACHE_SET_BY_USER:
        pytest.skip("TORCHINDUCTOR_CACHE_DIR set by the user")
    capability = os.environ.get("ATEN_CPU_CAPABILITY") or "native"
    assert cache_dir() == os.path.abspath(conftest.inductor_cache_dir({"ATEN_CPU_CAPABILITY": capability}))
    dirs = {conftest.inductor_cache_dir({"ATEN_CPU_CAPABILITY": c}) for c in ("avx2", "avx512", "default")}
    assert len(dirs | {conftest.inductor_cache_dir({})}) == 4
    assert conftest.inductor_cache_dir({"TORCHINDUCTOR_CACHE_DIR": "/elsewhere"}) == "/elsewhere"
