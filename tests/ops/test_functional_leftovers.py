"""The last torch.nn.functional names: relu_ / elu_ / leaky_relu_, the deprecated upsample aliases,
the *_with_indices poolings, gumbel_softmax, native_channel_shuffle and conv_tbc, each against torch
(values, gradients, warnings, exceptions)."""
import warnings

import pytest
import torch
import torch.nn.functional as TF

import manualgrad.functional as F
from manualgrad.testing import assert_raises_like_torch, check_gradients
from tests.conftest import exact_dy

pytestmark = pytest.mark.usefixtures("one_thread")


def _grad_fn_names(t):
    """Names of the autograd nodes of t's graph."""
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


# ---------------------------------------------------------------------------------------------
# relu_, elu_, leaky_relu_

INPLACE = [("relu_", ()), ("elu_", ()), ("elu_", (0.7,)), ("leaky_relu_", ()), ("leaky_relu_", (0.2,))]


@pytest.mark.parametrize("name, args", INPLACE)
def test_inplace_activation_overwrites_its_input_like_torch(name, args):
    leaf = torch.randn(5, 7, requires_grad=True)
    dy = exact_dy((5, 7))
    results = []
    for fn in (getattr(F, name), getattr(TF, name)):
        x = leaf.detach().clone().requires_grad_()
        h = x * 1
        out = fn(h, *args)
        assert out is h
        (g,) = torch.autograd.grad(out, x, dy)
        results.append((out.detach(), g))
    (out, g), (ref, ref_g) = results
    # torch's elementwise kernels on the same values: expm1 rounding is the only difference
    torch.testing.assert_close(out, ref, rtol=1.3e-6, atol=1e-7)
    torch.testing.assert_close(g, ref_g, rtol=1.3e-6, atol=1e-7)


@pytest.mark.parametrize("name, args", INPLACE)
def test_inplace_activation_runs_manualgrads_backward_and_gradchecks(name, args):
    x = torch.randn(4, 6, dtype=torch.float64)
    x = x + 0.1 * x.sign()  # away from the kink at 0
    out = getattr(F, name)(x.clone().requires_grad_() * 1, *args)
    assert any(n.startswith(("ReLU", "ELU", "LeakyReLU")) and "Function" in n for n in _grad_fn_names(out))
    check_gradients(lambda t: getattr(F, name)(t * 1, *args), x.requires_grad_(), batched_forward_grad=False)


@pytest.mark.parametrize("name", ["relu_", "elu_", "leaky_relu_"])
def test_inplace_activation_on_a_leaf_that_requires_grad_raises_like_torch(name):
    x = torch.randn(3, requires_grad=True)
    assert_raises_like_torch(lambda: getattr(F, name)(x), lambda: getattr(TF, name)(x), match="leaf")


# ---------------------------------------------------------------------------------------------
# upsample, upsample_nearest, upsample_bilinear

UPSAMPLE = [
    ("upsample", (torch.randn(2, 3, 5),), dict(scale_factor=2)),
    ("upsample", (torch.randn(2, 3, 4, 5),), dict(size=(7, 3), mode="bilinear", align_corners=False)),
    ("upsample", (torch.randn(2, 3, 4, 5),), dict(size=(7, 3), mode="bicubic", align_corners=True)),
    ("upsample_nearest", (torch.randn(2, 3, 4, 5),), dict(scale_factor=1.5)),
    ("upsample_nearest", (torch.randn(1, 2, 3, 4, 2),), dict(size=5)),
    ("upsample_bilinear", (torch.randn(2, 3, 4, 5),), dict(size=(6, 9))),
    ("upsample_bilinear", (torch.randn(2, 3, 4, 5),), dict(scale_factor=(2, 0.5))),
]


