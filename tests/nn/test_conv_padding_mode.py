"""Conv1d / Conv2d with padding_mode reflect, replicate, circular: torch's recipe (pad the input
with F.pad's mode, then convolve without padding), both steps hand-written; convert swaps them."""
import copy

import pytest
import torch

import manualgrad as mg
import manualgrad.nn as mnn
from manualgrad.testing import assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


# as tests/ops/test_conv.py: sums of C/g prod(K) products in another order than torch's kernels
ATOL = 1e-5
MODES = ["reflect", "replicate", "circular"]

# (class, constructor kwargs, input shape): int / tuple / 'same' (odd and even kernels: the even
# one pads one more after) / 'valid' padding, stride, dilation, groups, no bias, unbatched,
# size-1 channels
CASES = [
    ("Conv2d", dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (2, 3, 5, 6)),
    ("Conv2d", dict(in_channels=2, out_channels=3, kernel_size=(3, 2), padding=(2, 1), stride=(2, 1)), (1, 2, 5, 4)),
    ("Conv2d", dict(in_channels=2, out_channels=2, kernel_size=(2, 3), padding="same", dilation=(2, 1)), (2, 2, 5, 5)),
    ("Conv2d", dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2, bias=False), (3, 4, 4, 7)),
    ("Conv2d", dict(in_channels=1, out_channels=2, kernel_size=3, padding="valid"), (1, 1, 3, 4)),
    ("Conv2d", dict(in_channels=3, out_channels=2, kernel_size=3, padding=(0, 2)), (3, 4, 5)),
    ("Conv1d", dict(in_channels=3, out_channels=5, kernel_size=4, padding=2, stride=3, dilation=2), (2, 3, 13)),
    ("Conv1d", dict(in_channels=2, out_channels=2, kernel_size=4, padding="same"), (2, 2, 5)),
    ("Conv1d", dict(in_channels=4, out_channels=2, kernel_size=3, padding=1, groups=2, bias=False), (4, 6)),
]
IDS = [f"{c}-{kw}-{s}" for c, kw, s in CASES]


def _pair(name, kwargs, mode):
    theirs = getattr(torch.nn, name)(padding_mode=mode, **kwargs)
    ours = getattr(mnn, name)(padding_mode=mode, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, kwargs, shape", CASES, ids=IDS)
def test_conv_with_padding_mode_matches_torch(name, kwargs, shape, mode):
    ours, theirs = _pair(name, kwargs, mode)
    assert repr(ours) == repr(theirs)
    assert_same_as_torch(ours, theirs, torch.randn(shape, requires_grad=True), atol=ATOL)
    assert_same_as_torch(ours, theirs, noncontiguous(torch.randn(shape, requires_grad=True)), atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_conv2d_with_padding_mode_matches_torch_on_channels_last(mode):
    ours, theirs = _pair("Conv2d", dict(in_channels=3, out_channels=4, kernel_size=3, padding=2), mode)
    x = torch.randn(2, 3, 6, 5).to(memory_format=torch.channels_last).requires_grad_()
    assert_same_as_torch(ours, theirs, x, atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, kwargs, shape", [CASES[i] for i in (1, 2, 7, 8)], ids=[IDS[i] for i in (1, 2, 7, 8)])
def test_conv_with_padding_mode_gradients(name, kwargs, shape, mode):
    m = getattr(mnn, name)(padding_mode=mode, **kwargs).double()
    params = dict(m.named_parameters())

    def f(x, *p):
        return torch.func.functional_call(m, dict(zip(params, p)), (x,))
    check_gradients(f, torch.randn(shape, dtype=torch.float64, requires_grad=True), *params.values())


@pytest.mark.parametrize("mode", MODES)
def test_convert_swaps_convs_with_padding_mode_and_every_backward_is_hand_written(mode):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), torch.nn.ReLU(),
                                torch.nn.Conv2d(3, 2, (1, 3), padding="same", padding_mode=mode))
    reference = copy.deepcopy(model)
    mg.convert(model, strict=True)
    assert type(model[0]) is mnn.Conv2d and type(model[2]) is mnn.Conv2d
    x = torch.randn(2, 2, 5, 6)
    report = mg.coverage(model, x, mode=False)
    assert report.torch_ops == [] and report.hand_written_flop_share == 1.0, report
    assert_same_as_torch(model, reference, x.requires_grad_(), atol=ATOL)
