"""Transformer layers (manualgrad/nn/transformer.py) against torch's, from the same weights.

Each torch model is copied and converted with ``convert(strict=True)``; both copies run from
the same seed (so dropout drops the same units: manualgrad's masks are torch's) and the same
upstream gradient. What holds, in float32: outputs and every parameter and input gradient
match torch (rtol 1e-4, atol 1e-5, as the other model tests: a few layers of float32 rounding
in kernels that sum in different orders); the converted graphs hold only manualgrad Functions
and structural torch nodes, so 100% of backward FLOPs are hand-written; in eval with no
gradient the twins are torch's forward (its fused fast path and nested tensors) bit for bit,
and with gradients they give the same values, padded positions of the nested path included.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import manualgrad
from manualgrad.coverage import graph_nodes
from tests.conftest import exact_dy
from tests.test_models import STRUCTURAL

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-4, 1e-5
E, H, FF = 8, 2, 12
SEED = 1234


def converted(model):
    return manualgrad.convert(copy.deepcopy(model), strict=True)


def run(model, inputs, kwargs, dy):
    """Forward from a fixed seed, backward of sum(out * dy): the output, the parameter
    gradients and the input gradients."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(SEED)
    out = model(*inputs, **kwargs)
    (out * dy).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, [x.grad for x in inputs]


def assert_matches_torch(model, inputs, kwargs=None, ours=None):
    kwargs = kwargs or {}
    ours = ours if ours is not None else converted(model)
    with torch.no_grad():
        dy = exact_dy(model(*inputs, **kwargs).shape)
    out, grads, dxs = run(model, inputs, kwargs, dy)
    our_out, our_grads, our_dxs = run(ours, inputs, kwargs, dy)
    torch.testing.assert_close(our_out, out, rtol=RTOL, atol=ATOL)
    assert our_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    for i, (our_dx, dx) in enumerate(zip(our_dxs, dxs)):
        torch.testing.assert_close(our_dx, dx, rtol=RTOL, atol=ATOL, msg=lambda m: f"input {i}: {m}")
    return ours


def torch_nodes(out):
    """Backward nodes of out's graph that are neither manualgrad Functions nor structural."""
    names = {type(n).__name__ for n in graph_nodes([out.grad_fn])}
    structural = STRUCTURAL | {"SplitWithSizesBackward0"}  # attention's packed in-projection split
    return {n for n in names if n not in structural and not n.endswith("FunctionBackward")}


def seq(batch_first, length, n=3):
    return torch.randn(n, length, E) if batch_first else torch.randn(length, n, E)


def padding(n=3, length=5):
    """Key padding, left aligned: True = padded."""
    lengths = torch.tensor([length, length - 2, 1])[:n]
    return torch.arange(length) >= lengths[:, None]


ACTIVATIONS = {  # each a fresh one per layer
    "relu": lambda: "relu",
    "gelu": lambda: "gelu",
    "F.silu": lambda: F.silu,  # a torch.nn.functional activation: routed to manualgrad's silu
    "nn.GELU(tanh)": lambda: nn.GELU(approximate="tanh"),  # a submodule, converted with the layer
}


def twins(make):
    """A torch model and its converted twin, each made by ``make()`` from the same seed, with no
    deepcopy: torch's TransformerDecoderLayer.__setstate__ turns a module activation into
    F.relu on a copy (its "activation" lives in state["_modules"], which it does not look in)."""
    torch.manual_seed(0)
    model = make()
    torch.manual_seed(0)
    return model, manualgrad.convert(make(), strict=True)


# --- encoder layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_encoder_layer_output_and_gradients_match_torch_in_training(activation, norm_first, batch_first, dropout):
    layer, ours = twins(lambda: nn.TransformerEncoderLayer(
        E, H, FF, dropout, ACTIVATIONS[activation](), batch_first=batch_first, norm_first=norm_first,
    ))
    assert_matches_torch(layer, [seq(batch_first, 5)], dict(src_key_padding_mask=padding()), ours=ours)
    out = ours(seq(batch_first, 5).requires_grad_())
    assert torch_nodes(out) == set()