def _warned(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("name, args, kwargs", UPSAMPLE)
def test_upsample_alias_matches_torch_and_warns_like_it(name, args, kwargs):
    x = args[0].double().requires_grad_()
    (out, warned), (ref, ref_warned) = (_warned(fn, x, **kwargs) for fn in (getattr(F, name), getattr(TF, name)))
    assert warned == ref_warned and warned and warned[0][1].startswith(f"`nn.functional.{name}` is deprecated")
    torch.testing.assert_close(out, ref)
    dy = torch.randn_like(out)
    (g,), (ref_g,) = torch.autograd.grad(out, x, dy), torch.autograd.grad(ref, x, dy)
    torch.testing.assert_close(g, ref_g)
    assert any("Interpolate" in n or "AdaptiveAvg" in n for n in _grad_fn_names(out))


def test_upsample_bilinear_of_a_3d_input_raises_like_torch():
    x = torch.randn(2, 3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_raises_like_torch(lambda: F.upsample_bilinear(x, size=4), lambda: TF.upsample_bilinear(x, size=4))
        assert_raises_like_torch(lambda: F.upsample(x, scale_factor=2, mode="cubic"),
                                 lambda: TF.upsample(x, scale_factor=2, mode="cubic"))


# ---------------------------------------------------------------------------------------------
# *_with_indices

WITH_INDICES = [
    ("max_pool1d_with_indices", (torch.randn(2, 3, 9), 3), dict(stride=2, padding=1)),
    ("max_pool2d_with_indices", (torch.randn(2, 3, 7, 6), 2), dict(dilation=2, ceil_mode=True)),
    ("max_pool3d_with_indices", (torch.randn(2, 2, 5, 4, 6), 2), {}),
    ("adaptive_max_pool1d_with_indices", (torch.randn(2, 3, 9), 4), {}),
    ("adaptive_max_pool2d_with_indices", (torch.randn(2, 3, 7, 6), (3, None)), {}),
    ("adaptive_max_pool3d_with_indices", (torch.randn(2, 2, 5, 4, 6), (2, 3, 2)), {}),
    ("fractional_max_pool2d_with_indices", (torch.randn(2, 3, 7, 6), 2), dict(output_size=(4, 3))),
    ("fractional_max_pool3d_with_indices", (torch.randn(2, 2, 5, 4, 6), 2), dict(output_ratio=(0.5, 0.5, 0.6))),
]


@pytest.mark.parametrize("return_indices", [False, True])
@pytest.mark.parametrize("name, args, kwargs", WITH_INDICES)
def test_with_indices_returns_output_and_indices_like_torch(name, args, kwargs, return_indices):
    x = args[0].requires_grad_()
    results = []
    for fn in (getattr(F, name), getattr(TF, name)):
        torch.manual_seed(3)  # the fractional poolings draw their windows
        out, idx = fn(x, *args[1:], **kwargs, return_indices=return_indices)
        dy = exact_dy(out.shape)
        (g,) = torch.autograd.grad(out, x, dy)
        results.append((out, idx, g, torch.get_rng_state()))
    (out, idx, g, state), (ref, ref_idx, ref_g, ref_state) = results
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx) and torch.equal(g, ref_g)
    assert torch.equal(state, ref_state)
    assert any("Pool" in n and "Function" in n for n in _grad_fn_names(out))


@pytest.mark.parametrize("name, args, kwargs", WITH_INDICES)
def test_with_indices_gradchecks(name, args, kwargs):
    x = torch.randperm(args[0].numel()).reshape(args[0].shape).double().requires_grad_()  # no ties

    if name.startswith("fractional"):  # fixed windows: vmap'd checks cannot draw
        d = int(name[len("fractional_max_pool")])
        kwargs = dict(kwargs, _random_samples=torch.rand(x.shape[0], x.shape[1], d, dtype=torch.float64))

    def pooled(t):
        return getattr(F, name)(t, *args[1:], **kwargs)[0]

    check_gradients(pooled, x)


def test_with_indices_bad_input_raises_like_torch():
    x = torch.randn(2, 3)
    assert_raises_like_torch(lambda: F.max_pool2d_with_indices(x, 2), lambda: TF.max_pool2d_with_indices(x, 2))
    assert_raises_like_torch(lambda: F.adaptive_max_pool1d_with_indices(x[None], (2, 2)),
                             lambda: TF.adaptive_max_pool1d_with_indices(x[None], (2, 2)))
    assert_raises_like_torch(lambda: F.fractional_max_pool2d_with_indices(x[None, None], 2),
                             lambda: TF.fractional_max_pool2d_with_indices(x[None, None], 2))


# ---------------------------------------------------------------------------------------------
# gumbel_softmax

@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shape, dim, tau", [((7,), -1, 1.0), ((5, 13), -1, 0.5), ((3, 4, 6), 1, 2.0), ((3, 4, 6), 0, 1)])
def test_gumbel_softmax_draws_torchs_samples_and_gradients_under_the_same_seed(shape, dim, tau, hard):
    logits = torch.randn(shape, requires_grad=True)
    dy = exact_dy(shape)
    results = []
    for fn in (F.gumbel_softmax, TF.gumbel_softmax):
        torch.manual_seed(7)
        out = fn(logits, tau=tau, hard=hard, dim=dim)
        state = torch.get_rng_state()
        (g,) = torch.autograd.grad(out, logits, dy)
        results.append((out, g, state))
    (out, g, state), (ref, ref_g, ref_state) = results
    assert torch.equal(state, ref_state)  # the generator advanced as torch's
    assert torch.equal(out, ref)  # the same noise, the same ops in the same order: the same bits
    if hard:
        assert torch.equal(out, out.round()) and torch.equal(out.sum(dim), torch.ones_like(out.sum(dim)))
    # dx = softmax's backward / tau: a different association than torch's three nodes
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)
    assert "GumbelSoftmaxFunctionBackward" in _grad_fn_names(out)


