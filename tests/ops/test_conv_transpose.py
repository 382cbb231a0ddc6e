"""conv_transpose1d/2d/3d: forward is torch's kernel; backward dx = conv(dy, W), dW = conv's
weight-gradient correlation with x and dy swapped, db = sum of dy (ops/conv_transpose.py), each
compared with torch and with finite differences."""
import itertools

import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.ops.conv import _GEMM_MAX
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients, saved_bytes
from tests.conftest import noncontiguous


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


OURS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
THEIRS = {1: TF.conv_transpose1d, 2: TF.conv_transpose2d, 3: TF.conv_transpose3d}

# float32 parity: each output sums C/g prod(K) / prod(s) products, each dW element N prod(L)
# prod(K)-ish of them, in another order than torch's kernels; the longest sums here (3-d, ~200
# products of unit normals, |terms| summed ~130) are a few float32 roundings of ~1e-5 apart
ATOL = 4e-5


def _tensors(x_shape, w_shape, groups, bias, dtype=torch.float32):
    """x (N, C, *L), W (C, O/g, *K) and b (O,) (None unless bias), requiring grad."""
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    w = torch.randn(w_shape, dtype=dtype, requires_grad=True)
    b = torch.randn(w_shape[1] * groups, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


def _n(w_shape):
    return len(w_shape) - 2


# float64 gradchecks (gradcheck + gradgradcheck, forward AD, batched vmap) on tiny shapes
GRAD_CASES = [
    ((2, 3, 4), (3, 2, 3), dict(stride=2, padding=1, output_padding=1)),
    ((1, 2, 3), (2, 2, 2), dict(dilation=3, output_padding=2)),  # q = 2 >= s = 1 (allowed as q < d)
    ((3, 4), (3, 2, 2), dict(stride=3, padding=1, output_padding=2, bias=None)),  # unbatched
    ((1, 4, 3, 2), (4, 1, 3, 2), dict(stride=(2, 1), padding=(1, 0), groups=2, dilation=(1, 2))),
    ((1, 3, 2, 3), (3, 1, 3, 3), dict(groups=3, stride=2, padding=1, output_padding=(1, 0))),  # depthwise dW
    ((1, 2, 2, 2, 2), (2, 2, 2, 1, 2), dict(stride=2, padding=(0, 0, 1), output_padding=(1, 0, 0))),
]


@pytest.mark.parametrize("x_shape,w_shape,kwargs", GRAD_CASES, ids=[str(c) for c in GRAD_CASES])
def test_conv_transpose_gradients(x_shape, w_shape, kwargs):
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", True) is not None
    x, w, b = _tensors(x_shape, w_shape, kwargs.get("groups", 1), bias, torch.float64)
    fn = OURS[_n(w_shape)]
    check_gradients(lambda x, w, b: fn(x, w, b, **kwargs), x, w, b)


def test_conv_transpose_weight_gradient_by_swapped_convolution_passes_gradcheck():
    # dy has O/g prod(K) = 11 * 9 > _GEMM_MAX "input" channels for dW: the batch-swapped convolution
    x = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 11, 3, 3, dtype=torch.float64, requires_grad=True)
    assert 11 * 9 > _GEMM_MAX
    check_gradients(lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1), x, w)


