"""grid_sample and affine_grid against torch (float32) and finite differences (float64), both
gradients (input and grid) in every mode, padding mode and align_corners; and a spatial
transformer (affine_grid + grid_sample + conv) converted with convert(strict=True).

The forwards are torch's kernels: identical outputs. A gradient here sums at most a few dozen
rounded products (taps times the points reading one pixel, channels times taps for the grid):
32 float32 ulps of the gradient's scale (float32 parity).
"""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as TF

import manualgrad as mg
import manualgrad.functional as F
from manualgrad.ops.grid_sample import affine_grid_backward, base_grid
from manualgrad.testing import assert_raises_like_torch, assert_same_as_torch, check_gradients
from tests.conftest import exact_dy, noncontiguous

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see tests/conftest.py

EPS = torch.finfo(torch.float32).eps
MODES = ["bilinear", "nearest", "bicubic"]
PADDING = ["zeros", "border", "reflection"]
CASES = [(m, p, ac, d) for m, p, ac, d in itertools.product(MODES, PADDING, [False, True], [2, 3])
         if not (m == "bicubic" and d == 3)]
IDS = [f"{m}-{p}-{ac}-{d}d" for m, p, ac, d in CASES]


def points(N, So, d, dtype=torch.float32, spread=1.4):
    # normalized coordinates in [-spread, spread]: inside and outside the input (the padding modes)
    return ((torch.rand((N,) + So + (d,), dtype=dtype) * 2 - 1) * spread).requires_grad_()


def same_as_torch(x, grid, **kwargs):
    with torch.no_grad():
        y = TF.grid_sample(x, grid, **kwargs)
    dy = exact_dy(y.shape)
    scale = max(1.0, float(x.detach().abs().max()) if x.numel() else 1.0) * 4 * max(x.shape[2:] or (1,))
    assert_same_as_torch(F.grid_sample, TF.grid_sample, x, grid, grad_output=dy, rtol=0, atol=32 * EPS * scale,
                         **kwargs)


@pytest.mark.parametrize("mode, padding_mode, align_corners, d", CASES, ids=IDS)
def test_grid_sample_gradients(mode, padding_mode, align_corners, d):
    # few points: a gradgradcheck of bicubic differentiates 16 taps per point
    S, So = ((3, 4), (2, 2) if mode == "bicubic" else (2, 3)) if d == 2 else ((2, 3, 3), (1, 1, 3))
    x = torch.randn((1, 1) + S, dtype=torch.float64, requires_grad=True)
    grid = points(1, So, d, torch.float64)
    check_gradients(F.grid_sample, x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


@pytest.mark.parametrize("mode, padding_mode, align_corners, d", CASES, ids=IDS)
def test_grid_sample_matches_torch(mode, padding_mode, align_corners, d):
    S, So = ((5, 7), (4, 3)) if d == 2 else ((3, 5, 4), (2, 3, 2))
    x = torch.randn((2, 3) + S, requires_grad=True)
    same_as_torch(x, points(2, So, d), mode=mode, padding_mode=padding_mode, align_corners=align_corners)


@pytest.mark.parametrize("mode", MODES)
def test_grid_sample_matches_torch_on_odd_layouts_and_sizes(mode):
    kw = dict(mode=mode, align_corners=False, padding_mode="reflection")
    x = torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last).requires_grad_()
    same_as_torch(x, points(2, (3, 4), 2), **kw)
    same_as_torch(noncontiguous(torch.randn(2, 3, 4, 5, requires_grad=True)), noncontiguous(points(2, (3, 4), 2)), **kw)
    same_as_torch(torch.randn(1, 1, 1, 1, requires_grad=True), points(1, (2, 3), 2), **kw)  # one pixel
    same_as_torch(torch.randn(1, 2, 1, 6, requires_grad=True), points(1, (1, 1), 2), **kw)
    same_as_torch(torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True),
                  points(2, (3, 3), 2, torch.float64), **kw)
    same_as_torch(torch.randn(0, 2, 4, 3, requires_grad=True), points(0, (3, 3), 2), **kw)  # no samples


