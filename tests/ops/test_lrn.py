"""local_response_norm / LocalResponseNorm and CrossMapLRN2d against torch and finite differences."""
import pytest
import torch
import torch.nn.functional as TF
from torch.nn.modules._functions import CrossMapLRN2d as TorchCrossMapLRN2d

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.ops.lrn import cross_map_lrn2d
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients, saved_bytes
from tests.conftest import exact_dy, noncontiguous

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py

D = torch.float64
# float32: torch averages the squares with avg_pool, ours sums them with a product by the 0/1
# window matrix; each a few roundings of the same small sums
TOL = dict(rtol=1e-5, atol=1e-6)


def _torch_cross_map(x, size, alpha=1e-4, beta=0.75, k=1):
    return TorchCrossMapLRN2d.apply(x, size, alpha, beta, k)


# ---------------------------------------------------------------------------------------------
# local_response_norm

@pytest.mark.parametrize("shape,size", [((2, 4, 3), 3), ((1, 3, 2, 2), 2), ((2, 5, 2, 1, 2), 4), ((1, 2, 3), 5)])
def test_local_response_norm_gradients(shape, size):
    check_gradients(F.local_response_norm, torch.randn(shape, dtype=D, requires_grad=True), size, 0.5, 0.75, 1.5)


def test_local_response_norm_gradients_non_contiguous():
    x = noncontiguous(torch.randn(2, 3, 4, dtype=D, requires_grad=True))
    check_gradients(F.local_response_norm, x, 2, 0.3, 0.6, 2.0)


@pytest.mark.parametrize("shape", [(3, 6, 7), (2, 7, 3, 4), (2, 5, 2, 3, 2), (1, 1, 5), (2, 3, 1, 1, 1, 2)])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 9])
def test_local_response_norm_matches_torch(shape, size):
    x = (torch.randn(shape) * 3).requires_grad_()
    assert_same_as_torch(F.local_response_norm, TF.local_response_norm, x, size, grad_output=exact_dy(shape), **TOL)


@pytest.mark.parametrize("alpha,beta,k", [(1e-4, 0.75, 1.0), (0.5, 0.5, 2.0), (2.0, 1.5, 0.5), (1.0, 0.0, 1.0)])
def test_local_response_norm_parameters_match_torch(alpha, beta, k):
    x = torch.randn(2, 6, 5, requires_grad=True)
    assert_same_as_torch(F.local_response_norm, TF.local_response_norm, x, 3, alpha=alpha, beta=beta, k=k, **TOL)


def test_local_response_norm_channels_last_and_float64_match_torch():
    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert_same_as_torch(F.local_response_norm, TF.local_response_norm, x, 3, **TOL)
    x = torch.randn(2, 5, 3, dtype=D, requires_grad=True)
    assert_same_as_torch(F.local_response_norm, TF.local_response_norm, x, 4, rtol=1e-12, atol=1e-12)


def test_local_response_norm_value_worked_by_hand():
    # one sample, 3 channels of one value each, size 2: windows {c-1, c}; d = 1 + (1/2)/2 * s, beta 1
    x = torch.tensor([[[1.0], [2.0], [3.0]]])
    s = torch.tensor([1.0, 1 + 4, 4 + 9])  # x_{c-1}^2 + x_c^2
    expected = x / (1 + 0.25 * s).view(1, 3, 1)
    torch.testing.assert_close(F.local_response_norm(x, 2, alpha=0.5, beta=1.0, k=1.0), expected)


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_local_response_norm_under_autocast_takes_torchs_dtypes(dims):
    # 3-d: avg_pool2d, input dtype; 4-d and more: avg_pool3d, on torch's CPU float32 list
    x = torch.randn((2, 5, 3, 4)[:dims]).bfloat16()
    if dims < 3:
        assert_raises_like_torch(F.local_response_norm, TF.local_response_norm, x, 3)
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = F.local_response_norm(x, 3), TF.local_response_norm(x, 3)
    assert ours.dtype == theirs.dtype == (torch.bfloat16 if dims == 3 else torch.float32)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1.6e-2, atol=1e-2)


