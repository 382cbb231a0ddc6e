"""RNN, LSTM, GRU and their cells under torch.autocast("cpu", torch.bfloat16): torch's output dtypes,
values within bfloat16 tolerance of torch's under the same autocast, float32 gradients on the
float32 leaves within bfloat16 tolerance (backward outside the region, as torch recommends).

torch's CPU output dtype depends on the code path (worked out with a TorchDispatchMode on torch's
own layers): a padded LSTM without projections runs oneDNN's kernel, cast whole to bfloat16, so
everything is bfloat16; every other path runs torch's per-step cells, where only the matmuls are
autocast: the gates are bfloat16 and the state updates promote with the float32 states, so GRU,
packed LSTM, LSTMCell and GRUCell give float32, and c_n is float32 with proj_size. An RNN's state
is the bfloat16 output of tanh/relu: bfloat16 everywhere.
"""
import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import manualgrad.nn as mnn

BF16 = dict(rtol=2e-2, atol=2e-2)  # bfloat16 keeps 8 significant bits: ~4e-3 relative per rounding

LAYERS = {
    "lstm": ("LSTM", dict()),
    "lstm_proj": ("LSTM", dict(proj_size=3)),
    "lstm_2layer_bidirectional": ("LSTM", dict(num_layers=2, bidirectional=True)),
    "gru": ("GRU", dict()),
    "gru_2layer_bidirectional": ("GRU", dict(num_layers=2, bidirectional=True)),
    "rnn_tanh": ("RNN", dict()),
    "rnn_relu": ("RNN", dict(nonlinearity="relu")),
}


def _tensors(out):
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return [out]


def _run(module, make_input, with_state):
    """Outputs under autocast, then the gradients of x, the initial states and the parameters."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, requires_grad=True)
    states = [torch.randn(s, requires_grad=True) for s in with_state]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hx = None if not states else (states[0] if len(states) == 1 else tuple(states))
        out = _tensors(module(make_input(x), hx))
    g = torch.Generator().manual_seed(1)
    torch.autograd.backward(out, [torch.randn(o.shape, generator=g).to(o.dtype) for o in out])
    return out, [x.grad] + [s.grad for s in states] + [p.grad for p in module.parameters()]


def _compare(ours, theirs, make_input, with_state=()):
    out, grads = _run(ours, make_input, with_state)
    expected, expected_grads = _run(theirs, make_input, with_state)
    assert [o.dtype for o in out] == [e.dtype for e in expected]
    for o, e in zip(out, expected):
        torch.testing.assert_close(o.float(), e.float(), **BF16)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == e.dtype == torch.float32
        # a gradient chain of bfloat16 roundings: compared on the scale of the whole gradient
        torch.testing.assert_close(g, e, rtol=BF16["rtol"], atol=3e-2 * e.abs().max().item())


def _pair(name, *args, **kwargs):
    torch.manual_seed(2)
    theirs = getattr(torch.nn, name)(*args, **kwargs)
    ours = getattr(mnn, name)(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _states(name, kwargs):
    directions = 2 if kwargs.get("bidirectional") else 1
    k = kwargs.get("num_layers", 1) * directions
    h = (k, 3, kwargs.get("proj_size") or 6)
    return (h, (k, 3, 6)) if name == "LSTM" else (h,)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("case", list(LAYERS))
def test_layer_under_autocast_matches_torch(case, layout, initial_state):
    name, kwargs = LAYERS[case]
    ours, theirs = _pair(name, 4, 6, **kwargs)
    lengths = torch.tensor([5, 3, 2])
    make_input = (lambda x: x) if layout == "padded" else (lambda x: pack_padded_sequence(x, lengths))
    _compare(ours, theirs, make_input, _states(name, kwargs) if initial_state else ())


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("initial_state", [False, True])
def test_cell_under_autocast_matches_torch(name, initial_state):
    ours, theirs = _pair(name, 4, 6)
    states = ((3, 6), (3, 6)) if name == "LSTMCell" else ((3, 6),)
    _compare(ours, theirs, lambda x: x[0], states if initial_state else ())


def test_padded_lstm_without_onednn_gives_the_per_step_dtypes():
    # With oneDNN switched off torch's padded LSTM runs the per-step cells: float32 out.
    ours, theirs = _pair("LSTM", 4, 6)
    with torch.backends.mkldnn.flags(enabled=False):
        _compare(ours, theirs, lambda x: x)
