"""alpha_dropout, feature_alpha_dropout, dropout1d/2d/3d and their modules: torch's draws, outputs
and gradients bit for bit under the same seed (also in place, on views, unbatched, under vmap),
float64 gradchecks with double backward, compact masks, bad input like torch."""
import warnings

import pytest
import torch
import torch.nn.functional as TF

import manualgrad as mg
import manualgrad.functional as F
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients, saved_bytes
from tests.conftest import VIEWS, inplace_on_view, noncontiguous

# (name, input shapes that are valid for it)
OPS = {
    "alpha_dropout": [(1,), (7, 13), (2, 3, 257)],
    "feature_alpha_dropout": [(3, 1), (7, 13), (2, 3, 5, 7)],
    "dropout1d": [(4, 13), (3, 5, 17)],
    "dropout2d": [(3, 5, 7), (2, 5, 3, 7)],
    "dropout3d": [(3, 2, 3, 5), (2, 3, 2, 3, 5)],
}
CASES = [(name, shape) for name, shapes in OPS.items() for shape in shapes]


def ops(name):
    return getattr(F, name), getattr(TF, name)


def seeded(fn, seed=0, **kwargs):
    def run(t):
        torch.manual_seed(seed)
        return fn(t, **kwargs)
    return run


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout2d / 3d's deprecation warnings: their own test
        yield


@pytest.mark.parametrize("name,shape", CASES)
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_dropout_matches_torch_bit_for_bit_under_the_same_seed(name, shape, p):
    fn, torch_fn = ops(name)
    x = torch.randn(shape, requires_grad=True)
    assert_same_as_torch(seeded(fn, p=p, training=True), seeded(torch_fn, p=p, training=True), x, rtol=0, atol=0)


@pytest.mark.parametrize("name,shape", CASES)
def test_dropout_inplace_matches_torch(name, shape):
    fn, torch_fn = ops(name)
    x = torch.randn(shape, requires_grad=True)
    kw = dict(p=0.4, training=True, inplace=True)
    assert_same_as_torch(lambda t: seeded(fn, **kw)(t * 1), lambda t: seeded(torch_fn, **kw)(t * 1), x, rtol=0, atol=0)
    h = torch.randn(shape)
    expected = seeded(torch_fn, **kw)(h.clone())
    assert seeded(fn, **kw)(h) is h
    assert torch.equal(h, expected) and h.shape == shape  # (unbatched: the batch dim added in place is gone again)


@pytest.mark.parametrize("name", OPS)
def test_dropout_noncontiguous_and_float64_match_torch(name):
    fn, torch_fn = ops(name)
    shape = OPS[name][-1]
    for x in (noncontiguous(torch.randn(shape, requires_grad=True)), torch.randn(shape, dtype=torch.float64, requires_grad=True)):
        assert_same_as_torch(seeded(fn, p=0.3, training=True), seeded(torch_fn, p=0.3, training=True), x, rtol=0, atol=0)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("inplace", [False, True])
def test_dropout_gradients(name, inplace):
    # the same seed on every call: the same mask for gradcheck's perturbed inputs. No batched
    # forward-AD check: it draws inside torch's legacy vmap, which refuses random ops (torch's too)
    shape = [s for s in OPS[name] if len(s) > 1][0]
    fn = seeded(getattr(F, name), p=0.4, training=True, inplace=inplace)
    check_gradients(lambda t: fn(t.clone()) if inplace else fn(t), torch.randn(shape, dtype=torch.float64, requires_grad=True),
                    batched_forward_grad=False)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("p,training", [(0.0, True), (0.5, False), (1.0, True)])
def test_dropout_edge_probabilities_and_eval_match_torch(name, p, training):
    fn, torch_fn = ops(name)
    x = torch.randn(OPS[name][-1], requires_grad=True)
    assert_same_as_torch(seeded(fn, p=p, training=training), seeded(torch_fn, p=p, training=training), x, rtol=0, atol=0)
    if p == 0 or not training:
        assert fn(x, p=p, training=training) is x  # as torch: the input itself


def test_alpha_dropout_keeps_zero_mean_and_unit_variance():
    # independent of torch: the point of the shift b
    torch.manual_seed(0)
    x = torch.randn(400000, dtype=torch.float64)
    y = F.alpha_dropout(x, 0.3, True)
    assert abs(y.mean().item()) < 0.01 and abs(y.var().item() - 1) < 0.01
    # each value is x a + b1 (kept) or b0 (dropped): the SELU fixed point (mean 0, variance 1) kept,
    # alpha' = SELU's scale * alpha, a = ((alpha'^2 p + 1)(1 - p))^(-1/2), b0 = -alpha' a (1 - p), b1 = alpha' a p
    alpha = 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717
    a = ((alpha**2 * 0.3 + 1) * 0.7) ** -0.5
    b0, b1 = -alpha * a * 0.7, alpha * a * 0.3
    dropped = (y - b0).abs() < 1e-12
    assert 0.28 < dropped.double().mean().item() < 0.32
    torch.testing.assert_close(y[~dropped], x[~dropped] * a + b1)


def test_feature_dropout_zeroes_whole_channels():
    torch.manual_seed(0)
    y = F.dropout2d(torch.ones(8, 16, 5, 5), 0.5)
    per_channel = y.flatten(2)
    assert ((per_channel == 0).all(-1) | (per_channel == 2).all(-1)).all()
    assert 0.3 < (per_channel[..., 0] == 0).double().mean() < 0.7


