"""manualgrad.lean(): the same gradients, bit for bit, from less memory kept for backward.

Every model runs twice from the same parameters, inputs and RNG state, once plainly and once
with the forward inside lean(); the gradients must be torch.equal. What each op keeps comes from
testing.saved_bytes_by_op, and the difference is checked against a count of bytes worked out by
hand (the tensors lean recomputes instead of keeping).
"""
import weakref

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import manualgrad as mg
import manualgrad.functional as MF
import manualgrad.nn as mnn
from benchmarks.models import gpt_small, resnet_small
from manualgrad import memory
from manualgrad.testing import saved_bytes, saved_bytes_by_op
from tests.ports import leave, spawn
from train.models import seed_mlp

F32 = 4  # bytes per float32 element


def _run(model, args, lean, loss=None, seed=1):
    """(per-op saved bytes, parameter gradients) of one forward + backward, the forward under lean()
    or not, from RNG state ``seed`` (dropout draws the same masks in both runs)."""
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    torch.manual_seed(seed)
    with mg.lean() if lean else torch.enable_grad():
        per_op, out = saved_bytes_by_op(model, *args, exclude=params)
    (out if loss is None else loss(out)).backward()
    return per_op, [p.grad.clone() for p in params]


def _compare(model, args, loss=None):
    """Run plain and lean; assert bit-identical gradients; return the two per-op byte counts."""
    plain, g_plain = _run(model, args, False, loss)
    lean, g_lean = _run(model, args, True, loss)
    assert len(g_plain) == len(g_lean)
    for i, (a, b) in enumerate(zip(g_plain, g_lean)):
        assert torch.equal(a, b), f"gradient of parameter {i} differs under lean(): max |diff| {(a - b).abs().max()}"
    return plain, lean


def _only_difference(plain, lean, op, nbytes):
    """lean keeps ``nbytes`` fewer, all of them at ``op``; every other op keeps the same."""
    assert plain[op] - lean.get(op, 0) == nbytes, (op, plain[op], lean.get(op, 0), nbytes)
    assert {k: v for k, v in plain.items() if k != op} == {k: v for k, v in lean.items() if k != op}


def _mean_square(out):
    return out.square().mean()


# ---------------------------------------------------------------------------------------------
# models

def test_seed_mlp_keeps_the_same_and_gives_the_same_gradients():
    # Linear -> ReLU -> Linear: relu keeps its output, which the next Linear keeps too (one storage);
    # nothing is tagged (relu's input comes from a Linear), so lean() changes nothing
    model = seed_mlp(in_features=20, width=24, depth=3)
    plain, lean = _compare(model, (torch.randn(5, 20),), _mean_square)
    assert plain == lean


@pytest.mark.parametrize("training", [True, False])
def test_resnet_recomputes_relu_of_batch_norm(training):
    # (in eval, batch_norm normalizes with the running statistics, which its recipe then keeps)
    torch.manual_seed(0)
    model = mg.convert(resnet_small(), strict=True).train(training)
    n = 4
    plain, lean = _compare(model, (torch.randn(n, 3, 16, 16),), _mean_square)
    # relu(bn(conv(x))) in place: the relu output (kept by relu, and by the next conv / max pool) is
    # recomputed from the conv output batch_norm keeps. Three of them: the stem (16 ch, 16 x 16),
    # block 1's first (16 ch, 8 x 8) and block 2's first (32 ch, 4 x 4); the relu after each residual
    # add has an untagged input and is kept.
    expected = n * (16 * 16 * 16 + 16 * 8 * 8 + 32 * 4 * 4) * F32
    _only_difference(plain, lean, "ReLUFunctionBackward", expected)
    assert sum(lean.values()) / sum(plain.values()) < 0.75


def test_gpt_recomputes_layer_norm_and_gelu_outputs():
    torch.manual_seed(0)
    n, t, d, layers = 3, 16, 32, 2
    model = mg.convert(gpt_small(vocab=64, d=d, heads=4, layers=layers, ctx=t), strict=True)
    args = (torch.randint(0, 64, (n, t)), torch.randint(0, 64, (n, t)))
    plain, lean = _compare(model, args)
    # per layer the inputs of three Linears: ln1's output (the packed in-projection's, through a
    # transpose), ln2's (fc1's) and GELU's (fc2's, 4 d wide); then ln_f's (the LM head's)
    expected = (layers * (d + d + 4 * d) + d) * n * t * F32
    _only_difference(plain, lean, "LinearFunctionBackward", expected)
    assert sum(lean.values()) / sum(plain.values()) < 0.70


