"""manualgrad.functional.multi_head_attention_forward against torch's, and unconverted torch
attention modules under ``manualgrad.enable()`` (the mode routes F.multi_head_attention_forward).

Self-attention (q is k is v) and encoder-decoder attention (k is v) take their own projection
paths, so the comparisons copy the inputs keeping which of them are the same tensor.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import manualgrad
import manualgrad.functional as MF
from manualgrad.coverage import graph_nodes
from manualgrad.testing import assert_raises_like_torch, check_gradients

torch.set_num_threads(1)
# bool key padding masks next to float attention masks: torch's deprecation warning, expected here
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched")

RTOL, ATOL = 1e-4, 1e-5


# --- inputs ---------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


def _bool_mask(*shape):
    """True = masked; key 0 always visible, so no row is masked whole."""
    m = torch.rand(*shape) > 0.6
    m[..., 0] = False
    return m


def _float_mask(*shape, grad=False):
    """Added to the scores: random values, -inf where a bool mask would mask."""
    return torch.randn(*shape).masked_fill(_bool_mask(*shape), -torch.inf).requires_grad_(grad)


def make_case(batched=True, share="qkv", L=5, S=7, N=3, E=12, H=3, kdim=None, vdim=None, bias=True, bias_kv=False,
              add_zero_attn=False, dropout_p=0.0, kpm=None, mask=None, static_kv=False, dtype=torch.float32, **options):
    """(args, kwargs) of one multi_head_attention_forward call.

    share: "qkv" self-attention (query is key is value, S = L), "kv" key is value, "none".
    kpm: None, "bool", "float"; mask: None, "2d-bool", "2d-float", "3d-bool", "3d-float",
    "causal" (the float causal mask, with is_causal=True).
    """
    t = lambda *shape: _t(*shape, dtype=dtype)  # noqa: E731
    separate = kdim is not None or vdim is not None
    kdim, vdim = kdim or E, vdim or E
    S = L if share == "qkv" else S

    def seq(n, d):
        return t(n, N, d) if batched else t(n, d)

    query = seq(L, E)
    if share == "qkv":
        key = value = query
    elif share == "kv":
        key = value = seq(S, kdim)
    else:
        key, value = seq(S, kdim), seq(S, vdim)
    args = [query, key, value, E, H, None if separate else t(3 * E, E), t(3 * E) if bias else None,
            t(1, 1, E) if bias_kv else None, t(1, 1, E) if bias_kv else None, add_zero_attn, dropout_p,
            t(E, E), t(E) if bias else None]
    kwargs = dict(options)
    if separate:
        kwargs.update(use_separate_proj_weight=True, q_proj_weight=t(E, E), k_proj_weight=t(E, kdim),
                      v_proj_weight=t(E, vdim))
    kpm_shape = (N, S) if batched else (S,)
    if kpm == "bool":
        kwargs["key_padding_mask"] = _bool_mask(*kpm_shape)
    elif kpm == "float":
        kwargs["key_padding_mask"] = _float_mask(*kpm_shape).to(dtype)
    heads = N * H if batched else H
    if mask == "causal":
        kwargs.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype), is_causal=True)
    elif mask is not None:
        dims, kind = mask.split("-")
        shape = (L, S) if dims == "2d" else (heads, L, S)
        kwargs["attn_mask"] = _bool_mask(*shape) if kind == "bool" else _float_mask(*shape, grad=True).to(dtype)
    if static_kv:
        kwargs.update(static_k=t(heads, S, E // H), static_v=t(heads, S, E // H))
    return args, kwargs


def _copy(obj, memo):
    """Fresh leaves with the same values; a tensor passed twice stays one tensor."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().clone().requires_grad_(obj.requires_grad)
        return memo[id(obj)]
    if isinstance(obj, list):
        return [_copy(o, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _copy(v, memo) for k, v in obj.items()}
    return obj


def _run(fn, args, kwargs, grad_outputs=None, seed=0):
    """Outputs of fn, and the gradient of every leaf that requires grad under grad_outputs."""
    memo = {}
    args, kwargs = _copy(args, memo), _copy(kwargs, memo)
    torch.manual_seed(seed)
    outputs = fn(*args, **kwargs)
    if grad_outputs is None:
        grad_outputs = [None if o is None else torch.randn_like(o) for o in outputs]
    leaves = [t for t in memo.values() if t.requires_grad]
    loss = sum((o * g).sum() for o, g in zip(outputs, grad_outputs) if o is not None)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return outputs, grads, grad_outputs


def assert_matches_torch(args, kwargs, rtol=RTOL, atol=ATOL):
    """Outputs (attention output and weights) and the gradient of every input, weight and
    float mask equal torch's F.multi_head_attention_forward's."""
    th_out, th_grads, dys = _run(TF.multi_head_attention_forward, args, kwargs)
    mg_out, mg_grads, _ = _run(MF.multi_head_attention_forward, args, kwargs, dys)
    assert len(mg_out) == 2
    for what, a, b in zip(("output", "weights"), mg_out, th_out):
        assert (a is None) == (b is None), what
        if b is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    assert len(th_grads) == len(mg_grads) > 0
    for i, (a, b) in enumerate(zip(mg_grads, th_grads)):
        assert (a is None) == (b is None), f"gradient {i}"
        if b is not None:
            # atol relative to the gradient's scale: the key bias's gradient is 0 in exact
            # arithmetic (softmax ignores a constant added to a row), rounding noise in float32
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, msg=lambda m: f"gradient {i}: {m}")
    return mg_out, th_out


