"""Upsample, UpsamplingNearest2d, UpsamplingBilinear2d: drop-ins for torch.nn's (same repr, outputs and
gradients), and convert(strict=True) swaps them, e.g. in a small U-Net-style decoder."""
import copy

import pytest
import torch

import manualgrad as mg
import manualgrad.nn as mnn
from manualgrad.testing import assert_same_as_torch
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py

EPS = torch.finfo(torch.float32).eps

# (class name, constructor kwargs, input shape)
MODULES = [
    ("Upsample", dict(scale_factor=2, mode="nearest"), (2, 3, 5)),
    ("Upsample", dict(size=(7, 4), mode="bilinear", align_corners=True), (2, 3, 5, 6)),
    ("Upsample", dict(scale_factor=(1.5, 0.5), mode="bicubic"), (2, 3, 5, 6)),
    ("Upsample", dict(scale_factor=1.7, mode="trilinear", recompute_scale_factor=True), (1, 2, 3, 4, 5)),
    ("Upsample", dict(size=3, mode="area"), (1, 2, 5, 4, 7)),
    ("Upsample", dict(scale_factor=2.5, mode="nearest-exact"), (2, 3, 5, 6)),
    ("UpsamplingNearest2d", dict(scale_factor=3), (2, 3, 4, 5)),
    ("UpsamplingBilinear2d", dict(size=(9, 2)), (2, 3, 4, 5)),
]
IDS = [f"{m[0]}-{i}" for i, m in enumerate(MODULES)]


@pytest.mark.parametrize("name, kwargs, shape", MODULES, ids=IDS)
def test_resampling_module_matches_torch(name, kwargs, shape):
    ours, theirs = getattr(mnn, name)(**kwargs), getattr(torch.nn, name)(**kwargs)
    assert repr(ours) == repr(theirs) and isinstance(ours, getattr(torch.nn, name))
    x = torch.randn(shape, requires_grad=True)
    dy = exact_dy(theirs(x).shape)
    # a gradient sums a few dozen rounded products at most: 32 ulps of its scale (4)
    assert_same_as_torch(ours, theirs, x, grad_output=dy, rtol=0, atol=32 * EPS * 4)
    assert type(ours(x).grad_fn).__name__.endswith("FunctionBackward")


class Decoder(torch.nn.Module):
    """Upsample the coarse map, concatenate the skip connection, convolve (a U-Net decoder step)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.near = torch.nn.UpsamplingNearest2d(scale_factor=2)
        self.conv = torch.nn.Conv2d(6 + 3, 4, 3, padding=1)

    def forward(self, coarse, skip):
        return self.conv(torch.cat([self.up(coarse), self.near(coarse), skip], 1))


def test_convert_swaps_the_upsampling_of_a_unet_decoder_and_matches_torch():
    theirs = Decoder()
    ours = mg.convert(copy.deepcopy(theirs), strict=True)
    assert type(ours.up) is mnn.Upsample and type(ours.near) is mnn.UpsamplingNearest2d
    coarse, skip = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(2, 3, 8, 10, requires_grad=True)
    assert_same_as_torch(ours, theirs, coarse, skip, rtol=1e-5, atol=1e-5)
