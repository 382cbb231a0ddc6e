"""manualgrad.utils.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""
import math
import re

import pytest
import torch

from manualgrad.utils import clip_grad_norm_

SHAPES = [(7, 5), (7,), (3, 7), (3,), (1, 1, 13)]


def make_params(seed=0, none=(), dtypes=None, scale=3.0):
    """Parameters with random grads (None for indices in ``none``)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(SHAPES):
        dtype = dtypes[i] if dtypes else torch.float32
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        p.grad = None if i in none else (scale * torch.randn(shape, generator=gen)).to(dtype)
        params.append(p)
    return params


def twin(params):
    copies = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        copies.append(q)
    return copies


def assert_same_clip(params, *args, **kwargs):
    """Clip copies with manualgrad and with torch; compare total norms and grads bit for bit."""
    mg_params, th_params = twin(params), twin(params)
    mg_norm = clip_grad_norm_(mg_params, *args, **kwargs)
    th_norm = torch.nn.utils.clip_grad_norm_(th_params, *args, **kwargs)
    assert (mg_norm.dtype, mg_norm.shape, mg_norm.device) == (th_norm.dtype, th_norm.shape, th_norm.device)
    assert torch.equal(mg_norm, th_norm), f"total norm {mg_norm} != torch's {th_norm}"
    for i, (a, b) in enumerate(zip(mg_params, th_params)):
        assert (a.grad is None) == (b.grad is None)
        if b.grad is not None:
            assert torch.equal(a.grad, b.grad), f"grad {i}: {a.grad} != torch's {b.grad}"
    return mg_norm, mg_params


@pytest.mark.parametrize("norm_type", [2.0, 1, float("inf"), "inf", 3.5])
@pytest.mark.parametrize("max_norm", [0.5, 1e4], ids=["clips", "no-clip"])
@pytest.mark.parametrize("none", [(), (0, 3)], ids=["all-grads", "some-None"])
def test_clip_grad_norm_matches_torch(norm_type, max_norm, none):
    params = make_params(none=none)
    norm, clipped = assert_same_clip(params, max_norm, norm_type)
    # independent check of the definition: N = ||concat(g)||_p, grads scaled by min(max/(N+1e-6), 1)
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten().double() for g in grads])
    p = float(norm_type)
    expected = flat.abs().max() if math.isinf(p) else flat.abs().pow(p).sum().pow(1 / p)
    torch.testing.assert_close(norm.double(), expected, rtol=1e-5, atol=0)
    coef = min(max_norm / (expected.item() + 1e-6), 1.0)
    for a, b in zip([q.grad for q in clipped if q.grad is not None], grads):
        torch.testing.assert_close(a, b * coef, rtol=1e-5, atol=1e-7)
    assert (coef < 1) == (max_norm == 0.5)  # both regimes are really exercised


def test_clip_grad_norm_matches_torch_with_mixed_dtypes():
    # torch groups grads by dtype in its own (hash map) order; the norm must round the same way
    dtypes = [torch.float64, torch.float32, torch.float16, torch.float64, torch.float32]
    assert_same_clip(make_params(dtypes=dtypes, scale=30.0), 0.5, 2.0)
    assert_same_clip(make_params(dtypes=dtypes, scale=30.0), 0.5, 3.5)


def test_clip_grad_norm_accepts_a_single_tensor_and_a_generator():
    p = make_params()[0]
    mg, th, gen = twin([p]) + twin([p]) + twin([p])
    mg_norm = clip_grad_norm_(mg, 0.5)  # the tensor itself, not a list
    th_norm = torch.nn.utils.clip_grad_norm_(th, 0.5)
    gen_norm = clip_grad_norm_((t for t in [gen]), 0.5)
    assert torch.equal(mg_norm, th_norm) and torch.equal(gen_norm, th_norm)
    assert torch.equal(mg.grad, th.grad) and torch.equal(gen.grad, th.grad)
    assert not torch.equal(th.grad, p.grad)  # it did clip


def test_clip_grad_norm_without_grads_returns_zero_like_torch():
    params = make_params(none=range(len(SHAPES)))
    norm, _ = assert_same_clip(params, 1.0)
    assert norm.item() == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        clip_grad_norm_((p for p in []), 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_error_if_nonfinite_raises_like_torch(bad, norm_type):
    params = make_params()
    params[2].grad[1, 3] = bad
    with pytest.raises(RuntimeError) as th_error:
        torch.nn.utils.clip_grad_norm_(twin(params), 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match=f"^{re.escape(str(th_error.value))}$"):
        clip_grad_norm_(twin(params), 1.0, norm_type, error_if_nonfinite=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_grad_norm_nonfinite_without_flag_scales_like_torch(bad):
    params = make_params()
    params[2].grad[1, 3] = bad
    mg, th = twin(params), twin(params)
    mg_norm = clip_grad_norm_(mg, 1.0)
    th_norm = torch.nn.utils.clip_grad_norm_(th, 1.0)
    torch.testing.assert_close(mg_norm, th_norm, equal_nan=True, rtol=0, atol=0)
    assert not mg_norm.isfinite()
    for a, b in zip(mg, th):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)


def test_clip_grad_norm_foreach_true_raises_not_implemented():
    torch.nn.utils.clip_grad_norm_(twin(make_params()), 1.0, foreach=True)  # a real torch option
    with pytest.raises(NotImplementedError, match="foreach"):
        clip_grad_norm_(make_params(), 1.0, foreach=True)
    assert_same_clip(make_params(), 0.5, foreach=False)


@pytest.fixture
def no_host_sync(monkeypatch):
    """Make every Python-level way of reading a tensor value on the host raise."""

    def sync(self, *args, **kwargs):
        raise AssertionError("host sync")

    for name in ["item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__len__"]:
        monkeypatch.setattr(torch.Tensor, name, sync)


def test_clip_grad_norm_does_not_sync(no_host_sync):
    params = make_params(none=(1,))
    norm = clip_grad_norm_(params, 0.5, 2.0)
    clip_grad_norm_(params, 0.5, float("inf"))
    assert isinstance(norm, torch.Tensor)
    # the detector works: torch's error_if_nonfinite check reads the norm on the host
    with pytest.raises(AssertionError, match="host sync"):
        torch.nn.utils.clip_grad_norm_(params, 0.5, error_if_nonfinite=True)
    with pytest.raises(AssertionError, match="host sync"):
        bool(norm < 1)
