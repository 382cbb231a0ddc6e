"""ConvTranspose1d/2d/3d (and Conv3d in a network) are drop-ins for torch.nn's: same repr and
state_dict, same outputs and gradients, forward's ``output_size`` as torch's, torch's exceptions;
convert(strict=True) swaps them in a DCGAN-like generator and in a 3-D CNN, whose loss, every
gradient and batch-norm buffers then match torch's."""
import copy

import pytest
import torch

import manualgrad as mg
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import noncontiguous


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py


# float32: sums of up to a few hundred products in another order than torch's kernels (see
# tests/ops/test_conv_transpose.py); the networks' gradients pass through batch norm's 1/std
ATOL = 4e-5

# (class name, constructor kwargs, input shape): stride, padding, output_padding, groups,
# dilation, no bias, unbatched, size-1 dims, per-dim tuples
MODULES = [
    ("ConvTranspose1d", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1,
                             groups=2), (2, 4, 7)),
    ("ConvTranspose1d", dict(in_channels=3, out_channels=2, kernel_size=2, dilation=3, output_padding=2, bias=False),
     (3, 5)),
    ("ConvTranspose2d", dict(in_channels=3, out_channels=5, kernel_size=(3, 2)), (2, 3, 5, 4)),
    ("ConvTranspose2d", dict(in_channels=4, out_channels=2, kernel_size=4, stride=2, padding=1, bias=False),
     (2, 4, 3, 1)),
    ("ConvTranspose2d", dict(in_channels=4, out_channels=4, kernel_size=3, stride=(2, 3), padding=(1, 0),
                             output_padding=(1, 2), groups=4), (4, 3, 2)),
    ("ConvTranspose3d", dict(in_channels=2, out_channels=3, kernel_size=(2, 3, 2), stride=2, padding=(0, 1, 0)),
     (2, 2, 3, 2, 3)),
    ("ConvTranspose3d", dict(in_channels=4, out_channels=2, kernel_size=2, stride=(1, 2, 2), output_padding=(0, 1, 0),
                             groups=2, dilation=(2, 1, 1)), (4, 2, 3, 1)),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(MODULES)]


def _pair(name, kwargs):
    theirs = getattr(torch.nn, name)(**kwargs)
    ours = getattr(mnn, name)(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("name,kwargs,shape", MODULES, ids=IDS)
def test_conv_transpose_module_matches_torch_module(name, kwargs, shape):
    ours, theirs = _pair(name, kwargs)
    assert_same_as_torch(ours, theirs, torch.randn(shape, requires_grad=True), atol=ATOL)
    assert_same_as_torch(ours, theirs, noncontiguous(torch.randn(shape, requires_grad=True)), atol=ATOL)


@pytest.mark.parametrize("name,kwargs,shape", MODULES, ids=IDS)
def test_conv_transpose_module_is_a_drop_in_for_torch(name, kwargs, shape):
    ours, theirs = _pair(name, kwargs)
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(theirs)
    back = getattr(torch.nn, name)(**kwargs)
    back.load_state_dict(ours.state_dict())
    for (k, a), (_, b) in zip(back.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), k


# output_size: any size from the smallest ((L - 1) s - 2p + d (K - 1) + 1) to s - 1 more, given
# with or without the batch and channel dims; torch turns it into output_padding
OUTPUT_SIZES = [
    ("ConvTranspose1d", dict(in_channels=2, out_channels=3, kernel_size=3, stride=3), (2, 2, 4), [12]),
    ("ConvTranspose1d", dict(in_channels=2, out_channels=3, kernel_size=3, stride=3), (2, 4), [3, 13]),
    ("ConvTranspose2d", dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1), (2, 2, 4, 3),
     (8, 5)),
    ("ConvTranspose2d", dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1), (2, 2, 4, 3),
     torch.Size([2, 3, 7, 6])),
    ("ConvTranspose3d", dict(in_channels=2, out_channels=2, kernel_size=2, stride=(2, 1, 3)), (1, 2, 2, 3, 2),
     [5, 4, 7]),
]


@pytest.mark.parametrize("name,kwargs,shape,size", OUTPUT_SIZES, ids=[f"{c[0]}-{c[3]}" for c in OUTPUT_SIZES])
def test_conv_transpose_module_output_size_matches_torch(name, kwargs, shape, size):
    ours, theirs = _pair(name, kwargs)
    out, _ = assert_same_as_torch(ours, theirs, torch.randn(shape, requires_grad=True), atol=ATOL, output_size=size)
    n = int(name[-2])  # spatial dims
    assert list(out[0].shape[-n:]) == list(size)[-n:]


