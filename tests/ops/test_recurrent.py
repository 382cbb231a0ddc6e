"""ops/recurrent.py: one layer, one direction, over a whole sequence in the packed layout.

Gradients (reverse, forward mode, batched, double backward) against finite differences in
float64 on tiny shapes; values and gradients in float32 against torch's own layer (a one-layer
bidirectional torch module over a PackedSequence: its first half of the features is the forward
direction, its second the reverse one).
"""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

from manualgrad.ops import recurrent as R
from manualgrad.testing import check_gradients, saved_bytes

F64 = dict(dtype=torch.float64, requires_grad=True)

def _params(gates, in_size, hidden, proj=None, bias=True):
    p = proj or hidden
    return [torch.randn(gates * hidden, in_size, **F64), torch.randn(gates * hidden, p, **F64),
            torch.randn(gates * hidden, **F64) if bias else None, torch.randn(gates * hidden, **F64) if bias else None]


# (batch_sizes, reverse): a packed batch (lengths 3, 2, 1) forward, a padded one (2 x 2) reverse,
# one step of one sequence. Sizes are tiny: every float64 gradcheck runs the sequence per element.
SCHEDULES = [((3, 2, 1), False), ((2, 2), True), ((1,), False)]


@pytest.mark.parametrize("batch_sizes,reverse", SCHEDULES)
def test_lstm_gradients(batch_sizes, reverse):
    b, n = batch_sizes[0], sum(batch_sizes)
    x, h0, c0 = torch.randn(n, 2, **F64), torch.randn(b, 2, **F64), torch.randn(b, 2, **F64)
    check_gradients(R.lstm, x, batch_sizes, reverse, h0, c0, *_params(4, 2, 2))


def test_lstm_with_projection_packed_reverse_gradients():
    x, h0, c0 = torch.randn(5, 1, **F64), torch.randn(2, 1, **F64), torch.randn(2, 2, **F64)
    check_gradients(R.lstm, x, (2, 2, 1), True, h0, c0, *_params(4, 1, 2, proj=1), torch.randn(1, 2, **F64))


def test_lstm_without_bias_hidden_one_gradients():
    x, h0, c0 = torch.randn(3, 1, **F64), torch.randn(2, 1, **F64), torch.randn(2, 1, **F64)
    check_gradients(R.lstm, x, (2, 1), True, h0, c0, *_params(4, 1, 1, bias=False))


@pytest.mark.parametrize("batch_sizes,reverse", SCHEDULES + [((3, 2, 1), True)])
def test_gru_gradients(batch_sizes, reverse):
    b, n = batch_sizes[0], sum(batch_sizes)
    x, h0 = torch.randn(n, 2, **F64), torch.randn(b, 2, **F64)
    check_gradients(R.gru, x, batch_sizes, reverse, h0, *_params(3, 2, 2))


def test_gru_without_bias_hidden_one_gradients():
    check_gradients(R.gru, torch.randn(3, 1, **F64), (2, 1), True, torch.randn(2, 1, **F64), *_params(3, 1, 1, bias=False))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch_sizes,reverse", SCHEDULES + [((3, 2, 1), True)])
def test_rnn_gradients(nonlinearity, batch_sizes, reverse):
    b, n = batch_sizes[0], sum(batch_sizes)
    x, h0 = torch.randn(n, 2, **F64), torch.randn(b, 3, **F64)
    check_gradients(R.rnn, x, batch_sizes, reverse, nonlinearity, h0, *_params(1, 2, 3))


def test_rnn_without_bias_gradients():
    check_gradients(R.rnn, torch.randn(4, 3, **F64), (2, 2), False, "tanh", torch.randn(2, 2, **F64),
                    *_params(1, 3, 2, bias=False))


# ---------------------------------------------------------------------------------------------
# float32 against torch's layer

