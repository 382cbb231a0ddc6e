"""Whole models converted with manualgrad.convert(strict=True) against the same torch.nn models:
a ResNet-style CNN and a GPT-style decoder (benchmarks/models.py), in float32.

What holds: the loss and every parameter gradient match torch (rtol 1e-4, atol 1e-5) over a
few SGD steps; batch-norm running statistics follow torch's; eval-mode outputs match after
training; and the converted graphs hold no torch compute node, only manualgrad Functions
and structural nodes (views, the residual add, gradient accumulation).
"""
import copy

import pytest
import torch

import manualgrad
from manualgrad.coverage import graph_nodes
from benchmarks.models import gpt_small, resnet_small

RTOL, ATOL = 1e-4, 1e-5

# torch backward nodes that only move, reshape, add or accumulate: allowed in a converted graph.
STRUCTURAL = {
    "AccumulateGrad",
    "AddBackward0",  # residual adds, token + position embedding
    "TBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "ExpandBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "UnsqueezeBackward0",
    "UnflattenBackward0",
    "UnbindBackward0",
    "CloneBackward0",  # .contiguous()
    "SliceBackward0",
    "SplitBackward0",
}
# torch nodes that do a layer's real work: none may remain after convert.
HEAVY = {
    "MmBackward0",
    "AddmmBackward0",
    "BmmBackward0",
    "ConvolutionBackward0",
    "NativeLayerNormBackward0",
    "NativeBatchNormBackward0",
    "CudnnBatchNormBackward0",
    "SoftmaxBackward0",
    "LogSoftmaxBackward0",
    "NllLossBackward0",
    "EmbeddingBackward0",
    "GeluBackward0",
    "ReluBackward0",
    "ThresholdBackward0",
    "MaxPool2DWithIndicesBackward0",
    "AdaptiveAvgPool2DBackward0",
    "MeanBackward1",
    "ScaledDotProductFlashAttentionForCpuBackward0",
    "ScaledDotProductEfficientAttentionBackward0",
    "ScaledDotProductAttentionBackward0",
}


def _resnet_case():
    model = resnet_small()
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(3)]
    return model, torch.nn.CrossEntropyLoss(), batches


def _gpt_case():
    model = gpt_small(vocab=64, d=32, heads=4, layers=2, ctx=16)
    # odd length (13 < ctx) so the mask is sliced, as in generation with a shorter prompt
    batches = [(torch.randint(0, 64, (3, 13)), torch.randint(0, 64, (3, 13))) for _ in range(3)]
    return model, None, batches


CASES = {"resnet": _resnet_case, "gpt": _gpt_case}


def _loss(model, loss_fn, x, y):
    return loss_fn(model(x), y) if loss_fn is not None else model(x, y)


def _converted_pair(case):
    """(converted, torch) copies of one freshly built model, the loss and the batches."""
    model, loss_fn, batches = CASES[case]()
    theirs = model
    ours = manualgrad.convert(copy.deepcopy(model), strict=True)
    loss_ours = manualgrad.convert(copy.deepcopy(loss_fn), strict=True) if loss_fn is not None else None
    return ours, theirs, loss_ours, loss_fn, batches


def _graph_nodes(root):
    """Every backward node reachable from root (a grad_fn), each once."""
    return graph_nodes([root])


def _is_manualgrad_function(node):
    cls = getattr(node, "_forward_cls", None)  # set on the backward node of a custom autograd.Function
    return cls is not None and cls.__module__.startswith("manualgrad.")


