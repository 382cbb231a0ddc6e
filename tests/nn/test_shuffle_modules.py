"""PixelShuffle, PixelUnshuffle, ChannelShuffle, Fold, Unfold: drop-ins for torch.nn's (same repr,
outputs and gradients, exact: upstream gradients in multiples of 1/4), and convert(strict=True)
swaps them, e.g. in an ESPCN-style super-resolution net."""
import copy

import pytest
import torch

import manualgrad as mg
import manualgrad.nn as mnn
from manualgrad.testing import assert_same_as_torch

# (class name, constructor kwargs, input shape)
MODULES = [
    ("PixelShuffle", dict(upscale_factor=3), (2, 18, 3, 2)),
    ("PixelUnshuffle", dict(downscale_factor=2), (2, 3, 4, 6)),
    ("ChannelShuffle", dict(groups=3), (2, 6, 3, 5)),
    ("Unfold", dict(kernel_size=(2, 3), dilation=(1, 2), padding=1, stride=(2, 1)), (2, 3, 5, 6)),
    ("Unfold", dict(kernel_size=2), (3, 4, 5)),
    ("Fold", dict(output_size=(4, 5), kernel_size=2, stride=1), (2, 12, 12)),
    ("Fold", dict(output_size=5, kernel_size=(2, 3), padding=(1, 0), stride=2), (12, 6)),
]
IDS = [f"{m[0]}-{i}" for i, m in enumerate(MODULES)]


@pytest.mark.parametrize("name, kwargs, shape", MODULES, ids=IDS)
def test_rearrangement_module_matches_torch(name, kwargs, shape):
    ours, theirs = getattr(mnn, name)(**kwargs), getattr(torch.nn, name)(**kwargs)
    assert repr(ours) == repr(theirs)
    x = torch.randn(shape, requires_grad=True)
    dy = (torch.randint(-16, 17, theirs(x).shape) / 4).float()
    assert_same_as_torch(ours, theirs, x, grad_output=dy, rtol=0, atol=0)
    assert type(ours(x).grad_fn).__name__ == f"{name}FunctionBackward"


def test_convert_swaps_an_espcn_style_super_resolution_net_and_matches_torch():
    # conv (reflect padding) -> ReLU -> conv to C r^2 channels -> PixelShuffle(r)
    r = 3
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5, padding=2, padding_mode="reflect"), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3, padding=1), torch.nn.ChannelShuffle(2), torch.nn.Tanh(),
        torch.nn.Conv2d(4, r * r, 3, padding=1, padding_mode="replicate"), torch.nn.PixelShuffle(r))
    reference = copy.deepcopy(model)
    mg.convert(model, strict=True)
    assert type(model[-1]) is mnn.PixelShuffle and type(model[3]) is mnn.ChannelShuffle
    x = torch.randn(2, 1, 7, 6)
    report = mg.coverage(model, x, mode=False)
    assert report.torch_ops == [], report
    assert_same_as_torch(model, reference, x.requires_grad_(), atol=1e-5)


def test_converted_padding_conv_and_shuffle_net_compiles_without_graph_breaks_and_matches_eager():
    model = torch.nn.Sequential(
        torch.nn.ReflectionPad2d((1, 2, 1, 0)), torch.nn.Conv2d(2, 8, 3, padding=1, padding_mode="circular"),
        torch.nn.ChannelShuffle(2), torch.nn.PixelShuffle(2), torch.nn.ReplicationPad2d(1),
        torch.nn.Unfold(2, stride=2), torch.nn.Fold((14, 10), (2, 1), stride=(2, 1)))  # 8 x 70 columns: (4, 14, 10)
    mg.convert(model, strict=True)
    x = torch.randn(2, 2, 5, 6)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    compiled = torch.compile(model, backend="aot_eager")
    outs, grads = [], []
    for m in (model, compiled):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.ones_like(y))
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b)