def test_gumbel_softmax_gradchecks_for_fixed_noise():
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def sample(t):
        torch.manual_seed(1)
        return F.gumbel_softmax(t, tau=0.7, dim=0)

    # (the noise is drawn: vmap's batched forward-AD check cannot draw inside vmap)
    check_gradients(sample, logits, batched_forward_grad=False)


def test_gumbel_softmax_hard_passes_the_soft_samples_gradient_straight_through():
    # hard's true derivative is 0 almost everywhere: its gradient is by definition the soft one's
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 6, dtype=torch.float64)
    grads = []
    for hard in (False, True):
        torch.manual_seed(2)
        grads.append(torch.autograd.grad(F.gumbel_softmax(logits, tau=0.3, hard=hard), logits, dy)[0])
    assert torch.equal(grads[0], grads[1])


def test_gumbel_softmax_eps_warns_like_torch():
    logits = torch.randn(4, 3)
    (_, warned), (_, ref_warned) = (_warned(fn, logits, eps=1e-5) for fn in (F.gumbel_softmax, TF.gumbel_softmax))
    assert warned == ref_warned == [(UserWarning, "`eps` parameter is deprecated and has no effect.")]


def test_gumbel_softmax_bad_dim_raises_like_torch():
    logits = torch.randn(4, 3)
    assert_raises_like_torch(lambda: F.gumbel_softmax(logits, dim=2), lambda: TF.gumbel_softmax(logits, dim=2))


# ---------------------------------------------------------------------------------------------
# native_channel_shuffle

def test_native_channel_shuffle_matches_torch():
    # torch's native_channel_shuffle has no derivative (its backward raises); the gradient is that
    # of the same permutation, torch's channel_shuffle
    x = torch.randn(2, 6, 3, 5, requires_grad=True)
    dy = exact_dy((2, 6, 3, 5))
    out, ref = F.native_channel_shuffle(x, 3), TF.native_channel_shuffle(x, 3)
    assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(ref, x, dy)
    assert torch.equal(torch.autograd.grad(out, x, dy)[0], torch.autograd.grad(TF.channel_shuffle(x, 3), x, dy)[0])
    check_gradients(lambda t: F.native_channel_shuffle(t, 2), torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True))