@pytest.mark.parametrize(
    "masks",
    [
        "bool src_mask",
        "float src_mask",
        "padding",
        "float padding",
        "src_mask and padding",
        "causal",
        "3-d src_mask",
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_encoder_layer_masks_match_torch(masks, training):
    layer = nn.TransformerEncoderLayer(E, H, FF, 0.1, batch_first=True).train(training)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    kwargs = {
        "bool src_mask": dict(src_mask=torch.rand(5, 5) < 0.3),
        "float src_mask": dict(src_mask=torch.randn(5, 5)),
        "padding": dict(src_key_padding_mask=padding()),
        "float padding": dict(src_key_padding_mask=torch.zeros(3, 5).masked_fill(padding(), float("-inf"))),
        "src_mask and padding": dict(src_mask=torch.randn(5, 5), src_key_padding_mask=torch.zeros(3, 5).masked_fill(padding(), float("-inf"))),
        "causal": dict(src_mask=causal, is_causal=True),
        "3-d src_mask": dict(src_mask=torch.rand(3 * H, 5, 5) < 0.3),
    }[masks]
    assert_matches_torch(layer, [seq(True, 5)], kwargs)


@pytest.mark.parametrize(
    "bad",
    [
        dict(src_key_padding_mask=torch.zeros(3, 5, dtype=torch.long)),  # masks are bool or float
        dict(src_mask=torch.zeros(4, 4)),  # (S, S) needed
        dict(src_key_padding_mask=torch.zeros(3, 4, dtype=torch.bool)),  # (N, S) needed
    ],
)
def test_encoder_layer_bad_masks_raise_torchs_exception(bad):
    layer = nn.TransformerEncoderLayer(E, H, FF, 0.0)
    ours = converted(layer)
    x = seq(False, 5).requires_grad_()
    with pytest.raises(Exception) as expected:
        layer(x, **bad)
    with pytest.raises(type(expected.value)):
        ours(x, **bad)


def test_unbatched_encoder_layer_matches_torch():
    layer = nn.TransformerEncoderLayer(E, H, FF, 0.1)
    assert_matches_torch(layer, [torch.randn(5, E)], dict(src_key_padding_mask=torch.tensor([False] * 4 + [True])))


# --- decoder layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_decoder_layer_output_and_gradients_match_torch_in_training(activation, norm_first, batch_first, dropout):
    layer, ours = twins(lambda: nn.TransformerDecoderLayer(
        E, H, FF, dropout, ACTIVATIONS[activation](), batch_first=batch_first, norm_first=norm_first,
    ))
    kwargs = dict(
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(4), tgt_is_causal=True,
        tgt_key_padding_mask=padding(length=4), memory_key_padding_mask=padding(),
    )
    assert_matches_torch(layer, [seq(batch_first, 4), seq(batch_first, 5)], kwargs, ours=ours)
    out = ours(seq(batch_first, 4).requires_grad_(), seq(batch_first, 5).requires_grad_())
    assert torch_nodes(out) == set()


@pytest.mark.parametrize("masks", ["none", "memory_mask", "bool tgt_mask", "float masks", "memory_is_causal"])
@pytest.mark.parametrize("training", [True, False])
def test_decoder_layer_masks_match_torch(masks, training):
    layer = nn.TransformerDecoderLayer(E, H, FF, 0.1, batch_first=True).train(training)
    kwargs = {
        "none": {},
        "memory_mask": dict(memory_mask=torch.rand(4, 5) < 0.3),
        "bool tgt_mask": dict(tgt_mask=torch.rand(4, 4) < 0.3, memory_key_padding_mask=padding()),
        "float masks": dict(tgt_mask=torch.randn(4, 4), memory_mask=torch.randn(4, 5)),
        "memory_is_causal": dict(memory_mask=nn.Transformer.generate_square_subsequent_mask(4)[:, :4], memory_is_causal=True),
    }[masks]
    tgt_memory = [seq(True, 4), seq(True, 4 if masks == "memory_is_causal" else 5)]
    assert_matches_torch(layer, tgt_memory, kwargs)


# --- stacks and the whole nn.Transformer --------------------------------------------------------

def seq2seq(dropout, norm_first=False, batch_first=True, activation="relu"):
    return nn.Transformer(
        E, H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=FF, dropout=dropout,
        activation=activation, batch_first=batch_first, norm_first=norm_first,
    )


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("norm_first", [False, True])
def test_seq2seq_transformer_trains_like_torch(dropout, norm_first):
    model = seq2seq(dropout, norm_first)
    ours = converted(model)
    src, tgt = seq(True, 6), seq(True, 5)
    kwargs = dict(
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), src_key_padding_mask=padding(length=6),
        memory_key_padding_mask=padding(length=6), tgt_key_padding_mask=padding(length=5),
    )
    opt, our_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ours))
    for _ in range(3):  # each step from the weights the last one left
        assert_matches_torch(model, [src, tgt], kwargs, ours=ours)
        opt.step()
        our_opt.step()