def _torch_layer(mode, in_size, hidden, proj, bias, nonlinearity="tanh"):
    kw = dict(bias=bias, bidirectional=True)
    if mode == "LSTM":
        return torch.nn.LSTM(in_size, hidden, proj_size=proj, **kw)
    if mode == "GRU":
        return torch.nn.GRU(in_size, hidden, **kw)
    return torch.nn.RNN(in_size, hidden, nonlinearity=nonlinearity, **kw)


CASES = [("LSTM", 0, "tanh"), ("LSTM", 3, "tanh"), ("GRU", 0, "tanh"), ("RNN", 0, "tanh"), ("RNN", 0, "relu")]


@pytest.mark.parametrize("mode,proj,nonlinearity", CASES)
@pytest.mark.parametrize("batch_sizes", [(5, 5, 5, 5), (5, 4, 4, 2, 1, 1, 1)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_torch(mode, proj, nonlinearity, batch_sizes, reverse, bias):
    in_size, hidden = 7, 6
    layer = _torch_layer(mode, in_size, hidden, proj, bias, nonlinearity)
    p, b, n = proj or hidden, batch_sizes[0], sum(batch_sizes)
    x = torch.randn(n, in_size, requires_grad=True)
    h0 = torch.randn(2, b, p, requires_grad=True)
    c0 = torch.randn(2, b, hidden, requires_grad=True)
    d = 1 if reverse else 0
    sfx = "_l0_reverse" if reverse else "_l0"
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else [])
    params = {k: getattr(layer, k + sfx) for k in names}
    w = [params["weight_ih"], params["weight_hh"], params.get("bias_ih"), params.get("bias_hh")]

    hx = (h0, c0) if mode == "LSTM" else h0
    y_t, hn_t = layer(PackedSequence(x, torch.tensor(batch_sizes)), hx)
    y_t = y_t.data[:, d * p: (d + 1) * p]
    if mode == "LSTM":
        y, h, c = R.lstm(x, batch_sizes, reverse, h0[d], c0[d], *w, getattr(layer, "weight_hr" + sfx) if proj else None)
        outs, refs = [y, h, c], [y_t, hn_t[0][d], hn_t[1][d]]
    elif mode == "GRU":
        outs, refs = list(R.gru(x, batch_sizes, reverse, h0[d], *w)), [y_t, hn_t[d]]
    else:
        outs, refs = list(R.rnn(x, batch_sizes, reverse, nonlinearity, h0[d], *w)), [y_t, hn_t[d]]
    grads = [torch.randn_like(o) for o in outs]
    leaves = [x, h0] + ([c0] if mode == "LSTM" else []) + list(params.values())
    if mode == "LSTM" and proj:
        leaves.append(getattr(layer, "weight_hr" + sfx))
    ours = torch.autograd.grad(outs, leaves, grads)
    theirs = torch.autograd.grad(refs, leaves, grads)
    # float32: a few ulps of rounding per step, carried through at most 7 steps
    for a, b_ in zip(outs + list(ours), refs + list(theirs)):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_lstm_saves_less_than_torch():
    """What backward keeps: x, y, the gate activations (N, 4H) and cell states (N, H), against
    torch's own layer over the same packed sequence (its CPU kernel saves every step's graph)."""
    layer = torch.nn.LSTM(16, 32)
    batch_sizes = (8,) * 10
    x = torch.randn(80, 16, requires_grad=True)
    h0, c0 = torch.zeros(8, 32), torch.zeros(8, 32)
    params = list(layer.parameters())
    ours, _ = saved_bytes(R.lstm, x, batch_sizes, False, h0, c0, *params, exclude=params + [x])
    theirs, _ = saved_bytes(layer, PackedSequence(x, torch.tensor(batch_sizes)), exclude=params + [x])
    n, hidden, b = 80, 32, 8
    # y (N, H) + activations (N, 4H) + cell states (N, H) + h0, c0 (B, H), float32
    assert ours == 4 * (n * (hidden + 4 * hidden + hidden) + 2 * b * hidden)
    assert ours <= theirs