def test_native_channel_shuffle_bad_groups_raise_like_torch():
    x = torch.randn(2, 6, 3)
    for g in (4, 0, -2):
        assert_raises_like_torch(lambda: F.native_channel_shuffle(x, g), lambda: TF.native_channel_shuffle(x, g))


# ---------------------------------------------------------------------------------------------
# conv_tbc

@pytest.mark.parametrize("T, B, Ci, Co, K, pad", [(7, 2, 3, 4, 3, 0), (5, 3, 2, 5, 2, 1), (6, 1, 4, 3, 5, 2),
                                                  (3, 2, 3, 4, 4, 0), (4, 2, 3, 2, 1, 0)])
def test_conv_tbc_matches_torch(T, B, Ci, Co, K, pad):
    x, w, b = torch.randn(T, B, Ci), torch.randn(K, Ci, Co), torch.randn(Co)
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    out, ref = F.conv_tbc(*leaves, pad), torch.conv_tbc(*leaves, pad)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref)
    dy = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, leaves, dy), torch.autograd.grad(ref, leaves, dy))
    # float32: both sum K * Ci products per output; tolerances of float32 rounding of such sums
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    out32, ref32 = F.conv_tbc(*leaves32, pad), torch.conv_tbc(*leaves32, pad)
    torch.testing.assert_close(out32, ref32, rtol=1e-5, atol=1e-5)
    dy32 = dy.float()
    torch.testing.assert_close(torch.autograd.grad(out32, leaves32, dy32), torch.autograd.grad(ref32, leaves32, dy32),
                               rtol=1e-5, atol=1e-5)
    assert "ConvTBCFunctionBackward" in _grad_fn_names(out)


@pytest.mark.parametrize("pad", [0, 1])
def test_conv_tbc_gradchecks(pad):
    x, w, b = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((5, 2, 3), (3, 3, 2), (2,)))
    check_gradients(lambda x, w, b: F.conv_tbc(x, w, b, pad), x, w, b)


def test_conv_tbc_bad_input_raises_like_torch():
    x, w, b = torch.randn(5, 2, 3), torch.randn(2, 3, 4), torch.randn(4)
    bad = [(x[0], w, b), (x, w[0], b), (x, w, b[None]), (x, w, b[:3]), (x, w[:, :2], b), (x, torch.randn(9, 3, 4), b)]
    for args in bad:
        assert_raises_like_torch(lambda: F.conv_tbc(*args), lambda: torch.conv_tbc(*args))


# ---------------------------------------------------------------------------------------------
# enable() and autocast

def test_enable_routes_the_new_names_to_manualgrad():
    import manualgrad

    x = torch.randn(2, 3, 6, 4, requires_grad=True)
    calls = {
        "ReLUFunctionBackward": lambda: TF.relu_(x * 1),
        "LeakyReLUFunctionBackward": lambda: TF.leaky_relu_(x * 1, 0.1),
        "InterpolateFunctionBackward": lambda: TF.upsample_bilinear(x, size=(5, 5)),
        "MaxPoolFunctionBackward": lambda: TF.max_pool2d_with_indices(x, 2)[0],
        "GumbelSoftmaxFunctionBackward": lambda: TF.gumbel_softmax(x, hard=True),
        "ChannelShuffleFunctionBackward": lambda: TF.native_channel_shuffle(x, 3),
        "ConvTBCFunctionBackward": lambda: torch.conv_tbc(x[0], torch.randn(2, 4, 5), torch.randn(5), 1),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upsample_bilinear's deprecation
        for node, call in calls.items():
            with manualgrad.enable():
                out = call()
            assert node in _grad_fn_names(out), node


def test_conv_tbc_under_bfloat16_autocast_runs_in_bfloat16_like_torch():
    x, w, b = torch.randn(7, 2, 3), torch.randn(3, 3, 4), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = F.conv_tbc(x, w, b, 1), torch.conv_tbc(x, w, b, 1)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
