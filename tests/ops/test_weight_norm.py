import copy
import inspect

import pytest
import torch
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.coverage import graph_nodes
from manualgrad.nn.weight_norm import LegacyWeightNorm, WeightNorm
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")

# (shape of v, dim): every dim of a conv weight, the whole tensor (-1), a negative dim, 1-D and 2-D
CASES = [((4, 3, 5), 0), ((4, 3, 5), 1), ((4, 3, 5), 2), ((4, 3, 5), -1), ((4, 3, 5), -2), ((7,), 0), ((5, 6), 1)]


def _pair(shape, dim, dtype=torch.float32):
    v = torch.randn(shape, dtype=dtype)
    g = torch.norm_except_dim(v, 2, dim) * torch.rand(()).add(0.5)  # g away from ||v||: w is not v
    if g.dim() and dim != -1:
        g = g * torch.rand_like(g).add(0.5)
    return v.requires_grad_(), g.requires_grad_()


@pytest.mark.parametrize("shape,dim", CASES)
def test_weight_norm_gradients(shape, dim):
    check_gradients(F.weight_norm, *_pair(shape, dim, torch.float64), dim=dim)


@pytest.mark.parametrize("shape,dim", CASES + [((17, 13, 31), 0), ((257, 3), 1), ((3, 11, 7), -1)])
def test_weight_norm_matches_torch(shape, dim):
    assert_same_as_torch(F.weight_norm, torch._weight_norm, *_pair(shape, dim), dim=dim)


def test_weight_norm_by_hand():
    v, g = torch.tensor([[3.0, 4.0]], requires_grad=True), torch.tensor([[10.0]], requires_grad=True)
    w = F.weight_norm(v, g, 0)
    assert w.tolist() == [[6.0, 8.0]]
    w.backward(torch.tensor([[1.0, 0.0]]))
    # r = dw . v = 3, n = 5: dg = r / n; dv = (g / n) (dw - v r / n^2) = 2 ([1, 0] - [3, 4] 3 / 25)
    torch.testing.assert_close(g.grad, torch.tensor([[0.6]]))
    torch.testing.assert_close(v.grad, torch.tensor([[1.28, -0.96]]))


@pytest.mark.parametrize("dim", [3, -4])
def test_weight_norm_rejects_a_dim_out_of_range_like_torch(dim):
    v = torch.randn(4, 3, 5)
    assert_raises_like_torch(F.weight_norm, torch._weight_norm, v, torch.randn(4, 1, 1), dim, match="out of range")


@pytest.mark.parametrize("shape,dim", [((0, 3, 4), 0), ((2, 3, 0), 2)])
def test_weight_norm_without_slices_raises_runtime_error(shape, dim):
    # torch raises RuntimeError for (2, 3, 0) along dim 2, and dies of SIGFPE for (0, 3, 4) along 0
    g_shape = [s if d == dim else 1 for d, s in enumerate(shape)]
    with pytest.raises(RuntimeError, match="no slices"):
        F.weight_norm(torch.randn(shape), torch.randn(g_shape), dim)


def test_weight_norm_signature_is_torchs():
    assert list(inspect.signature(F.weight_norm).parameters) == ["v", "g", "dim"]


def test_parametrized_linear_is_routed_under_enable():
    th = torch_weight_norm(torch.nn.Linear(5, 3))
    x = torch.randn(4, 5)
    with mg.enable():
        y = th(x)
    assert "WeightNormFunctionBackward" in {type(n).__name__ for n in graph_nodes([y.grad_fn])}


# ---------------------------------------------------------------------------------------------
# convert: a weight-normalized layer becomes hand-written end to end

def _wav2vec2_positional_conv():
    """HF wav2vec2's positional convolution, scaled down: a grouped Conv1d, weight norm over dim 2."""
    conv = torch.nn.Conv1d(8, 8, kernel_size=5, padding=2, groups=4)
    return torch_weight_norm(conv, name="weight", dim=2)


def test_weight_normalized_conv_converts_strictly_and_trains_like_torch():
    theirs = torch.nn.Sequential(_wav2vec2_positional_conv(), torch.nn.GELU())
    ours = mg.convert(copy.deepcopy(theirs), strict=True)
    conv = ours[0]
    assert isinstance(conv, mnn.Conv1d) and parametrize.is_parametrized(conv, "weight")
    assert type(conv.parametrizations.weight[0]) is WeightNorm
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for step in range(3):
        x, dy = torch.randn(2, 8, 11), exact_dy((2, 8, 11))
        y, y_t = ours(x), theirs(x)
        names = {type(n).__name__ for n in graph_nodes([y.grad_fn])}
        assert names <= {"ConvFunctionBackward", "WeightNormFunctionBackward", "GELUFunctionBackward",
                         "AccumulateGrad"}, names
        torch.testing.assert_close(y, y_t)
        for m, out, opt in ((ours, y, opts[0]), (theirs, y_t, opts[1])):
            opt.zero_grad()
            out.backward(dy)
        grads_t = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, grads_t[name].grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        for opt in opts:
            opt.step()


def test_deprecated_weight_norm_hook_converts_and_trains_like_torch():
    def make():  # (a module with this hook cannot be deep-copied: made twice from one seed)
        torch.manual_seed(3)
        with pytest.warns(FutureWarning):
            return torch.nn.utils.weight_norm(torch.nn.Conv1d(6, 4, 3, padding=1, groups=2), dim=2)

    theirs, ours = make(), mg.convert(make(), strict=True)
    assert isinstance(ours, mnn.Conv1d)
    assert [type(h) for h in ours._forward_pre_hooks.values()] == [LegacyWeightNorm]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for step in range(3):
        x, dy = torch.randn(2, 6, 7), exact_dy((2, 4, 7))
        y, y_t = ours(x), theirs(x)
        assert {type(n).__name__ for n in graph_nodes([y.grad_fn])} == {
            "ConvFunctionBackward", "WeightNormFunctionBackward", "AccumulateGrad"}
        torch.testing.assert_close(y, y_t)
        for m, out, opt in ((ours, y, opts[0]), (theirs, y_t, opts[1])):
            opt.zero_grad()
            out.backward(dy)
        for (name, p), p_t in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, p_t.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        for opt in opts:
            opt.step()
    torch.nn.utils.remove_weight_norm(ours)  # finds the hook it registered (the twin is one)
    assert not ours._forward_pre_hooks and "weight" in dict(ours.named_parameters())


def test_converted_weight_norm_can_be_removed_and_copied():
    conv = mg.convert(_wav2vec2_positional_conv(), strict=True)
    assert type(copy.deepcopy(conv)) is type(conv)
    w = conv.weight.detach().clone()
    parametrize.remove_parametrizations(conv, "weight")
    assert type(conv) is mnn.Conv1d
    torch.testing.assert_close(conv.weight, w)


def test_convert_keeps_a_users_parametrization_and_converts_its_module():
    class Double(torch.nn.Module):  # a user's parametrization: its forward is beyond reach
        def forward(self, w):
            return 2 * w

    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    parametrize.register_parametrization(model[0], "weight", Double())
    mg.convert(model, strict=True)  # holds no parameters of its own: nothing to report
    assert isinstance(model[0], mnn.Linear) and type(model[0].parametrizations.weight[0]) is Double
    torch.testing.assert_close(model[0].weight, 2 * model[0].parametrizations.weight.original)
