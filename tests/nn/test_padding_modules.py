"""The padding modules are drop-ins for torch.nn's: same repr, same outputs and gradients (exact:
padding copies values and its backward sums multiples of 1/4), torch's input checks, and
convert(strict=True) swaps them."""
import pytest
import torch

import manualgrad as mg
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch

# (class name, constructor args, input shape)
MODULES = [
    ("ZeroPad1d", (2,), (2, 3, 5)),
    ("ZeroPad2d", ((1, 0, 2, -1),), (2, 3, 4, 5)),
    ("ZeroPad3d", (1,), (3, 2, 3, 4)),
    ("ConstantPad1d", ((3, -1), 1.5), (3, 5)),
    ("ConstantPad2d", (2, -0.5), (1, 2, 3, 4)),
    ("ConstantPad3d", ((1, 2, 0, 1, 2, 0), 3.0), (1, 2, 3, 4, 5)),
    ("ReflectionPad1d", (2,), (2, 3, 5)),
    ("ReflectionPad2d", ((1, 2, 3, -1),), (3, 4, 5)),
    ("ReflectionPad3d", (1,), (1, 2, 3, 4, 5)),
    ("ReplicationPad1d", ((3, 0),), (3, 1)),
    ("ReplicationPad2d", (2,), (2, 1, 3, 4)),
    ("ReplicationPad3d", ((1, 0, 2, 1, 0, 3),), (2, 3, 4, 5)),
    ("CircularPad1d", (2,), (2, 3, 5)),
    ("CircularPad2d", ((1, 2, -1, 2),), (1, 2, 4, 5)),
    ("CircularPad3d", (1,), (2, 3, 3, 4)),
]
IDS = [m[0] for m in MODULES]


def _pair(name, args):
    return getattr(mnn, name)(*args), getattr(torch.nn, name)(*args)


@pytest.mark.parametrize("name, args, shape", MODULES, ids=IDS)
def test_padding_module_matches_torch(name, args, shape):
    ours, theirs = _pair(name, args)
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, type(theirs))
    x = torch.randn(shape, requires_grad=True)
    dy = (torch.randint(-16, 17, theirs(x).shape) / 4).float()
    assert_same_as_torch(ours, theirs, x, grad_output=dy, rtol=0, atol=0)
    assert type(ours(x).grad_fn).__name__.endswith("PadFunctionBackward")


@pytest.mark.parametrize("name, args, shape", MODULES, ids=IDS)
def test_convert_swaps_the_padding_module(name, args, shape):
    model = torch.nn.Sequential(getattr(torch.nn, name)(*args))
    mg.convert(model, strict=True)
    assert type(model[0]) is getattr(mnn, name)


@pytest.mark.parametrize("name, shape", [("CircularPad1d", (2, 3, 4, 5)), ("CircularPad2d", (5, 6)),
                                         ("CircularPad3d", (1, 2, 3, 4, 5, 6))])
def test_circular_pad_modules_check_the_input_dim_like_torch(name, shape):
    ours, theirs = _pair(name, (1,))
    assert_raises_like_torch(ours, theirs, torch.randn(shape), match=r"expected \dD or \dD input")


@pytest.mark.parametrize("name, shape", [("ReflectionPad1d", (1, 2, 2)), ("ReflectionPad2d", (2, 3)),
                                         ("ReplicationPad3d", (2, 3, 4))])
def test_padding_module_bad_input_raises_like_torch(name, shape):
    ours, theirs = _pair(name, (2,))
    assert_raises_like_torch(ours, theirs, torch.randn(shape))


def test_the_mode_routes_an_unconverted_padding_module_to_the_hand_written_backward():
    model = torch.nn.Sequential(torch.nn.ReflectionPad2d(2), torch.nn.CircularPad1d(1))
    x = torch.randn(2, 3, 4, requires_grad=True)
    with mg.enable():
        y = model(x)
    names = {type(n).__name__ for n in (y.grad_fn, y.grad_fn.next_functions[0][0])}
    assert names == {"PadFunctionBackward", "ReflectReplicatePadFunctionBackward"}
    dy = torch.randint(-16, 17, y.shape) / 4
    (dx,) = torch.autograd.grad(y, x, dy)
    x2 = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(model(x2), x2, dy)
    assert torch.equal(dx, expected)
