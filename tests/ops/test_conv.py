import copy
import math

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.ops.conv import _GEMM_MAX
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


# float32 parity: each output is a sum over C/g * prod(K) products (and dW over N * prod(Lo)),
# accumulated in a different order than torch's kernels (transposed conv, batch-swapped conv),
# so absolute rounding grows with the sum's length: atol 1e-5 instead of 1e-6.
ATOL = 1e-5

# (input shape, weight shape, options): stride that does not divide, int / tuple / 'same' /
# 'valid' padding (the 'same' ones with an even kernel pad asymmetrically), dilation 2,
# groups 2, depthwise (with and without a channel multiplier), size-1 dims, unbatched.
CASES_2D = [
    ((2, 3, 5, 4), (4, 3, 3, 2), {}),
    ((1, 1, 5, 5), (2, 1, 3, 2), dict(stride=2, padding=1)),
    ((1, 1, 5, 6), (1, 1, 2, 3), dict(stride=(2, 3), padding=(1, 0), bias=None)),
    ((1, 2, 3, 4), (2, 2, 2, 3), dict(padding="same")),
    ((1, 1, 4, 3), (1, 1, 2, 2), dict(padding="same", dilation=(2, 1))),
    ((1, 1, 5, 4), (1, 1, 2, 2), dict(padding="valid", dilation=2)),
    ((2, 4, 5, 5), (6, 2, 3, 3), dict(groups=2, padding=1)),
    ((1, 2, 4, 5), (2, 1, 3, 3), dict(groups=2, stride=2, padding=1)),
    ((1, 2, 3, 3), (4, 1, 2, 2), dict(groups=2, padding="same", bias=None)),
    ((1, 1, 1, 7), (1, 1, 1, 3), dict(stride=(1, 2))),
    ((2, 4, 3), (1, 2, 2, 2), dict(padding=(1, 0))),
]
CASES_1D = [
    ((2, 3, 13), (5, 3, 4), dict(stride=3, padding=2, dilation=2)),
    ((2, 2, 5), (2, 2, 4), dict(padding="same")),
    ((1, 4, 5), (2, 2, 3), dict(groups=2, stride=2, bias=None)),
    ((1, 2, 6), (4, 1, 3), dict(groups=2, padding="same", dilation=2)),
    ((1, 1, 1), (1, 1, 1), {}),
    ((3, 5), (2, 3, 2), dict(padding="valid")),
]
CASES = [(F.conv2d, TF.conv2d, *c) for c in CASES_2D] + [(F.conv1d, TF.conv1d, *c) for c in CASES_1D]
IDS = [f"{f.__name__}-{x}-{w}-{kw}" for f, _, x, w, kw in CASES]


def _tensors(x_shape, w_shape, bias, dtype=torch.float32):
    """x, W and b (None unless bias) with random values, requiring grad."""
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    w = torch.randn(w_shape, dtype=dtype, requires_grad=True)
    b = torch.randn(w_shape[0], dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("fn,torch_fn,x_shape,w_shape,kwargs", CASES, ids=IDS)
def test_conv_gradients(fn, torch_fn, x_shape, w_shape, kwargs):
    # kwargs may say bias=None: then the Function gets no bias
    kwargs = dict(kwargs)
    x, w, b = _tensors(x_shape, w_shape, kwargs.pop("bias", True) is not None, torch.float64)
    check_gradients(lambda x, w, b: fn(x, w, b, **kwargs), x, w, b)


@pytest.mark.parametrize("fn,torch_fn,x_shape,w_shape,kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_matches_torch(fn, torch_fn, x_shape, w_shape, kwargs, bias):
    kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    x, w, b = _tensors(x_shape, w_shape, bias)
    assert_same_as_torch(fn, torch_fn, x, w, b, atol=ATOL, **kwargs)


@pytest.mark.parametrize("fn,torch_fn,x_shape,w_shape,kwargs", [
    (F.conv2d, TF.conv2d, (2, 3, 13, 11), (5, 3, 3, 2), {}),
    (F.conv2d, TF.conv2d, (2, 3, 13, 11), (5, 3, 3, 2), dict(stride=2, padding=(1, 2), dilation=(2, 1))),
    (F.conv2d, TF.conv2d, (2, 6, 13, 11), (9, 2, 3, 3), dict(groups=3, padding="same")),
    (F.conv2d, TF.conv2d, (2, 6, 13, 11), (6, 1, 3, 3), dict(groups=6, stride=2, padding=1)),
    (F.conv1d, TF.conv1d, (2, 3, 257), (5, 3, 7), dict(stride=3, padding=3)),
    (F.conv1d, TF.conv1d, (2, 4, 257), (4, 1, 4), dict(groups=4, padding="same")),
])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_matches_torch_on_odd_shapes(fn, torch_fn, x_shape, w_shape, kwargs):
    x, w, b = _tensors(x_shape, w_shape, True)
    assert_same_as_torch(fn, torch_fn, x, w, b, atol=ATOL, **kwargs)


def test_conv2d_gradients_non_contiguous():
    x = noncontiguous(torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True))
    w = noncontiguous(torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True))
    assert not x.is_contiguous() and not w.is_contiguous()
    check_gradients(lambda x, w: F.conv2d(x, w, stride=2, padding=1), x, w)