@pytest.mark.parametrize("mode, padding_mode, align_corners, d", [c for c in CASES if c[0] != "bicubic"],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] != "bicubic"])
def test_grid_sample_plain_backward_matches_the_per_tap_graph_path(mode, padding_mode, align_corners, d):
    # the plain backward (every tap in one gather and one scatter-add) against the per-tap loop
    # that double backward differentiates, in float64: the same sums in another order
    from manualgrad.ops.grid_sample import grid_sample_backward
    S, So = ((5, 7), (4, 3)) if d == 2 else ((3, 5, 4), (2, 3, 2))
    x, grid = torch.randn((2, 3) + S, dtype=torch.float64), points(2, So, d, torch.float64).detach()
    dy = torch.randn((2, 3) + So, dtype=torch.float64)
    with torch.no_grad():  # as in a plain backward
        plain = grid_sample_backward(dy, x, grid, mode, padding_mode, align_corners)
    with torch.enable_grad():  # a graph being recorded: the per-tap path
        expected = grid_sample_backward(dy, x, grid, mode, padding_mode, align_corners)
    for a, e in zip(plain, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_sample_bilinear_zeros_fast_backward_in_batch_slices_matches_the_per_tap_graph_path(
        monkeypatch, align_corners):
    # the 2-d bilinear zeros-padding fast form gathers and scatters over slices of the batch:
    # slices of 2 of 5 samples here (the last one short), each gradient alone and both, against
    # the per-tap loop in float64 (the same sums in another order)
    import manualgrad.ops.grid_sample as gs
    N, C, S, So = 5, 3, (5, 7), (4, 3)
    monkeypatch.setattr(gs, "_CHUNK_BYTES", 2 * C * 4 * 12 * 8)  # 2 samples: C x 4 corners x 12 points x 8 bytes
    calls = []
    fast = gs._bilinear_zeros_2d_backward
    monkeypatch.setattr(gs, "_bilinear_zeros_2d_backward", lambda *a: calls.append(1) or fast(*a))
    x, grid = torch.randn((N, C) + S, dtype=torch.float64), points(N, So, 2, torch.float64).detach()
    dy = torch.randn((N, C) + So, dtype=torch.float64)
    with torch.enable_grad():  # a graph being recorded: the per-tap path
        expected = gs.grid_sample_backward(dy, x, grid, "bilinear", "zeros", align_corners)
    for need in [(True, True), (True, False), (False, True)]:
        with torch.no_grad():  # as in a plain backward: the fast form
            got = gs.grid_sample_backward(dy, x, grid, "bilinear", "zeros", align_corners, *need)
        for a, e, n in zip(got, expected, need):
            if n:
                torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
            else:
                assert a is None
    assert len(calls) == 3


def test_grid_sample_bilinear_matches_a_value_worked_out_by_hand():
    # 2x2 input [[0, 1], [2, 3]], align_corners=True: g = (0, 0) is the center, u = (0.5, 0.5),
    # y = (0 + 1 + 2 + 3) / 4 = 1.5; dy/dg_x = (W - 1) / 2 * ((1 - 0) + (3 - 2)) / 2 = 0.5
    x = torch.arange(4.0).view(1, 1, 2, 2).requires_grad_()
    grid = torch.zeros(1, 1, 1, 2, requires_grad=True)
    y = F.grid_sample(x, grid, align_corners=True)
    y.sum().backward()
    assert y.item() == 1.5
    assert grid.grad.flatten().tolist() == [0.5, 1.0]  # dy/dg_y: (1 / 2) ((2 - 0) + (3 - 1)) / 2
    assert x.grad.flatten().tolist() == [0.25] * 4


def test_grid_sample_nearest_has_a_zero_grid_gradient_like_torch():
    x, grid = torch.randn(1, 2, 4, 5, requires_grad=True), points(1, (3, 3), 2)
    F.grid_sample(x, grid, mode="nearest", align_corners=False).sum().backward()
    assert torch.equal(grid.grad, torch.zeros_like(grid))


def test_grid_sample_under_vmap_matches_torch():
    x, grid = torch.randn(3, 2, 2, 4, 5), torch.rand(3, 2, 3, 3, 2) * 2 - 1
    ours = torch.func.vmap(lambda a, b: F.grid_sample(a, b, align_corners=False))(x, grid)
    theirs = torch.func.vmap(lambda a, b: TF.grid_sample(a, b, align_corners=False))(x, grid)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_grid_sample_runs_in_float32_under_cpu_autocast_like_torch():
    x, grid = torch.randn(1, 2, 4, 4, dtype=torch.bfloat16), torch.rand(1, 3, 3, 2, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = F.grid_sample(x, grid, align_corners=False), TF.grid_sample(x, grid, align_corners=False)
        grid_ours = F.affine_grid(torch.randn(1, 2, 3, dtype=torch.bfloat16), (1, 2, 4, 4), align_corners=False)
        grid_theirs = TF.affine_grid(torch.randn(1, 2, 3, dtype=torch.bfloat16), (1, 2, 4, 4), align_corners=False)
    assert ours.dtype == theirs.dtype == torch.float32
    assert grid_ours.dtype == grid_theirs.dtype == torch.bfloat16


@pytest.mark.parametrize("args, kwargs", [
    ((torch.randn(1, 2, 4, 4), torch.rand(1, 3, 3, 2)), dict(mode="linear")),
    ((torch.randn(1, 2, 4, 4), torch.rand(1, 3, 3, 2)), dict(padding_mode="circular")),
    ((torch.randn(1, 2, 4, 4), torch.rand(1, 3, 3, 3)), {}),                    # grid's last dim != 2
    ((torch.randn(1, 2, 4, 4), torch.rand(2, 3, 3, 2)), {}),                    # batch sizes differ
    ((torch.randn(1, 2, 4, 4, 4), torch.rand(1, 3, 3, 3, 3)), dict(mode="bicubic")),  # bicubic is 2-d
    ((torch.randn(2, 4, 4), torch.rand(2, 3, 2)), {}),                          # 3-d input
    ((torch.randn(1, 2, 4, 4), torch.rand(1, 3, 3, 2).double()), {}),           # dtypes differ
])
def test_grid_sample_bad_input_fails_like_torch(args, kwargs):
    assert_raises_like_torch(F.grid_sample, TF.grid_sample, *args, align_corners=False, **kwargs)


# affine_grid


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior has changed for unit-size grids")
@pytest.mark.parametrize("size", [(2, 3, 4, 5), (2, 1, 1, 6), (2, 3, 3, 4, 2), (1, 1, 2, 1, 3)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid_gradients_and_torch_parity(size, align_corners):
    d = len(size) - 2
    theta = torch.randn(size[0], d, d + 1, dtype=torch.float64, requires_grad=True)
    check_gradients(F.affine_grid, theta, size, align_corners=align_corners)
    theta = theta.detach().float().requires_grad_()
    dy = exact_dy((size[0],) + size[2:] + (d,))
    # dtheta sums prod(S) products base * dy: 32 ulps of its scale (at most 4 prod(S))
    n = 1
    for s in size[2:]:
        n *= s
    assert_same_as_torch(F.affine_grid, TF.affine_grid, theta, size, grad_output=dy, rtol=0, atol=32 * EPS * 4 * n,
                         align_corners=align_corners)


def test_affine_grid_backward_is_the_contraction_with_the_base_grid_worked_by_hand():
    # S = (1, 2), align_corners=True: base points (x, y, 1) = (-1, 0, 1), (1, 0, 1);
    # dtheta = sum_p dgrid_p base_p^T
    dgrid = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert base_grid((1, 2), True, torch.float32).tolist() == [[-1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    expected = torch.tensor([[[-1 + 3, 0, 1 + 3], [-2 + 4, 0, 2 + 4]]], dtype=torch.float32)
    assert torch.equal(affine_grid_backward(dgrid, (1, 2), True), expected)


@pytest.mark.parametrize("args, kwargs", [
    ((torch.randn(1, 2, 3), (1, 2, 4)), {}),                   # 3-d size
    ((torch.randn(1, 3, 4), (1, 2, 4, 4)), {}),                # 3-d theta for a 4-d size
    ((torch.randn(1, 2, 3).long(), (1, 2, 4, 4)), {}),         # integer theta
    ((torch.randn(1, 2, 3), (1, 2, 0, 4)), {}),                # empty size
])
def test_affine_grid_bad_input_fails_like_torch(args, kwargs):
    assert_raises_like_torch(F.affine_grid, TF.affine_grid, *args, align_corners=False, **kwargs)


# a spatial transformer


class SpatialTransformer(torch.nn.Module):
    """A localization net predicts theta; the input is resampled on affine_grid(theta) and classified."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                       torch.nn.Linear(4 * 6 * 6, 6))
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.head = torch.nn.Linear(3 * 8 * 8, 5)

    def forward(self, x):
        theta = self.loc(x).view(-1, 2, 3) + torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_converted_spatial_transformer_matches_torch_loss_and_every_gradient():
    theirs = SpatialTransformer()
    ours = mg.convert(copy.deepcopy(theirs), strict=True)
    x, target = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    losses = []
    for model in (theirs, ours):
        with mg.enable() if model is ours else torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # the hand-written Functions ran: grid_sample's and affine_grid's nodes are in ours' graph
    with mg.enable():
        out = ours(x)
    names = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            stack.extend(n for n, _ in node.next_functions)
    assert {"GridSampleFunctionBackward", "AffineGridFunctionBackward"} <= names


def test_grid_sample_and_affine_grid_save_no_more_than_torch():
    from manualgrad.testing import saved_bytes
    x, grid = torch.randn(2, 3, 8, 9, requires_grad=True), points(2, (5, 6), 2)
    assert saved_bytes(F.grid_sample, x, grid, align_corners=False)[0] <= \
        saved_bytes(TF.grid_sample, x, grid, align_corners=False)[0]
    theta = torch.randn(2, 2, 3, requires_grad=True)
    assert saved_bytes(F.affine_grid, theta, (2, 3, 8, 9), align_corners=False)[0] <= \
        saved_bytes(TF.affine_grid, theta, (2, 3, 8, 9), align_corners=False)[0]
