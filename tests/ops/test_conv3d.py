"""conv3d / Conv3d: the conv1d/2d Function (ops/conv.py) with 3 spatial dims. Forward and dx are
torch's conv3d / conv_transpose3d kernels, dW the correlation of x with dy (a matrix product over
the unfolded input, a batch-swapped conv3d, or per tap for depthwise), each compared with torch."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as TF

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.ops.conv import _GEMM_MAX
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients, saved_bytes
from tests.conftest import noncontiguous


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


# float32 parity: each output sums C/g prod(K) products, each dW element N prod(Lo) of them, in
# another order than torch's kernels. In 3-d these sums are long: up to 240 products of unit
# normals here (|terms| summed ~150), where one float32 rounding of a partial sum is already
# ~150 x 6e-8 = 1e-5 (seen: 1.2e-5 apart under ATEN_CPU_CAPABILITY=default), so 4 of those
ATOL = 4e-5


def _tensors(x_shape, w_shape, bias, dtype=torch.float32):
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    w = torch.randn(w_shape, dtype=dtype, requires_grad=True)
    b = torch.randn(w_shape[0], dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


# float64 gradchecks (gradcheck + gradgradcheck, forward AD, vmap) on tiny shapes: a 3-d
# gradgradcheck perturbs every element of x, W and dy, so a few dozen elements each
GRAD_CASES = [
    ((1, 2, 3, 3, 3), (2, 2, 2, 2, 2), dict(stride=2, padding=1)),
    ((1, 2, 3, 3, 3), (2, 1, 2, 1, 2), dict(groups=2, padding="same", dilation=(2, 1, 1))),
    ((2, 3, 2, 3), (2, 2, 1, 2, 2), dict(padding=(0, 1, 0), bias=None)),  # unbatched, stride 1
]


@pytest.mark.parametrize("x_shape,w_shape,kwargs", GRAD_CASES, ids=[str(c) for c in GRAD_CASES])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv3d_gradients(x_shape, w_shape, kwargs):
    kwargs = dict(kwargs)
    x, w, b = _tensors(x_shape, w_shape, kwargs.pop("bias", True) is not None, torch.float64)
    check_gradients(lambda x, w, b: F.conv3d(x, w, b, **kwargs), x, w, b)


# float32 parity, odd shapes: each option alone and a few together (a compact product, see below)
CASES = [
    ((2, 3, 5, 4, 6), (4, 3, 3, 2, 3), {}),
    ((1, 2, 7, 5, 6), (3, 2, 3, 3, 3), dict(stride=2, padding=1)),
    ((1, 2, 5, 6, 7), (3, 2, 2, 3, 1), dict(stride=(1, 2, 3), padding=(1, 0, 2))),
    ((2, 2, 4, 5, 3), (2, 2, 2, 3, 2), dict(padding="same")),  # even kernels: one more zero after
    ((1, 1, 6, 5, 4), (2, 1, 2, 2, 2), dict(padding="same", dilation=(2, 1, 3))),
    ((1, 2, 7, 6, 5), (2, 2, 3, 2, 2), dict(padding="valid", dilation=2)),
    ((2, 4, 5, 4, 5), (6, 2, 3, 3, 3), dict(groups=2, padding=1)),
    ((1, 3, 5, 6, 4), (6, 1, 3, 3, 3), dict(groups=3, stride=2, padding=1)),  # depthwise, multiplier 2
    ((1, 1, 1, 1, 7), (1, 1, 1, 1, 3), dict(stride=(1, 1, 2))),  # size-1 dims
    ((3, 4, 5, 3), (2, 3, 2, 2, 2), dict(padding=(1, 0, 1))),  # unbatched
    ((2, 12, 5, 4, 5), (5, 12, 3, 3, 3), dict(stride=2, padding=1)),  # dW by batch-swapped conv3d
    ((2, 3, 5, 6, 4), (4, 3, 3, 3, 3), dict(padding=1)),  # dW by matrix product (81 <= _GEMM_MAX)
    ((2, 130, 3, 2, 3), (4, 130, 1, 1, 1), dict(stride=2)),  # 1x1x1 past _GEMM_MAX: a matrix product
]


@pytest.mark.parametrize("x_shape,w_shape,kwargs", CASES, ids=[f"{x}-{w}-{kw}" for x, w, kw in CASES])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv3d_matches_torch(x_shape, w_shape, kwargs, bias):
    x, w, b = _tensors(x_shape, w_shape, bias)
    assert_same_as_torch(F.conv3d, TF.conv3d, x, w, b, atol=ATOL, **kwargs)


def test_conv3d_cases_select_each_weight_gradient_formulation():
    # the matrix product, the batch-swapped convolution and the depthwise taps (ops/conv.py's
    # _conv_weight_grad) are each among the cases compared above
    kinds = set()
    for x_shape, w_shape, kwargs in CASES:
        c, groups, k = x_shape[-4], kwargs.get("groups", 1), math.prod(w_shape[2:])
        if c == groups > 1:
            kinds.add("depthwise")
        else:
            kinds.add("gemm" if k == 1 or c // groups * k <= _GEMM_MAX else "conv")
    assert kinds == {"depthwise", "gemm", "conv"}


# Every option combination, compactly: each pair of (stride, padding, dilation, groups, bias)
# values appears in at least one call of this product's diagonal walk, on one odd shape.
OPTIONS = dict(stride=[1, 2, (1, 3, 2)], padding=[0, 1, (2, 0, 1), "same", "valid"], dilation=[1, 2, (1, 2, 1)],
               groups=[1, 2], bias=[True, False])


def _combinations():
    names = list(OPTIONS)
    combos = []
    for values in itertools.product(*OPTIONS.values()):
        kw = dict(zip(names, values))
        if kw["padding"] == "same" and kw["stride"] != 1:
            continue  # torch rejects it (tested below)
        combos.append(kw)
    return combos[::7]  # every 7th: ~20 calls covering every value of every option


@pytest.mark.parametrize("kwargs", _combinations(), ids=str)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv3d_option_combinations_match_torch(kwargs):
    kwargs = dict(kwargs)
    g = kwargs["groups"]
    x, w, b = _tensors((2, 2 * g, 7, 6, 5), (2 * g, 2, 3, 2, 3), kwargs.pop("bias"))
    assert_same_as_torch(F.conv3d, TF.conv3d, x, w, b, atol=ATOL, **kwargs)


def test_conv3d_option_combinations_cover_every_value():
    combos = _combinations()
    for name, values in OPTIONS.items():
        assert all(any(c[name] == v for c in combos) for v in values), name


def test_conv3d_matches_torch_on_non_contiguous_and_channels_last_inputs():
    x = noncontiguous(torch.randn(2, 3, 5, 4, 6, requires_grad=True))
    w = noncontiguous(torch.randn(4, 3, 3, 2, 2, requires_grad=True))
    assert not x.is_contiguous() and not w.is_contiguous()
    assert_same_as_torch(F.conv3d, TF.conv3d, x, w, None, atol=ATOL, stride=2, padding=1)
    x = torch.randn(2, 3, 5, 4, 6).to(memory_format=torch.channels_last_3d).requires_grad_()
    w = torch.randn(4, 3, 3, 3, 3).to(memory_format=torch.channels_last_3d).requires_grad_()
    assert_same_as_torch(F.conv3d, TF.conv3d, x, w, torch.randn(4), atol=ATOL, padding=1)


def test_conv3d_gradients_non_contiguous():
    x = noncontiguous(torch.randn(1, 2, 3, 2, 3, dtype=torch.float64, requires_grad=True))
    w = noncontiguous(torch.randn(2, 2, 2, 1, 2, dtype=torch.float64, requires_grad=True))
    check_gradients(lambda x, w: F.conv3d(x, w, stride=(2, 1, 1), padding=1), x, w)


def test_conv3d_weight_gradient_by_swapped_convolution_passes_gradcheck():
    # C prod(K) = 4 * 27 > _GEMM_MAX: the batch-swapped conv3d, cropped with the stride
    x = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert 4 * 27 > _GEMM_MAX
    check_gradients(lambda x, w: F.conv3d(x, w, stride=2, padding=1), x, w, gradgrad=False)
    # double backward: the second-order gradient of a scalar, against torch's
    got, want = [], []
    for fn, out in ((F.conv3d, got), (TF.conv3d, want)):
        g = torch.autograd.grad(fn(x, w, stride=2, padding=1).square().sum(), w, create_graph=True)[0]
        out.extend(torch.autograd.grad(g.square().sum(), (x, w)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs", [{}, dict(stride=2, padding=1), dict(padding="same", dilation=2)], ids=str)
def test_conv3d_saves_only_its_inputs_as_torch(kwargs):
    x, w, b = (torch.randn(2, 3, 6, 5, 7, requires_grad=True), torch.randn(4, 3, 3, 3, 3, requires_grad=True),
               torch.randn(4, requires_grad=True))
    ours, _ = saved_bytes(F.conv3d, x, w, b, **kwargs)
    theirs, _ = saved_bytes(TF.conv3d, x, w, b, **kwargs)
    assert ours == (x.numel() + w.numel()) * 4 <= theirs  # x and w for the two gradients; the bias needs nothing


def test_conv3d_backward_is_hand_written():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, w, b = _tensors((2, 3, 5, 4, 3), (4, 3, 3, 2, 2), True)
    y = F.conv3d(x, w, b, stride=2, padding=1)
    assert type(y.grad_fn).__name__ == "ConvFunctionBackward"
    with Ops() as ops:
        y.backward(torch.randn_like(y))
    assert "convolution_backward" not in ops.names and "convolution" in ops.names


X, W = torch.randn(2, 4, 5, 5, 5), torch.randn(6, 4, 3, 3, 3)


@pytest.mark.parametrize("args,kwargs,match", [
    ((X, torch.randn(6, 3, 3, 3, 3)), {}, "to have 3 channels, but got 4"),
    ((X, torch.randn(6, 2, 3, 3, 3)), dict(groups=3), "groups=3"),
    ((X, torch.randn(5, 2, 3, 3, 3)), dict(groups=2), "divisible by 2"),
    ((X, W), dict(padding="same", stride=(1, 1, 2)), "not supported for strided"),
    ((X, W), dict(padding="full"), "Invalid padding string"),
    ((X[0, 0], W), {}, "Expected 4D .unbatched. or 5D .batched. input to conv3d"),
    ((X.unsqueeze(0), W), {}, "Expected 4D .unbatched. or 5D .batched. input to conv3d"),
    ((X, W[..., 0]), {}, "4-dimensional weight"),
    ((X, W), dict(stride=(1, 2)), "list of 3 values"),
    ((X, W), dict(padding=-1), "negative padding"),
    ((X, W), dict(stride=0), "non-positive stride"),
    ((X, W, torch.randn(5)), {}, "bias"),
    ((X[:, :, :2], W), {}, "Kernel size can't be greater"),
    ((X, W.double()), {}, None),
])
def test_conv3d_rejects_bad_input_like_torch(args, kwargs, match):
    assert_raises_like_torch(F.conv3d, TF.conv3d, *args, match=match, **kwargs)


# --- module ---------------------------------------------------------------------------------

MODULES = [
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=2, kernel_size=(3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 2), groups=2),
    dict(in_channels=2, out_channels=3, kernel_size=(2, 3, 2), padding="same", dilation=(1, 2, 1), bias=False),
    dict(in_channels=2, out_channels=2, kernel_size=3, padding="valid"),
]
MODES = ["zeros", "reflect", "replicate", "circular"]


def _pair(kwargs, mode):
    theirs = torch.nn.Conv3d(padding_mode=mode, **kwargs)
    ours = mnn.Conv3d(padding_mode=mode, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kwargs", MODULES, ids=str)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv3d_module_matches_torch_in_every_padding_mode(kwargs, mode):
    ours, theirs = _pair(kwargs, mode)
    assert isinstance(ours, torch.nn.Conv3d) and repr(ours) == repr(theirs)
    shape = (2, kwargs["in_channels"], 5, 6, 4)
    assert_same_as_torch(ours, theirs, torch.randn(shape, requires_grad=True), atol=ATOL)
    assert_same_as_torch(ours, theirs, noncontiguous(torch.randn(shape[1:], requires_grad=True)), atol=ATOL)


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_conv3d_module_with_padding_mode_gradients(mode):
    m = mnn.Conv3d(2, 2, (2, 1, 2), padding=(1, 0, 1), stride=(2, 1, 1), padding_mode=mode).double()
    params = dict(m.named_parameters())

    def f(x, *p):
        return torch.func.functional_call(m, dict(zip(params, p)), (x,))
    check_gradients(f, torch.randn(1, 2, 3, 2, 3, dtype=torch.float64, requires_grad=True), *params.values())


@pytest.mark.parametrize("mode", MODES)
def test_convert_swaps_conv3d_in_every_padding_mode(mode):
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1, padding_mode=mode), torch.nn.ReLU(),
                                torch.nn.Conv3d(3, 2, (1, 3, 2), stride=2, padding=(0, 1, 1), padding_mode=mode))
    reference = copy.deepcopy(model)
    mg.convert(model, strict=True)
    assert type(model[0]) is mnn.Conv3d and type(model[2]) is mnn.Conv3d
    assert_same_as_torch(model, reference, torch.randn(2, 2, 5, 6, 4, requires_grad=True), atol=ATOL)