def test_conv_matches_torch_on_a_channels_last_input():
    x = torch.randn(2, 3, 9, 7).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    assert_same_as_torch(F.conv2d, TF.conv2d, x, w, None, atol=ATOL, padding=1)


def test_conv_only_computes_requested_gradients():
    x = torch.randn(2, 3, 6, 5)  # no grad: the first layer's input
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = F.conv2d(x, w, padding=1)
    assert type(y.grad_fn).__name__ == "ConvFunctionBackward"
    y.sum().backward()
    expected = torch.autograd.grad(TF.conv2d(x, w, padding=1).sum(), w)[0]
    torch.testing.assert_close(w.grad, expected, atol=ATOL, rtol=1e-5)
    assert x.grad is None


def test_conv_backward_is_hand_written():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, w, b = _tensors((2, 3, 7, 6), (4, 3, 3, 2), True)
    y = F.conv2d(x, w, b, stride=2, padding=1)
    with Ops() as ops:
        y.backward(torch.randn_like(y))
    assert "convolution_backward" not in ops.names and "convolution" in ops.names


def test_conv_gradients_work_under_vmap():
    x = torch.randn(3, 2, 4, 9, dtype=torch.float64)  # vmapped over dim 0: each (2, 4, 9)
    w = torch.randn(6, 2, 3, dtype=torch.float64)

    def loss(fn, x, w):
        return fn(x, w, None, 2, 1, 1, 2).square().sum()

    ours = torch.func.vmap(torch.func.grad(lambda x, w: loss(F.conv1d, x, w), argnums=(0, 1)), in_dims=(0, None))(x, w)
    theirs = torch.func.vmap(torch.func.grad(lambda x, w: loss(TF.conv1d, x, w), argnums=(0, 1)), in_dims=(0, None))(x, w)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@given(
    dims=st.sampled_from([1, 2]),
    batch=st.integers(0, 3),  # 0: unbatched
    groups=st.integers(1, 3),
    c_per_group=st.integers(1, 2),
    o_per_group=st.integers(1, 2),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 2, "same", "valid"]),
    size=st.integers(4, 11),
    bias=st.booleans(),
)
@settings(max_examples=30, deadline=None)
def test_conv_matches_torch_property(dims, batch, groups, c_per_group, o_per_group, kernel, stride, dilation,
                                     padding, size, bias):
    if padding == "same":
        stride = 1
    # Only shapes torch accepts: the dilated kernel must fit in the padded input.
    padded = size if padding in ("same", "valid") else size + 2 * padding
    assume(padding == "same" or dilation * (kernel - 1) + 1 <= padded)
    x_shape = ((batch,) if batch else ()) + (groups * c_per_group,) + (size,) * dims
    w_shape = (groups * o_per_group, c_per_group) + (kernel,) * dims
    x, w, b = _tensors(x_shape, w_shape, bias)
    fn, torch_fn = (F.conv1d, TF.conv1d) if dims == 1 else (F.conv2d, TF.conv2d)
    assert_same_as_torch(fn, torch_fn, x, w, b, atol=ATOL, stride=stride, padding=padding, dilation=dilation,
                         groups=groups)


X, W = torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3)


