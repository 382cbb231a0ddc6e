"""GradientMonitor: hooks that gather per-module gradient statistics and log them to TensorBoard.

Cost model. Every step (logged or not) the monitor sums every gradient and every parameter
(float32: NaN/Inf make a sum non-finite; a sum of finite values overflows only past ~3.4e38,
where an L2 norm would past ~1.8e19; the small ones copied into one buffer summed by row,
``stats.FiniteCheck``: two kernel calls and one row per step), and never waits for the device:
the rows wait there until the next logging step. With ``activations=True`` each
hooked activation's forward hook adds the activation's sum into a per-step device buffer (two
small kernels per call, two per step), so an activation that goes NaN/Inf is reported even
when every gradient stays finite. With ``origin='trace'`` it also traces every module and
manualgrad Function call: forward hooks, a tensor hook per activation and a hook per
Function's autograd node keep references to the inputs, outputs and their gradients, summed
the same way at the optimizer step. That is one pass over every activation and activation
gradient, plus a few microseconds of Python per module and Function: on a model with large
activations and little compute per activation (a small MLP on CPU) that is the bulk of the
monitor's cost; ``origin='parameters'`` (the default) leaves it out. On a logging step it also
computes norms, the update and (every ``hist_every``) 64-bin histograms, stacks everything
into one tensor and moves it to the host once, the rows' total with it (twice when that total
is not finite: the per-step non-finite counts, and the step something was first seen in, read
back to name where it was born, see ``origin.py``); with the
noise scale and cosine (below) a few more small kernels. Under torch.distributed a logging step
adds two all-reduces (sums, maxima), and one all_gather_object when something went
non-finite. The scalars of a logging step make one event per TensorBoard run (the writer's
own and one per layer, see ``tensorboard.py``); they reach the writer in bursts of 8 logging
steps (or 1 s after the previous burst, at a non-finite report, at ``close()``, and when a
monitor never closed is collected or the interpreter exits): each event wakes the
SummaryWriter's thread, which on a busy CPU costs more than a small model's step.

Hook points. With ``optimizer=`` a step pre-hook reads the final ``.grad`` (after gradient
accumulation, unscaling and clipping; before the update) and, on logging steps only, keeps
the parameters as they were (the check's copy of the small ones, a copy of the others); the
step post-hook measures the update ||θ_after - θ_before||. A logging step reads the norms of
the small tensors from the check's copy too, by rows (``_gp_fast``; ``_gp_plain`` is the
per-tensor form, the tests run both). Without
an optimizer the user calls ``mon.step()`` after backward; there is then no update ratio.
Activations use forward hooks, and their gradients ``output.register_hook`` from inside the
forward hook on logging steps: no full backward hooks, which break on in-place ops.

Distributed. Statistics are those of the whole model on every rank: under DDP of the
gradients after the all-reduce (rank 0's replica), under FSDP2 (``fully_shard``: DTensor
parameters and gradients) combined from the shards: each parameter's squared norms weighted
by w_p (1 where this rank's piece counts, ``stats.rank_weight``) before they are summed per
module, then added across ranks (each shard once, each replica once); maxima the maximum over
shards (an empty shard counts 0), in the all-reduces of a logging step. The every-step check
sums this rank's shards; a step is non-finite when it is on any rank, and the report names the
earliest birth over all ranks, on every rank. Histograms under sharding are of rank 0's shard.

Also logged (``noise.py``): the gradient noise scale ``noise/B_simple`` (with ``noise/tr_sigma``,
``noise/g_sq``) from the micro-batch and per-rank gradients (under FSDP2, the micro-batch
increments of the sharded gradients), when a step has more than one of them (under
torch.compile pass ``batch_size``); and ``grad/cosine_prev/<name>``, the cosine between a
module's gradients at successive logging steps. Both work on logging steps only: one squared
norm per parameter and micro-batch, one dot product per parameter, and a copy of the gradients
kept from one logging step to the next (``cosine=False`` saves it).

torch.compile. Hooks registered before compiling are traced into the graph without breaks:
they only do tensor arithmetic into preallocated tensors, and the origin tracer's hooks do
nothing while compiling (inside a compiled model the origin is told from parameters,
gradients and, with ``activations=True``, the hooked activations only). Whether the coming
step is logged is a Python bool the graph is guarded on, so a compiled model holds up to three
variants (plain, logging, logging with histograms). Under compile the activation gradient
norm is not measured: a hook on an intermediate tensor would break the graph.
"""
from __future__ import annotations

import functools
import math
import operator
import re
import time
import warnings
import weakref

import torch

from .. import utils
from . import noise, stats
from . import origin as origin_
from . import tensorboard as tb

__all__ = ["GradientMonitor", "NonFiniteError", "NonFiniteOrigin"]

NonFiniteOrigin = origin_.NonFiniteOrigin

_ATTACHED = weakref.WeakSet()  # models and optimizers with a monitor attached
_WRITE_BATCH, _WRITE_SECS = 8, 1.0  # scalars reach the writer every 8 logging steps or 1 s, and at close()


class NonFiniteError(FloatingPointError):
    """A parameter, activation or gradient went NaN/Inf (raised with ``on_nonfinite='raise'``)."""


def _is_activation(module):
    return any(c.__module__ == "torch.nn.modules.activation" for c in type(module).__mro__)


