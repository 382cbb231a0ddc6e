"""Where the first non-finite value of a run is born: GradientMonitor's NaN origin.

A NaN or Inf spreads: a NaN weight in one layer makes every later activation, the loss and
then every gradient NaN, so "the first module whose gradient is non-finite" names the input
layer every time. The place it is *born* is the first value that is non-finite while
everything it was computed from was finite. Kinds, in the order they can happen in a step:

    parameter   a trainable parameter is non-finite when the optimizer step begins
    input       the model's input is non-finite (the batch itself)
    forward     a module's (or manualgrad Function's) output is non-finite, its inputs finite
    loss        the model's forward was finite but the gradient arriving at its output is not
                (born in the loss, outside the model)
    backward    a module (or manualgrad Function) passes back a non-finite gradient to its
                inputs while the gradient it received was finite
    gradient    a parameter's final .grad is non-finite while every gradient reaching its
                module was finite (a gradient hook, or another rank's all-reduce under DDP)

How a step is traced (``origin='trace'``): a forward hook on every module, and manualgrad's
``apply`` handing every Function call to ``Tracer._op``, keep *references* to each call's
floating inputs and outputs (no kernel), from the model's forward to the optimizer step. A
hook on each Function's autograd node, and a tensor hook on each other module input or output
that requires grad, keep references to the gradients. ``Tracer.stop`` (at the optimizer step)
hands them to the monitor, which sums each into a 0-dim device tensor (NaN/Inf make the sum
non-finite); nothing is read on the host. ``decode`` walks a row read back at a logging step
and returns the first birth, by the rules above.

Memory: the references keep activations and their gradients alive until the optimizer step
(backward would free most of them on the way); past ``FLUSH_ELEMENTS`` elements the pending
ones are summed and dropped. A step traced at a logging step keeps them until the report, for
the offending indices. A module that modifies its input in place is seen after the change.
"""
from __future__ import annotations

import functools
import math

import torch

from ..ops import _apply

KINDS = ("parameter", "input", "forward", "loss", "backward", "gradient")
HOW = {
    "parameter": "the parameter is non-finite when the step begins",
    "input": "the model's input is non-finite",
    "forward": "output non-finite while its inputs were finite (forward)",
    "loss": "the model's forward was finite, the gradient reaching its output is not (born in the loss)",
    "backward": "the gradient it passes back is non-finite while the one it received was finite (backward)",
    "gradient": "the parameter's .grad is non-finite while every gradient reaching the module was finite",
}
OUTSIDE = "(outside the monitored model)"
FLUSH_ELEMENTS = 1 << 25  # referenced elements (128 MB of float32) before they are summed and dropped
N_INDICES = 3  # offending indices shown in a report


class NonFiniteOrigin(tuple):
    """``(module, kind, step)``, with ``op`` (manualgrad Function or None), ``rank``, ``detail``
    (parameter name, offending indices) and ``message`` (the report's text) as attributes."""

    def __new__(cls, module, kind, step, op=None, rank=0, detail=""):
        self = super().__new__(cls, (module, kind, step))
        self.op, self.rank, self.detail = op, rank, detail
        self.how, self.message = HOW[kind], ""
        return self

    def __getnewargs__(self):  # pickled (all_gather_object under torch.distributed)
        return tuple(self)

    module = property(lambda self: self[0])
    kind = property(lambda self: self[1])
    step = property(lambda self: self[2])

    def describe(self):
        plural = "s" if "', '" in self.module else ""  # several modules (origin='parameters')
        where = self.module if self.module == OUTSIDE else f"module{plural} '{self.module}'"
        if self.op:
            where += f" (op {self.op})"
        rank = f" on rank {self.rank}" if self.rank else ""
        detail = f"; {self.detail}" if self.detail else ""
        return f"non-finite {self.kind} in {where} first at step {self.step}{rank}: {self.how}{detail}"


def _floats(obj):
    """The floating tensors in a module's args or output (a tensor, or a tuple / list / dict of them)."""
    if type(obj) is torch.Tensor:  # the common case first: this runs for every call
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _floats(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _floats(o)]
    return []