@pytest.mark.parametrize("size", [[6, 5], [9, 5], [2, 3, 8], [1, 2, 3, 8, 5]])
def test_conv_transpose_module_rejects_a_bad_output_size_like_torch(size):
    # valid: (7..8, 5..6); a size out of range, or of the wrong length, is torch's ValueError
    ours, theirs = _pair("ConvTranspose2d", dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1))
    x = torch.randn(2, 2, 4, 3)
    assert_raises_like_torch(ours, theirs, x, output_size=size, match="output size|output_size must have")


def test_conv_transpose_module_gradients_with_output_size():
    m = mnn.ConvTranspose2d(2, 2, 3, stride=(2, 3), padding=1, groups=2).double()
    params = dict(m.named_parameters())

    def f(x, *p):
        return torch.func.functional_call(m, dict(zip(params, p)), (x,), dict(output_size=[4, 6]))
    check_gradients(f, torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True), *params.values())


def test_conv_transpose_module_refuses_a_padding_mode_like_torch():
    ours, theirs = _pair("ConvTranspose2d", dict(in_channels=2, out_channels=3, kernel_size=3))
    ours.padding_mode = theirs.padding_mode = "reflect"  # the constructor refuses it already
    assert_raises_like_torch(ours, theirs, torch.randn(1, 2, 4, 4), match="Only `zeros` padding mode")
    with pytest.raises(ValueError):
        mnn.ConvTranspose2d(2, 3, 3, padding_mode="reflect")


def test_conv_transpose_module_rejects_bad_input_like_torch():
    ours, theirs = _pair("ConvTranspose2d", dict(in_channels=2, out_channels=3, kernel_size=3))
    assert_raises_like_torch(ours, theirs, torch.randn(1, 3, 4, 4), match="to have 2 channels")
    assert_raises_like_torch(ours, theirs, torch.randn(4, 4), match="Expected 3D .unbatched. or 4D .batched.")


# --- networks --------------------------------------------------------------------------------


def _dcgan_generator(nz=8, ngf=4, nc=3):
    """A small DCGAN generator: latent (N, nz, 1, 1) -> image (N, nc, 32, 32)."""
    nn = torch.nn
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
    )


def _cnn3d_features():
    """A small 3-D CNN without pooling (Conv3d + BatchNorm3d + ReLU, strided and padded, one
    replicate-padded, one grouped), with a linear head: (N, 1, 8, 8, 8) -> (N, 3)."""
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
        torch.nn.Conv3d(4, 6, 3, stride=2, padding=1, padding_mode="replicate"), torch.nn.BatchNorm3d(6),
        torch.nn.ReLU(),
        torch.nn.Conv3d(6, 6, (1, 3, 3), stride=2, groups=2, bias=False), torch.nn.BatchNorm3d(6), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 2 * 1 * 1, 3),
    )


def _cnn3d_with_pooling():
    nn = torch.nn
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(4, 6, 3, padding=1, bias=False), nn.BatchNorm3d(6), nn.ReLU(), nn.MaxPool3d(3, stride=2, padding=1),
        nn.Flatten(), nn.Linear(6 * 2 * 2 * 2, 3),
    )


def _assert_step_matches(ours, theirs, x, loss_fn):
    """One training-mode forward/backward: same loss, every parameter gradient and buffer."""
    loss, ref = loss_fn(ours(x)), loss_fn(theirs(x))
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")
    for (name, b), (_, c) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_converted_dcgan_generator_matches_torch():
    torch.manual_seed(0)
    theirs = _dcgan_generator()
    ours = mg.convert(copy.deepcopy(theirs), strict=True)
    assert {type(m) for m in ours} == {mnn.ConvTranspose2d, mnn.BatchNorm2d, mnn.ReLU, mnn.Tanh}
    z, target = torch.randn(5, 8, 1, 1), torch.rand(5, 3, 32, 32) * 2 - 1
    _assert_step_matches(ours, theirs, z, lambda y: torch.nn.functional.mse_loss(y, target))