def _rope(x, cos, sin):
    # rotary embedding: x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]   (N, H, T, hd)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class LlamaBlock(nn.Module):
    """x + Wo attn(rope(Wq h), rope(Wk h), Wv h), h = rmsnorm(x); then x + W2 (silu(W1 h) * W3 h)."""

    def __init__(self, d, heads, hidden, ctx):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = mnn.RMSNorm(d), mnn.RMSNorm(d)
        self.wq, self.wk, self.wv, self.wo = (mnn.Linear(d, d, bias=False) for _ in range(4))
        self.w1, self.w3 = mnn.Linear(d, hidden, bias=False), mnn.Linear(d, hidden, bias=False)
        self.w2 = mnn.Linear(hidden, d, bias=False)
        hd = d // heads
        freq = 10000.0 ** (-torch.arange(0, hd, 2) / hd)
        angle = torch.outer(torch.arange(ctx).float(), freq).repeat(1, 2)  # (T, hd)
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, x):
        n, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (w(h).view(n, t, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        cos, sin = self.cos[:t], self.sin[:t]
        a = MF.scaled_dot_product_attention(_rope(q, cos, sin), _rope(k, cos, sin), v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(n, t, d))
        h = self.norm2(x)
        return x + self.w2(MF.silu(self.w1(h)) * self.w3(h))


def test_llama_block_recomputes_rms_norm_and_silu_outputs():
    torch.manual_seed(0)
    n, t, d, hidden = 2, 8, 16, 40
    model = LlamaBlock(d, heads=2, hidden=hidden, ctx=t)
    plain, lean = _compare(model, (torch.randn(n, t, d),), _mean_square)
    # the two RMSNorm outputs (kept by Wq/Wk/Wv and by W1/W3), and silu's output (kept by the product)
    assert plain["LinearFunctionBackward"] - lean["LinearFunctionBackward"] == 2 * n * t * d * F32
    assert plain["MulBackward0"] - lean["MulBackward0"] == n * t * hidden * F32
    rest = lambda per_op: {k: v for k, v in per_op.items() if k not in ("LinearFunctionBackward", "MulBackward0")}
    assert rest(plain) == rest(lean)


@pytest.mark.parametrize("inplace", [False, True])
def test_dropout_after_gelu_is_recomputed_from_the_kept_mask(inplace):
    torch.manual_seed(0)
    n, hidden = 6, 40
    model = nn.Sequential(mnn.Linear(10, hidden), mnn.GELU(), mnn.Dropout(0.3, inplace=inplace), mnn.Linear(hidden, 3))
    plain, lean = _compare(model, (torch.randn(n, 10),), _mean_square)
    # the last Linear's input, dropout(gelu(x)), is recomputed from gelu's input and dropout's mask
    _only_difference(plain, lean, "LinearFunctionBackward", n * hidden * F32)


def test_transformer_layer_with_dropout_gives_the_same_gradients():
    # attention dropout (the mask redrawn from the generator state) and feed-forward dropout on
    # relu(linear1(x)): the same draws under the same seed, the same gradients
    torch.manual_seed(0)
    layer = mg.convert(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.2, batch_first=True),
                       strict=True)
    plain, lean = _compare(layer, (torch.randn(3, 7, 16),), _mean_square)
    assert sum(lean.values()) < sum(plain.values())


# ---------------------------------------------------------------------------------------------
# saved_bytes_by_op, and single ops

def test_linear_after_gelu_keeps_no_extra_bytes():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    f = lambda: MF.linear(MF.gelu(x), w)
    plain, _ = saved_bytes_by_op(f, exclude=[w])
    with mg.lean():
        lean, _ = saved_bytes_by_op(f, exclude=[w])
    # gelu keeps x (4 x 8 floats); the Linear keeps gelu's output too, or under lean() nothing new
    assert plain == {"GELUFunctionBackward": 4 * 8 * F32, "LinearFunctionBackward": 4 * 8 * F32}
    assert lean == {"GELUFunctionBackward": 4 * 8 * F32}
    with mg.lean():
        assert saved_bytes(f, exclude=[w])[0] == 4 * 8 * F32


def test_saved_bytes_by_op_sums_to_saved_bytes():
    torch.manual_seed(0)
    model = mg.convert(gpt_small(vocab=64, d=32, heads=4, layers=1, ctx=8), strict=True)
    args = (torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    params = list(model.parameters())
    for region in (torch.enable_grad, mg.lean):
        with region():
            assert sum(saved_bytes_by_op(model, *args, exclude=params)[0].values()) == \
                saved_bytes(model, *args, exclude=params)[0]


def test_recipes_keep_nothing_alive_and_live_as_long_as_their_tensor():
    x = torch.randn(3, 4, requires_grad=True)
    assert memory.recipe_of(MF.gelu(x)) is None  # outside lean(): no recipe
    with mg.lean(), torch.no_grad():
        h = x * 2
        y = MF.gelu(h)
        gone = weakref.ref(h)
        del h
        assert gone() is None  # the recipe of y does not keep gelu's input alive
    with mg.lean():
        y = MF.gelu(x)
        assert memory.recipe_of(y) is not None
    del y
    assert len(memory._recipes) == 0


def test_a_tensor_changed_in_place_after_tagging_is_kept_as_it_is():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(2, 4, requires_grad=True)

    def f():
        y = MF.gelu(x)
        y.mul_(2)  # no longer gelu(x): its recipe no longer applies
        return MF.linear(y, w).square().sum()

    expected = torch.autograd.grad(f(), (x, w))
    with mg.lean():
        loss = f()
    for a, b in zip(torch.autograd.grad(loss, (x, w)), expected):
        assert torch.equal(a, b)


def test_a_saved_tensor_changed_in_place_raises_as_without_lean():
    a = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(2, 4, requires_grad=True)
    for region in (torch.enable_grad, mg.lean):
        with region():
            h = a * 2
            z = MF.linear(h, w)
            h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.sum().backward()


# ---------------------------------------------------------------------------------------------
# with the rest of torch: double backward, checkpoint, autocast, enable(), compile

def _gpt():
    torch.manual_seed(0)
    model = mg.convert(gpt_small(vocab=64, d=32, heads=4, layers=2, ctx=16), strict=True)
    return model, (torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16)))