def _dist_info():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _without_grad(hook):
    """``hook`` run with autograd off: nothing the monitor computes is differentiated (gradients
    of a create_graph backward require grad). ``torch.no_grad()`` costs ~2.5 us of Python per
    use, and a logging step took several; the switch itself ~0.1 us."""
    @functools.wraps(hook)
    def run(*args, **kwargs):
        mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return hook(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(mode)
    return run


def _write_out(writer, writes, flush=True):
    """Each buffered logging step ``(step, tags, values)`` to ``writer`` (one event per step and
    run), then ``writes`` is emptied; ``flush``: and on to the disk, layer runs included (at exit)."""
    tb.write_steps(writer, writes)
    writes.clear()
    if flush:
        writer.flush()
        tb.flush_layer_runs(writer)


class GradientMonitor:
    """Per-module gradient statistics of ``model`` written to a TensorBoard ``writer``.

    Args:
        model (nn.Module): any module (manualgrad or plain torch).
        writer (SummaryWriter): where to log; only rank 0 writes under torch.distributed.
        optimizer (Optimizer, optional): count steps with its step hooks and log the update
            ratio. Without it, call ``step()`` once per optimizer step, after backward.
        every (int): log scalars every ``every`` steps; the first step is always logged.
        hist_every (int): log 64-bin histograms of grads and weights (and activations) every
            ``hist_every`` steps (0 turns them off).
        include, exclude (str, optional): regexes on module names (``re.search``). By default
            leaf modules with parameters; with ``include``, every matching module with
            parameters (its own and its children's).
        activations (bool): also hook forward outputs (leaf activation modules and the
            selected modules) for mean, std, near-zero and dead-unit fractions, saturation and
            the activation gradient norm.
        on_nonfinite ('warn' | 'raise'): what to do at a logging step when a parameter,
            activation or gradient was NaN/Inf since the previous one. The report names where
            the first one was born (module, manualgrad op, step, parameter / input / forward /
            loss / backward / gradient, offending indices); it is kept as ``first_nonfinite``.
            ``nonfinite/<name>`` counts the steps with a non-finite parameter or gradient per
            module, ``global/nonfinite`` the module-steps (and activation-steps) of any kind.
        origin ('parameters' | 'trace'): how a non-finite value's birth is found. Both check
            every parameter and gradient (and, with ``activations=True``, hooked activation)
            at every step, and name a parameter that is non-finite. Otherwise 'parameters'
            names the step and the activations that went non-finite (kind 'forward'), else the
            modules whose gradients did (kind 'gradient'). 'trace' also traces every module
            and manualgrad Function call (inputs, outputs and their gradients) and names where
            it was born: forward, backward, the loss, the input. It costs one more pass over
            the activations and their gradients and a few microseconds of Python per call (see
            the cost model), and holds references to them until the optimizer step (up to 2^25
            elements).
        sharded (bool): under torch.distributed, each rank holds a disjoint shard of every
            plain-tensor parameter and gradient (FSDP-like), so norms are summed across ranks.
            False (DDP): they are replicated and rank 0's count. DTensor parameters (FSDP2's
            ``fully_shard``) decide from their placements, whatever ``sharded`` says: Shard
            pieces are summed, Replicate ones counted once. Build the monitor after wrapping.
        noise_scale (bool): log the gradient noise scale B_simple (``noise/*``, see
            ``noise.py``) when a step has more than one micro-batch or more than one rank.
        batch_size (int, optional): samples per micro-batch on one rank, for the noise scale;
            by default dim 0 of the first tensor argument of the model's forward.
        noise_ema (float): smoothing of the noise scale over logging steps (0 = none).
        cosine (bool): log ``grad/cosine_prev``, the cosine between each module's gradient at
            this logging step and at the previous one. Costs one copy of the gradients (of this
            rank's shard under FSDP), kept between logging steps.

    Use as a context manager, or call ``close()``: it removes every hook it registered, hands
    the last logged steps to the writer and closes the per-layer runs (the writer stays open).
    """

    def __init__(self, model, writer, optimizer=None, every=50, hist_every=1000, include=None,
                 exclude=None, activations=False, on_nonfinite="warn", sharded=False, origin="parameters",
                 noise_scale=True, batch_size=None, noise_ema=0.9, cosine=True):
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        if origin not in ("trace", "parameters"):
            raise ValueError(f"origin must be 'trace' or 'parameters', got {origin!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        for obj, what in ((model, "model"), (optimizer, "optimizer")):
            if obj is not None and obj in _ATTACHED:
                raise RuntimeError(
                    f"a GradientMonitor is already attached to this {what} ({type(obj).__name__}); "
                    "close() it (or leave its `with` block) before attaching another"
                )
        self.model, self.writer, self.optimizer = model, writer, optimizer
        self.every, self.hist_every = int(every), int(hist_every)
        self.on_nonfinite, self.sharded, self.origin = on_nonfinite, sharded, origin
        self.rank, self.world = _dist_info()
        self._handles = []
        self._n = 0  # optimizer steps seen

        def keep(name):
            return (include is None or re.search(include, name)) and not (exclude and re.search(exclude, name))

        named = [(name or "model", m) for name, m in model.named_modules()]
        if include is None:
            chosen = [(n, m) for n, m in named if not list(m.children()) and list(m.parameters(recurse=False))]
        else:
            chosen = [(n, m) for n, m in named if list(m.parameters())]
        chosen = [(n, m) for n, m in chosen if keep(n)]
        self.names = [n for n, _ in chosen]

        # Flat list of all trainable parameters; group[i] = index of the module it is reported
        # under, or M ("rest") for parameters outside the chosen modules (still in the total).
        self._params, group, seen = [], [], set()
        for gi, (_, m) in enumerate(chosen):
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p)); self._params.append(p); group.append(gi)
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p)); self._params.append(p); group.append(len(chosen))
        if not self._params:
            raise ValueError("GradientMonitor: the model has no trainable parameters")
        self._param_ids = seen
        dev = stats.local(self._params[0]).device
        self._device = dev
        M = len(chosen)
        self._M = M
        self._group = torch.tensor(group, device=dev)
        # the every-step check of the P gradients and the P parameters, in one (stats.FiniteCheck
        # of the 2P tensors: E entries); (E, M+1) one-hot: column group[i] for each entry of
        # gradient i and of parameter i (tensor P + i)
        local = [stats.local(p.detach()) for p in self._params]
        self._check = stats.FiniteCheck(local + local, dev)
        owner = self._check.owner
        P = len(self._params)
        self._to_module = torch.zeros(len(owner), M + 1, device=dev)
        self._to_module[torch.arange(len(owner)), torch.tensor([group[i % P] for i in owner], dtype=torch.long)] = 1
        self._group_list = group
        # a logging step's fast form (``_gp_fast``, ``_update_sq``): the cell of each entry's Σx²
        # in (gradients, parameters) x (M+1 modules), the module of each gradient entry (max |g|)
        # and of each parameter entry (the update)
        own = self._check.owners
        self._cells_gp = torch.tensor([group[i % P] + (M + 1) * (i // P) for i in own(0, 2 * P)], dtype=torch.long, device=dev)
        self._cells_g = torch.tensor([group[i] for i in own(0, P)], dtype=torch.long, device=dev)
        self._cells_update = torch.tensor([group[i - P] for i in own(P, 2 * P)], dtype=torch.long, device=dev)
        # the fast form's sums, one row each per module (+ rest), zeroed at each logging step and
        # filled in place (no zeros to allocate, no cat): max |g|, Σg², Σθ², Σ(θ_before - θ_after)²
        self._fast_sums = torch.zeros(4, M + 1, device=dev)
        self._fs_max, self._fs_gp, self._fs_gpd = self._fast_sums[0], self._fast_sums[1:3], self._fast_sums[1:]
        self._fs_gp_flat, self._fs_d = self._fs_gp.view(-1), self._fast_sums[3]
        self._after = None  # θ_after laid out like the check's parameter rows (``_update_sq``)
        self._scratch = None  # the differences of the large parameters (``_diff_sq``)
        self._zero = torch.zeros((), device=dev)  # stands in for a missing .grad
        # NaN origin. One row per step since the last log: the check of the gradients (E
        # entries), of the parameters (E', when checked: see _before_update), then, with
        # origin='trace', Σ of every traced tensor; and the step's number and trace (host side)
        owner = {id(p): n for n, p in model.named_parameters()}
        self._param_names = [tuple(owner[id(p)].rpartition(".")[::2]) for p in self._params]
        self._param_names = [(m or "model", n) for m, n in self._param_names]
        self._rows, self._row_steps, self._row_meta = [], [], []
        self._tracer = origin_.Tracer(model)
        self._held = None  # (step, tensors) of a step traced at a logging step, for the report

        mods = [m for _, m in chosen]
        self.act_names, self._act_mods = [], []
        if activations:
            for n, m in named:
                if (m in mods or (not list(m.children()) and _is_activation(m))) and keep(n):
                    self.act_names.append(n); self._act_mods.append(m)
        A = len(self._act_mods)
        # Σ of each activation over this step's forward calls, folded in by its forward hook
        # every step (NaN/Inf make it non-finite): one row (A,) per step since the last log
        self._a_sum = torch.zeros(A, device=dev)
        self._a_rows = []
        self._a_stats = [None] * A
        self._a_hist = [None] * A
        self._a_gnorm = [None] * A
        self._log_now, self._hist_now = True, self.hist_every > 0  # for the coming step (step 0)

        for a, m in enumerate(self._act_mods):
            self._handles.append(m.register_forward_hook(self._act_hook(a, stats.unit_dim(m), stats.saturation_kind(m))))

        # Clipping through manualgrad.utils.clip_grad_norm_
        self._clip_coef = self._clip_norm = None
        self._clip_count = torch.zeros((), device=dev)
        self._clip_calls = 0
        self._handles.append(utils.register_clip_listener(self._on_clip))

        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_update()))
            self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_update()))
            _ATTACHED.add(optimizer)
        _ATTACHED.add(model)
        self._before = None  # parameters before the step being logged (a buffer kept for reuse)
        self._have_before = False
        self._pending = None
        self._writes, self._written_at = [], time.monotonic()  # logging steps not yet handed to the writer
        # a monitor never closed still hands them over when it is collected or the interpreter exits
        self._finalize = weakref.finalize(self, _write_out, writer, self._writes) if self.rank == 0 else None
        self._tags = {}  # (stat, id(names)) -> tags
        self._kept = {}  # a logging step's tags -> (its scalars without the "rest" entries, its tags without them)
        self._closed = False
        self.first_nonfinite = None  # NonFiniteOrigin (module, kind, step) of the run's first report
        if origin == "trace":
            self._tracer.attach()

        self._init_distributed_stats(noise_scale, batch_size, noise_ema, cosine)  # B: noise.py, stats.py

        if self.rank == 0:
            tb.crc32c_many([b"\0"])  # its tables (~13 ms) built now rather than at the first write of a training run
            present = {"grad/norm", "grad/max_abs", "param/norm", "global/grad_norm", "global/lr",
                       "global/clip_coef", "global/clip_fraction", "global/nonfinite", "nonfinite"}
            if optimizer is not None:
                present |= {"update/ratio", "update/log10_ratio"}
            present |= self._stat_tags_present()  # B
            if A:
                present |= {"act/mean", "act/std", "act/near_zero", "act/dead", "act/saturation", "act/grad_norm"}
            writer.add_custom_scalars(tb.custom_layout(present))

    # -- hooks -------------------------------------------------------------------------------

    def _act_hook(self, a, dim, kind):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                return
            y = output.detach()
            # every step: the device-side non-finite check of this activation (a sum, added to
            # the step's; no host sync)                                                 0-dim
            self._a_sum[a].add_(y.sum(dtype=torch.float32))
            if self._log_now:
                self._a_stats[a] = stats.activation_stats(y, dim, kind)
                if self._hist_now:
                    self._a_hist[a] = stats.histogram(y)
                # Dynamo breaks the graph on a hook on an intermediate tensor: under
                # torch.compile the activation gradient norm is not measured (logged as NaN).
                if output.requires_grad and not torch.compiler.is_compiling():
                    output.register_hook(self._act_grad_hook(a))
        return hook

    def _act_grad_hook(self, a):
        def hook(grad):
            self._a_gnorm[a] = torch.linalg.vector_norm(grad.detach().float())
        return hook

    def _on_clip(self, parameters, total_norm, clip_coef):
        if not any(id(p) in self._param_ids for p in parameters):
            return
        if self._has_dtensor:  # FSDP2: the clip function computed N with DTensors
            total_norm, clip_coef = stats.full(total_norm), stats.full(clip_coef)
        self._clip_norm, self._clip_coef = total_norm, clip_coef
        self._clip_count.add_(clip_coef < 1)
        self._clip_calls += 1

    # -- steps -------------------------------------------------------------------------------

    def step(self):
        """Record one step without an optimizer (call after backward, once per optimizer step)."""
        if self.optimizer is not None:
            raise RuntimeError("GradientMonitor counts steps through its optimizer; do not call step()")
        self._before_update()
        self._after_update()

    def _grads(self):
        if self._has_dtensor:  # FSDP2: this rank's shard
            return [self._zero if p.grad is None else stats.local(p.grad.detach()) for p in self._params]
        return [self._zero if p.grad is None else p.grad for p in self._params]

    def _local_params(self):
        """The parameters as this rank holds them (FSDP2: the local shards), detached."""
        if self._has_dtensor:
            return [stats.local(p.detach()) for p in self._params]
        return [p.detach() for p in self._params]

    def _module_max(self, per_param):
        return torch.zeros(self._M + 1, device=self._device).scatter_reduce_(0, self._group, per_param, "amax")

    # -- a logging step's norms: the plain form per tensor, the fast form from the check's buffer

    def _max_abs(self, tensors):
        """max |t| per tensor (n,): max(max t, -min t), two reductions each and no temporary
        (|t| then its max writes a copy: on CPU 2.4x slower for a 1024 x 1024 gradient, most of
        it the page faults of a fresh buffer); 0 for an empty one (an empty FSDP shard)."""
        hi = [t.amax() if t.numel() else self._zero for t in tensors]
        lo = [t.amin() if t.numel() else self._zero for t in tensors]
        return torch.maximum(torch.stack(hi), -torch.stack(lo)).float()

    def _sq(self, tensors):
        """||t||² per tensor, in float32 (one foreach norm; on CPU ~30x faster than max |t|)  (n,)"""
        return torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float32)).square()

    def _gp_plain(self, grads, params):
        """Σ||g||² and Σ||θ||² per module (2, M+1), each weighted by w_p (``_across``), and max
        |g| per module (M+1,): per parameter, then summed by module."""
        sq = self._sq(grads + params).view(2, -1)  #                        (2, P)
        if self._w is not None:
            sq = sq * self._w
        gp_sq = torch.zeros(2, self._M + 1, device=self._device).index_add_(1, self._group, sq)
        return gp_sq, self._module_max(self._max_abs(grads))

    def _gp_fast(self, grads, params):
        """``_gp_plain`` from the check's copy of this step's small gradients and parameters:
        Σx² and max |x| of every row at once (a kernel or two for all), summed (maxed) by
        module; the tensors summed alone per tensor. (Rows are zero-padded: no change to either.)"""
        rows, _, alone = self._check.span(0, 2 * len(grads))  # all of them, in the check's order
        sq = torch.linalg.vecdot(rows, rows)  # Σx² per row                   (R,)
        grows, _, galone = self._check.span(0, len(grads))  # the gradients'
        gabs = grows.abs().amax(1)  # max |g| per row                         (Rg,)
        if alone:
            both = grads + params
            sq = torch.cat([sq, self._sq([both[i] for i in alone]).to(sq.device)])
        if galone:
            gabs = torch.cat([gabs, self._max_abs([grads[i] for i in galone]).to(gabs.device)])
        if self._w_entries is not None:
            sq = sq * self._w_entries
        # each entry's cell of (grads, params) x (M+1 modules); its module for max |g|
        self._fast_sums.zero_()
        self._fs_gp_flat.index_add_(0, self._cells_gp, sq)
        self._fs_max.scatter_reduce_(0, self._cells_g, gabs, "amax")  # (with the 0s: |g| >= 0)
        return self._fs_gp, self._fs_max

    def _grad_entries_by_module(self, values):
        """Σ per module (+ rest) of one value per gradient entry of the check (its rows, then the
        gradients summed alone), weighted by w_p like ``_across``                  (M+1,)"""
        if self._w_g is not None:
            values = values * self._w_g
        return torch.zeros(self._M + 1, device=self._device).index_add_(0, self._cells_g, values.to(self._device))

    def _keep_before(self, params, fast):
        """θ before the update, for ||θ_after - θ_before||: the small parameters are in the
        check's buffer already (fast form; until the next step's check), the others copied into
        buffers kept from one logging step to the next (no allocation after the first)."""
        P = len(params)
        keep = [i - P for i in self._check.span(P, 2 * P)[2]] if fast else range(P)
        if self._before is None or list(self._before) != list(keep):
            self._before = {i: params[i].clone() for i in keep}
        elif keep:
            torch._foreach_copy_(list(self._before.values()), [params[i] for i in keep])
        self._have_before = True

    def _before_of(self, i):
        """Parameter i as it was before this step's update (fast form: the check's copy)."""
        if i in self._before:
            return self._before[i]
        return self._check.view(len(self._params) + i)

    def _update_sq(self, params, fast):
        """Σ||θ_after - θ_before||² per module, weighted by w_p  (M+1,). Plain: a difference and
        a norm per parameter. Fast: θ_after copied into a buffer laid out like the check's
        parameter rows (one foreach copy), the difference and Σx² by rows, the others alone."""
        P = len(params)
        sq = []
        if fast:
            rows, _, alone = self._check.span(P, 2 * P)
            if self._after is None:
                self._after = torch.zeros_like(rows)
                row0 = self._check.rows_of(P, 2 * P)[0].start
                flat = [i for i in range(P, 2 * P) if self._check.view(i) is not None]
                self._after_at = ([self._check.view(i, self._after, row0) for i in flat], [i - P for i in flat])
            views, idx = self._after_at
            if idx:
                torch._foreach_copy_(views, [params[i] for i in idx])
            d = torch.sub(rows, self._after, out=self._after)  # θ_before - θ_after, by rows
            sq.append(torch.linalg.vecdot(d, d))  #                              (R_p,)
            large = [i - P for i in alone]
            if large:
                sq.append(self._diff_sq([self._before[i] for i in large], [params[i] for i in large]))
        else:
            sq.append(self._sq(torch._foreach_sub([self._before[i] for i in range(P)], params)).to(self._device))
        sq = torch.cat(sq) if len(sq) > 1 else sq[0]
        if not fast:
            return self._across(sq)
        if self._w_update is not None:
            sq = sq * self._w_update
        return self._fs_d.index_add_(0, self._cells_update, sq)  # zeroed by _gp_fast at this step

    _CHUNK = 1 << 20  # elements of the scratch buffer of ``_diff_sq``

    def _diff_sq(self, before, after):
        """||b - a||² of each pair (float32, on the monitor's device)  (n,). The plain form is
        ``_sq(_foreach_sub(before, after))``; its differences are fresh buffers the size of the
        parameters at every logging step, and on CPU their page faults cost more than the
        arithmetic (the seed MLP's three large weights: ~4.7 ms of a 28 ms step at every=1). Here
        each difference goes through one scratch buffer of at most _CHUNK elements, kept."""
        out = []
        for b, a in zip(before, after):
            b, a = b.reshape(-1), a.reshape(-1)
            n = min(b.numel(), self._CHUNK)
            if self._scratch is None or self._scratch.dtype != b.dtype or self._scratch.device != b.device \
                    or self._scratch.numel() < n:
                self._scratch = torch.empty(n, dtype=b.dtype, device=b.device)
            parts = []
            for s in range(0, b.numel(), self._CHUNK):
                d = torch.sub(b[s : s + self._CHUNK], a[s : s + self._CHUNK], out=self._scratch[: min(self._CHUNK, b.numel() - s)])
                parts.append(torch.linalg.vector_norm(d, dtype=torch.float32).square())
            out.append(torch.stack(parts).sum() if len(parts) > 1 else parts[0] if parts else self._zero)
        return torch.stack(out).to(self._device)

    @_without_grad
    def _before_update(self):
        grads = self._grads()
        meta = None
        if self.origin == "trace":  # a traced step: every traced tensor too
            tensors, meta = self._tracer.stop()
            self._held = (self._n, tensors) if self._log_now else None
        # Every step: is every gradient and every parameter finite (stats.FiniteCheck: sums of
        # x 2^-100 by rows, NaN/Inf make them non-finite; two kernel calls for both, one row).
        # Parameters every step too: a weight made non-finite by the optimizer's own update (an
        # overflow) or written through ``.data`` is named at the step whose forward first used it
        # (the check is ~2.7% of the small benchmark model's ~680 us step, parameters included; a
        # version-counter shortcut misses both). The row waits on the device for the next log.
        # (E [+ T],)  An empty FSDP shard sums to 0.
        parts = [self._check(grads + (self._local_params() if self._has_dtensor else self._params))]
        if meta is not None and tensors:
            parts.append(torch.stack(stats.check_sums(tensors)).to(parts[0].device))
        row = parts[0] if len(parts) == 1 else torch.cat(parts)
        self._rows.append(row); self._row_steps.append(self._n); self._row_meta.append(meta)
        if self._act_mods:  # this step's Σ of each activation (the forward hooks'), then reset  (A,)
            self._a_rows.append(self._a_sum.clone()); self._a_sum.zero_()
        if not self._log_now:
            return
        # logging step: Σ||g||², Σ||θ||² and max |g| per module, and θ before the update
        params = self._local_params() if self._has_dtensor else self._params
        fast = self._check.filled  # its buffer holds this step's small gradients and parameters
        gp_sq, gmax = self._gp_fast(grads, params) if fast else self._gp_plain(grads, params)
        if self.optimizer is not None:
            self._keep_before(params, fast)
        self._pending = dict(gp_sq=gp_sq, g_max=gmax, fast=fast)
        self._stats_before_update(grads)  # B
        if self._hist_now:
            self._pending["hist"] = [
                (kind, k, stats.histogram(torch.cat([t[i].flatten() for i in idx])))
                for k, idx in enumerate(self._module_param_indices())
                for kind, t in (("grad", grads), ("weight", params))
            ]

    def _module_param_indices(self):
        out = [[] for _ in range(self._M)]
        for i, g in enumerate(self._group_list):
            if g < self._M:
                out[g].append(i)
        return out

    @_without_grad
    def _after_update(self):
        n = self._n
        self._n += 1
        if self._log_now:
            self._log(n)
        self._log_now = self._n % self.every == 0
        self._hist_now = self.hist_every > 0 and self._n % self.hist_every == 0
        self._stats_after_update()  # B

    # -- logging -----------------------------------------------------------------------------

    def _log(self, n):
        P, M = self._pending, self._M
        W = M + 1
        # Σ ||·||² per module of the gradients, parameters (and updates), each weighted by w_p
        # (``_across``), so that the sum over ranks counts every shard once and every replica
        # once                                                         (2 or 3, M+1)
        mod_sq = P["gp_sq"]
        if self._have_before:
            # Σ ||θ_before - θ_after||² (θ_before stays, for the offending indices of a
            # non-finite parameter). Under FSDP2 of this rank's shards.
            params = self._local_params() if self._has_dtensor else self._params
            d_sq = self._update_sq(params, P["fast"])
            # (fast form: the rows of Σg², Σθ² and this one are consecutive already)
            mod_sq = self._fs_gpd if d_sq is self._fs_d else torch.cat([mod_sq, d_sq[None]])
        has_update = mod_sq.shape[0] == 3
        g_max = P["g_max"]
        A = len(self._act_mods)
        act = torch.stack([s if s is not None else torch.full((5,), math.nan, device=self._device)
                           for s in self._a_stats]) if A else None
        agn = torch.stack([g.reshape(()) if g is not None else torch.full((), math.nan, device=self._device)
                           for g in self._a_gnorm]) if A else None
        # non-finite bookkeeping from the rows of sums (``_bad``). On one process only their
        # total rides along with the statistics: finite (nearly always), nothing was NaN/Inf
        # and the counts are 0; else they are worked out and read back in a second transfer
        # (each kernel of a logging step runs cold: ~20-30 us each on the small benchmark model)
        rows = len(self._row_steps)
        # (rows, W): a traced run's rows differ in length (what each step traced), padded
        # (pad_sequence: ~67 us for 50 rows, a stack ~9)
        if len(self._rows) == 1:  # every=1
            ring = self._rows[0][None]
        else:
            ring = torch.stack(self._rows) if self.origin != "trace" else torch.nn.utils.rnn.pad_sequence(self._rows, batch_first=True)
        a_ring = torch.stack(self._a_rows) if A else None  # (rows, A)
        if self.world > 1:
            g_bad, row_bad, a_bad = self._bad(ring, a_ring)
        else:
            total = ring.sum().reshape(1) if not A else torch.stack([ring.sum(), a_ring.sum()])

        # Cross-rank reduction (logging steps only): sums and maxima in two collectives.
        # Sums of squares are already weighted per parameter (w_p): replicas count once.
        extra = self._stat_sums()  # B: per-rank sums of the noise scale and cosine, reduced alike
        if self.world > 1:
            sum_parts = [mod_sq] + extra + ([act, agn ** 2] if A else [])
            # (per rank: whether its own traced row went bad, for the origin exchange)
            max_parts = [g_bad, g_max, row_bad.amax(0, keepdim=True)] + ([a_bad] if A else [])
            flat = [torch.cat([t.flatten() for t in parts]) for parts in (sum_parts, max_parts)]
            ops = (torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.MAX)
            for t, op in zip(flat, ops):
                torch.distributed.all_reduce(t, op=op)
            # (only the reduced values are read back below; activation stats are averaged)
            s, mx = flat
            mod_sq, s = s[: mod_sq.numel()], s[mod_sq.numel() :]
            for i, t in enumerate(extra):
                extra[i], s = s[: t.numel()], s[t.numel() :]
            if A:
                act = s[: 5 * A] / self.world
                agn = (s[5 * A :] / self.world).sqrt()
            k = rows * W
            g_bad_all, g_max, any_bad = mx[:k], mx[k : k + W], mx[k + W : k + W + 1]
            a_bad = mx[k + W + 1 :] if A else None

        # One vector of everything, one transfer: the sums and maxima as they are; norms,
        # ratios and cosines are worked out from them on the host below (on a logging step's
        # cold caches a kernel on a handful of values costs ~2 us; the host's arithmetic on
        # Python floats ~0.1 us a value)
        clip_calls = self._clip_calls
        lr_dev = [(i, g["lr"]) for i, g in enumerate(self.optimizer.param_groups)
                  if isinstance(g["lr"], torch.Tensor)] if self.optimizer is not None else []
        parts = [mod_sq, g_max] + extra + [lr.to(self._device) for _, lr in lr_dev]
        if clip_calls:
            parts += [self._clip_coef, self._clip_norm, self._clip_count]
        if A:
            parts += [act, agn]
        # non-finite bookkeeping rides along
        parts += [g_bad_all, row_bad, any_bad] + ([a_bad] if A else []) if self.world > 1 else [total]
        hists = P.get("hist", [])
        names = self.names
        hist_tags = [f"hist/{kind}/{names[k]}" for kind, k, _ in hists]
        parts += [h for _, _, h in hists]
        if self._hist_now and A:
            for a, h in enumerate(self._a_hist):
                if h is not None:
                    hist_tags.append(f"hist/act/{self.act_names[a]}"); parts.append(h)
        sizes = [t.numel() for t in parts]
        values = torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in parts]).float().cpu().tolist()  # the one transfer
        at = 0

        def take(k):
            nonlocal at
            at += k
            return values[at - k : at]

        # reset the accumulators (in place, on the device)
        steps, metas = self._row_steps, self._row_meta
        self._rows, self._row_steps, self._row_meta, self._a_rows = [], [], [], []
        self._a_stats = [None] * A; self._a_hist = [None] * A; self._a_gnorm = [None] * A
        self._clip_count.zero_(); self._clip_calls = 0
        self._pending = None

        # the statistics, from the values read back
        tags, scalars = [], []

        def put(stat, names, v):
            # v: a float, or one value per name; per module also the last one ("rest"), not
            # logged (its tag is None, dropped below)
            if names is None:
                tags.append(stat); scalars.append(v)
            else:
                key = (stat, id(names), len(v))
                if key not in self._tags:
                    self._tags[key] = [tb.tag(stat, x) for x in names] + [None] * (len(v) - len(names))
                tags.extend(self._tags[key]); scalars.extend(v)

        g_sq, p_sq = take(W), take(W)
        d_sq = take(W) if has_update else None
        g_max = take(W)
        extra = [take(k) for k in sizes[2 : 2 + len(extra)]]
        put("grad/norm", names, [stats.sqrt(x) for x in g_sq])
        put("grad/max_abs", names, g_max)
        p_norm = [stats.sqrt(x) for x in p_sq]
        put("param/norm", names, p_norm)
        if d_sq is not None:
            ratio = [stats.update_ratio(stats.sqrt(d), p) for d, p in zip(d_sq, p_norm)]
            put("update/ratio", names, ratio)
            put("update/log10_ratio", names, [stats.log10(r) for r in ratio])
        put("global/grad_norm", None, stats.sqrt(math.fsum(g_sq)))
        self._put_stats(put, g_sq, extra)  # B: noise/*, grad/cosine_prev/*
        host = {}  # scalars already on the host (float learning rates)
        if self.optimizer is not None:
            device_lr = dict(lr_dev)
            for i, group in enumerate(self.optimizer.param_groups):
                if i in device_lr:  # capturable / tensor lr stays on the device
                    put(f"global/lr/group{i}", None, take(1)[0])
                else:
                    host[f"global/lr/group{i}"] = float(group["lr"])
        if clip_calls:
            coef, norm, count = take(3)
            put("global/clip_coef", None, coef)
            put("global/clip_norm_before", None, norm)
            put("global/clip_fraction", None, count / clip_calls)
        if A:
            a = take(5 * A)
            for j, stat in enumerate(("act/mean", "act/std", "act/near_zero", "act/dead", "act/saturation")):
                put(stat, self.act_names, a[j::5])
            put("act/grad_norm", self.act_names, take(A))
        rest = values[at:]
        key = tuple(tags)
        if key not in self._kept:  # without the modules' "rest" entries (None): positions, tags
            kept = [i for i, t in enumerate(tags) if t is not None]
            self._kept[key] = (operator.itemgetter(*kept) if len(kept) > 1 else lambda v, i=kept: [v[j] for j in i],
                               [tags[i] for i in kept])
        pick, kept = self._kept[key]
        scalars, tags = list(pick(scalars)), list(kept)
        clean = False  # nothing was NaN/Inf since the last log: every count is 0
        if self.world > 1:
            bookkeeping, rest = rest[: rows * (M + 2) + 1 + rows * A], rest[rows * (M + 2) + 1 + rows * A :]
        else:
            clean = all(map(math.isfinite, rest[: 1 + bool(A)]))
            if not clean:  # the second transfer
                g_bad, row_bad, a_bad = self._bad(ring, a_ring)
                bookkeeping = torch.cat([g_bad.reshape(-1), row_bad, row_bad.amax(0, keepdim=True)] + (
                    [a_bad.reshape(-1)] if A else [])).cpu().tolist()
            rest = rest[1 + bool(A) :]
        if clean:
            nonfinite = anywhere = 0
            per_module = [0.0] * M
        else:
            k = rows * (M + 1)
            gb = [bookkeeping[r * (M + 1) : (r + 1) * (M + 1)] for r in range(rows)]  # per step, per module
            rb, anywhere = bookkeeping[k : k + rows], bookkeeping[k + rows]
            ab = [bookkeeping[k + rows + 1 + r * A : k + rows + 1 + (r + 1) * A] for r in range(rows)]  # per hooked activation
            nonfinite = sum(map(sum, gb)) + sum(map(sum, ab))
            per_module = [sum(col) for col in zip(*gb)][:M] if rows else [0.0] * M
        if self.rank == 0:
            # nonfinite/<name>: steps with a non-finite parameter or gradient, per module
            key = ("nonfinite", id(names), M)
            if key not in self._tags:
                self._tags[key] = [tb.tag("nonfinite", x) for x in names]
            tags += self._tags[key]
            scalars += per_module
            host["global/nonfinite"] = nonfinite
            self._writes.append((n, tags + list(host), scalars + list(host.values())))
            width = 5 + stats.HIST_BINS
            for i, t in enumerate(hist_tags):
                tb.write_histogram(self.writer, t, n, rest[i * width : (i + 1) * width])
            if len(self._writes) >= _WRITE_BATCH or time.monotonic() - self._written_at > _WRITE_SECS:
                self._write()
        report = self._nonfinite(ring, steps, metas, gb, rb, ab) if (nonfinite or anywhere) else None
        self._held = None
        self._have_before = False
        if report is not None:
            self._report(report)

    def _bad(self, ring, a_ring):
        """From the rows of sums: per step and module, was a parameter or its gradient NaN/Inf
        (rows, M+1); per step, was anything NaN/Inf (rows,); per step and hooked activation
        (rows, A) or None. Floats, 0 or 1."""
        bad = torch.isfinite(ring).logical_not_()
        g_bad = (bad[:, : len(self._to_module)].float() @ self._to_module).clamp_max_(1)  # (rows, M+1)
        row_bad = bad.any(1)
        a_bad = None
        if a_ring is not None:
            a_bad = torch.isfinite(a_ring).logical_not_()
            row_bad |= a_bad.any(1)
            a_bad = a_bad.float()
        return g_bad, row_bad.float(), a_bad

    def _nonfinite(self, ring, steps, metas, gb, rb, ab):
        """The origin to report: where the first non-finite value since the last log was born."""
        first = next((r for r in range(len(steps)) if rb[r]), None)  # this rank's first bad step
        mine = None
        if first is not None:
            # read that row back (a second transfer, only when something went bad). Not
            # traced, it still names a parameter that is non-finite.
            values = ring[first].tolist()  # [grads and params (E), traced (T)]
            E = len(self._check.owner)
            values = self._check.per_tensor(values[:E]) + values[E:]  # P grads, P params, T traced
            found = origin_.decode(values, metas[first] or ([], {}), self._param_names)
            if found is not None and (metas[first] is not None or found[0] == "parameter"):
                mine = self._origin(found, steps[first])
        if self.world > 1:  # the earliest birth over all ranks, named on every rank
            everyone = [None] * self.world
            torch.distributed.all_gather_object(everyone, mine)
            found = [o for o in everyone if o is not None]
            mine = min(found, key=lambda o: o.order) if found else None
        if mine is not None:
            return mine
        # untraced (origin='parameters') and no parameter non-finite: the step and the modules,
        # a non-finite activation (forward) before a non-finite gradient (backward)
        r = next((r for r in range(len(steps)) if any(gb[r]) or any(ab[r])), None)
        if r is None:  # (a traced value went non-finite, and no birth was found: not expected)
            return origin_.NonFiniteOrigin(origin_.OUTSIDE, "forward", steps[first] if first is not None else steps[-1])
        if any(ab[r]):
            mods = [self.act_names[a] for a, b in enumerate(ab[r]) if b]
            o = origin_.NonFiniteOrigin("', '".join(mods), "forward", steps[r])
            o.how = "activation non-finite (origin='trace' names where it was born)"
            return o
        mods = [self.names[k] if k < self._M else "(other parameters)" for k, b in enumerate(gb[r]) if b]
        o = origin_.NonFiniteOrigin("', '".join(mods), "gradient", steps[r])
        o.how = ("gradient non-finite while every parameter was finite: born in the forward or "
                 "backward (origin='trace' names where)")
        return o

    def _origin(self, found, step):
        kind, module, op, order, (what, i, label) = found
        # the first few offending elements: of the parameter or its .grad as they are now, of
        # a traced tensor when the step is the one being reported
        if what == "param":  # as it was at the step if it was copied then, else as it is now
            then = self._before_of(i) if self._have_before and step == self._n - 1 else stats.local(self._params[i])
            detail = origin_.offending(then, self._param_names[i][1])
        elif what == "grad":  # (under FSDP2 the indices are of this rank's shard)
            detail = origin_.offending(stats.local(self._params[i].grad), self._param_names[i][1] + ".grad")
        elif self._held is not None and self._held[0] == step:
            detail = origin_.offending(self._held[1][i], label)
        else:
            detail = ""
        o = origin_.NonFiniteOrigin(module, kind, step, op, self.rank, detail)
        o.order = (step, origin_.KINDS.index(kind), order, self.rank)
        return o

    def _write(self):
        """Hand the buffered logging steps to the writer, one event each, in one burst: each
        event wakes the SummaryWriter's thread, and a wake-up per step costs more than a small
        model's step when the CPU is busy."""
        _write_out(self.writer, self._writes, flush=False)
        self._written_at = time.monotonic()

    def _report(self, origin):
        msg = f"GradientMonitor: {origin.describe()} (reported at step {self._n - 1})"
        origin.message = msg
        if self.first_nonfinite is None:  # the run's first, not the latest report
            self.first_nonfinite = origin
        if self.rank == 0:
            self._write()
            self.writer.flush()
            tb.flush_layer_runs(self.writer)  # the per-layer runs too: on disk before a raise
        if self.on_nonfinite == "raise":
            raise NonFiniteError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)

    # -- across ranks, noise scale, direction (stats.py, noise.py) -----------------------------

    def _init_distributed_stats(self, noise_scale, batch_size, noise_ema, cosine):
        self._has_dtensor = any(stats.is_dtensor(p) for p in self._params)
        # w_p: 1 where this rank's piece of parameter p counts in a cross-rank sum (stats.rank_weight)
        w = [stats.rank_weight(p, self.rank, self.world, self.sharded) for p in self._params]
        self._w = None if all(x == 1.0 for x in w) else torch.tensor(w, device=self._device)
        self._w_entries = self._w_g = self._w_update = None  # the same per entry of the check (fast form)
        if self._w is not None:
            P, own = len(self._params), self._check.owners
            self._w_entries = torch.tensor([w[i % P] for i in own(0, 2 * P)], device=self._device)
            self._w_g = torch.tensor([w[i] for i in own(0, P)], device=self._device)
            self._w_update = torch.tensor([w[i - P] for i in own(P, 2 * P)], device=self._device)
        per_rank = not (self._has_dtensor or (self.sharded and self.world > 1))  # else increments of shards
        self._noise = noise.NoiseScale(self, batch_size, noise_ema, per_rank) if noise_scale else None
        self._direction = noise.Direction(self) if cosine else None
        if self._noise is not None and self._log_now:
            self._noise.arm()

    def _stat_tags_present(self):
        return ({"noise/B_simple", "noise/tr_sigma", "noise/g_sq"} if self._noise is not None else set()) | (
            {"grad/cosine_prev"} if self._direction is not None else set())

    def _across(self, per_param, weighted=True):
        """Σ per module (+ rest) of a (P,) vector; ``weighted``: by w_p, so that a sum over ranks
        counts each piece of a parameter once (not for per-rank quantities such as one rank's
        micro-batch gradient).                                                       (M+1,)"""
        if weighted and self._w is not None:
            per_param = per_param * self._w
        return torch.zeros(self._M + 1, device=self._device).index_add_(0, self._group, per_param)

    def _stats_before_update(self, grads):
        if self._has_dtensor:  # the weights w_p came from the parameters' placements
            for p in self._params:
                if p.grad is not None and stats.is_dtensor(p.grad):
                    stats.check_placements(p.grad)
                    if p.grad.placements != p.placements:
                        raise NotImplementedError(
                            f"GradientMonitor: a gradient placed as {p.grad.placements} for a parameter placed as "
                            f"{p.placements}; only gradients placed like their parameters are supported"
                        )
        if self._direction is not None:
            self._direction.before_update(grads)

    def _stats_after_update(self):
        if self._noise is not None:  # for the coming step: its hooks if it logs, else none
            self._noise.arm() if self._log_now else self._noise.disarm()

    def _stat_sums(self):
        self._extra = [(x, x.sums()) for x in (self._noise, self._direction) if x is not None]
        return [t for _, ts in self._extra for t in ts]

    def _put_stats(self, put, g_sq, reduced):
        for x, ts in self._extra:
            mine, reduced = reduced[: len(ts)], reduced[len(ts) :]
            x.put(put, g_sq, mine)
        self._extra = []

    # -- lifetime ----------------------------------------------------------------------------

    def close(self):
        """Remove every hook and the clip listener; flush the writer (it stays open)."""
        if self._closed:
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        _ATTACHED.discard(self.model)
        if self.optimizer is not None:
            _ATTACHED.discard(self.optimizer)
        self._before = None
        self._tracer.close()
        self._held = None
        if self._noise is not None:
            self._noise.close()
        if self._direction is not None:
            self._direction.close()
        self._closed = True
        if self.rank == 0:
            self._write()
            self._finalize.detach()
            self.writer.flush()
            tb.close_layer_runs(self.writer)  # the per-layer runs beside it are the monitor's: closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return (f"GradientMonitor({len(self.names)} modules, every={self.every}, hist_every={self.hist_every}, "
                f"activations={bool(self._act_mods)}, steps={self._n})")