@pytest.mark.parametrize("case", list(CASES))
def test_convert_strict_swaps_every_layer(case):
    model, _, _ = CASES[case]()
    manualgrad.convert(model, strict=True)  # raises NotImplementedError naming any layer left
    twins = set(manualgrad.supported_modules())
    left = [name for name, m in model.named_modules() if type(m) in twins]
    assert not left, f"still torch classes after convert: {left}"


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_every_gradient_match_torch_over_sgd_steps(case):
    ours, theirs, loss_ours, loss_theirs, batches = _converted_pair(case)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, theirs)]
    for step, (x, y) in enumerate(batches):
        losses = []
        for model, loss_fn, opt in zip((ours, theirs), (loss_ours, loss_theirs), opts):
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, loss_fn, x, y)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step} loss: {m}")
        th = dict(theirs.named_parameters())
        mg = dict(ours.named_parameters())
        assert mg.keys() == th.keys()
        for name, p in th.items():
            assert p.grad is not None and mg[name].grad is not None, f"step {step}: no gradient for {name}"
            torch.testing.assert_close(
                mg[name].grad, p.grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"step {step} grad {n}: {m}"
            )
        for opt in opts:
            opt.step()


def test_gpt_lm_head_stays_tied_after_convert():
    ours, _, _, _, _ = _converted_pair("gpt")
    assert ours.lm_head.weight is ours.tok_emb.weight


def test_resnet_batchnorm_running_stats_and_eval_outputs_follow_torch():
    ours, theirs, loss_ours, loss_theirs, batches = _converted_pair("resnet")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for x, y in batches:
        for model, loss_fn, opt in zip((ours, theirs), (loss_ours, loss_theirs), opts):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
    bns = [(n, m) for n, m in theirs.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 6
    mg = dict(ours.named_modules())
    for name, bn in bns:
        assert torch.equal(mg[name].num_batches_tracked, bn.num_batches_tracked), name
        assert bn.num_batches_tracked.item() == len(batches)
        # the running stats must have moved off their (0, 1) init, or the comparison says nothing
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)), name
        # after the first step the weights differ by gradient rounding, so the stats by as much
        torch.testing.assert_close(
            mg[name].running_mean, bn.running_mean, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}.running_mean: {m}"
        )
        torch.testing.assert_close(
            mg[name].running_var, bn.running_var, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}.running_var: {m}"
        )
    ours.eval()
    theirs.eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=RTOL, atol=ATOL)
    # eval really uses the running stats: train mode gives different outputs on this batch
    ours.train()
    with torch.no_grad():
        assert not torch.allclose(ours(x), out_ours, rtol=RTOL, atol=ATOL)


def test_resnet_batchnorm_running_stats_equal_torch_bit_for_bit_on_one_forward():
    """Same weights, one forward in training mode: the running-stat update is torch's exactly."""
    ours, theirs, _, _, batches = _converted_pair("resnet")
    x, _ = batches[0]
    with torch.no_grad():
        ours(x), theirs(x)
    mg = dict(ours.named_buffers())
    for name, buf in theirs.named_buffers():
        assert torch.equal(mg[name], buf), f"{name}: max diff {(mg[name].double() - buf.double()).abs().max().item()}"


@pytest.mark.parametrize("case", list(CASES))
def test_converted_graph_has_only_manualgrad_functions_and_structural_nodes(case):
    ours, theirs, loss_ours, loss_theirs, batches = _converted_pair(case)
    x, y = batches[0]

    torch_nodes = {type(n).__name__ for n in _graph_nodes(_loss(theirs, loss_theirs, x, y).grad_fn)}
    # the walk sees torch's heavy nodes in the unconverted model, so it would see any left in ours
    assert torch_nodes & HEAVY, f"no heavy node found in torch's own graph: {sorted(torch_nodes)}"

    nodes = _graph_nodes(_loss(ours, loss_ours, x, y).grad_fn)
    functions = {type(n).__name__ for n in nodes if _is_manualgrad_function(n)}
    others = sorted({type(n).__name__ for n in nodes if not _is_manualgrad_function(n)})
    heavy = [name for name in others if name in HEAVY]
    assert not heavy, f"torch compute nodes left in the converted graph: {heavy} (manualgrad: {sorted(functions)})"
    unknown = [name for name in others if name not in STRUCTURAL]
    assert not unknown, f"torch nodes that are neither manualgrad Functions nor structural: {unknown}"
    assert functions, "no manualgrad Function in the converted graph"
