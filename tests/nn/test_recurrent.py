"""manualgrad.nn RNN, LSTM, GRU and their cells against torch's.

Every option of the layers (layers, bias, batch_first, dropout between layers under the same
seed, bidirectional, proj_size, nonlinearity) on padded, unbatched and packed input (sorted and
unsorted, pack_sequence), with and without initial states: outputs, final states and the
gradients of the input, the initial states and every parameter, for a random upstream gradient
on every output (the sequence, h_n and c_n). Float32 tolerances: a few float32 ulps of rounding
per step and layer on values of order 1 (torch's LSTM runs oneDNN's kernel, whose sums are
ordered differently). Gradients in float64 against finite differences through the module glue
(packing order, directions, layers); the per-layer Functions have their own in tests/ops.
"""
import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence

import manualgrad as mg
import manualgrad.nn as mnn
from manualgrad.testing import assert_raises_like_torch, check_gradients

RTOL, ATOL = 1e-5, 1e-5


def _pair(name, *args, **kwargs):
    theirs = getattr(torch.nn, name)(*args, **kwargs)
    ours = getattr(mnn, name)(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _tensors(out):
    """The tensors of a module's output, flattened: PackedSequence -> its data."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return [out]


def _copy(a):
    if isinstance(a, torch.Tensor):
        return a.detach().clone().requires_grad_(a.requires_grad)
    if isinstance(a, PackedSequence):
        return PackedSequence(_copy(a.data), a.batch_sizes, a.sorted_indices, a.unsorted_indices)
    if isinstance(a, tuple):
        return tuple(_copy(t) for t in a)
    return a


def _leaves(args):
    return [t for t in _tensors(list(args)) if t.requires_grad]


def assert_module_matches_torch(ours, theirs, *args, rtol=RTOL, atol=ATOL):
    """Same outputs (types, shapes, values) and gradients of inputs and parameters, same seed."""
    ours_args, their_args = _copy(args), _copy(args)
    torch.manual_seed(1)
    out = ours(*ours_args)
    torch.manual_seed(1)
    ref = theirs(*their_args)
    assert type(out) is type(ref)
    if isinstance(ref, tuple):  # (output, h_n) or (output, (h_n, c_n)); output a PackedSequence or not
        assert [type(o) for o in out] == [type(r) for r in ref]
    outs, refs = _tensors(out), _tensors(ref)
    assert len(outs) == len(refs)
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)  # shapes, dtypes and values
    if isinstance(ref[0], PackedSequence):
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            torch.testing.assert_close(getattr(out[0], field), getattr(ref[0], field))
    grads = [torch.randn_like(r) for r in refs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(refs, grads)
    for a, b in zip(_leaves(ours_args), _leaves(their_args)):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, their_params[name].grad, rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------
# layers

LAYERS = [
    ("LSTM", {}),
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(proj_size=3, num_layers=2, batch_first=True)),
    ("LSTM", dict(bias=False, bidirectional=True, proj_size=2)),
    ("LSTM", dict(num_layers=3, dropout=0.4)),
    ("GRU", dict(num_layers=2, bidirectional=True, dropout=0.3)),
    ("GRU", dict(bias=False, batch_first=True)),
    ("RNN", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("RNN", dict(nonlinearity="relu", num_layers=2, dropout=0.5, bias=False)),
]
LAYER_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in LAYERS]
IN, HID = 5, 4


def _states(name, kw, batch, batched=True, hidden=HID):
    """Random (h0, c0) / h0 of the layer's shape, requiring grad."""
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    lead = (layers, batch) if batched else (layers,)
    h0 = torch.randn(*lead, kw.get("proj_size") or hidden, requires_grad=True)
    return (h0, torch.randn(*lead, hidden, requires_grad=True)) if name == "LSTM" else h0


@pytest.mark.parametrize("name,kw", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("with_state", [False, True])
def test_layer_on_padded_input_matches_torch(name, kw, with_state):
    ours, theirs = _pair(name, IN, HID, **kw)
    shape = (3, 6, IN) if kw.get("batch_first") else (6, 3, IN)
    args = (torch.randn(shape, requires_grad=True),) + ((_states(name, kw, 3),) if with_state else ())
    assert_module_matches_torch(ours, theirs, *args)


@pytest.mark.parametrize("name,kw", LAYERS, ids=LAYER_IDS)
def test_layer_on_unbatched_input_matches_torch(name, kw):
    ours, theirs = _pair(name, IN, HID, **kw)
    assert_module_matches_torch(ours, theirs, torch.randn(5, IN, requires_grad=True))
    assert_module_matches_torch(ours, theirs, torch.randn(5, IN, requires_grad=True), _states(name, kw, 1, False))


@pytest.mark.parametrize("name,kw", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_layer_on_packed_input_matches_torch(name, kw, enforce_sorted):
    ours, theirs = _pair(name, IN, HID, **kw)
    lengths = [6, 4, 4, 1] if enforce_sorted else [4, 6, 1, 4]
    padded = torch.randn(4, 6, IN, requires_grad=True)
    packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    assert_module_matches_torch(ours, theirs, packed)
    # h0 given in the caller's order of sequences; h_n comes back in it
    assert_module_matches_torch(ours, theirs, packed, _states(name, kw, 4))


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_layer_on_pack_sequence_matches_torch(name):
    ours, theirs = _pair(name, IN, HID, num_layers=2, bidirectional=True)
    seqs = [torch.randn(n, IN, requires_grad=True) for n in (2, 5, 3)]
    assert_module_matches_torch(ours, theirs, pack_sequence(seqs, enforce_sorted=False))


def test_packed_sequence_never_runs_padded_steps():
    """The padding's values cannot reach any output or gradient: nan in every padded slot."""
    lstm = mnn.LSTM(IN, HID, num_layers=2, bidirectional=True)
    padded = torch.randn(3, 5, IN)
    lengths = [5, 2, 3]
    for b, n in enumerate(lengths):
        padded[b, n:] = float("nan")
    packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
    out, (h_n, c_n) = lstm(packed)
    (out.data.sum() + h_n.sum() + c_n.sum()).backward()
    assert not out.data.isnan().any() and not h_n.isnan().any() and not c_n.isnan().any()
    assert all(not p.grad.isnan().any() for p in lstm.parameters())


def test_dropout_between_layers_draws_torchs_mask():
    """Under the same seed, each layer's output but the last is dropped exactly as torch drops it
    (at::dropout on the layer's output): the outputs agree only if the masks do."""
    ours, theirs = _pair("GRU", IN, HID, num_layers=3, dropout=0.5)
    x = torch.randn(7, 3, IN)
    torch.manual_seed(5)
    a = ours(x)[0]
    torch.manual_seed(5)
    b = theirs(x)[0]
    torch.manual_seed(6)
    c = theirs(x)[0]
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(b, c)  # the seed matters: the comparison is of the masks
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=RTOL, atol=ATOL)  # no dropout in eval


# ---------------------------------------------------------------------------------------------
# float64 gradients through the whole module (packing order, directions, layers, states)

def _functional(module, batch_sizes, sorted_indices, unsorted_indices):
    def run(data, *states):
        packed = PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)
        out, hidden = module(packed, states if len(states) == 2 else states[0])
        return (out.data,) + (tuple(hidden) if isinstance(hidden, tuple) else (hidden,))
    return run


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_layer_gradients_through_packed_bidirectional_stack(name):
    module = getattr(mnn, name)(1, 1, num_layers=2, bidirectional=True).double()
    for p in module.parameters():
        p.requires_grad_(False)  # the parameters' gradients: tests/ops and the float32 comparisons
    padded = torch.randn(3, 3, 1, dtype=torch.float64)
    packed = pack_padded_sequence(padded, [2, 3, 1], batch_first=True, enforce_sorted=False)
    states = _states(name, dict(num_layers=2, bidirectional=True), 3, hidden=1)
    states = states if isinstance(states, tuple) else (states,)
    fn = _functional(module, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    check_gradients(fn, packed.data.requires_grad_(), *(s.detach().double().requires_grad_() for s in states))


# ---------------------------------------------------------------------------------------------
# cells

@pytest.mark.parametrize("name,kw", [("RNNCell", {}), ("RNNCell", dict(nonlinearity="relu", bias=False)),
                                     ("LSTMCell", {}), ("LSTMCell", dict(bias=False)), ("GRUCell", {}),
                                     ("GRUCell", dict(bias=False))])
def test_cell_matches_torch(name, kw):
    ours, theirs = _pair(name, IN, HID, **kw)
    state = (lambda *s: (torch.randn(*s, HID, requires_grad=True), torch.randn(*s, HID, requires_grad=True))
             if name == "LSTMCell" else torch.randn(*s, HID, requires_grad=True))
    assert_module_matches_torch(ours, theirs, torch.randn(3, IN, requires_grad=True))
    assert_module_matches_torch(ours, theirs, torch.randn(3, IN, requires_grad=True), state(3))
    assert_module_matches_torch(ours, theirs, torch.randn(IN, requires_grad=True))
    assert_module_matches_torch(ours, theirs, torch.randn(IN, requires_grad=True), state())


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_gradients(name):
    cell = getattr(mnn, name)(2, 3).double()
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    if name == "LSTMCell":
        check_gradients(lambda x, h, c: cell(x, (h, c)), x, h, torch.randn(2, 3, dtype=torch.float64, requires_grad=True))
    else:
        check_gradients(cell, x, h)


# ---------------------------------------------------------------------------------------------
# bad input: torch's exception type

@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_layer_rejects_bad_input_like_torch(name):
    ours, theirs = _pair(name, IN, HID, num_layers=2)
    assert_raises_like_torch(ours, theirs, torch.randn(6, 3, IN + 1), match="input_size")
    assert_raises_like_torch(ours, theirs, torch.randn(6, 3, 2, IN), match="2D or 3D")
    wrong_batch = torch.randn(2, 4, HID)
    bad_state = (wrong_batch, torch.randn(2, 4, HID)) if name == "LSTM" else wrong_batch
    assert_raises_like_torch(ours, theirs, torch.randn(6, 3, IN), bad_state, match="size")
    flat = (torch.randn(2, HID), torch.randn(2, HID)) if name == "LSTM" else torch.randn(2, HID)
    assert_raises_like_torch(ours, theirs, torch.randn(6, 3, IN), flat, match="3-D")
    assert_raises_like_torch(ours, theirs, torch.randn(6, 3, IN, dtype=torch.float64), match="dtype")
    assert_raises_like_torch(ours, theirs, torch.randn(0, 3, IN), match="sequence length")


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_layer_on_an_empty_batch_matches_torch(name):
    ours, theirs = _pair(name, IN, HID, num_layers=2, bidirectional=True)
    assert_module_matches_torch(ours, theirs, torch.randn(5, 0, IN, requires_grad=True))


def test_packed_input_rejects_an_unsorted_batch_and_increasing_batch_sizes():
    padded, lengths = torch.randn(3, 4, IN), [2, 4, 1]
    # enforce_sorted=True refuses unsorted lengths before any layer sees them (torch's RuntimeError)
    with pytest.raises(RuntimeError, match="sorted"):
        pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=True)
    ours, theirs = _pair("GRU", IN, HID)
    malformed = PackedSequence(torch.randn(3, IN), torch.tensor([1, 2]))
    assert_raises_like_torch(ours, theirs, malformed, match="batch_sizes must not increase")


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_rejects_bad_input_like_torch(name):
    ours, theirs = _pair(name, IN, HID)
    state = (lambda *s: (torch.randn(*s), torch.randn(*s))) if name == "LSTMCell" else (lambda *s: torch.randn(*s))
    assert_raises_like_torch(ours, theirs, torch.randn(3, IN + 1), match="inconsistent input_size")
    assert_raises_like_torch(ours, theirs, torch.randn(3, IN), state(3, HID + 1), match="inconsistent hidden_size")
    assert_raises_like_torch(ours, theirs, torch.randn(3, IN), state(2, HID), match="batch size")
    assert_raises_like_torch(ours, theirs, torch.randn(1, 3, IN), match="1D or 2D")


# ---------------------------------------------------------------------------------------------
# torch's module: constructor, names, state_dict, repr, flatten_parameters, convert

@pytest.mark.parametrize("name,kw", LAYERS, ids=LAYER_IDS)
def test_layer_is_torchs_module(name, kw):
    ours, theirs = _pair(name, IN, HID, **kw)
    assert isinstance(ours, getattr(torch.nn, name)) and repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.flatten_parameters()  # a no-op on CPU, as torch's
    assert_module_matches_torch(ours, theirs, torch.randn(4, 2, IN, requires_grad=True))


def test_convert_strict_swaps_recurrent_layers_and_keeps_what_they_compute():
    model = torch.nn.ModuleDict(dict(lstm=torch.nn.LSTM(IN, HID, 2, bidirectional=True), gru=torch.nn.GRU(2 * HID, HID),
                                     rnn=torch.nn.RNN(HID, HID), cell=torch.nn.LSTMCell(HID, HID),
                                     gcell=torch.nn.GRUCell(HID, HID), rcell=torch.nn.RNNCell(HID, HID)))
    reference = copy.deepcopy(model)

    def run(m, x):
        y = m["rnn"](m["gru"](m["lstm"](x)[0])[0])[0][-1]
        return m["rcell"](m["gcell"](m["cell"](y)[0]))

    x = torch.randn(5, 2, IN)
    mg.convert(model, strict=True)
    assert [type(m).__module__ for m in model.values()] == ["manualgrad.nn.recurrent"] * 6
    torch.testing.assert_close(run(model, x), run(reference, x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_per_sample_gradients_under_vmap_match_a_loop(name):
    """torch.func.vmap(grad(...)) over sequences (the vmapped dim is run through the batched
    Function; its rule is generated): each sample's parameter gradients as computed one by one."""
    from torch.func import functional_call, grad, vmap

    module = getattr(mnn, name)(3, 4, num_layers=2, bidirectional=True)
    params = dict(module.named_parameters())
    x = torch.randn(5, 6, 3)  # 5 samples of 6 steps

    def loss(p, seq):
        return functional_call(module, p, (seq.unsqueeze(1),))[0].pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for k, seq in enumerate(x):
        expected = torch.autograd.grad(loss(params, seq), list(params.values()))
        for (pname, g), e in zip(per_sample.items(), expected):
            torch.testing.assert_close(g[k], e, rtol=RTOL, atol=ATOL, msg=pname)