class Tracer:
    """Records one step's module and Function calls and their gradients (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        # (name, depth: 0 for the model itself, m)
        self._modules = [(name or "model", name.count(".") + 1 if name else 0, m) for name, m in model.named_modules()]
        self._handles = []
        self.recording = False

    # -- recording ---------------------------------------------------------------------------

    def attach(self):
        """Hooks every module and joins manualgrad's apply; they record from the model's
        forward (the first one, under gradient accumulation) to ``stop`` at the optimizer step:
        the loss is in, another model's forward before this one's is not."""
        self._handles.append(self.model.register_forward_pre_hook(self._begin))
        for name, depth, m in self._modules:
            self._handles.append(m.register_forward_hook(functools.partial(self._module, name, depth)))
        _apply.recorders.append(self._op)

    def _begin(self, module, args):
        if not self.recording and not torch.compiler.is_compiling() and torch.is_grad_enabled():
            self.start()

    def start(self):
        self._tensors, self._slot_of, self._events, self._grad_of, self._hooked = [], {}, [], {}, set()
        self._held_elements = 0
        self.recording = True

    def stop(self):
        """Ends the step: (tensors recorded, in order; events, gradient of each slot)."""
        if not self.recording:  # no forward of the model since the last step
            return [], ([], {})
        self.recording = False
        out = self._tensors, (self._events, self._grad_of)
        self._tensors = self._slot_of = self._events = self._grad_of = self._hooked = None
        return out

    def _slot(self, t):
        s = self._slot_of.get(id(t))
        if s is None:  # the reference kept in _tensors also keeps id(t) unique within the step
            s = self._slot_of[id(t)] = len(self._tensors)
            self._tensors.append(t)
            self._held_elements += t.numel()
            if self._held_elements > FLUSH_ELEMENTS:
                self._flush()
        return s

    def _flush(self):
        """Sum the tensors held so far (0-dim each, in their slots) and drop the references."""
        with torch.no_grad():
            for i, t in enumerate(self._tensors):
                if t.dim():
                    self._tensors[i] = t.detach().sum(dtype=torch.float32)
        # their ids may be reused from now on: a tensor seen again gets a new slot
        self._slot_of.clear()
        self._held_elements = 0

    def _on_grad(self, s, grad):
        if self.recording:
            self._grad_of[s] = self._slot(grad)

    def _module(self, name, depth, module, args, output):
        if not self.recording or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return
        slot, hooked = self._slot, self._hooked
        ins, outs = _floats(args), _floats(output)
        slots = []
        for t in ins + outs:
            s = slot(t)
            slots.append(s)
            if s not in hooked and t.requires_grad:  # its gradient, once per tensor
                hooked.add(s)
                t.register_hook(functools.partial(self._on_grad, s))
        self._events.append(("module", name, depth, slots[: len(ins)], slots[len(ins) :]))

    def _op(self, fn, args, output):
        if not self.recording or not torch.is_grad_enabled():
            return
        # parameters and their gradients are checked on their own (the monitor's first 2P)
        slot, Parameter = self._slot, torch.nn.Parameter
        skip = tuple(type(a) is Parameter for a in args)
        ins = [slot(a) for a, p in zip(args, skip) if not p and isinstance(a, torch.Tensor) and a.is_floating_point()]
        outs = _floats(output)
        out_slots = [slot(t) for t in outs]
        forward_index = len(self._events)
        self._events.append(("op", fn.__name__, None, ins, out_slots))
        node = next((t.grad_fn for t in outs if t.grad_fn is not None), None)
        if node is not None:
            # the node's hook sees the gradient of each of its outputs: no tensor hook needed
            # for them when a module returns them                      (slot, output index)
            mine = [(s, t.output_nr) for t, s in zip(outs, out_slots) if t.grad_fn is node]
            self._hooked.update(s for s, _ in mine)
            node.register_hook(functools.partial(self._op_grads, fn.__name__, forward_index, skip, mine))

    def _op_grads(self, name, forward_index, skip, mine, grad_inputs, grad_outputs):
        if self.recording:
            recv = []
            for s, k in mine:
                g = grad_outputs[k]
                if isinstance(g, torch.Tensor):
                    recv.append(self._slot(g))
                    self._grad_of[s] = recv[-1]
            prod = [self._slot(g) for g, p in zip(grad_inputs, skip) if not p and isinstance(g, torch.Tensor)]
            self._events.append(("op_grad", name, forward_index, recv, prod))

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._op in _apply.recorders:
            _apply.recorders.remove(self._op)
        self.recording = False


def decode(values, meta, params):
    """The first birth in one traced step, or None.

    ``values``: [Σ of every parameter's .grad (P), of every parameter (P), of every traced
    tensor (T)] as Python floats (only their finiteness matters); ``meta`` from
    ``Tracer.stop``; ``params``: (module name, parameter name) per parameter. Returns (kind,
    module, op, key, what) with ``key`` an ordering within the step and ``what`` =
    ("param" | "grad", i, None) or ("slot", s, label): the tensor to show offending indices of.
    """
    P = len(params)
    grads, pvals, tv = values[:P], values[P : 2 * P], values[2 * P :]
    events, grad_of = meta

    def fin(s):
        return math.isfinite(tv[s])

    for i, v in enumerate(pvals):
        if not math.isfinite(v):
            return "parameter", params[i][0], None, (0, i), ("param", i, None)
    modules = [e for e in events if e[0] == "module"]
    for kind, name, depth, ins, outs in modules:
        if depth == 0:
            bad = [s for s in ins if not fin(s)]
            if bad:
                return "input", name, None, (1, 0), ("slot", bad[0], "input")

    def born(ins, outs):
        return all(fin(s) for s in ins) and any(not fin(s) for s in outs)

    for i, (kind, name, depth, ins, outs) in enumerate(events):
        if kind in ("module", "op") and born(ins, outs):
            bad = next(s for s in outs if not fin(s))
            if kind == "module":
                return "forward", name, None, (2, i), ("slot", bad, "output")
            # the Function's module: the first module born after it (none: outside the model)
            module = next((e[1] for e in events[i + 1 :] if e[0] == "module" and born(e[3], e[4])), OUTSIDE)
            return "forward", module, name, (2, i), ("slot", bad, "output")

    # backward: received gradients finite, produced ones not; ordered by when they were made
    cands = []
    for kind, name, depth, ins, outs in events:
        if kind == "op_grad":  # (depth holds the index of the Function's forward event)
            recv, prod = ins, outs
        elif kind == "module":
            recv = [grad_of[s] for s in outs if s in grad_of]
            prod = [grad_of[s] for s in ins if s in grad_of]
            if depth == 0 and any(not fin(s) for s in recv):
                return "loss", name, None, (3, 0), ("slot", next(s for s in recv if not fin(s)), "grad_output")
        else:
            continue
        if all(fin(s) for s in recv):
            bad = [s for s in prod if not fin(s)]
            if bad:
                cands.append((min(bad), kind, name, depth))
    if cands:
        cands.sort(key=lambda c: (c[0], c[1] == "module", -c[3] if c[1] == "module" else 0))  # op, then innermost
        pos, kind, name, forward_index = cands[0]
        if kind == "op_grad":
            # its module: the first module born in the backward after it, else the first
            # module whose forward ended after the Function's (none: outside the model)
            module = next((c[2] for c in cands if c[1] == "module" and c[0] >= pos), None)
            if module is None:
                module = next((e[1] for e in events[forward_index + 1 :] if e[0] == "module"), OUTSIDE)
            return "backward", module, name, (4, pos), ("slot", pos, "grad_input")
        return "backward", name, None, (4, pos), ("slot", pos, "grad_input")
    for i, v in enumerate(grads):
        if not math.isfinite(v):
            return "gradient", params[i][0], None, (5, i), ("grad", i, None)
    return None


def offending(t, name, n=N_INDICES):
    """'weight[1, 5] = nan, weight[2, 0] = inf' for the first ``n`` non-finite elements of ``t``
    (a host sync: reports only), '' when there are none."""
    if t is None:
        return ""
    t = t.detach()
    if t.dim() == 0:
        return f"{name} = {t.item()}" if not torch.isfinite(t) else ""
    bad = (~torch.isfinite(t)).nonzero()[:n]
    if not len(bad):
        return ""
    vals = t[tuple(bad.t())].tolist()
    return ", ".join(f"{name}[{', '.join(map(str, idx))}] = {v}" for idx, v in zip(bad.tolist(), vals))