@pytest.mark.parametrize("name", ["alpha_dropout", "dropout2d"])
def test_dropout_keeps_its_mask_bit_packed(name):
    x = torch.randn(64, 32, 8, 8, requires_grad=True)
    torch.manual_seed(0)
    ours, _ = saved_bytes(getattr(F, name), x, 0.5, True)
    torch.manual_seed(0)
    theirs, _ = saved_bytes(getattr(TF, name), x, 0.5, True)
    per = x.numel() if name == "alpha_dropout" else 64 * 32  # one bit per drawn value
    assert ours == -(-per // 8) and ours * 32 <= theirs


@pytest.mark.parametrize("view", VIEWS.values(), ids=VIEWS.keys())
@pytest.mark.parametrize("name", ["alpha_dropout", "feature_alpha_dropout", "dropout1d"])
def test_inplace_on_a_view_matches_torch(name, view):
    if name != "alpha_dropout" and view is VIEWS["row"]:
        pytest.skip("a row is 1D: feature dropout refuses it (tested in test_bad_input_raises_like_torch)")
    fn, torch_fn = ops(name)
    leaf, w, v = (torch.randn(4, 6, dtype=torch.float64) * 2 for _ in range(3))
    ours = inplace_on_view(lambda t: fn(t, 0.4, True, True), view, leaf, w, v)
    theirs = inplace_on_view(lambda t: torch_fn(t, 0.4, True, True), view, leaf, w, v)
    for what in theirs:
        torch.testing.assert_close(ours[what], theirs[what], rtol=0, atol=0, msg=lambda m, what=what: f"{what}: {m}")


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("randomness", ["different", "same"])
@pytest.mark.parametrize("transposed", [False, True])
def test_dropout_under_vmap_draws_torchs_masks(name, randomness, transposed):
    # transposed: each sample non-contiguous; torch then draws on a contiguous (batch, *sample) tensor
    fn, torch_fn = ops(name)
    x = torch.randn(3, *OPS[name][-1])
    w = torch.randn_like(x)
    if transposed:
        x, w = x.transpose(-1, -2), w.transpose(-1, -2)

    def run(f):
        def one(t, g):
            y, pull = torch.func.vjp(lambda s: f(s, 0.4, True), t)
            return y, pull(g)[0]
        torch.manual_seed(0)
        return torch.func.vmap(one, in_dims=(0, 0), randomness=randomness)(x, w)

    for a, b in zip(run(fn), run(torch_fn)):
        assert torch.equal(a, b)


def test_dropout_under_vmap_with_randomness_error_raises_like_torch():
    x = torch.randn(3, 2, 4)
    assert_raises_like_torch(lambda t: torch.func.vmap(lambda s: F.alpha_dropout(s, 0.5, True))(t),
                             lambda t: torch.func.vmap(lambda s: TF.alpha_dropout(s, 0.5, True))(t), x)


@pytest.mark.parametrize("call", [
    lambda f: f.dropout1d(torch.randn(2, 3, 4, 5)),
    lambda f: f.dropout1d(torch.randn(3)),
    lambda f: f.feature_alpha_dropout(torch.randn(5), 0.5, True),
    lambda f: f.alpha_dropout(torch.randn(5), 1.5, True),
    lambda f: f.dropout2d(torch.randn(2, 3, 4, 5), -0.1),
    lambda f: f.feature_alpha_dropout(torch.randn(2, 5), float("nan"), True),
    lambda f: f.alpha_dropout(torch.arange(6), 0.5, True),
    lambda f: f.dropout2d(torch.arange(24).view(2, 3, 4), 0.5),
    lambda f: f.alpha_dropout(torch.randn(3, requires_grad=True), 0.5, True, True),
], ids=["1d-4d", "1d-1d", "feature-1d", "p>1", "p<0", "p-nan", "alpha-int", "2d-int", "leaf-inplace"])
def test_bad_input_raises_like_torch(call):
    assert_raises_like_torch(lambda: call(F), lambda: call(TF))


@pytest.mark.parametrize("name,dim", [("dropout2d", 2), ("dropout2d", 3), ("dropout2d", 5), ("dropout3d", 3)])
def test_dropout2d_and_3d_warn_like_torch(name, dim):
    fn, torch_fn = ops(name)
    x = torch.randn(*[2] * dim)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        fn(x, 0.5)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch_fn(x, 0.5)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs] and theirs


@pytest.mark.parametrize("name,kwargs,shape", [
    ("AlphaDropout", dict(p=0.3), (4, 9)), ("FeatureAlphaDropout", dict(p=0.3), (2, 3, 4, 5)),
    ("Dropout1d", dict(p=0.3), (3, 4, 5)), ("Dropout1d", dict(p=0.3, inplace=True), (4, 5)),
    ("Dropout2d", dict(p=0.3), (2, 3, 4, 5)), ("Dropout3d", dict(p=0.6), (2, 3, 2, 3, 4)),
    ("Dropout3d", dict(p=0.6, inplace=True), (3, 2, 3, 4)),
])
@pytest.mark.parametrize("train", [True, False])
def test_dropout_modules_are_drop_ins(name, kwargs, shape, train):
    theirs = getattr(torch.nn, name)(**kwargs).train(train)
    ours = getattr(mnn, name)(**kwargs).train(train)
    assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
    x = torch.randn(shape, requires_grad=True)
    assert_same_as_torch(lambda t: seeded(ours)(t * 1), lambda t: seeded(theirs)(t * 1), x, rtol=0, atol=0)
    model = mg.convert(torch.nn.Sequential(getattr(torch.nn, name)(**kwargs)), strict=True)
    assert type(model[0]) is getattr(mnn, name)