def _grads(model, loss_fn, lean):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with mg.lean() if lean else torch.enable_grad():
        loss = loss_fn()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _assert_equal(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs"


@pytest.mark.parametrize("backward_inside", [False, True])
def test_double_backward_gives_the_same_gradients(backward_inside):
    # a gradient penalty: create_graph=True recomputes with grad mode on, so the recomputed tensors
    # are differentiable functions of the kept ones
    model, args = _gpt()
    params = list(model.parameters())

    def penalty(lean):
        model.zero_grad(set_to_none=True)
        with mg.lean() if lean else torch.enable_grad():
            loss = model(*args)
            if backward_inside:
                g = torch.autograd.grad(loss, params, create_graph=True)
        if not backward_inside:
            g = torch.autograd.grad(loss, params, create_graph=True)
        sum(t.square().sum() for t in g).backward()
        return [t.detach() for t in g] + [p.grad.clone() for p in params]

    _assert_equal(penalty(False), penalty(True))


def _blocks_checkpointed(model, args, lean_inside=False):
    idx, targets = args
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1]))

    def block(b, x):
        with mg.lean() if lean_inside else torch.enable_grad():
            return b(x)

    for b in model.blocks:
        x = cp.checkpoint(block, b, x, use_reentrant=False)
    return model.loss_fn(model.lm_head(model.ln_f(x)).flatten(0, 1), targets.flatten())


def test_checkpoint_inside_and_around_lean_gives_the_same_gradients():
    model, args = _gpt()
    expected = _grads(model, lambda: model(*args), False)
    _assert_equal(_grads(model, lambda: _blocks_checkpointed(model, args), True), expected)
    _assert_equal(_grads(model, lambda: _blocks_checkpointed(model, args, lean_inside=True), False), expected)


def test_autocast_gives_the_same_gradients():
    model, args = _gpt()

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(*args)

    _assert_equal(_grads(model, loss, True), _grads(model, loss, False))


def test_enable_mode_keeps_less_and_gives_the_same_gradients():
    torch.manual_seed(0)
    model = gpt_small(vocab=64, d=32, heads=4, layers=2, ctx=16)  # torch.nn layers, routed by enable()
    args = (torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16)))
    with mg.enable():
        plain, lean = _compare(model, args)
    assert sum(lean.values()) < 0.7 * sum(plain.values())


