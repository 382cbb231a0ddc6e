"""Coverage report: which backward nodes of a model ran a hand-written backward, and how much
of the backward work that was.

    report = manualgrad.coverage(model, x)               # forward under manualgrad.enable()
    print(report)                                         # per-op table, largest first
    report.hand_written_flop_share                        # e.g. 0.987
    report.torch_ops                                      # ops still on torch's autograd

    python -m manualgrad.coverage pkg.module:make_model --input-shape 64,1,28,28

How it works. One forward runs (under ``manualgrad.enable()`` unless ``mode=False``); its
output is reduced to a loss and one backward runs. Every node of the autograd graph gets a
pre-hook and a post-hook, so while a node runs it is the "current node"; a TorchDispatchMode
sees every aten op the backward runs and adds its FLOPs to the current node. A node is
hand-written when it is a manualgrad ``autograd.Function`` (its class lives in the manualgrad
package); every other node (torch's derivative formulas, other custom Functions) is torch's.
AccumulateGrad nodes (writing a leaf's gradient) are not ops and are not counted, nor is the
engine's summing of gradients where a tensor is used twice (it runs between nodes).

FLOP convention (per aten op):
- matrix products, convolutions and attention: torch.utils.flop_counter's formulas (the ones
  FlopCounterMode uses, extended to torch's CPU attention kernels), e.g. 2 M N K for an
  (M, K) @ (K, N) product;
- views and ops that only create, copy or rearrange memory (t, view, expand, clone, cat,
  zeros, slice_backward, ...): 0;
- every other op (elementwise, reductions, fused backward kernels such as
  native_layer_norm_backward): the number of elements of its largest tensor argument or
  result, i.e. one FLOP per output element for elementwise ops and one per input element for
  a reduction.
The shares are therefore a measure of where the arithmetic is, not an exact operation count.
"""
import argparse
import importlib
import math
import re
import sys
import threading
import types
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from .mode import enable

# aten ops that only create, copy or rearrange memory: no arithmetic.
_MOVES_ONLY = frozenset(
    """alias as_strided_scatter cat clone constant_pad_nd copy copy_ detach empty empty_like
    empty_strided expand_copy fill_ flip full full_like index_select lift_fresh lift_fresh_copy
    new_empty new_empty_strided new_full new_ones new_zeros ones ones_like permute_copy repeat
    roll scalar_tensor select_backward select_scatter slice_backward slice_scatter stack
    t_copy transpose_copy _to_copy _unsafe_view unsqueeze_copy view_copy zero_ zeros
    zeros_like""".split()
)


def _formulas():
    """flop_registry, plus torch's CPU attention kernels: they take the same leading arguments
    (query, key, value / grad_out, query, key, value) as the flash kernels the registry knows."""
    aten, table = torch.ops.aten, dict(flop_registry)
    for cpu_op, known in [
        ("_scaled_dot_product_flash_attention_for_cpu", aten._scaled_dot_product_flash_attention),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", aten._scaled_dot_product_flash_attention_backward),
    ]:
        if hasattr(aten, cpu_op) and known in table:
            table[getattr(aten, cpu_op)] = table[known]
    return table


_FORMULAS = _formulas()