# --- the functional against torch's ----------------------------------------------------------

CASES = {
    "self": dict(),
    "self-weights-per-head": dict(need_weights=True, average_attn_weights=False),
    "self-no-weights": dict(need_weights=False),
    "cross-key-is-value": dict(share="kv"),
    "cross-key-is-value-no-weights": dict(share="kv", need_weights=False),
    "cross-distinct": dict(share="none", need_weights=False),
    "unbatched-self": dict(batched=False, need_weights=False),
    "unbatched-masks-weights": dict(batched=False, share="none", kpm="bool", mask="3d-float"),
    "unbatched-cross-averaged": dict(batched=False, share="kv", mask="2d-bool", need_weights=True),
    "kdim-vdim": dict(share="none", kdim=5, vdim=3, need_weights=False),
    "kdim-vdim-weights-no-bias": dict(share="none", kdim=5, vdim=3, bias=False, kpm="bool"),
    "no-bias": dict(bias=False, need_weights=False),
    "bias-kv-masks": dict(bias_kv=True, kpm="bool", mask="2d-float", need_weights=False),
    "bias-kv-weights": dict(share="kv", bias_kv=True, mask="3d-bool"),
    "zero-attn-masks": dict(add_zero_attn=True, kpm="float", mask="3d-bool", need_weights=False),
    "zero-attn-bias-kv-weights": dict(add_zero_attn=True, bias_kv=True, kpm="bool", average_attn_weights=False),
    "kpm-bool": dict(share="none", kpm="bool", need_weights=False),
    "kpm-float-weights": dict(share="none", kpm="float"),
    "mask-2d-bool": dict(mask="2d-bool", need_weights=False),
    "mask-2d-float": dict(mask="2d-float", need_weights=False),
    "mask-3d-bool": dict(share="kv", mask="3d-bool", need_weights=False),
    "mask-3d-float-weights": dict(share="kv", mask="3d-float"),
    "kpm-and-mask": dict(kpm="bool", mask="2d-bool", need_weights=False),
    "causal": dict(mask="causal", need_weights=False),
    "causal-weights": dict(mask="causal", need_weights=True),
    "causal-with-kpm": dict(mask="causal", kpm="bool", need_weights=False),
    "static-kv": dict(static_kv=True, need_weights=False),
    "static-kv-weights": dict(share="none", static_kv=True, kpm="bool"),
    "dropout-eval": dict(dropout_p=0.4, training=False, need_weights=False),
    "dropout-eval-weights": dict(dropout_p=0.4, training=False, kpm="bool"),
    "training-p0": dict(dropout_p=0.0, training=True, need_weights=False),
    "training-p0-weights": dict(dropout_p=0.0, training=True, mask="2d-float"),
}


@pytest.mark.parametrize("name", CASES)
def test_multi_head_attention_forward_matches_torch_outputs_and_gradients(name):
    assert_matches_torch(*make_case(**CASES[name]))


def test_dropout_with_weights_draws_torchs_mask_under_one_seed():
    # need_weights=True drops the materialised weights with F.dropout, whose mask manualgrad's
    # dropout draws exactly as torch's: the same outputs and gradients from the same seed
    mg_out, _ = assert_matches_torch(*make_case(dropout_p=0.5, training=True, kpm="bool"))
    assert (mg_out[1] == 0).any()  # the dropout really dropped weights


