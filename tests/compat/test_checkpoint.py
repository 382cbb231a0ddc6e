"""torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) around converted blocks.

Under checkpointing a block's forward runs twice: once with its saved tensors dropped, again
in backward to rebuild them. Non-reentrant checkpoint checks (``determinism_check="default"``)
that the recomputation saves tensors of the same shapes, dtypes and devices, and restores the
RNG state so random ops (dropout) draw the same numbers again.

What holds, for an MLP block with dropout, a pre-norm transformer block (layer norm,
MultiheadAttention or manualgrad's scaled_dot_product_attention, GELU MLP) and a conv +
batch-norm block in training mode: the output and every gradient (input and parameters) of the
checkpointed converted block equal those of the converted block without checkpoint and of
torch's block with and without checkpoint. Batch-norm running statistics, which the
recomputation updates a second time, end where torch's end under the same checkpointing.
"""
import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.utils.checkpoint import checkpoint

import manualgrad
import manualgrad.functional as MF
from benchmarks.models import DecoderBlock
from tests.compat._models import converted_pair

torch.set_num_threads(1)
RTOL, ATOL = 1e-4, 1e-5


class SDPABlock(nn.Module):
    """Pre-norm block with a functional attention: x + proj(sdpa(qkv(ln1(x)))), then x + mlp(ln2(x)).

    ``sdpa`` is torch's or manualgrad's scaled_dot_product_attention; convert cannot reach a
    functional call, so the converted copy is handed manualgrad's."""

    def __init__(self, d=16, heads=2, sdpa=TF.scaled_dot_product_attention, dropout_p=0.0):
        super().__init__()
        self.heads, self.sdpa, self.dropout_p = heads, sdpa, dropout_p
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        n, t, d = x.shape
        # (N, T, 3d) -> 3 x (N, heads, T, d / heads)
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = self.sdpa(q, k, v, is_causal=True, dropout_p=self.dropout_p if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.ln2(x))


def mlp_block():
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Dropout(0.3), nn.Linear(24, 12), nn.ReLU())


def conv_bn_block():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))


def _sdpa_pair():
    theirs = SDPABlock()
    ours = manualgrad.convert(copy.deepcopy(theirs), strict=True)
    ours.sdpa = MF.scaled_dot_product_attention
    return ours, theirs


BLOCKS = {
    # name: (() -> (ours, theirs), input shape)
    "mlp_dropout": (lambda: converted_pair(mlp_block()), (5, 12)),
    "mha_block": (lambda: converted_pair(DecoderBlock(16, 2, ctx=8)), (3, 7, 16)),
    "sdpa_block": (_sdpa_pair, (3, 7, 16)),
    "conv_bn_train": (lambda: converted_pair(conv_bn_block()), (4, 3, 6, 6)),
}


def _run(block, x, dy, use_checkpoint):
    """Output and {name: gradient} (input as 'input') of one forward/backward, from a fixed RNG state."""
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1234)  # the same dropout draws for every run
    if use_checkpoint:
        out = checkpoint(block, x, use_reentrant=False, determinism_check="default")
    else:
        out = block(x)
    out.backward(dy)
    grads = {"input": x.grad}
    grads.update((n, p.grad) for n, p in block.named_parameters())
    return out.detach(), grads


def _assert_same(actual, expected, what):
    (out_a, grads_a), (out_e, grads_e) = actual, expected
    torch.testing.assert_close(out_a, out_e, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} output: {m}")
    assert grads_a.keys() == grads_e.keys()
    for name, g in grads_e.items():
        assert g is not None and grads_a[name] is not None, f"{what}: no gradient for {name}"
        torch.testing.assert_close(grads_a[name], g, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.mark.parametrize("name", list(BLOCKS))
def test_checkpointed_converted_block_gives_torchs_gradients_with_and_without_checkpoint(name):
    make, shape = BLOCKS[name]
    ours, theirs = make()
    x = torch.randn(shape)
    dy = torch.randn_like(theirs(x))
    # buffers (batch-norm running stats) restart from the same state for every run
    ours_start, theirs_start = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())

    runs = {}
    for label, block, start in (("ours", ours, ours_start), ("torch", theirs, theirs_start)):
        for ckpt in (False, True):
            block.load_state_dict(start)
            runs[label, ckpt] = _run(block, x, dy, ckpt)

    _assert_same(runs["ours", True], runs["torch", True], "checkpointed vs torch checkpointed")
    _assert_same(runs["ours", True], runs["ours", False], "checkpointed vs not")
    _assert_same(runs["ours", True], runs["torch", False], "checkpointed vs torch not checkpointed")


def test_batchnorm_running_stats_under_checkpoint_update_twice_as_torchs_do():
    ours, theirs = converted_pair(conv_bn_block())
    plain = copy.deepcopy(theirs)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(2):
        for block in (ours, theirs):
            checkpoint(block, x, use_reentrant=False).sum().backward()
        plain(x).sum().backward()
    bn, ref = ours[1], theirs[1]
    # the recomputation in backward is a second forward in training mode: two updates a step
    assert ref.num_batches_tracked.item() == 4 and bn.num_batches_tracked.item() == 4
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=RTOL, atol=ATOL)
    # ...which is not where two plain steps leave them, or the comparison above says little
    assert plain[1].num_batches_tracked.item() == 2
    assert not torch.allclose(plain[1].running_mean, ref.running_mean, rtol=RTOL, atol=ATOL)


def test_checkpoint_restores_the_dropout_draws_of_manualgrad_sdpa():
    """sdpa's attention dropout draws from torch's generator: the recomputation,
    run from the restored RNG state, must rebuild the very mask forward used."""
    block = SDPABlock(sdpa=MF.scaled_dot_product_attention, dropout_p=0.5)
    manualgrad.convert(block, strict=True)
    x = torch.randn(2, 5, 16)
    dy = torch.randn(2, 5, 16)
    _assert_same(_run(block, x, dy, True), _run(block, x, dy, False), "sdpa dropout checkpointed vs not")
    # the mask matters: another draw gives other gradients
    torch.manual_seed(99)
    block.zero_grad(set_to_none=True)
    x2 = x.clone().requires_grad_(True)
    block(x2).backward(dy)
    assert not torch.allclose(x2.grad, _run(block, x, dy, False)[1]["input"], rtol=RTOL, atol=ATOL)


def test_checkpoint_debug_mode_runs_converted_blocks():
    """debug=True records the forward's op trace for a determinism failure; it must not
    trip on manualgrad's Functions."""
    ours, theirs = converted_pair(DecoderBlock(16, 2, ctx=8))
    x = torch.randn(2, 6, 16)
    dy = torch.randn(2, 6, 16)
    outs = []
    for block in (ours, theirs):
        xx = x.clone().requires_grad_(True)
        out = checkpoint(block, xx, use_reentrant=False, debug=True)
        out.backward(dy)
        outs.append(xx.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=RTOL, atol=ATOL)