def test_converted_3d_cnn_matches_torch():
    torch.manual_seed(0)
    theirs = _cnn3d_features()
    ours = mg.convert(copy.deepcopy(theirs), strict=True)
    assert all(type(m).__module__.startswith("manualgrad") for m in ours)
    x, y = torch.randn(3, 1, 8, 8, 8), torch.tensor([0, 2, 1])
    _assert_step_matches(ours, theirs, x, lambda logits: torch.nn.functional.cross_entropy(logits, y))


def test_converted_3d_cnn_with_max_pooling_matches_torch():
    # Conv3d + BatchNorm3d + ReLU + MaxPool3d blocks (overlapping windows in the second), a
    # linear head; every layer converts
    torch.manual_seed(1)
    theirs = _cnn3d_with_pooling()
    ours = mg.convert(copy.deepcopy(theirs), strict=True)
    assert all(type(m).__module__.startswith("manualgrad") for m in ours)
    x, y = torch.randn(3, 1, 8, 8, 8), torch.tensor([0, 2, 1])
    _assert_step_matches(ours, theirs, x, lambda logits: torch.nn.functional.cross_entropy(logits, y))


@pytest.mark.parametrize("case", ["dcgan", "cnn3d"])
def test_compiled_converted_network_has_no_graph_break_and_gives_eager_gradients(case):
    # torch.compile traces the hand-written forward and backward whole (tests/test_compile.py)
    from tests.test_compile import _assert_compiled_matches_eager, _assert_no_graph_break

    torch.manual_seed(0)
    if case == "dcgan":
        model = mg.convert(_dcgan_generator(), strict=True)
        z, target = torch.randn(3, 8, 1, 1), torch.rand(3, 3, 32, 32)
        loss_fn = lambda m: torch.nn.functional.mse_loss(m(z), target)  # noqa: E731
    else:
        model = mg.convert(_cnn3d_with_pooling(), strict=True)
        x, y = torch.randn(2, 1, 8, 8, 8), torch.tensor([2, 0])
        loss_fn = lambda m: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    _assert_no_graph_break(lambda: loss_fn(model))
    _assert_compiled_matches_eager(model, loss_fn)
    torch._dynamo.reset()


def _dcgan_discriminator(nc=3, ndf=4):
    """The matching discriminator: image (N, nc, 32, 32) -> probability (N, 1, 1, 1)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False), nn.Sigmoid(),
    )


def test_converted_dcgan_training_steps_match_torch():
    # Two GAN iterations (Adam): the discriminator on real and detached fake images, then the
    # generator through the discriminator; losses, every gradient and the BN buffers, each step
    torch.manual_seed(0)
    G, D = _dcgan_generator(), _dcgan_discriminator()
    G2, D2 = mg.convert(copy.deepcopy(G), strict=True), mg.convert(copy.deepcopy(D), strict=True)
    bce = torch.nn.functional.binary_cross_entropy
    pairs = []
    for g, d in ((G2, D2), (G, D)):
        pairs.append((g, d, torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)))
    for step in range(2):
        z, real = torch.randn(4, 8, 1, 1), torch.rand(4, 3, 32, 32) * 2 - 1
        results = []
        for g, d, opt_g, opt_d in pairs:
            opt_d.zero_grad()
            fake = g(z)
            p_real, p_fake = d(real).flatten(), d(fake.detach()).flatten()
            loss_d = bce(p_real, torch.ones(4)) + bce(p_fake, torch.zeros(4))
            loss_d.backward()
            grads_d = [p.grad.clone() for p in d.parameters()]
            opt_d.step()
            opt_g.zero_grad()
            loss_g = bce(d(fake).flatten(), torch.ones(4))
            loss_g.backward()
            grads_g = [p.grad.clone() for p in g.parameters()]
            opt_g.step()
            buffers = [b.clone() for b in list(g.buffers()) + list(d.buffers())]
            results.append((loss_d.detach(), loss_g.detach(), grads_d, grads_g, buffers))
        ours, theirs = results
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} loss_D: {m}")
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} loss_G: {m}")
        for what, a, b in (("D", ours[2], theirs[2]), ("G", ours[3], theirs[3])):
            for i, (x, y) in enumerate(zip(a, b)):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=ATOL,
                                           msg=lambda m: f"step {step} {what} grad {i}: {m}")
        for i, (x, y) in enumerate(zip(ours[4], theirs[4])):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} buffer {i}: {m}")