def test_dropout_without_weights_drops_in_training_and_keeps_the_expected_output():
    # need_weights=False: manualgrad's sdpa draws its own mask. Two draws differ; their mean
    # over many draws tends to the output without dropout (dropout is unbiased).
    args, kwargs = make_case(dropout_p=0.3, training=True, need_weights=False, N=1, L=3, E=4, H=2)
    with torch.no_grad():
        a = MF.multi_head_attention_forward(*args, **kwargs)[0]
        b = MF.multi_head_attention_forward(*args, **kwargs)[0]
        assert not torch.allclose(a, b)
        mean = torch.stack([MF.multi_head_attention_forward(*args, **kwargs)[0] for _ in range(3000)]).mean(0)
        args[10] = 0.0
        expected = TF.multi_head_attention_forward(*args, **kwargs)[0]
    torch.testing.assert_close(mean, expected, rtol=0.0, atol=0.1)


def test_self_attention_is_one_input_projection(monkeypatch):
    # q is k is v: one linear of (L N, 3E), as torch, not three of (L N, E); then out_proj
    import manualgrad.ops.multi_head_attention as ops

    args, kwargs = make_case(need_weights=False)
    shapes, real = [], ops.linear
    monkeypatch.setattr(ops, "linear", lambda x, w, b=None: shapes.append(tuple(w.shape)) or real(x, w, b))
    MF.multi_head_attention_forward(*args, **kwargs)
    assert shapes == [(36, 12), (12, 12)]


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa-path", "weights-path"])
def test_gradients_in_float64(need_weights):
    # gradcheck, gradgradcheck, forward AD and batched gradients through the whole layer, with a
    # learned key / value (bias_k, bias_v), a padding mask and a float attention mask
    E, H = 4, 2
    kpm = torch.tensor([[False, False, True], [False, False, False]])

    def fn(x, w_in, b_in, bias_k, bias_v, w_out, b_out, attn_mask):
        out, weights = MF.multi_head_attention_forward(
            x, x, x, E, H, w_in, b_in, bias_k, bias_v, need_weights, 0.0, w_out, b_out, key_padding_mask=kpm,
            need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=False)
        return out if weights is None else (out, weights)

    shapes = [(3, 2, E), (3 * E, E), (3 * E,), (1, 1, E), (1, 1, E), (E, E), (E,), (3, 3)]
    assert check_gradients(fn, *[_t(*shape, dtype=torch.float64) for shape in shapes])


# --- errors ----------------------------------------------------------------------------------