# float32 parity on odd shapes: each option alone, some together, size-1 dims, unbatched, and
# each of conv's dW formulations (matrix product, batch-swapped conv with channels-last filters
# at >= 64 per group, depthwise taps)
CASES = [
    ((2, 3, 7), (3, 4, 3), {}),
    ((2, 3, 7), (3, 5, 4), dict(stride=3, padding=2, output_padding=1, dilation=2)),
    ((1, 4, 9), (4, 3, 3), dict(groups=2, stride=2)),
    ((3, 1), (3, 2, 1), {}),  # unbatched, size-1 dims
    ((2, 3, 5, 4), (3, 4, 3, 2), {}),
    ((1, 2, 5, 6), (2, 3, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ((2, 2, 4, 5), (2, 2, 2, 3), dict(stride=(1, 3), padding=(0, 1), output_padding=(0, 2), dilation=(2, 1))),
    ((1, 6, 5, 4), (6, 1, 3, 3), dict(groups=6, stride=2, padding=1)),  # depthwise
    ((1, 1, 1, 7), (1, 2, 1, 3), dict(stride=(1, 2))),
    ((3, 4, 5), (3, 2, 2, 2), dict(padding=(1, 0))),  # unbatched
    ((2, 12, 4, 3), (12, 11, 3, 3), dict(stride=2, padding=1)),  # dW by batch-swapped conv
    ((2, 64, 3, 4), (64, 12, 3, 3), dict(stride=2, padding=1, output_padding=1)),  # ... channels-last filters
    ((2, 130, 3, 2), (130, 3, 1, 1), dict(stride=2)),  # 1x1 past _GEMM_MAX: a matrix product
    ((2, 3, 4, 3, 5), (3, 2, 3, 2, 3), dict(stride=2, padding=1, output_padding=(1, 0, 1))),
    ((1, 4, 3, 2, 3), (4, 2, 2, 2, 2), dict(groups=2, dilation=(1, 2, 1))),
    ((2, 1, 1, 3), (2, 2, 1, 2, 2), {}),  # unbatched 3-d, size-1 dims
]


@pytest.mark.parametrize("x_shape,w_shape,kwargs", CASES, ids=[f"{x}-{w}-{kw}" for x, w, kw in CASES])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_matches_torch(x_shape, w_shape, kwargs, bias):
    x, w, b = _tensors(x_shape, w_shape, kwargs.get("groups", 1), bias)
    n = _n(w_shape)
    assert_same_as_torch(OURS[n], THEIRS[n], x, w, b, atol=ATOL, **kwargs)


def test_conv_transpose_cases_select_each_weight_gradient_formulation():
    # dW = _conv_weight_grad with dy as the input: its channels O, per group O/g
    kinds = set()
    for x_shape, w_shape, kwargs in CASES:
        groups, k = kwargs.get("groups", 1), w_shape[2:]
        o = w_shape[1] * groups
        if o == groups > 1:
            kinds.add("depthwise")
        elif torch.Size(k).numel() == 1 or o // groups * torch.Size(k).numel() <= _GEMM_MAX:
            kinds.add("gemm")
        else:
            kinds.add("conv, channels-last filters" if len(k) == 2 and x_shape[-3] // groups >= 64 else "conv")
    assert kinds == {"depthwise", "gemm", "conv", "conv, channels-last filters"}


# Every option value in a compact product: each 5th of the full grid, for each number of spatial
# dims (a test below checks every value of every option is among them)
OPTIONS = dict(stride=[1, 2, 3], padding=[0, 1, 2], output_padding=[0, 1, 2], dilation=[1, 2, 3], groups=[1, 2],
               bias=[True, False])


def _combinations():
    combos = []
    for values in itertools.product(*OPTIONS.values()):
        kw = dict(zip(OPTIONS, values))
        if kw["output_padding"] >= max(kw["stride"], kw["dilation"]):
            continue  # torch rejects it (tested below)
        combos.append(kw)
    return combos[::5]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_conv_transpose_option_combinations_match_torch(n):
    torch.manual_seed(n)
    for kwargs in _combinations():
        kwargs = dict(kwargs)
        g = kwargs["groups"]
        # per-dim sizes that differ; the 3-d case stays small
        size, kernel = [(5,), (4, 3), (3, 2, 3)][n - 1], [(3,), (3, 2), (2, 3, 2)][n - 1]
        x, w, b = _tensors((2, 2 * g, *size), (2 * g, 3, *kernel), g, kwargs.pop("bias"))
        assert_same_as_torch(OURS[n], THEIRS[n], x, w, b, atol=ATOL, **kwargs)


def test_conv_transpose_option_combinations_cover_every_value():
    combos = _combinations()
    for name, values in OPTIONS.items():
        assert all(any(c[name] == v for c in combos) for v in values), name


@pytest.mark.parametrize("n", [1, 2, 3])
def test_conv_transpose_matches_torch_on_non_contiguous_inputs(n):
    x = noncontiguous(torch.randn(2, 4, *(5, 4, 3)[:n], requires_grad=True))
    w = noncontiguous(torch.randn(4, 3, *(3, 2, 2)[:n], requires_grad=True))
    assert not x.is_contiguous() and not w.is_contiguous()
    assert_same_as_torch(OURS[n], THEIRS[n], x, w, torch.randn(6), atol=ATOL, stride=2, padding=1,
                         output_padding=1, groups=2)


def test_conv_transpose_matches_torch_on_channels_last_inputs():
    x = torch.randn(2, 3, 5, 4).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(3, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    assert_same_as_torch(F.conv_transpose2d, TF.conv_transpose2d, x, w, torch.randn(4), atol=ATOL, stride=2,
                         padding=1, output_padding=1)
    x = torch.randn(2, 3, 3, 4, 2).to(memory_format=torch.channels_last_3d).requires_grad_()
    w = torch.randn(3, 2, 2, 3, 2).to(memory_format=torch.channels_last_3d).requires_grad_()
    assert_same_as_torch(F.conv_transpose3d, TF.conv_transpose3d, x, w, None, atol=ATOL, stride=2)


def test_conv_transpose_only_computes_requested_gradients():
    x = torch.randn(2, 3, 4, 5)  # no grad: a generator's latent input
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    y = F.conv_transpose2d(x, w, stride=2)
    assert type(y.grad_fn).__name__ == "ConvTransposeFunctionBackward"
    y.sum().backward()
    expected = torch.autograd.grad(TF.conv_transpose2d(x, w, stride=2).sum(), w)[0]
    torch.testing.assert_close(w.grad, expected, atol=ATOL, rtol=1e-5)
    assert x.grad is None


def test_conv_transpose_backward_is_hand_written():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, w, b = _tensors((2, 3, 5, 4), (3, 4, 3, 2), 1, True)
    y = F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1)
    with Ops() as ops:
        y.backward(torch.randn_like(y))
    assert "convolution_backward" not in ops.names and "convolution" in ops.names


def test_conv_transpose_per_sample_gradients_under_vmap_match_torch():
    x = torch.randn(3, 4, 5, dtype=torch.float64)  # vmapped over dim 0: each (4, 5), unbatched
    w = torch.randn(4, 3, 3, dtype=torch.float64)

    def loss(fn, x, w):
        return fn(x, w, None, 2, 1, 1, 2).square().sum()

    grads = []
    for fn in (F.conv_transpose1d, TF.conv_transpose1d):
        per_sample = torch.func.grad(lambda x, w, fn=fn: loss(fn, x, w), argnums=(0, 1))
        grads.append(torch.func.vmap(per_sample, in_dims=(0, None))(x, w))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


X1, W1 = torch.randn(2, 4, 5), torch.randn(4, 3, 3)
X2, W2 = torch.randn(2, 4, 5, 5), torch.randn(4, 3, 3, 3)


@pytest.mark.parametrize("n,args,kwargs,match", [
    (1, (X1, torch.randn(3, 3, 3)), {}, "to have 3 channels, but got 4"),
    (1, (X1, W1, torch.randn(4)), {}, "bias"),
    (1, (X1, W1), dict(groups=3), None),
    (1, (X1[0, 0], W1), {}, "Expected 2D .unbatched. or 3D .batched. input to conv_transpose1d"),
    (1, (X1.unsqueeze(0), W1), {}, "Expected 2D .unbatched. or 3D .batched. input to conv_transpose1d"),
    (1, (X1, W1), dict(stride=(1, 2)), "list of 1 values"),
    (1, (X1, W1), dict(output_padding=(0, 1)), "list of 1 values"),
    (1, (X1, W1), dict(padding="same"), "must be tuple of ints, not str"),
    (2, (X2, W2), dict(stride=2, output_padding=2), "output padding must be smaller than either stride or dilation"),
    (2, (X2, W2), dict(output_padding=1), "output padding must be smaller"),
    (2, (X2, W2), dict(padding=-1), "negative padding"),
    (2, (X2, W2), dict(output_padding=-1), "negative output_padding"),
    (2, (X2, W2), dict(stride=0), "non-positive stride"),
    (1, (X1, W1), dict(dilation=0), "dilation should be greater than zero"),
    (2, (X2, W2), dict(padding=4), "Output size is too small"),
    (2, (X2, W2[..., 0]), {}, None),
    (2, (X2, W2.double()), {}, None),
    (3, (X2[0, 0], torch.randn(4, 3, 3, 3, 3)), {}, "Expected 4D .unbatched. or 5D .batched. input to conv_transpose"),
    (3, (X2.unsqueeze(2)[:, :, :, :0], torch.randn(4, 3, 1, 3, 3)), {}, None),  # no spatial positions
    (1, (X1[:, :0], torch.randn(0, 3, 3)), {}, None),  # no input channels
])
def test_conv_transpose_rejects_bad_input_like_torch(n, args, kwargs, match):
    assert_raises_like_torch(OURS[n], THEIRS[n], *args, match=match, **kwargs)


@pytest.mark.parametrize("needs", ["x and W", "W only", "x only"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_conv_transpose_saves_no_more_than_torch(n, needs):
    # dx needs W, dW needs x: each saved only when that gradient will be computed
    x = torch.randn(2, 4, *(5, 4, 3)[:n], requires_grad=needs != "W only")
    w = torch.randn(4, 3, *(3, 2, 2)[:n], requires_grad=needs != "x only")
    ours, _ = saved_bytes(OURS[n], x, w, None, stride=2, padding=1)
    theirs, _ = saved_bytes(THEIRS[n], x, w, None, stride=2, padding=1)
    assert ours <= theirs
    if needs != "x and W":
        assert ours == (x if needs == "W only" else w).untyped_storage().nbytes()