@pytest.mark.parametrize("args,kwargs,match", [
    ((X, torch.randn(6, 3, 3, 3)), {}, "to have 3 channels, but got 4"),
    ((X, torch.randn(6, 2, 3, 3)), dict(groups=3), "groups=3"),
    ((X, torch.randn(5, 2, 3, 3)), dict(groups=2), "divisible by 2"),
    ((X, W), dict(padding="same", stride=2), "not supported for strided"),
    ((X, W), dict(padding="same", stride=(1, 2)), "not supported for strided"),
    ((X, W), dict(padding="full"), "Invalid padding string"),
    ((X[0, 0], W), {}, "Expected 3D .unbatched. or 4D .batched. input to conv2d"),
    ((X.unsqueeze(0), W), {}, "Expected 3D .unbatched. or 4D .batched. input to conv2d"),
    ((X, W[..., 0]), dict(padding="same"), "3-dimensional weight"),
    ((X, W), dict(stride=(1, 2, 3)), "list of 2 values"),
    ((X, W), dict(padding=-1), "negative padding"),
    ((X, W), dict(stride=0), "non-positive stride"),
    ((X, W, torch.randn(5)), {}, "bias"),
    ((X[:, :, :2, :2], W), {}, "Kernel size can't be greater"),
    ((X, W.double()), {}, None),
])
def test_conv2d_rejects_bad_input_like_torch(args, kwargs, match):
    assert_raises_like_torch(F.conv2d, TF.conv2d, *args, match=match, **kwargs)


def test_conv1d_rejects_bad_input_like_torch():
    x = torch.randn(2, 4, 9)
    assert_raises_like_torch(F.conv1d, TF.conv1d, x, torch.randn(3, 5, 2), match="to have 5 channels")
    assert_raises_like_torch(F.conv1d, TF.conv1d, x[0, 0], torch.randn(3, 4, 2), match="2D .unbatched. or 3D")
    assert_raises_like_torch(F.conv1d, TF.conv1d, x, torch.randn(3, 4, 2), padding="same", stride=3,
                             match="strided")


def test_conv_propagates_nan():
    x = torch.randn(1, 2, 9)
    x[0, 1, 4] = float("nan")
    y = F.conv1d(x, torch.randn(3, 2, 3), padding=1)  # output i reads inputs i - 1 .. i + 1
    assert y[0, :, 3:6].isnan().all() and not y[0, :, :3].isnan().any() and not y[0, :, 6:].isnan().any()


# --- modules -------------------------------------------------------------------------------

MODULES = [
    ("Conv1d", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2), (2, 4, 13)),
    ("Conv1d", dict(in_channels=3, out_channels=2, kernel_size=4, padding="same", bias=False), (3, 11)),
    ("Conv2d", dict(in_channels=3, out_channels=5, kernel_size=(3, 2)), (2, 3, 13, 11)),
    ("Conv2d", dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", dilation=2, groups=4), (2, 4, 7, 9)),
    ("Conv2d", dict(in_channels=2, out_channels=3, kernel_size=3, stride=(2, 1), padding=(1, 0)), (2, 7, 6)),
]
MODULE_IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(MODULES)]


def _pair(name, kwargs):
    torch_mod = getattr(torch.nn, name)(**kwargs)
    mg_mod = getattr(mnn, name)(**kwargs)
    mg_mod.load_state_dict(torch_mod.state_dict())
    return mg_mod, torch_mod


@pytest.mark.parametrize("name,kwargs,x_shape", MODULES, ids=MODULE_IDS)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_module_matches_torch_module(name, kwargs, x_shape):
    mg_mod, torch_mod = _pair(name, kwargs)
    assert_same_as_torch(mg_mod, torch_mod, torch.randn(x_shape, requires_grad=True), atol=ATOL)


@pytest.mark.parametrize("name,kwargs,x_shape", MODULES, ids=MODULE_IDS)
def test_conv_module_is_a_drop_in_for_torch(name, kwargs, x_shape):
    mg_mod, torch_mod = _pair(name, kwargs)
    assert isinstance(mg_mod, getattr(torch.nn, name))
    assert repr(mg_mod) == repr(torch_mod)
    back = getattr(torch.nn, name)(**kwargs)
    back.load_state_dict(mg_mod.state_dict())
    for (k, a), (_, b) in zip(back.state_dict().items(), torch_mod.state_dict().items()):
        assert torch.equal(a, b), k


def test_convert_swaps_conv_modules_for_manualgrad():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv1d(4, 2, 3))
    reference = copy.deepcopy(model)
    mg.convert(model)
    assert type(model[0]) is mnn.Conv2d and type(model[2]) is mnn.Conv1d
    x = torch.randn(2, 1, 5, 7)
    fn = lambda m, x: m[2](m[1](m[0](x)).flatten(2))  # noqa: E731
    torch.testing.assert_close(fn(model, x), fn(reference, x))