def test_compile_without_graph_breaks_gives_the_same_gradients():
    torch.manual_seed(0)
    # (with dropout: the same seed in both runs, the same masks)
    model = nn.Sequential(mnn.Linear(16, 32), mnn.LayerNorm(32), mnn.ReLU(), mnn.Dropout(0.2), mnn.Linear(32, 64),
                          mnn.GELU(), mnn.Dropout(0.2), mnn.Linear(64, 4))
    x = torch.randn(8, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    # (against the compiled model without lean(): the compiled graph rounds like itself, not like eager)
    expected = _grads(model, lambda: compiled(x).square().mean(), False)
    _assert_equal(_grads(model, lambda: compiled(x).square().mean(), True), expected)


def test_a_tensor_saved_by_several_ops_is_recomputed_once(monkeypatch):
    # the Q, K and V projections all keep rms_norm's output: one recipe, run once in backward
    from manualgrad.ops import normalization

    calls = []
    forward = normalization.rms_norm_forward
    monkeypatch.setattr(normalization, "rms_norm_forward", lambda *a: calls.append(1) or forward(*a))
    x = torch.randn(4, 8, requires_grad=True)
    ws = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    with mg.lean():
        h = MF.rms_norm(x, (8,))
        loss = sum(MF.linear(h, w).square().sum() for w in ws)
    del h
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2  # the forward, and one recomputation for the three


@pytest.mark.parametrize("transposed", [False, True])
def test_a_large_dropout_mask_is_redrawn_from_the_generator_state(transposed):
    # 64 x 1024 elements: the packed mask (8192 bytes) is larger than the generator's state
    # (5056 bytes), so lean() keeps the state and backward redraws the mask from it
    torch.manual_seed(0)
    n, hidden = 64, 1024
    first, last = mnn.Linear(10, hidden), mnn.Linear(hidden, 3)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.last = first, last

        def forward(self, x):
            h = MF.gelu(self.first(x))
            if transposed:  # a mask laid out like a non-contiguous input
                return self.last(MF.dropout(h.t(), 0.3).t())
            return self.last(MF.dropout(h, 0.3))

    plain, lean = _compare(Block(), (torch.randn(n, 10),), _mean_square)
    assert plain["DropoutFunctionBackward"] == n * hidden // 8
    assert lean["DropoutFunctionBackward"] == 5056
    assert plain["LinearFunctionBackward"] - lean["LinearFunctionBackward"] == n * hidden * F32


def test_a_graph_never_backpropagated_is_freed():
    # tanh keeps its own output: kept as it is (with its grad_fn), that would be a reference cycle
    # through the graph, alive after the last reference to the loss is gone
    x = torch.randn(100, requires_grad=True)
    with mg.lean():
        y = MF.tanh(x * 2)
        loss = (y * 3).sum()
    gone = weakref.ref(y)
    del y, loss
    assert gone() is None


@pytest.mark.parametrize("producer", ["gelu", "layer_norm", "batch_norm_relu"])
def test_a_recomputed_tensor_is_not_held_after_the_forward(producer):
    # the point of lean(): with no other hooks around (saved_bytes' would be), the tensor the next
    # op would have kept is freed as soon as the forward lets go of it, and backward still works
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(3, 6, requires_grad=True)
    with mg.lean():
        if producer == "gelu":
            h = MF.gelu(x * 2)
        elif producer == "layer_norm":
            h = MF.layer_norm(x * 2, (6,))
        else:
            h = MF.relu(MF.batch_norm(x * 2, None, None, training=True), inplace=True)
        loss = MF.linear(h, w).square().sum()
    storage = StorageWeakRef(h.untyped_storage())  # the memory, not the Python object
    del h
    assert storage.expired()
    loss.backward()
    assert x.grad is not None


def _ddp_worker(rank, port, state, x, outdir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _ln_gelu_mlp()
    model.load_state_dict(state)
    ddp = DDP(model)
    grads = []
    for lean in (False, True):
        ddp.zero_grad(set_to_none=True)
        with mg.lean() if lean else torch.enable_grad():
            loss = ddp(x.chunk(2)[rank]).square().mean()
        loss.backward()  # DDP's all-reduce hooks run as the recomputed tensors come back
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.save(grads, f"{outdir}/rank{rank}.pt")
    leave()


def _ln_gelu_mlp():
    return nn.Sequential(mnn.Linear(6, 16), mnn.LayerNorm(16), mnn.Linear(16, 32), mnn.GELU(), mnn.Linear(32, 3))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch built without the gloo backend")
def test_ddp_gives_the_same_gradients(tmp_path):
    torch.manual_seed(0)
    state, x = _ln_gelu_mlp().state_dict(), torch.randn(8, 6)
    spawn(_ddp_worker, (state, x, str(tmp_path)))
    for rank in range(2):
        plain, lean = torch.load(tmp_path / f"rank{rank}.pt")
        _assert_equal(lean, plain)