BAD = {
    "2d-mask-shape": (dict(), dict(attn_mask=torch.zeros(4, 5, dtype=torch.bool)), "2D attn_mask"),
    "3d-mask-shape": (dict(), dict(attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool)), "3D attn_mask"),
    "value-shape": (dict(share="none"), dict(), None),
    "causal-without-mask": (dict(), dict(is_causal=True), "Need attn_mask"),
    "kpm-shape": (dict(), dict(key_padding_mask=torch.zeros(3, 4, dtype=torch.bool)), None),
    "int-mask": (dict(), dict(attn_mask=torch.zeros(5, 5, dtype=torch.int64)), "attn_mask"),
    "4d-query": (dict(), dict(), "4-D query"),
    "bias-k-only": (dict(bias_kv=True), dict(), "bias_v is None"),
    "embed-dim": (dict(), dict(), "embedding dimension"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_like_torch(name):
    case, extra, match = BAD[name]
    args, kwargs = make_case(**case)
    kwargs.update(extra)
    if name == "value-shape":
        args[2] = _t(6, 3, 12)
    elif name == "4d-query":
        args[0] = args[1] = args[2] = _t(1, 5, 3, 12)
    elif name == "bias-k-only":
        args[8] = None
    elif name == "embed-dim":
        args[3] = 10
    assert_raises_like_torch(MF.multi_head_attention_forward, TF.multi_head_attention_forward, *args,
                             match=match, **kwargs)


def test_nested_tensors_raise_not_implemented_naming_them():
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    args, _ = make_case(E=8, H=2)
    with pytest.raises(NotImplementedError, match="nested tensors"):
        MF.multi_head_attention_forward(x, x, x, *args[3:])


# --- unconverted torch modules under manualgrad.enable() -------------------------------------

def test_the_mode_routes_multi_head_attention_forward():
    assert manualgrad.mode.routes()[TF.multi_head_attention_forward] is MF.multi_head_attention_forward


def _node_names(t):
    """The class names of every node in t's backward graph."""
    return {type(node).__name__ for node in graph_nodes([t.grad_fn])}


def _torch_and_routed(model, inputs, loss_fn):
    """(loss, gradients of the inputs and parameters) of a torch model, and of a deep copy run
    under manualgrad.enable(), from the same inputs and seed. The routed run must have gone
    through manualgrad's attention (sdpa, or the products of the weights path) and linear."""
    results = []
    for m, routed in ((model, False), (copy.deepcopy(model), True)):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        torch.manual_seed(1)
        with manualgrad.enable() if routed else contextlib.nullcontext():
            loss = loss_fn(m(*xs))
        if routed:
            names = _node_names(loss)
            assert "LinearFunctionBackward" in names, names
            assert names & {"ScaledDotProductAttentionFunctionBackward", "AddProductFunctionBackward",
                            "ProductFunctionBackward"}, names
        loss.backward()
        grads = {f"input {i}": x.grad for i, x in enumerate(xs) if x.requires_grad}
        grads.update((n, p.grad) for n, p in m.named_parameters())
        results.append((loss.detach(), grads))
    return results


def _assert_same(results):
    (loss, grads), (mg_loss, mg_grads) = results
    torch.testing.assert_close(mg_loss, loss, rtol=RTOL, atol=ATOL)
    assert grads.keys() == mg_grads.keys()
    for name in grads:
        assert grads[name] is not None, name
        torch.testing.assert_close(mg_grads[name], grads[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def _weighted_sum(out):
    # a loss whose gradient differs per feature (a plain sum would hide a feature mix-up)
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum()


class _Layer(nn.Module):
    """An encoder layer called with a causal mask and a key padding mask."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        L = x.shape[1] if self.layer.self_attn.batch_first else x.shape[0]
        kpm = torch.zeros(2, L, dtype=torch.bool)
        kpm[1, -2:] = True
        return self.layer(x, src_mask=nn.Transformer.generate_square_subsequent_mask(L), src_key_padding_mask=kpm)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("masks", [False, True], ids=["no-masks", "causal-and-padding-masks"])
def test_unconverted_transformer_encoder_layer_under_enable_gives_torchs_loss_and_gradients(
        batch_first, norm_first, masks):
    layer = nn.TransformerEncoderLayer(12, 3, 20, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    model = _Layer(layer) if masks else layer
    x = torch.randn((2, 5, 12) if batch_first else (5, 2, 12))
    _assert_same(_torch_and_routed(model, (x,), _weighted_sum))


class _Call(nn.Module):
    """module(*inputs, **kwargs) as a module (keyword options fixed)."""

    def __init__(self, module, **kwargs):
        super().__init__()
        self.module, self.kwargs = module, kwargs

    def forward(self, *inputs):
        return self.module(*inputs, **self.kwargs)


@pytest.mark.parametrize("need_weights", [True, False])
def test_unconverted_multihead_attention_under_enable_gives_torchs_outputs_and_gradients(need_weights):
    mha = nn.MultiheadAttention(12, 3, kdim=5, vdim=7, batch_first=True)
    q, k, v = torch.randn(2, 4, 12), torch.randn(2, 6, 5), torch.randn(2, 6, 7)

    def loss_fn(outputs):
        out, weights = outputs
        return _weighted_sum(out) + (0 if weights is None else _weighted_sum(weights))

    model = _Call(mha, need_weights=need_weights, average_attn_weights=False)
    _assert_same(_torch_and_routed(model, (q, k, v), loss_fn))


class _Classifier(nn.Module):
    """Two encoder layers, mean over the sequence, a linear head (written as users write it)."""

    def __init__(self, d=32, heads=4, classes=5):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def test_transformer_encoder_classifier_under_enable_alone_is_95_percent_hand_written():
    model = _Classifier()
    x, y = torch.randn(4, 7, 32), torch.randint(0, 5, (4,))
    report = manualgrad.coverage(model, x, loss_fn=lambda out: TF.cross_entropy(out, y))
    assert report.hand_written_flop_share >= 0.95, str(report)
    ops = {row.op for row in report.rows if row.hand_written_nodes and not row.torch_nodes}
    assert {"linear", "scaled_dot_product_attention"} <= ops, str(report)
    # and the routed model trains as torch's does
    _assert_same(_torch_and_routed(model, (x,), lambda out: TF.cross_entropy(out, y)))
