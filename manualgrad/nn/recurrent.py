"""RNN, LSTM, GRU and their cells: torch's classes, forward run by manualgrad.ops.recurrent.

Each layer and direction is one Function over the whole sequence (ops/recurrent.py). A padded
(T, B, *) input runs as T * B rows with batch_sizes (B,) * T; a PackedSequence runs as it is
packed, so no padded step is computed. What surrounds the Functions follows torch's forward
(torch/nn/modules/rnn.py and aten/src/ATen/native/RNN.cpp): torch's own argument checks
(``check_forward_args``: the same exceptions and messages), hidden states reordered by the
PackedSequence's sorted/unsorted indices, the two directions' outputs concatenated on the
feature dim, h_n stacked as (num_layers * num_directions, B, *), and dropout between layers
applied to each layer's output but the last's, drawn like torch's ``at::dropout`` (bernoulli_
on a tensor of the output's elements, in the same order), so the masks equal torch's under
the same seed.

The cells are the one-step case of the same Functions (torch.nn.functional has no twin for them).
"""
import torch
from torch.nn.utils.rnn import PackedSequence

from .. import functional as F
from ..ops.recurrent import gru, lstm, rnn


def _cell_args(module, input, hx, count):
    """torch's cell checks and defaults: (input (B, I), hidden states (B, H) each, is_batched)."""
    name = type(module).__bases__[0].__name__
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    states = [] if hx is None else ([hx] if count == 1 else list(hx))
    for k, h in enumerate(states):
        if h.dim() not in (1, 2):
            label = "hidden" if count == 1 else f"hx[{k}]"
            raise ValueError(f"{name}: Expected {label} to be 1D or 2D, got {h.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
        states = [h.unsqueeze(0) for h in states]
    if hx is None:
        states = [torch.zeros(input.size(0), module.hidden_size, dtype=input.dtype, device=input.device)] * count
    # torch's kernel checks (RNN.cpp check_rnn_cell_forward_input / _hidden), same messages
    if input.size(1) != module.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {module.input_size}")
    for k, h in enumerate(states):
        if input.size(0) != h.size(0):
            raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{k} batch size {h.size(0)}")
        if h.size(1) != module.hidden_size:
            raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {h.size(1)}, expected {module.hidden_size}")
    return input, states, is_batched


def _cell_weights(module):
    return module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh


class RNNCell(torch.nn.RNNCell):
    """Drop-in for ``torch.nn.RNNCell``: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh) (or relu),
    with a hand-written backward."""

    def forward(self, input, hx=None):
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        x, (h,), is_batched = _cell_args(self, input, hx, 1)
        y, _ = rnn(x, (x.size(0),), False, self.nonlinearity, h, *_cell_weights(self))
        return y if is_batched else y.squeeze(0)


class LSTMCell(torch.nn.LSTMCell):
    """Drop-in for ``torch.nn.LSTMCell`` with a hand-written backward: returns (h', c')."""

    def forward(self, input, hx=None):
        x, (h, c), is_batched = _cell_args(self, input, hx, 2)
        y, _, c_n = lstm(x, (x.size(0),), False, h, c, *_cell_weights(self))
        return (y, c_n) if is_batched else (y.squeeze(0), c_n.squeeze(0))


class GRUCell(torch.nn.GRUCell):
    """Drop-in for ``torch.nn.GRUCell`` with a hand-written backward."""

    def forward(self, input, hx=None):
        x, (h,), is_batched = _cell_args(self, input, hx, 1)
        y, _ = gru(x, (x.size(0),), False, h, *_cell_weights(self))
        return y if is_batched else y.squeeze(0)


# ---------------------------------------------------------------------------------------------
# the layers

def _onednn_lstm(module, input, packed):
    """Whether torch runs this LSTM call on oneDNN (RNN.cpp ``use_mkldnn``): a padded, non-empty CPU
    float32 / bfloat16 input, no projections, oneDNN built and enabled. Under CPU autocast that
    path is cast whole to bfloat16 (states included); the per-step path casts only the matmul
    operands."""
    return (isinstance(module, torch.nn.LSTM) and not packed and module.proj_size == 0
            and input.device.type == "cpu" and input.dtype in (torch.float32, torch.bfloat16)
            and input.numel() != 0 and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _run_layers(module, x, batch_sizes, h0, c0, onednn=False):
    """Every layer and direction over x (N, I) in the packed layout: (y (N, D P), h_n, c_n or None)."""
    directions = 2 if module.bidirectional else 1
    lstm_mode = isinstance(module, torch.nn.LSTM)
    hs, cs = [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(directions):
            k, sfx = layer * directions + d, f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(module, f"weight_ih{sfx}"), getattr(module, f"weight_hh{sfx}")]
            w += [getattr(module, f"bias_ih{sfx}"), getattr(module, f"bias_hh{sfx}")] if module.bias else [None, None]
            if lstm_mode:
                w_hr = getattr(module, f"weight_hr{sfx}") if module.proj_size > 0 else None
                y, h, c = lstm(x, batch_sizes, d == 1, h0[k], c0[k], *w, w_hr, onednn=onednn)
                cs.append(c)
            elif isinstance(module, torch.nn.GRU):
                y, h = gru(x, batch_sizes, d == 1, h0[k], *w)
            else:
                y, h = rnn(x, batch_sizes, d == 1, module.nonlinearity, h0[k], *w)
            outs.append(y), hs.append(h)
        # the next layer's input: both directions' features side by side     (N, D P)
        x = torch.cat(outs, 1) if directions == 2 else outs[0]
        if module.dropout and module.training and layer < module.num_layers - 1:
            x = F.dropout(x, module.dropout, True)
    return x, torch.stack(hs), (torch.stack(cs) if lstm_mode else None)


def _forward(module, input, hx):
    """torch's RNNBase forward around ``_run_layers``: checks, defaults, layouts, orders."""
    lstm_mode = isinstance(module, torch.nn.LSTM)
    name = type(module).__bases__[0].__name__
    directions = 2 if module.bidirectional else 1
    real_hidden = module.proj_size if module.proj_size > 0 else module.hidden_size
    packed = isinstance(input, PackedSequence)
    is_batched = True
    if packed:
        input, batch_sizes, sorted_indices, unsorted_indices = input
        if (batch_sizes[1:] > batch_sizes[:-1]).any():  # torch fails on it later, in a kernel
            raise RuntimeError(f"{name}: a PackedSequence's batch_sizes must not increase, got {batch_sizes.tolist()}")
        batch = int(batch_sizes[0])
    else:
        batch_sizes = sorted_indices = unsorted_indices = None
        if input.dim() not in (2, 3):
            tail = " tensor instead" if name == "RNN" else " instead"
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tail}")
        is_batched = input.dim() == 3
        batch_dim = 0 if module.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        if hx is not None:
            states = hx if lstm_mode else (hx,)
            want = 3 if is_batched else 2
            if any(h.dim() != want for h in states):
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                if lstm_mode:
                    dims = ", ".join(f"{h.dim()}-D" for h in states)
                    raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got ({dims}) tensors")
                raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
            if not is_batched:
                hx = tuple(h.unsqueeze(1) for h in hx) if lstm_mode else hx.unsqueeze(1)
        batch = input.size(batch_dim)
    if hx is None:
        zeros = dict(dtype=input.dtype, device=input.device)
        h0 = torch.zeros(module.num_layers * directions, batch, real_hidden, **zeros)
        hx = (h0, torch.zeros(module.num_layers * directions, batch, module.hidden_size, **zeros)) if lstm_mode else h0
    else:
        # each sequence's state follows its sequence into the sorted order
        hx = module.permute_hidden(hx, sorted_indices)
    module.check_forward_args(input, hx, batch_sizes)
    h0, c0 = hx if lstm_mode else (hx, None)

    if packed:
        y, h_n, c_n = _run_layers(module, input, tuple(batch_sizes.tolist()), h0, c0)
        output = PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices)
    else:
        # (T, B, I) as T * B rows, step after step                          (T B, I)
        seq = input.transpose(0, 1) if module.batch_first else input
        steps = seq.size(0)
        if steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")  # torch's message
        y, h_n, c_n = _run_layers(module, seq.reshape(steps * batch, seq.size(2)), (batch,) * steps, h0, c0,
                                  _onednn_lstm(module, input, packed))
        output = y.view(steps, batch, y.size(1))
        if module.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if lstm_mode else None
    hidden = (h_n, c_n) if lstm_mode else h_n
    # back to the caller's order of sequences
    return output, module.permute_hidden(hidden, unsorted_indices)


class RNN(torch.nn.RNN):
    """Drop-in for ``torch.nn.RNN`` (tanh or relu), backpropagation through time written by hand.

    Shape: as torch.nn.RNN: input (L, B, H_in), (B, L, H_in) with batch_first, (L, H_in)
    unbatched, or a PackedSequence; returns output and h_n exactly as torch returns them."""

    def forward(self, input, hx=None):
        return _forward(self, input, hx)


class LSTM(torch.nn.LSTM):
    """Drop-in for ``torch.nn.LSTM`` (proj_size included), backpropagation through time written by hand.

    Returns output, (h_n, c_n) exactly as torch returns them (PackedSequence in, PackedSequence out)."""

    def forward(self, input, hx=None):
        return _forward(self, input, hx)


class GRU(torch.nn.GRU):
    """Drop-in for ``torch.nn.GRU``, backpropagation through time written by hand."""

    def forward(self, input, hx=None):
        return _forward(self, input, hx)
