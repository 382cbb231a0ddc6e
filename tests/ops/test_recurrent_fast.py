"""ops/recurrent_fast.py: the LSTM's fast form against the reference (recurrent.py's
lstm_forward / lstm_backward) on the same inputs. The gradchecks of tests/ops/test_recurrent.py
run the fast form too (their padded schedules are float64, its backward without create_graph);
double backward and vmap run the reference."""
import pytest
import torch

from manualgrad.ops import recurrent as R
from manualgrad.ops import recurrent_fast as RF

SHAPES = [(5, 3, 4, 6), (1, 1, 1, 1), (3, 1, 2, 1), (4, 2, 5, 3)]  # (T, B, I, H)


def _inputs(T, B, I, H, dtype, bias):
    g = torch.Generator().manual_seed(T * 1000 + B * 100 + I * 10 + H)
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=g)  # noqa: E731
    return (r(T * B, I), r(B, H), r(B, H), r(4 * H, I), r(4 * H, H),
            r(4 * H) if bias else None, r(4 * H) if bias else None)


def _both(T, B, I, H, dtype, reverse, bias, needs=(True,) * 7):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _inputs(T, B, I, H, dtype, bias)
    bs = (B,) * T
    ref = R.lstm_forward(x, bs, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, None)
    fast = RF.lstm_forward_fast(x, T, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh)
    y, h_n, c_n, act, cs = ref
    g = torch.Generator().manual_seed(1)
    dy, dh_n, dc_n = (torch.randn(t.shape, dtype=dtype, generator=g) for t in (y, h_n, c_n))
    grads_ref = R.lstm_backward(dy, dh_n, dc_n, x, bs, reverse, h0, c0, w_ih, w_hh, None, y, act, cs,
                                list(needs) + [False])[:7]
    grads_fast = RF.lstm_backward_fast(dy, dh_n, dc_n, x, T, reverse, h0, c0, w_ih, w_hh, y, act, cs, list(needs))
    return list(ref) + list(grads_ref), list(fast) + list(grads_fast)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_lstm_is_the_reference_in_float64(shape, reverse, bias):
    # the same formulas up to float64 rounding (tanh z as 2 sigmoid(2 z) - 1, sums in another order)
    ref, fast = _both(*shape, torch.float64, reverse, bias)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_fast_lstm_matches_the_reference_in_float32(onednn, reverse):
    # float32: oneDNN's or MKL's products against torch.mm's, a few ulps of rounding per step
    with torch.backends.mkldnn.flags(enabled=onednn):
        ref, fast = _both(6, 5, 7, 8, torch.float32, reverse, True)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_fast_lstm_backward_gives_only_the_gradients_asked_for():
    needs = (False, True, False, False, True, True, False)
    ref, fast = _both(3, 2, 3, 4, torch.float64, False, True, needs)
    for want, a, b in zip(needs, ref[5:], fast[5:]):
        assert (b is None) == (not want)
        if want:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_fast_form_runs_on_a_padded_batch_only():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _inputs(3, 2, 3, 4, torch.float32, True)
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    assert RF.lstm_fast_applies((2, 2, 2), None, *args)
    assert RF.lstm_fast_applies((2, 2, 2), None, *[a.double() for a in args])
    assert not RF.lstm_fast_applies((2, 2, 1), None, *args)  # a packed batch
    assert not RF.lstm_fast_applies((2, 2, 2), torch.randn(3, 4), *args)  # a projection
    assert not RF.lstm_fast_applies((2, 2, 2), None, *[a.bfloat16() for a in args])
    assert not RF.lstm_fast_applies((2, 2, 2), None, x, h0.double(), *args[2:])  # mixed dtypes (autocast)


def test_lstm_function_runs_the_fast_form_on_a_padded_batch(monkeypatch):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (t.requires_grad_() for t in _inputs(3, 2, 3, 4, torch.float32, True))
    leaves = [x, h0, c0, w_ih, w_hh, b_ih, b_hh]

    def grads():  # the upstream gradients arrive expanded (stride 0), as from a sum
        y, h, c = R.lstm(x, (2, 2, 2), True, h0, c0, w_ih, w_hh, b_ih, b_hh)
        return [y, h, c] + list(torch.autograd.grad(y.sum() + h.sum() + c.sum(), leaves))

    with monkeypatch.context() as m:
        m.setattr(R, "lstm_fast_applies", lambda *a: False)
        ref = grads()
    calls = []
    for name in ("lstm_forward_fast", "lstm_backward_fast"):
        f = getattr(R, name)
        monkeypatch.setattr(R, name, lambda *a, f=f, name=name: calls.append(name) or f(*a))
    fast = grads()
    assert calls == ["lstm_forward_fast", "lstm_backward_fast"]
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_onednn_check_leaves_the_random_stream_alone():
    # it runs once, on an LSTM's first call: dropout masks drawn after it must stay torch's
    RF._onednn_works.cache_clear()
    torch.manual_seed(0)
    RF._onednn(torch.ones(1))
    drawn = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(3))