def op_flops(func, args, kwargs, out):
    """FLOPs of one aten op call under the module's convention (see the module docstring)."""
    packet = func.overloadpacket
    if packet in _FORMULAS:
        return int(_FORMULAS[packet](*args, **kwargs, out_val=out))
    if func.is_view or torch.Tag.view_copy in func.tags or packet.__name__ in _MOVES_ONLY:
        return 0
    sizes = [t.numel() for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
    return max(sizes, default=0)


def _snake(name):
    # "MaxPool2DWithIndices" -> "max_pool2d_with_indices", "NLLLoss" -> "nll_loss",
    # "LeakyReLU" -> "leaky_relu", "PReLU" -> "prelu" (the mixed-case acronyms first, as torch spells them)
    name = name.replace("PReLU", "Prelu").replace("RReLU", "Rrelu").replace("ReLU", "Relu").replace("SiLU", "Silu")
    name = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return name.lower()


def node_op(node):
    """(op name, hand-written?) of an autograd node.

    manualgrad's nodes are its Functions' backward nodes: ``LinearFunction`` -> ``linear``.
    torch's are named after the op whose derivative they run: ``AddmmBackward0`` -> ``addmm``.
    """
    cls = getattr(node, "_forward_cls", None)  # set on custom Function nodes only
    if cls is not None and (cls.__module__ + ".").startswith("manualgrad."):
        return _snake(re.sub(r"Function$", "", cls.__name__).lstrip("_")), True
    name = node.name().rpartition("::")[2]  # "torch::autograd::CopySlices" -> "CopySlices"
    return _snake(re.sub(r"Backward\d*$", "", name)), False


def _is_accumulate_grad(node):
    return hasattr(node, "variable")  # AccumulateGrad is the only node that holds its leaf


@dataclass
class CoverageRow:
    """One op: how many of its backward nodes ran, on each side, and their FLOPs."""

    op: str
    hand_written_nodes: int = 0
    torch_nodes: int = 0
    hand_written_flops: int = 0
    torch_flops: int = 0

    @property
    def flops(self):
        return self.hand_written_flops + self.torch_flops

    @property
    def side(self):
        if self.hand_written_nodes and self.torch_nodes:
            return "both"
        return "hand-written" if self.hand_written_nodes else "torch"


def _share(part, whole):
    return part / whole if whole else math.nan


def _percent(share):
    # 0.99996 is not "100.0%": a share that is not exactly 0 or 1 never prints as one
    text = f"{share:.1%}"
    if text == "100.0%" and share < 1:
        return ">99.9%"
    if text == "0.0%" and share > 0:
        return "<0.1%"
    return text


class CoverageReport:
    """What one backward ran, per op. ``rows`` are sorted by FLOPs, largest first.

    Attributes: ``rows`` (list of CoverageRow), ``hand_written_flop_share`` and
    ``hand_written_node_share`` (NaN when there is nothing to share), ``torch_ops`` (the ops
    whose torch backward did arithmetic, largest first: what is left to write),
    ``total_flops``.
    """

    def __init__(self, rows, title="backward"):
        self.rows = sorted(rows, key=lambda r: (-r.flops, r.op))
        self.title = title

    @property
    def total_flops(self):
        return sum(r.flops for r in self.rows)

    @property
    def hand_written_flops(self):
        return sum(r.hand_written_flops for r in self.rows)

    @property
    def hand_written_flop_share(self):
        return _share(self.hand_written_flops, self.total_flops)

    @property
    def nodes(self):
        return sum(r.hand_written_nodes + r.torch_nodes for r in self.rows)

    @property
    def hand_written_node_share(self):
        return _share(sum(r.hand_written_nodes for r in self.rows), self.nodes)

    @property
    def torch_ops(self):
        left = [r for r in self.rows if r.torch_flops > 0]
        return [r.op for r in sorted(left, key=lambda r: (-r.torch_flops, r.op))]

    def to_dict(self):
        return {
            "rows": [
                {"op": r.op, "hand_written_nodes": r.hand_written_nodes, "torch_nodes": r.torch_nodes,
                 "hand_written_flops": r.hand_written_flops, "torch_flops": r.torch_flops}
                for r in self.rows
            ],
            "total_flops": self.total_flops,
            "hand_written_flop_share": self.hand_written_flop_share,
            "hand_written_node_share": self.hand_written_node_share,
            "torch_ops": self.torch_ops,
        }

    def __str__(self):
        total = self.total_flops
        width = max([len("op")] + [len(r.op) for r in self.rows])
        lines = [
            f"{self.title}: {_percent(self.hand_written_flop_share)} of {total:,} backward FLOPs hand-written, "
            f"{_percent(self.hand_written_node_share)} of {self.nodes} nodes",
            f"{'op':<{width}}  {'side':<12}  {'hand-written':>12}  {'torch':>5}  {'backward FLOPs':>16}  {'share':>6}",
        ]
        for r in self.rows:
            lines.append(
                f"{r.op:<{width}}  {r.side:<12}  {r.hand_written_nodes:>12}  {r.torch_nodes:>5}  "
                f"{r.flops:>16,}  {_percent(_share(r.flops, total)):>6}"
            )
        lines.append("torch ops left: " + (", ".join(self.torch_ops) or "none"))
        return "\n".join(lines)

    def __repr__(self):
        return (f"CoverageReport(hand_written_flop_share={self.hand_written_flop_share:.4f}, "
                f"ops={len(self.rows)}, torch_ops={self.torch_ops})")


class _Attribution(TorchDispatchMode):
    """Adds each aten op's FLOPs to the autograd node running it (per thread: a node's hooks
    and its backward's ops run on the same thread)."""

    def __init__(self):
        super().__init__()
        self.local = threading.local()
        self.flops = defaultdict(int)  # node -> FLOPs
        self.ran = []  # nodes in the order they ran

    def _stack(self):
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def enter(self, node):
        self._stack().append(node)
        self.ran.append(node)

    def leave(self, node):
        stack = self._stack()
        if stack and stack[-1] is node:
            stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        stack = self._stack()
        if stack:  # ops between nodes (the engine summing gradients) belong to no op
            self.flops[stack[-1]] += op_flops(func, args, kwargs, out)
        return out


def graph_nodes(roots):
    """Every autograd node reachable from ``roots`` (grad_fns), each once."""
    seen, todo, nodes = set(), list(roots), []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return nodes


def _buffers_kept(model):
    """Copies of the model's buffers (batch-norm statistics), to put back afterwards."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [(b, b.detach().clone()) for b in model.buffers()]


def coverage(model, *example_inputs, loss_fn=None, mode=True, **kwargs):
    """Run one forward and backward of ``model`` and report, per op, how many backward nodes
    ran a hand-written (manualgrad) backward and how many torch's, with their FLOPs.

    Args:
        model: an ``nn.Module`` (or any callable) called as ``model(*example_inputs, **kwargs)``.
        loss_fn: reduces the output to the loss, ``loss_fn(output)``; it runs under the mode
            too. Without it, backward starts from every output tensor that requires grad with an
            upstream gradient of ones (a scalar output is then its own loss, and no extra Sum
            node appears).
        mode: run the forward under ``manualgrad.enable()``, which routes torch.nn.functional
            calls to manualgrad; ``False`` shows what the model alone (e.g. converted) runs.

    The gradients are not written into ``.grad`` (``torch.autograd.grad`` on the graph's
    leaves), buffers such as batch-norm running statistics are restored, and the global RNG
    state is left as it was. FLOPs follow the convention in this module's docstring.
    Returns a ``CoverageReport``.
    """
    kept = _buffers_kept(model)
    try:
        with torch.random.fork_rng(devices=[]):
            attribution = _backward(model, example_inputs, kwargs, loss_fn, mode)
    finally:  # after backward: an eval-mode batch norm's backward reads its running statistics
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)
    rows = {}
    for node in attribution.ran:
        op, hand = node_op(node)
        row = rows.setdefault(op, CoverageRow(op))
        if hand:
            row.hand_written_nodes += 1
            row.hand_written_flops += attribution.flops[node]
        else:
            row.torch_nodes += 1
            row.torch_flops += attribution.flops[node]
    return CoverageReport(rows.values(), f"backward of {type(model).__name__}")


def _backward(model, example_inputs, kwargs, loss_fn, mode):
    """One forward and backward with every op's FLOPs attributed to its node."""
    with enable() if mode else nullcontext(), torch.enable_grad():
        out = model(*example_inputs, **kwargs)
        if loss_fn is not None:
            out = loss_fn(out)
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outputs:
        raise RuntimeError(f"coverage: the output of {type(model).__name__} does not require grad: no backward to run")
    nodes = graph_nodes(t.grad_fn for t in outputs)
    ops = [n for n in nodes if not _is_accumulate_grad(n)]
    leaves = [n.variable for n in nodes if _is_accumulate_grad(n)] + [t for t in outputs if t.grad_fn is None]
    attribution = _Attribution()
    handles = []
    try:
        for node in ops:
            handles.append(node.register_prehook(lambda grads, node=node: attribution.enter(node)))
            handles.append(node.register_hook(lambda grad_in, grad_out, node=node: attribution.leave(node)))
        ones = [torch.ones_like(t) for t in outputs]
        with attribution:
            torch.autograd.grad(outputs, leaves, ones, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return attribution


# --- python -m manualgrad.coverage -------------------------------------------------------------

_PROG = "python -m manualgrad.coverage"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    """Bad arguments: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage first)
        raise UsageError(message)


def _shape(text):
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers such as 64,1,28,28, got {text!r}")
    return shape


def _resolve(spec, what):
    """'pkg.module:name' -> the object it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} {spec!r}: expected module:name, e.g. mypkg.models:make_model")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{what} {spec!r}: cannot import {module_name}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{what} {spec!r}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{what} {spec!r}: {attr} is not callable")
    return obj