def test_encoder_and_decoder_stacks_with_final_norms_match_torch():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF, 0.1), 3, norm=nn.LayerNorm(E), enable_nested_tensor=False)
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, FF, 0.1), 2, norm=nn.LayerNorm(E))
    assert_matches_torch(enc, [seq(False, 5)], dict(mask=nn.Transformer.generate_square_subsequent_mask(5)))
    assert_matches_torch(dec, [seq(False, 4), seq(False, 5)], dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(4)))


def test_seq2seq_backward_is_all_hand_written():
    ours = converted(seq2seq(0.1))
    src, tgt = seq(True, 6).requires_grad_(), seq(True, 5).requires_grad_()
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5)
    out = ours(src, tgt, tgt_mask=tgt_mask)
    assert torch_nodes(out) == set()
    report = manualgrad.coverage(ours, src, tgt, tgt_mask=tgt_mask, mode=False)
    assert report.hand_written_flop_share == 1.0, str(report)
    assert {"linear", "scaled_dot_product_attention", "layer_norm", "dropout", "relu"} <= {
        row.op for row in report.rows if row.hand_written_nodes
    }, str(report)


def test_convert_keeps_torch_state_dict_and_repr():
    model = seq2seq(0.1)
    ours = converted(model)
    assert type(ours) is manualgrad.nn.Transformer and isinstance(ours, nn.Transformer)
    assert type(ours.encoder.layers[1]) is manualgrad.nn.TransformerEncoderLayer
    assert type(ours.decoder.layers[0].multihead_attn) is manualgrad.nn.MultiheadAttention
    assert repr(ours) == repr(model)
    assert ours.state_dict().keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name


# --- eval: the fast path and the nested-tensor path ---------------------------------------------

def test_eval_without_grad_is_torchs_fast_path_bit_for_bit():
    model = seq2seq(0.1).eval()
    ours = converted(model)
    src, tgt = seq(True, 6), seq(True, 5)
    kwargs = dict(src_key_padding_mask=padding(length=6), tgt_mask=nn.Transformer.generate_square_subsequent_mask(5))
    with torch.no_grad():
        assert torch.equal(ours(src, tgt, **kwargs), model(src, tgt, **kwargs))


@pytest.mark.parametrize("norm", [False, True])
def test_encoder_in_eval_with_padding_matches_torch_with_and_without_gradients(norm):
    """With no gradient torch packs the padded batch into a nested tensor: padded positions
    come out as zeros (then the final norm). With gradients it runs the padded batch, and the
    padded positions hold values. The twin matches torch both ways; the real tokens agree."""
    enc, ours = twins(lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, H, FF, 0.1, batch_first=True), 2, norm=nn.LayerNorm(E) if norm else None,
    ).eval())
    src, pad = seq(True, 5), padding()
    with torch.no_grad():
        nested = enc(src, src_key_padding_mask=pad)
        assert torch.equal(ours(src, src_key_padding_mask=pad), nested)
    if not norm:
        assert (nested[pad] == 0).all()
    assert_matches_torch(enc, [src], dict(src_key_padding_mask=pad), ours=ours)
    padded = ours(src.requires_grad_(), src_key_padding_mask=pad)
    assert (padded[pad] != nested[pad]).any()
    torch.testing.assert_close(padded[~pad], nested[~pad], rtol=RTOL, atol=ATOL)