# padding_mode reflect / replicate / circular: tests/nn/test_conv_padding_mode.py


# The weight gradient has two formulations (ops/conv.py): a matrix product over the unfolded input
# for 1x1 kernels and small C/g prod(K) (<= _GEMM_MAX), a batch-swapped convolution otherwise, in
# 2-d (3-d) with channels-last filters when O/g >= 64 (32) and with the padded input cropped when a stride
# would make it compute taps past K. Shapes picked to select each, compared with torch.

WGRAD_CASES = [
    # (x shape, w shape, options, formulation)
    ((2, 3, 9, 8), (4, 3, 3, 3), dict(padding=1), "gemm"),
    ((2, 4, 9, 8), (6, 2, 3, 3), dict(groups=2, stride=2, dilation=(1, 2)), "gemm"),
    ((2, 120, 6, 5), (8, 120, 1, 1), dict(stride=2), "gemm"),  # 1x1 past _GEMM_MAX: still a product
    ((2, 12, 9, 8), (5, 12, 3, 3), dict(padding=1), "conv"),
    ((2, 12, 9, 8), (5, 12, 3, 3), dict(stride=2, padding=1), "conv"),  # cropped
    ((2, 12, 9, 8), (64, 12, 3, 3), dict(stride=2, padding=(1, 2)), "conv"),  # channels-last, cropped
    ((2, 24, 7, 6), (128, 12, 3, 3), dict(groups=2, padding="same", dilation=2), "conv"),  # cl, groups
    ((2, 20, 31), (6, 20, 5), dict(stride=3, padding=2), "conv"),  # 1-d, cropped
    ((2, 4, 5, 4, 6), (32, 4, 3, 3, 3), dict(padding=1), "conv"),  # 3-d, channels-last
    ((2, 8, 5, 4, 6), (16, 4, 3, 3, 3), dict(groups=2, stride=2, padding=1), "conv"),  # 3-d, cropped
]


@pytest.mark.parametrize("x_shape,w_shape,kwargs,path", WGRAD_CASES, ids=[f"{c[3]}-{c[1]}-{c[2]}" for c in WGRAD_CASES])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_weight_gradient_formulations_match_torch(x_shape, w_shape, kwargs, path):
    per_output = w_shape[1] * math.prod(w_shape[2:])
    gemm = math.prod(w_shape[2:]) == 1 or per_output <= _GEMM_MAX
    assert gemm == (path == "gemm")  # the shape selects the formulation under test
    fn, torch_fn = {3: (F.conv1d, TF.conv1d), 4: (F.conv2d, TF.conv2d), 5: (F.conv3d, TF.conv3d)}[len(x_shape)]
    x, w, b = _tensors(x_shape, w_shape, True)
    assert_same_as_torch(fn, torch_fn, x, w, b, atol=1e-4, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1), dict(padding=1, dilation=2)])
def test_conv_weight_gradient_by_swapped_convolution_passes_gradcheck(kwargs):
    # C prod(K) = 11 * 9 > _GEMM_MAX: the batch-swapped convolution (cropped with the stride);
    # double backward, forward AD and vmap run it differentiably
    x = torch.randn(2, 11, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 11, 3, 3, dtype=torch.float64, requires_grad=True)
    assert 11 * 9 > _GEMM_MAX
    check_gradients(lambda x, w: F.conv2d(x, w, **kwargs), x, w)


def test_conv_weight_gradient_with_channels_last_filters_runs_under_vmap_and_double_backward():
    # O = 64 >= 64 filters and C prod(K) = 108 > _GEMM_MAX: the swapped convolution with
    # channels-last filters and a cropped input; too many weights for gradgradcheck, so vmap of
    # the vjp and a second-order gradient are compared with torch's
    x = torch.randn(2, 12, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, 12, 3, 3, dtype=torch.float64, requires_grad=True)
    dys = torch.randn(3, 2, 64, 4, 3, dtype=torch.float64)
    got, want = [], []
    for fn, out in ((F.conv2d, got), (TF.conv2d, want)):
        def vjp(dy):
            return torch.func.vjp(lambda x, w: fn(x, w, stride=2, padding=1), x, w)[1](dy)
        out.extend(torch.func.vmap(vjp)(dys))
        g = torch.autograd.grad(fn(x, w, stride=2, padding=1).square().sum(), w, create_graph=True)[0]
        out.extend(torch.autograd.grad(g.square().sum(), (x, w)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
