"""manualgrad.enable(): routing, fallbacks, torch's argument handling, backward, nesting,
checkpoint, double backward, torch.compile and torch.func.

A routed call is checked three ways: output and every gradient equal torch's (the same call
with the mode off), and the graph under the mode holds the manualgrad node (``<Fn>Backward``).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

import manualgrad
import manualgrad.functional as MF
from manualgrad import mode as mode_module
from manualgrad.coverage import graph_nodes
from manualgrad.mode import checkpoint_contexts, enable, routes
from manualgrad.testing import assert_raises_like_torch

torch.set_num_threads(1)


def node_names(t):
    """Class names of every node in t's backward graph."""
    return {type(node).__name__ for node in graph_nodes([t.grad_fn])}


def manualgrad_nodes(t):
    return {n for n in node_names(t) if n in mode_module._NODE_NAMES}


def leaves(*shapes, dtype=torch.float64):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def run(fn, inputs, routed):
    """fn(*inputs) with the mode on or off: (output, gradients of every float input, node names)."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    with enable() if routed else contextlib.nullcontext():
        out = fn(*inputs)
        names = node_names(out)
        dy = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        diff = [t for t in inputs if t.requires_grad]
        grads = torch.autograd.grad(out, diff, dy, allow_unused=True)
    return out, grads, names


# (id, fn, input shapes or tensors maker, the manualgrad node the call must create)
x23 = lambda: leaves((2, 3))  # noqa: E731
x234 = lambda: leaves((2, 3, 4))  # noqa: E731
CASES = [
    # torch.nn.functional, positional and keyword
    ("F.linear", lambda x, w, b: F.linear(x, w, b), lambda: leaves((3, 4), (5, 4), (5,)), "LinearFunctionBackward"),
    ("F.linear kw", lambda x, w: F.linear(input=x, weight=w), lambda: leaves((2, 3, 4), (5, 4)), "LinearFunctionBackward"),
    ("F.gelu tanh", lambda x: F.gelu(x, approximate="tanh"), x23, "GELUFunctionBackward"),
    ("F.relu", lambda x: F.relu(x), x23, "ReLUFunctionBackward"),
    ("F.silu", lambda x: F.silu(x), x23, "SiLUFunctionBackward"),
    ("F.elu", lambda x: F.elu(x, 0.5), x23, "ELUFunctionBackward"),
    ("F.leaky_relu kw", lambda x: F.leaky_relu(x, negative_slope=0.2), x23, "LeakyReLUFunctionBackward"),
    ("F.softplus", lambda x: F.softplus(x, beta=2), x23, "SoftplusFunctionBackward"),
    ("F.mish", lambda x: F.mish(x), x23, "MishFunctionBackward"),
    ("F.hardswish", lambda x: F.hardswish(x), x23, "HardswishFunctionBackward"),
    ("F.glu", lambda x: F.glu(x, 0), lambda: leaves((4, 3)), "GLUFunctionBackward"),
    ("F.tanh", lambda x: F.tanh(x), x23, "TanhFunctionBackward"),
    ("F.sigmoid", lambda x: F.sigmoid(x), x23, "SigmoidFunctionBackward"),
    ("F.softmax", lambda x: F.softmax(x, -1), x234, "SoftmaxFunctionBackward"),
    ("F.softmax kw dtype", lambda x: F.softmax(x, dim=1, dtype=torch.float32), x234, "SoftmaxFunctionBackward"),
    ("F.log_softmax", lambda x: F.log_softmax(x, dim=0), x234, "LogSoftmaxFunctionBackward"),
    ("F.dropout p=1", lambda x: F.dropout(x, 1.0), x23, "DropoutFunctionBackward"),
    ("F.layer_norm", lambda x, w, b: F.layer_norm(x, (4,), w, b), lambda: leaves((2, 3, 4), (4,), (4,)), "LayerNormFunctionBackward"),
    ("F.rms_norm", lambda x, w: F.rms_norm(x, (4,), w, eps=1e-5), lambda: leaves((2, 3, 4), (4,)), "RMSNormFunctionBackward"),
    ("F.group_norm", lambda x, w, b: F.group_norm(x, 2, w, b), lambda: leaves((2, 4, 3), (4,), (4,)), "GroupNormFunctionBackward"),
    ("F.batch_norm", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
     lambda: leaves((5, 3), (3,), (3,)), "BatchNormFunctionBackward"),
    ("F.embedding", lambda w: F.embedding(torch.tensor([[0, 2], [3, 2]]), w, padding_idx=2), lambda: leaves((4, 3)),
     "EmbeddingFunctionBackward"),
    ("F.conv1d", lambda x, w, b: F.conv1d(x, w, b, padding=1), lambda: leaves((2, 3, 7), (4, 3, 3), (4,)), "ConvFunctionBackward"),
    ("F.conv2d same", lambda x, w: F.conv2d(x, w, padding="same"), lambda: leaves((1, 2, 5, 5), (3, 2, 2, 3)),
     "ConvFunctionBackward"),
    ("F.max_pool2d", lambda x: F.max_pool2d(x, 2, stride=1), lambda: leaves((1, 2, 4, 5)), "MaxPoolFunctionBackward"),
    ("F.avg_pool2d", lambda x: F.avg_pool2d(x, 2, padding=1), lambda: leaves((1, 2, 4, 5)), "AvgPoolFunctionBackward"),
    ("F.adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (2, 3)), lambda: leaves((1, 2, 5, 7)),
     "AdaptiveAvgPoolFunctionBackward"),
    ("F.sdpa causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
     lambda: leaves((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 4)), "ScaledDotProductAttentionFunctionBackward"),
    ("F.cross_entropy", lambda x: F.cross_entropy(x, torch.tensor([0, 2]), label_smoothing=0.1), x23,
     "CrossEntropyFunctionBackward"),
    ("F.nll_loss", lambda x: F.nll_loss(x, torch.tensor([0, 2]), reduction="sum"), x23, "NLLLossFunctionBackward"),
    ("F.mse_loss", lambda x, y: F.mse_loss(x, y), lambda: leaves((2, 3), (2, 3)), None),
    ("F.l1_loss", lambda x, y: F.l1_loss(x, y, reduction="none"), lambda: leaves((2, 3), (2, 3)), None),
    ("F.smooth_l1_loss", lambda x, y: F.smooth_l1_loss(x, y, beta=0.5), lambda: leaves((2, 3), (2, 3)), None),
    ("F.huber_loss", lambda x, y: F.huber_loss(x, y, delta=0.5), lambda: leaves((2, 3), (2, 3)), None),
    ("F.binary_cross_entropy", lambda x, t: F.binary_cross_entropy(torch.sigmoid(x), t),
     lambda: leaves((2, 3)) + [torch.rand(2, 3, dtype=torch.float64)], None),
    ("F.bce_with_logits", lambda x, y: F.binary_cross_entropy_with_logits(x, y), lambda: leaves((2, 3), (2, 3)), None),
    ("F.kl_div", lambda x, y: F.kl_div(x, y, reduction="batchmean", log_target=True), lambda: leaves((2, 3), (2, 3)), None),
    # torch-level functions and Tensor methods
    ("torch.softmax", lambda x: torch.softmax(x, 1), x234, "SoftmaxFunctionBackward"),
    ("torch.softmax kw", lambda x: torch.softmax(x, dim=-1, dtype=torch.float32), x234, "SoftmaxFunctionBackward"),
    ("Tensor.softmax", lambda x: x.softmax(-1), x234, "SoftmaxFunctionBackward"),
    ("Tensor.softmax kw", lambda x: x.softmax(dim=0), x234, "SoftmaxFunctionBackward"),
    ("torch.log_softmax", lambda x: torch.log_softmax(x, 2), x234, "LogSoftmaxFunctionBackward"),
    ("Tensor.log_softmax", lambda x: x.log_softmax(dim=1, dtype=torch.float64), x234, "LogSoftmaxFunctionBackward"),
    ("torch.tanh", lambda x: torch.tanh(x), x23, "TanhFunctionBackward"),
    ("Tensor.tanh", lambda x: x.tanh(), x23, "TanhFunctionBackward"),
    ("torch.sigmoid", lambda x: torch.sigmoid(input=x), x23, "SigmoidFunctionBackward"),
    ("Tensor.sigmoid", lambda x: x.sigmoid(), x23, "SigmoidFunctionBackward"),
    ("torch.relu", lambda x: torch.relu(x), x23, "ReLUFunctionBackward"),
    ("Tensor.relu", lambda x: x.relu(), x23, "ReLUFunctionBackward"),
    ("torch.matmul", lambda a, b: torch.matmul(a, b), lambda: leaves((2, 3, 4), (4, 5)), "MatmulFunctionBackward"),
    ("torch.matmul kw", lambda a, b: torch.matmul(input=a, other=b), lambda: leaves((4,), (4, 5)), "MatmulFunctionBackward"),
    ("Tensor.matmul", lambda a, b: a.matmul(b), lambda: leaves((3, 4), (4,)), "MatmulFunctionBackward"),
    ("operator @", lambda a, b: a @ b, lambda: leaves((2, 3, 4), (2, 4, 5)), "MatmulFunctionBackward"),
    ("Tensor.__rmatmul__", lambda a, b: b.__rmatmul__(a), lambda: leaves((3, 4), (4, 5)), "MatmulFunctionBackward"),
    ("torch.mm", lambda a, b: torch.mm(a, b), lambda: leaves((3, 4), (4, 5)), "ProductFunctionBackward"),
    ("Tensor.mm", lambda a, b: a.mm(mat2=b), lambda: leaves((3, 4), (4, 5)), "ProductFunctionBackward"),
    ("torch.bmm", lambda a, b: torch.bmm(a, b), lambda: leaves((2, 3, 4), (2, 4, 5)), "ProductFunctionBackward"),
    ("torch.addmm", lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2), lambda: leaves((5,), (3, 4), (4, 5)),
     "AddProductFunctionBackward"),
    ("Tensor.addmm", lambda c, a, b: c.addmm(a, b), lambda: leaves((3, 5), (3, 4), (4, 5)), "AddProductFunctionBackward"),
    ("torch.baddbmm", lambda c, a, b: torch.baddbmm(c, a, b, alpha=-1), lambda: leaves((1, 3, 5), (2, 3, 4), (2, 4, 5)),
     "AddProductFunctionBackward"),
    ("Tensor.baddbmm", lambda c, a, b: c.baddbmm(a, b, beta=2), lambda: leaves((2, 3, 5), (2, 3, 4), (2, 4, 5)),
     "AddProductFunctionBackward"),
    ("torch.layer_norm", lambda x, w, b: torch.layer_norm(x, [4], w, b, 1e-3, True), lambda: leaves((2, 3, 4), (4,), (4,)),
     "LayerNormFunctionBackward"),
    ("torch.group_norm", lambda x, w: torch.group_norm(x, 2, w, eps=1e-3), lambda: leaves((2, 4, 3), (4,)),
     "GroupNormFunctionBackward"),
    ("torch.batch_norm", lambda x, w, b: torch.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, False),
     lambda: leaves((5, 3, 2), (3,), (3,)), "BatchNormFunctionBackward"),
    ("torch.rms_norm", lambda x: torch.rms_norm(x, [3, 4]), x234, "RMSNormFunctionBackward"),
    ("torch.dropout", lambda x: torch.dropout(x, 1.0, train=True), x23, "DropoutFunctionBackward"),
    ("torch.embedding", lambda w: torch.embedding(w, torch.tensor([0, 3, 3, 1])), lambda: leaves((4, 3)),
     "EmbeddingFunctionBackward"),
    ("torch.embedding padding", lambda w: torch.embedding(w, torch.tensor([0, 3, 3, 1]), 3), lambda: leaves((4, 3)),
     "EmbeddingFunctionBackward"),
    # conv3d and the transposed convolutions (one block)
    ("F.conv3d", lambda x, w: F.conv3d(x, w, None, 2, 1), lambda: leaves((1, 2, 4, 3, 5), (3, 2, 2, 2, 3)),
     "ConvFunctionBackward"),
    ("F.conv_transpose2d", lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, 1, dilation=(1, 2)),
     lambda: leaves((2, 3, 4, 3), (3, 2, 3, 2), (2,)), "ConvTransposeFunctionBackward"),
    ("ConvTranspose1d output_size", lambda x, m=torch.nn.ConvTranspose1d(3, 2, 3, stride=2).double(): m(x, [10]),
     lambda: leaves((2, 3, 4)), "ConvTransposeFunctionBackward"),
    ("F.max_pool3d", lambda x: F.max_pool3d(x, 2, padding=1), lambda: leaves((1, 2, 3, 4, 3)),
     "MaxPool3dFunctionBackward"),
    # end of conv3d and the transposed convolutions
    # more pooling (one block)
    ("F.avg_pool3d", lambda x: F.avg_pool3d(x, 2, padding=1), lambda: leaves((1, 2, 3, 4, 3)), "AvgPool3dFunctionBackward"),
    ("F.adaptive_avg_pool3d", lambda x: F.adaptive_avg_pool3d(x, (2, 3, 2)), lambda: leaves((1, 2, 3, 4, 3)),
     "AdaptiveAvgPool3dFunctionBackward"),
    ("F.adaptive_max_pool1d", lambda x: F.adaptive_max_pool1d(x, 3), lambda: leaves((1, 2, 7)),
     "AdaptiveMaxPoolFunctionBackward"),
    ("F.adaptive_max_pool3d", lambda x: F.adaptive_max_pool3d(x, 2, True)[0], lambda: leaves((1, 2, 3, 4, 3)),
     "AdaptiveMaxPool3dFunctionBackward"),
    # (return_indices=True: torch's F.*_with_indices, routed too)
    ("F.max_pool2d indices", lambda x: F.max_pool2d(x, 2, return_indices=True)[0], lambda: leaves((1, 2, 4, 5)),
     "MaxPoolFunctionBackward"),
    ("F.adaptive_max_pool1d indices", lambda x: F.adaptive_max_pool1d(x, 3, True)[0], lambda: leaves((1, 2, 7)),
     "AdaptiveMaxPoolFunctionBackward"),
    ("F.lp_pool2d", lambda x: F.lp_pool2d(x, 2, 2), lambda: leaves((1, 2, 4, 5)), "LPPoolFunctionBackward"),
    ("LPPool3d", lambda x, m=torch.nn.LPPool3d(2, 2): m(x), lambda: leaves((1, 2, 3, 4, 3)),
     "LPPool3dFunctionBackward"),
    ("LPPool1d inf", lambda x, m=torch.nn.LPPool1d(float("inf"), 2): m(x), lambda: leaves((1, 2, 5)),
     "LPPoolInfFunctionBackward"),
    ("F.max_unpool2d", lambda x: F.max_unpool2d(x, torch.tensor([[[[0, 3], [9, 10]]]]), 2),
     lambda: leaves((1, 1, 2, 2)), "MaxUnpoolFunctionBackward"),
    ("F.fractional_max_pool2d", lambda x: F.fractional_max_pool2d(x, 2, 3, _random_samples=torch.rand(1, 2, 2,
     dtype=torch.float64, generator=torch.Generator().manual_seed(0))), lambda: leaves((1, 2, 5, 6)), "FractionalMaxPoolFunctionBackward"),
    ("F.fractional_max_pool3d indices", lambda x: F.fractional_max_pool3d(x, 2, 2, return_indices=True,
     _random_samples=torch.rand(1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0], lambda: leaves((1, 2, 4, 4, 5)),
     "FractionalMaxPoolFunctionBackward"),
    # end of more pooling
]


@pytest.mark.parametrize("fn, make, node", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_routed_call_matches_torch_and_records_the_manualgrad_node(fn, make, node):
    inputs = make()
    out_t, grads_t, names_t = run(fn, inputs, routed=False)
    out_m, grads_m, names_m = run(fn, inputs, routed=True)
    torch.testing.assert_close(out_m, out_t)
    for gm, gt in zip(grads_m, grads_t):
        torch.testing.assert_close(gm, gt)
    assert not names_t & mode_module._NODE_NAMES
    if node is not None:
        assert node in names_m, names_m
    else:  # losses: some manualgrad node, whichever Function the twin uses
        assert names_m & mode_module._NODE_NAMES, names_m


def test_routes_cover_the_functional_twins_and_the_torch_level_ops():
    table = routes()
    for name in MF.__all__:
        if hasattr(F, name):
            assert table[getattr(F, name)] is getattr(MF, name)
    T = torch.Tensor
    expected = {
        torch.softmax: MF.softmax, T.log_softmax: MF.log_softmax, T.tanh: MF.tanh, torch.sigmoid: MF.sigmoid,
        T.relu: MF.relu, torch.matmul: MF.matmul, T.__matmul__: MF.matmul, T.__rmatmul__: MF.matmul, T.mm: MF.mm,
        torch.bmm: MF.bmm, T.addmm: MF.addmm, torch.baddbmm: MF.baddbmm, torch.layer_norm: MF.layer_norm,
        torch.batch_norm: MF.batch_norm, torch.dropout: MF.dropout, torch.embedding: MF.embedding,
    }
    for fn, twin in expected.items():
        assert table[fn] is twin, fn
    # (torch.relu_ is F.relu_, whose twin manualgrad.functional.relu_ is: routed by name above)
    for inplace in (T.relu_, T.tanh_, T.sigmoid_, torch.dropout_, T.softmax.__call__):
        assert inplace not in table


def test_torch_dropout_in_training_uses_manualgrad_dropout_with_the_right_scale():
    x = torch.randn(200, dtype=torch.float64, requires_grad=True)
    with enable():
        y = torch.dropout(x, 0.25, True)
    assert "DropoutFunctionBackward" in node_names(y)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, kept.double() / 0.75)


# ---------------------------------------------------------------------------------------------
# fallbacks: anything not supported runs through torch unchanged


def test_a_twin_raising_not_implemented_falls_back_to_torch(monkeypatch):
    # (a stand-in twin: embedding's max_norm and sparse=True were the example until the twin did them)
    def twin(*args, **kwargs):
        raise NotImplementedError("an option this twin does not support")

    monkeypatch.setitem(mode_module._ROUTES, F.embedding, mode_module._Route(twin))
    idx, w = torch.tensor([0, 2, 2]), torch.randn(4, 3, requires_grad=True)
    with enable():
        y = F.embedding(idx, w)
    torch.testing.assert_close(y, w[idx])
    assert not manualgrad_nodes(y) and "EmbeddingBackward0" in node_names(y)


def test_embedding_max_norm_is_routed_and_renormalizes_like_torch():
    idx = torch.tensor([0, 2, 2])
    w_t = torch.randn(4, 3, requires_grad=True)
    w_m = w_t.detach().clone().requires_grad_()
    y_t = F.embedding(idx, w_t, max_norm=0.5)
    with enable():
        y_m = F.embedding(idx, w_m, max_norm=0.5)
    torch.testing.assert_close(y_m, y_t)
    torch.testing.assert_close(w_m, w_t)  # the rows rewritten in place
    assert manualgrad_nodes(y_m) == {"EmbeddingFunctionBackward"}


def test_embedding_sparse_is_routed_and_gives_a_sparse_gradient():
    w = torch.randn(4, 3, requires_grad=True)
    with enable():
        y = F.embedding(torch.tensor([1, 1]), w, sparse=True)
    assert manualgrad_nodes(y) == {"EmbeddingFunctionBackward"}
    y.sum().backward()
    assert w.grad.is_sparse
    torch.testing.assert_close(w.grad.to_dense(), torch.tensor([[0.0] * 3, [2.0] * 3, [0.0] * 3, [0.0] * 3]))


def test_out_argument_and_integer_inputs_run_through_torch(twin_calls):
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    out = torch.empty(3, 5)
    i, j = torch.randint(-5, 5, (3, 4)), torch.randint(-5, 5, (4, 2))
    with enable():
        torch.matmul(a, b, out=out)
        y = torch.tanh(a, out=torch.empty(3, 4))
        ij = i @ j
        s = torch.softmax(i, 1, dtype=torch.float32)
    torch.testing.assert_close(out, a @ b)
    torch.testing.assert_close(y, a.tanh())
    assert torch.equal(ij, i @ j) and ij.dtype == torch.int64
    torch.testing.assert_close(s, torch.softmax(i.float(), 1))
    assert twin_calls == []


def test_inplace_and_unlisted_ops_stay_torch_ops():
    x = torch.randn(3, 4, requires_grad=True)
    with enable():
        y = (x * 1).relu_().tanh_().exp()
        z = torch.softmax(x, 1).log()
    assert node_names(y) >= {"ExpBackward0", "TanhBackward0", "ReluBackward0"} and not manualgrad_nodes(y)
    assert {"LogBackward0", "SoftmaxFunctionBackward"} <= node_names(z)


def test_other_overloads_run_through_torch():
    # mm's out_dtype and addmm's deprecated positional beta/alpha are not the twin's forms
    c, a, b = torch.randn(3, 5), torch.randn(3, 4, requires_grad=True), torch.randn(4, 5)
    with enable(), pytest.warns(UserWarning, match="deprecated"):
        y = torch.addmm(0.5, c, 2, a, b)
    torch.testing.assert_close(y, 0.5 * c + 2 * a @ b)
    assert not manualgrad_nodes(y)


def test_converted_modules_under_the_mode_route_nothing_inside_their_functions(twin_calls):
    # A twin called directly (a converted Linear) runs its Function; the Function's forward
    # calls torch.addmm, which must not become a second, nested Function.
    model = manualgrad.convert(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()))
    with enable():
        y = model(torch.randn(2, 4))
    assert manualgrad_nodes(y) == {"LinearFunctionBackward", "TanhFunctionBackward"}
    assert twin_calls == []


# ---------------------------------------------------------------------------------------------
# torch's argument handling: bad calls fail as torch's do


def _routed(fn):
    def call(*args, **kwargs):
        with enable():
            return fn(*args, **kwargs)
    return call


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: torch.softmax(x),  # missing dim
        lambda x: x.softmax(dims=1),  # wrong keyword
        lambda x: torch.log_softmax(x, 1, torch.float32, 3),  # too many arguments
        lambda x: F.linear(x, x, bad=1),
        lambda x: torch.matmul(x),
        lambda x: x @ torch.randn(5, 2),  # shapes
        lambda x: torch.addmm(x, x, x, beta=1, gamma=2),
        lambda x: F.gelu(x, approximate="bad"),
        lambda x: F.softmax(x, 5),  # dim out of range
        lambda x: torch.layer_norm(x, [5]),
        lambda x: F.cross_entropy(x, torch.tensor([0, 9, 1])),  # class out of range
        lambda x: torch.embedding(x, torch.tensor([0.5])),  # float indices
    ],
    ids=["missing dim", "wrong keyword", "extra argument", "F wrong keyword", "missing other", "matmul shapes",
         "addmm keyword", "gelu approximate", "dim range", "layer_norm shape", "target range", "float indices"],
)
def test_bad_arguments_raise_what_torch_raises(fn):
    assert_raises_like_torch(_routed(fn), fn, torch.randn(3, 4))


# ---------------------------------------------------------------------------------------------
# nesting, re-entry, exceptions: the mode stack as before, routing once


@pytest.fixture
def twin_calls(monkeypatch):
    """Counts calls to the twins the mode routes to."""
    calls = []

    def counting(twin):
        def call(*args, **kwargs):
            calls.append(twin.__name__)
            return twin(*args, **kwargs)
        return call

    table = {fn: route._replace(twin=counting(route.twin)) for fn, route in mode_module._ROUTES.items()}
    monkeypatch.setattr(mode_module, "_ROUTES", table)
    return calls


def test_nested_enable_pushes_one_mode_and_routes_once(twin_calls):
    x = torch.randn(2, 3, requires_grad=True)
    before = len(_get_current_function_mode_stack())
    with enable():
        with enable():
            assert len(_get_current_function_mode_stack()) == before + 1
            y = F.gelu(x)
        assert len(_get_current_function_mode_stack()) == before + 1
        z = torch.tanh(y)
    assert len(_get_current_function_mode_stack()) == before
    assert twin_calls == ["gelu", "tanh"]
    assert manualgrad_nodes(z) == {"GELUFunctionBackward", "TanhFunctionBackward"}


def test_the_same_mode_object_entered_twice_routes_once(twin_calls):
    m = enable()
    before = len(_get_current_function_mode_stack())
    with m:
        with m:
            torch.sigmoid(torch.randn(3))
            assert len(_get_current_function_mode_stack()) == before + 1
        torch.relu(torch.randn(3))  # still on after the inner exit
        assert len(_get_current_function_mode_stack()) == before + 1
    assert len(_get_current_function_mode_stack()) == before
    torch.relu(torch.randn(3))  # off
    assert twin_calls == ["sigmoid", "relu"]


def test_an_exception_inside_restores_the_mode_stack():
    before = list(_get_current_function_mode_stack())
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with enable():
            with enable():
                torch.randn(2, 3) @ torch.randn(2, 3)
    assert list(_get_current_function_mode_stack()) == before
    y = torch.tanh(torch.randn(3, requires_grad=True))
    assert not manualgrad_nodes(y)


def test_enable_under_another_mode_and_leaves_module_state_alone():
    routes_before = dict(mode_module._ROUTES)

    class Log(torch.overrides.TorchFunctionMode):
        seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    with Log():
        with enable():
            y = F.silu(torch.randn(3, requires_grad=True))
    assert "SiLUFunctionBackward" in node_names(y)
    assert mode_module._ROUTES == routes_before


# ---------------------------------------------------------------------------------------------
# backward: the hand-written backward's torch calls are not re-routed


def test_backward_under_the_mode_does_not_reroute_the_backward_calls(twin_calls):
    x, w = leaves((4, 3), (5, 3))
    with enable():
        loss = F.gelu(x @ w.t()).softmax(-1).log().sum()
        forward_calls = list(twin_calls)
        loss.backward()
    assert forward_calls == ["matmul", "gelu", "softmax"]
    assert twin_calls == forward_calls  # nothing routed during backward


def test_a_manualgrad_backward_counts_as_inside_a_function(monkeypatch):
    # The engine names the running node; inside a manualgrad backward no call is routed, with
    # or without create_graph, whichever way the backward was entered.
    import manualgrad.ops.activation as act

    seen = []
    original = act.tanh_backward

    def spy(dy, y):
        seen.append(mode_module._inside_function())
        return original(dy, y)

    monkeypatch.setattr(act, "tanh_backward", spy)
    x = torch.randn(3, requires_grad=True)
    assert not mode_module._inside_function()
    MF.tanh(x).sum().backward()
    torch.autograd.grad(MF.tanh(x).sum(), x, create_graph=True)
    torch.func.grad(lambda t: MF.tanh(t).sum())(torch.randn(3))
    assert seen == [True, True, True]


def test_double_backward_gradient_penalty_matches_torch(twin_calls):
    def penalty(x, w):
        loss = F.cross_entropy(F.gelu(x @ w.t()), torch.tensor([0, 1, 4, 2]))
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        return loss + (g**2).sum()

    x, w = leaves((4, 3), (5, 3))
    ref = torch.autograd.grad(penalty(x, w), (x, w))
    with enable():
        total = penalty(x, w)
        routed_in_forward = len(twin_calls)
        got = torch.autograd.grad(total, (x, w))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    # routed: matmul, gelu, cross_entropy; none of the create_graph backward's products
    assert twin_calls[:3] == ["matmul", "gelu", "cross_entropy"] and routed_in_forward == 3
    assert len(twin_calls) == 3


# ---------------------------------------------------------------------------------------------
# torch.utils.checkpoint


def _block(w):
    return lambda x: F.gelu(F.linear(x, w)).softmax(-1) @ w


@pytest.mark.parametrize("how", ["context_fn", "enable inside"])
def test_non_reentrant_checkpoint_recomputes_with_the_mode_and_matches_torch(how):
    x, w = leaves((4, 3), (5, 3))
    block = _block(w)

    def inside(t):
        with enable():
            return block(t)

    def loss_fn(t):
        if how == "context_fn":
            return checkpoint(block, t, use_reentrant=False, context_fn=checkpoint_contexts).tanh().sum()
        return checkpoint(inside, t, use_reentrant=False).tanh().sum()

    ref = torch.autograd.grad(block(x).tanh().sum(), (x, w))
    with enable():
        loss = loss_fn(x)
        assert {"LinearFunctionBackward", "GELUFunctionBackward", "MatmulFunctionBackward"} <= manualgrad_nodes(loss)
        got = torch.autograd.grad(loss, (x, w))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    # backward outside the mode recomputes the same way
    got = torch.autograd.grad(loss_fn(x), (x, w))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_non_reentrant_checkpoint_without_the_recipe_is_refused_by_torch():
    # The mode is popped during backward, so a region routed in forward is recomputed with
    # torch's ops, which save other tensors: torch's own consistency check catches it.
    x, w = leaves((4, 3), (5, 3))
    with enable():
        loss = checkpoint(_block(w), x, use_reentrant=False).sum()
        with pytest.raises(torch.utils.checkpoint.CheckpointError):
            loss.backward()


def test_reentrant_checkpoint_under_the_mode_matches_torch():
    x, w = leaves((4, 3), (5, 3))
    ref = torch.autograd.grad(_block(w)(x).sum(), (x, w))
    with enable():
        checkpoint(_block(w), x, use_reentrant=True).sum().backward()  # reentrant: .backward() only
    for a, b in zip((x.grad, w.grad), ref):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# torch.compile and torch.func


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(6, 4))
        self.w2 = torch.nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        h = F.gelu(F.linear(x, self.w1))
        return torch.log_softmax(h @ self.w2.t(), -1)


@pytest.mark.parametrize("where", ["inside", "around"])
def test_compiled_function_under_the_mode_matches_eager(where, twin_calls):
    torch._dynamo.reset()
    model = _Tiny()
    x = torch.randn(5, 4)

    def step(x):
        with enable() if where == "inside" else contextlib.nullcontext():
            return model(x).sum()

    with enable():
        eager = step(x)
        eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(step, backend="aot_eager")
    del twin_calls[:]
    with enable() if where == "around" else contextlib.nullcontext():
        loss = compiled(x)
    assert twin_calls == ["linear", "gelu", "matmul", "log_softmax"]  # Dynamo traced the routing
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_vmap_of_grad_under_the_mode_matches_a_loop(twin_calls):
    model = _Tiny().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs, ys = torch.randn(3, 2, 4, dtype=torch.float64), torch.tensor([[0, 2], [1, 1], [2, 0]])

    def loss(p, x, y):
        return F.nll_loss(torch.func.functional_call(model, p, (x,)), y)

    with enable():
        batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    assert twin_calls == ["linear", "gelu", "matmul", "log_softmax", "nll_loss"]
    for i in range(3):
        one = torch.func.grad(loss)(params, xs[i], ys[i])  # torch's ops, one sample at a time
        for k in params:
            torch.testing.assert_close(batched[k][i], one[k])


def test_grad_under_the_mode_routes_through_manualgrad(twin_calls):
    x = torch.randn(3, dtype=torch.float64)
    with enable():
        g = torch.func.grad(lambda t: torch.tanh(t).sum())(x)
    torch.testing.assert_close(g, 1 - x.tanh() ** 2)
    assert twin_calls == ["tanh"]


def test_a_functional_passing_out_none_is_routed_and_a_real_out_is_not():
    # F.normalize hands its explicit out=None on to __torch_function__: that is no out= at all
    x = torch.randn(3, 4, requires_grad=True)
    with enable():
        y = F.normalize(x, dim=1)
    assert type(y.grad_fn).__name__ == "NormalizeFunctionBackward"
    torch.testing.assert_close(y, F.normalize(x, dim=1))
    out = torch.empty(3, 4)
    with enable():
        F.normalize(x.detach(), dim=1, out=out)  # torch's out= path: writes into out
    torch.testing.assert_close(out, F.normalize(x.detach(), dim=1))