def test_encoder_with_a_frozen_first_layer_computes_torchs_nested_output():
    """Eval, frozen first layer: torch nests the batch, then fails in the trainable second
    layer (MultiheadAttention cannot take a nested tensor with gradients). The twin gives
    torch's no-grad values and a gradient for the second layer."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF, 0.0, batch_first=True), 2).eval()
    for p in enc.layers[0].parameters():
        p.requires_grad_(False)
    ours = converted(enc)
    src, pad = seq(True, 5), padding()
    with torch.no_grad():
        expected = enc(src, src_key_padding_mask=pad)
    with pytest.raises(AssertionError, match="NestedTensor"):
        enc(src, src_key_padding_mask=pad)
    out = ours(src, src_key_padding_mask=pad)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    out.sum().backward()
    assert ours.layers[1].linear1.weight.grad is not None


@pytest.mark.parametrize("norm_first", [False, True])
def test_eval_with_gradients_matches_torch_and_its_fast_path(norm_first):
    model = seq2seq(0.1, norm_first).eval()
    src, tgt = seq(True, 6), seq(True, 5)
    kwargs = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(5))
    ours = assert_matches_torch(model, [src, tgt], kwargs)  # torch with gradients: its general path
    with torch.no_grad():
        fast = model(src, tgt, **kwargs)
    torch.testing.assert_close(ours(src, tgt, **kwargs), fast, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("needs_grad", ["src", "weights"])
def test_encoder_in_eval_with_padding_does_not_nest_when_src_or_first_layer_needs_grad(needs_grad):
    """torch does not nest (padded positions hold values) when src or a first-layer weight
    requires grad, nor does the twin."""
    enc, ours = twins(lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF, 0.0, batch_first=True), 2).eval())
    if needs_grad == "src":
        for p in [*enc.parameters(), *ours.parameters()]:
            p.requires_grad_(False)
    src, pad = seq(True, 5).requires_grad_(needs_grad == "src"), padding()
    expected, out = enc(src, src_key_padding_mask=pad), ours(src, src_key_padding_mask=pad)
    assert (expected[pad] != 0).all()
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    dy = exact_dy(out.shape)
    wrt = (src,) if needs_grad == "src" else (enc.layers[0].linear1.weight,)
    our_wrt = (src,) if needs_grad == "src" else (ours.layers[0].linear1.weight,)
    torch.testing.assert_close(torch.autograd.grad(out, our_wrt, dy), torch.autograd.grad(expected, wrt, dy), rtol=RTOL, atol=ATOL)


def test_seq2seq_under_enable_matches_torch_in_training_and_eval():
    """Under manualgrad.enable() (a TorchFunctionMode: torch's fast-path checks see a torch
    function and run the general path) the converted model gives torch's values and gradients."""
    model = seq2seq(0.1)
    ours = converted(model)
    src, tgt = seq(True, 6), seq(True, 5)
    kwargs = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), src_key_padding_mask=padding(length=6))
    with torch.no_grad():
        dy = exact_dy(model(src, tgt, **kwargs).shape)
    out, grads, _ = run(model, [src, tgt], kwargs, dy)
    with manualgrad.enable():
        our_out, our_grads, _ = run(ours, [src, tgt], kwargs, dy)
    torch.testing.assert_close(our_out, out, rtol=RTOL, atol=ATOL)
    for name, g in grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    model.eval(), ours.eval()
    with torch.no_grad():
        expected = model(src, tgt, **kwargs)  # torch's fast path, nested tensors
        with manualgrad.enable():
            torch.testing.assert_close(ours(src, tgt, **kwargs), expected, rtol=RTOL, atol=ATOL)