def build_parser():
    p = _Parser(
        prog=_PROG,
        description="Run one forward+backward of a model and print, per op, which backward nodes were "
                    "hand-written (manualgrad) and which torch's, with their share of backward FLOPs.",
        epilog=f"example: {_PROG} mypkg.models:make_model --input-shape 64,1,28,28 --convert",
    )
    p.add_argument("factory", help="module:function that returns the model when called with no arguments")
    p.add_argument("--input-shape", type=_shape, action="append", default=[], metavar="D1,D2,...",
                   help="shape of one random (standard normal) input; repeat for each input, in order")
    p.add_argument("--inputs", metavar="MODULE:FN", help="function returning the example input(s) instead")
    p.add_argument("--loss", metavar="MODULE:FN", help="function reducing the output to the loss (default: "
                   "backward from every output with an upstream gradient of ones)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32", help="model and random input dtype")
    p.add_argument("--convert", action="store_true", help="manualgrad.convert(model) first")
    p.add_argument("--no-mode", action="store_true", help="do not run the forward under manualgrad.enable()")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building the model and inputs")
    p.add_argument("--json", action="store_true", help="print the report as JSON (CoverageReport.to_dict())")
    return p


def _run(argv):
    args = build_parser().parse_args(argv)
    if bool(args.input_shape) == bool(args.inputs):
        raise UsageError("give the inputs either as --input-shape (one per input) or as --inputs, not both or neither")
    factory = _resolve(args.factory, "factory")
    make_inputs = _resolve(args.inputs, "--inputs") if args.inputs else None
    loss_fn = _resolve(args.loss, "--loss") if args.loss else None
    dtype = _DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    model = factory()
    if isinstance(model, torch.nn.Module):
        model = model.to(dtype)
        if args.convert:
            from .convert import convert

            convert(model)
    if make_inputs is not None:
        inputs = make_inputs()
        inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    else:
        inputs = [torch.randn(shape, dtype=dtype) for shape in args.input_shape]
    report = coverage(model, *inputs, loss_fn=loss_fn, mode=not args.no_mode)
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report)
    return 0


def main(argv=None):
    try:
        return _run(argv)
    except UsageError as e:
        print(f"{_PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class _CallableModule(types.ModuleType):
    """``manualgrad.coverage`` is this module and, called, the ``coverage`` function: so both
    ``manualgrad.coverage(model, x)`` and ``import manualgrad.coverage as c; c.CoverageReport``
    hold, and ``python -m manualgrad.coverage`` runs this file once."""

    def __call__(self, *args, **kwargs):
        return coverage(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