def test_local_response_norm_routes_to_the_function_under_enable():
    x = torch.randn(2, 4, 3, requires_grad=True)
    with mg.enable():
        y = TF.local_response_norm(x, 3)
    assert type(y.grad_fn).__name__ == "LRNFunctionBackward"


@pytest.mark.parametrize("case", ["2 dims", "size 0", "negative size", "float size"])
def test_local_response_norm_bad_input_raises_like_torch(case):
    x, size = {"2 dims": (torch.randn(2, 3), 3), "size 0": (torch.randn(2, 3, 4), 0),
               "negative size": (torch.randn(2, 3, 4, 2), -1), "float size": (torch.randn(2, 3, 4), 2.5)}[case]
    assert_raises_like_torch(F.local_response_norm, TF.local_response_norm, x, size)


# ---------------------------------------------------------------------------------------------
# CrossMapLRN2d: torch's outputs; the gradient of those outputs (torch's backward is not)

@pytest.mark.parametrize("c", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_cross_map_lrn2d_outputs_match_torch(c, size):
    x = torch.randn(2, c, 3, 4) * 3
    expected = _torch_cross_map(x, size, 0.5, 0.75, 2.0)
    torch.testing.assert_close(cross_map_lrn2d(x, size, 0.5, 0.75, 2.0), expected, **TOL)


@pytest.mark.parametrize("c,size", [(1, 3), (3, 1), (4, 2), (5, 3), (6, 5)])
def test_cross_map_lrn2d_gradients(c, size):
    check_gradients(cross_map_lrn2d, torch.randn(2, c, 2, 2, dtype=D, requires_grad=True), size, 0.5, 0.75, 1.5)


def test_cross_map_lrn2d_gradient_is_torchs_where_torchs_is_right():
    # one channel: torch's backward is the gradient of its forward
    x = torch.randn(2, 1, 3, 4, requires_grad=True)
    assert_same_as_torch(lambda t: cross_map_lrn2d(t, 3, 0.5, 0.75, 2.0),
                         lambda t: _torch_cross_map(t, 3, 0.5, 0.75, 2.0), x, **TOL)


def test_cross_map_lrn2d_on_channels_last_and_non_contiguous_inputs():
    # torch's outputs; the gradient is the one of the same values laid out contiguously
    # (gradchecked above; torch's own is not the gradient for C > 1, see below)
    x, dy = torch.randn(2, 5, 3, 4) * 3, torch.randn(2, 5, 3, 4)
    ref = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(cross_map_lrn2d(ref, 3, 0.5, 0.75, 2.0), ref, dy)
    for t in (x.to(memory_format=torch.channels_last), noncontiguous(x)):
        t.requires_grad_()
        y = cross_map_lrn2d(t, 3, 0.5, 0.75, 2.0)
        torch.testing.assert_close(y, _torch_cross_map(t.detach(), 3, 0.5, 0.75, 2.0), **TOL)
        (g,) = torch.autograd.grad(y, t, dy)
        torch.testing.assert_close(g, expected, **TOL)


def test_torchs_cross_map_lrn2d_backward_is_not_its_forwards_gradient():
    # Why manualgrad's gradient differs from torch's for C > 1: torch's fails a finite-difference
    # check of its own forward (when torch fixes this, this test fails: then compare with torch)
    x = torch.randn(1, 4, 2, 2, dtype=D, requires_grad=True)
    assert not torch.autograd.gradcheck(lambda t: _torch_cross_map(t, 3, 0.5, 0.75, 1.5), (x,),
                                        raise_exception=False)
    assert check_gradients(cross_map_lrn2d, x, 3, 0.5, 0.75, 1.5, gradgrad=False)


def test_cross_map_lrn2d_without_elements():
    for shape in [(0, 3, 2, 2), (2, 0, 2, 2), (2, 3, 0, 2)]:
        x = torch.randn(shape, requires_grad=True)
        y = cross_map_lrn2d(x, 3)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("case", ["3 dims", "5 dims", "size 0"])
def test_cross_map_lrn2d_bad_input_raises_like_torch(case):
    x, size = {"3 dims": (torch.randn(2, 3, 4), 3), "5 dims": (torch.randn(2, 3, 4, 2, 2), 3),
               "size 0": (torch.randn(2, 3, 4, 2), 0)}[case]
    assert_raises_like_torch(cross_map_lrn2d, _torch_cross_map, x, size)


def test_cross_map_lrn2d_rejects_sizes_torch_computes_nonsense_for():
    for size in (-1, 2.5):
        with pytest.raises(ValueError, match="positive int"):
            cross_map_lrn2d(torch.randn(1, 3, 2, 2), size)


# ---------------------------------------------------------------------------------------------
# modules

def test_local_response_norm_module_matches_torch_and_converts():
    x = torch.randn(2, 6, 3, 4, requires_grad=True)
    kw = dict(size=3, alpha=0.3, beta=0.6, k=1.5)
    assert_same_as_torch(mnn.LocalResponseNorm(**kw), torch.nn.LocalResponseNorm(**kw), x, **TOL)
    assert repr(mnn.LocalResponseNorm(**kw)) == repr(torch.nn.LocalResponseNorm(**kw))
    model = mg.convert(torch.nn.Sequential(torch.nn.LocalResponseNorm(**kw), torch.nn.CrossMapLRN2d(3)), strict=True)
    assert [type(m) for m in model] == [mnn.LocalResponseNorm, mnn.CrossMapLRN2d]


def test_cross_map_lrn2d_module_outputs_match_torch():
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    ours, theirs = mnn.CrossMapLRN2d(3, alpha=0.5, beta=0.75, k=2), torch.nn.CrossMapLRN2d(3, alpha=0.5, beta=0.75, k=2)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert type(ours(x).grad_fn).__name__ == "CrossMapLRN2dFunctionBackward"


@pytest.mark.parametrize("shape", [(4, 16, 32), (2, 16, 8, 8)])
def test_local_response_norm_saves_only_its_input(shape):
    x = torch.randn(shape, requires_grad=True)
    ours, _ = saved_bytes(F.local_response_norm, x, 5)
    theirs, _ = saved_bytes(TF.local_response_norm, x, 5)
    # x alone; torch's composite keeps its squares, padded sums and powers too
    assert ours == x.numel() * 4 <= theirs


def test_converted_norm_model_compiles_without_graph_breaks_and_matches_eager():
    import copy

    torch.manual_seed(0)
    model = mg.convert(torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        torch.nn.LocalResponseNorm(3), torch.nn.CrossMapLRN2d(3, alpha=0.5), torch.nn.Flatten(),
        torch.nn.Linear(64, 3)), strict=True)
    x, y = torch.randn(2, 2, 6, 6), torch.randint(0, 3, (2,))

    def loss_fn(m):
        return F.cross_entropy(m(x), y)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss_fn)(copy.deepcopy(model))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = copy.deepcopy(model)
    loss = loss_fn(model)
    loss.backward()
    compiled_loss = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(compiled)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), (_, cb) in zip(model.named_buffers(), compiled.named_buffers()):
        assert torch.equal(cb, b), name


@pytest.mark.parametrize("op", ["instance_norm", "local_response_norm"])
def test_per_sample_gradients_under_vmap_match_torch(op):
    # torch.func.vmap(grad(...)) over a batch of (2, 3, 4) samples: the generated vmap rules
    x, w = torch.randn(5, 2, 3, 4, dtype=D), torch.randn(3, dtype=D)
    call = {"instance_norm": lambda f, x, w: f.instance_norm(x, weight=w),
            "local_response_norm": lambda f, x, w: f.local_response_norm(x * w.view(1, 3, 1), 2)}[op]

    def per_sample(f):
        loss = lambda x, w: call(f, x, w).pow(2).sum()  # noqa: E731
        return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, None))(x, w)

    for ours, theirs in zip(per_sample(F), per_sample(TF)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
