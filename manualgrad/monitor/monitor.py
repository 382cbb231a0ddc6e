"""GradientMonitor: hooks that gather per-module gradient statistics and log them to TensorBoard.

Cost model. Every step (logged or not) the monitor runs a handful of small kernels and never
waits for the device: one foreach L2 norm over the final gradients, folded per module into a
device-side non-finite counter (and, with ``activations=True``, one norm per hooked
activation). A norm that overflows float32 (above ~1.8e19) counts as non-finite too. On a logging step it also computes norms, the update and (every ``hist_every``)
64-bin histograms, stacks everything into one tensor and moves it to the host once.

Hook points. With ``optimizer=`` a step pre-hook reads the final ``.grad`` (after gradient
accumulation, unscaling and clipping; before the update) and, on logging steps only, keeps a
copy of the parameters; the step post-hook measures the update ||θ_after - θ_before||. Without
an optimizer the user calls ``mon.step()`` after backward; there is then no update ratio.
Activations use forward hooks, and their gradients ``output.register_hook`` from inside the
forward hook on logging steps: no full backward hooks, which break on in-place ops.

Distributed. Statistics are those of the whole model on every rank: under DDP of the
gradients after the all-reduce (rank 0's replica), under FSDP2 (``fully_shard``: DTensor
parameters and gradients) combined from the shards: sums of squares added across ranks (each
shard once, each replica once), maxima the maximum over shards, in the one all-reduce of a
logging step. Histograms under sharding are of rank 0's shard.

Also logged (``noise.py``): the gradient noise scale ``noise/B_simple`` (with ``noise/tr_sigma``,
``noise/g_sq``) from the micro-batch and per-rank gradients (under FSDP2, the micro-batch
increments of the sharded gradients), when a step has more than one of them (under
torch.compile pass ``batch_size``); and ``grad/cosine_prev/<name>``, the cosine between a
module's gradients at successive logging steps. Both work on logging steps only: one squared
norm per parameter and micro-batch, one dot product per parameter, and a copy of the gradients
kept from one logging step to the next (``cosine=False`` saves it).

torch.compile. Hooks registered before compiling are traced into the graph without breaks:
they only do tensor arithmetic into preallocated tensors. Whether the coming step is logged is
a Python bool the graph is guarded on, so a compiled model holds up to three variants (plain,
logging, logging with histograms). Under compile the activation gradient norm is not measured:
a hook on an intermediate tensor would break the graph.
"""
from __future__ import annotations

import math
import re
import warnings
import weakref

import torch

from .. import utils
from . import noise, stats
from . import tensorboard as tb

__all__ = ["GradientMonitor", "NonFiniteError"]

_ATTACHED = weakref.WeakSet()  # models and optimizers with a monitor attached


class NonFiniteError(FloatingPointError):
    """A gradient or activation went NaN/Inf (raised with ``on_nonfinite='raise'``)."""


def _is_activation(module):
    return any(c.__module__ == "torch.nn.modules.activation" for c in type(module).__mro__)


def _dist_info():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
        on_nonfinite ('warn' | 'raise'): what to do at a logging step when a gradient or
            activation was NaN/Inf since the previous one.
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

    Use as a context manager, or call ``close()``: it removes every hook it registered.
    """

    def __init__(self, model, writer, optimizer=None, every=50, hist_every=1000, include=None,
                 exclude=None, activations=False, on_nonfinite="warn", sharded=False,
                 noise_scale=True, batch_size=None, noise_ema=0.9, cosine=True):
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
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
        self.on_nonfinite, self.sharded = on_nonfinite, sharded
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
        self._group_list = group
        self._zero = torch.zeros((), device=dev)  # stands in for a missing .grad
        self._step_t = torch.zeros((), device=dev)  # the step number, on the device
        # Non-finite gradients per module (+ rest): steps counted, first step seen (inf = never)
        self._g_bad = torch.zeros(M + 1, device=dev)
        self._g_first = torch.full((M + 1,), math.inf, device=dev)

        # Forward order, recorded by one-shot pre-hooks during the first step's forward.
        self._order, self._order_done = [], False
        mods = [m for _, m in chosen]
        self.act_names, self._act_mods = [], []
        if activations:
            for n, m in named:
                if (m in mods or (not list(m.children()) and _is_activation(m))) and keep(n):
                    self.act_names.append(n); self._act_mods.append(m)
        A = len(self._act_mods)
        self._a_bad = [torch.zeros((), device=dev) for _ in range(A)]
        self._a_first = [torch.full((), math.inf, device=dev) for _ in range(A)]
        self._a_stats = [None] * A
        self._a_hist = [None] * A
        self._a_gnorm = [None] * A
        self._log_now, self._hist_now = True, self.hist_every > 0  # for the coming step (step 0)

        order_keys = {}
        for k, m in enumerate(mods):
            order_keys.setdefault(m, []).append(("grad", k))
        for a, m in enumerate(self._act_mods):
            order_keys.setdefault(m, []).append(("act", a))
        for m, keys in order_keys.items():
            self._handles.append(m.register_forward_pre_hook(self._order_hook(keys)))
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
        self._closed = False
        self.first_nonfinite = None  # (module name, 'gradient'|'activation', step) once seen

        self._init_distributed_stats(noise_scale, batch_size, noise_ema, cosine)  # B: noise.py, stats.py

        if self.rank == 0:
            present = {"grad/norm", "grad/max_abs", "param/norm", "global/grad_norm", "global/lr",
                       "global/clip_coef", "global/clip_fraction", "global/nonfinite"}
            if optimizer is not None:
                present |= {"update/ratio", "update/log10_ratio"}
            present |= self._stat_tags_present()  # B
            if A:
                present |= {"act/mean", "act/std", "act/near_zero", "act/dead", "act/saturation", "act/grad_norm"}
            writer.add_custom_scalars(tb.custom_layout(present))

    # -- hooks -------------------------------------------------------------------------------

    def _order_hook(self, keys):
        def hook(module, args):
            if torch.compiler.is_compiling() or self._order_done:
                return
            for k in keys:
                if k not in self._order:
                    self._order.append(k)
        return hook

    def _act_hook(self, a, dim, kind):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                return
            y = output.detach()
            # every step: count non-finite activations, remember the first step         0-dim
            bad = ~torch.isfinite(torch.linalg.vector_norm(y, dtype=torch.float32))
            self._a_bad[a].add_(bad)
            self._a_first[a].copy_(torch.where(bad & torch.isinf(self._a_first[a]), self._step_t, self._a_first[a]))
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
        return [self._zero if p.grad is None else p.grad.detach() for p in self._params]

    def _local_params(self):
        if self._has_dtensor:
            return [stats.local(p.detach()) for p in self._params]
        return [p.detach() for p in self._params]

    def _module_sum(self, per_param):
        """Σ over each module's parameters of a (P,) vector -> (M + 1,)."""
        return torch.zeros(self._M + 1, device=self._device).index_add_(0, self._group, per_param)

    def _module_max(self, per_param):
        return torch.zeros(self._M + 1, device=self._device).scatter_reduce_(0, self._group, per_param, "amax")

    def _before_update(self):
        self._order_done = True
        grads = self._grads()
        if self._log_now:
            # ||g||_2 per parameter in float32 (one foreach kernel; on CPU ~30x faster than
            # the max-abs norm), summed per module                              (M+1,)
            norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))  # (P,)
            g_sq = self._module_sum(norms * norms)
            g_sq_across = g_sq if self._w is None else self._across(norms * norms)  # replicas once
        else:
            # other steps only need to know whether a gradient went NaN/Inf: a sum of g per
            # parameter turns either into a non-finite value, at half the cost of a norm
            # (and it overflows far later than a sum of squares)                 (M+1,)
            g_sq = self._module_sum(torch.stack([g.sum(dtype=torch.float32) for g in grads]))
        # folded per module into the device-side non-finite counter, every step
        bad = ~torch.isfinite(g_sq)
        self._g_bad.add_(bad)
        self._g_first.copy_(torch.where(bad & torch.isinf(self._g_first), self._step_t, self._g_first))
        if not self._log_now:
            return
        # logging step: max |g| = max(max g, -min g) (no |g| temporary), parameter norms, and a
        # copy of the parameters for the update
        gmax = self._module_max(torch.stack([stats.max_abs(g) for g in grads]))
        with torch.no_grad():
            params = self._local_params()
            p_sq = self._across(torch.stack(torch._foreach_norm(params, 2.0, dtype=torch.float32)) ** 2)
            if self.optimizer is not None:
                # one buffer, allocated at the first logging step and reused: no allocation
                # proportional to the model afterwards
                if self._before is None:
                    self._before = [p.clone() for p in params]
                else:
                    torch._foreach_copy_(self._before, params)
                self._have_before = True
        self._pending = dict(g_sq=g_sq_across, g_max=gmax, p_sq=p_sq)
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

    def _after_update(self):
        n = self._n
        self._n += 1
        if self._log_now:
            self._log(n)
        self._log_now = self._n % self.every == 0
        self._hist_now = self.hist_every > 0 and self._n % self.hist_every == 0
        self._step_t.fill_(self._n)
        self._stats_after_update()  # B

    # -- logging -----------------------------------------------------------------------------

    def _log(self, n):
        P, M = self._pending, self._M
        d_sq = None
        if self._have_before:
            with torch.no_grad():
                # θ_before - θ_after, in place in the buffer: ||Δθ|| per parameter
                torch._foreach_sub_(self._before, self._local_params())
                d_sq = self._across(torch.stack(torch._foreach_norm(self._before, 2.0, dtype=torch.float32)) ** 2)
            self._have_before = False
        A = len(self._act_mods)
        act = torch.stack([s if s is not None else torch.full((5,), math.nan, device=self._device)
                           for s in self._a_stats]) if A else None
        agn = torch.stack([g.reshape(()) if g is not None else torch.full((), math.nan, device=self._device)
                           for g in self._a_gnorm]) if A else None

        # Cross-rank reduction (logging steps only): sums, maxima, minima in three collectives.
        # Sums of squares are already weighted per parameter (``_across``): replicas count once.
        extra = self._stat_sums()  # B: per-rank sums of the noise scale and cosine, reduced alike
        sums = [P["p_sq"], P["g_sq"]] + ([d_sq] if d_sq is not None else []) + extra
        if self.world > 1:
            sum_parts = sums + ([act.flatten(), agn ** 2] if A else [])
            max_parts = [self._g_bad, P["g_max"]] + ([torch.stack(self._a_bad)] if A else [])
            min_parts = [self._g_first] + ([torch.stack(self._a_first)] if A else [])
            flat = [torch.cat([t.flatten() for t in parts]) for parts in (sum_parts, max_parts, min_parts)]
            ops = (torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.MAX, torch.distributed.ReduceOp.MIN)
            for t, op in zip(flat, ops):
                torch.distributed.all_reduce(t, op=op)
            # (only the reduced values are read back below; activation stats are averaged)
            s, mx, mn = flat
            P["p_sq"], s = s[: M + 1], s[M + 1 :]
            P["g_sq"], s = s[: M + 1], s[M + 1 :]
            if d_sq is not None:
                d_sq, s = s[: M + 1], s[M + 1 :]
            for i, t in enumerate(extra):
                extra[i], s = s[: t.numel()].reshape(t.shape), s[t.numel() :]
            if A:
                act = s[: 5 * A].reshape(A, 5) / self.world
                agn = (s[5 * A :] / self.world).sqrt()
            g_bad, P["g_max"], a_bad = mx[: M + 1], mx[M + 1 : 2 * M + 2], mx[2 * M + 2 :]
            g_first, a_first = mn[: M + 1], mn[M + 1 :]
        else:
            g_bad, g_first = self._g_bad, self._g_first
            a_bad = torch.stack(self._a_bad) if A else None
            a_first = torch.stack(self._a_first) if A else None

        # One vector of everything, one transfer.
        tags, parts = [], []

        def put(stat, names, t):
            if names is None:
                tags.append(stat)
            else:
                tags.extend(tb.tag(stat, x) for x in names)
            parts.append(t.reshape(-1).float())

        names = self.names
        g_norm = P["g_sq"].sqrt()
        p_norm = P["p_sq"].sqrt()
        put("grad/norm", names, g_norm[:M])
        put("grad/max_abs", names, P["g_max"][:M])
        put("param/norm", names, p_norm[:M])
        if d_sq is not None:
            ratio, log10 = stats.update_ratio(d_sq.sqrt(), p_norm)
            put("update/ratio", names, ratio[:M])
            put("update/log10_ratio", names, log10[:M])
        put("global/grad_norm", None, P["g_sq"].sum().sqrt())
        self._put_stats(put, P["g_sq"], extra)  # B: noise/*, grad/cosine_prev/*
        host = {}  # scalars already on the host (float learning rates)
        if self.optimizer is not None:
            for i, group in enumerate(self.optimizer.param_groups):
                lr = group["lr"]
                if isinstance(lr, torch.Tensor):  # capturable / tensor lr stays on the device
                    put(f"global/lr/group{i}", None, lr.to(self._device))
                else:
                    host[f"global/lr/group{i}"] = float(lr)
        if self._clip_calls:
            put("global/clip_coef", None, self._clip_coef)
            put("global/clip_norm_before", None, self._clip_norm)
            put("global/clip_fraction", None, self._clip_count / self._clip_calls)
        if A:
            for j, stat in enumerate(("act/mean", "act/std", "act/near_zero", "act/dead", "act/saturation")):
                put(stat, self.act_names, act[:, j])
            put("act/grad_norm", self.act_names, agn)
        n_scalars = len(tags)
        # non-finite bookkeeping rides along
        parts += [g_bad, g_first] + ([a_bad, a_first] if A else [])
        hists = P.get("hist", [])
        hist_tags = [f"hist/{kind}/{names[k]}" for kind, k, _ in hists]
        parts += [h for _, _, h in hists]
        if self._hist_now and A:
            for a, h in enumerate(self._a_hist):
                if h is not None:
                    hist_tags.append(f"hist/act/{self.act_names[a]}"); parts.append(h)
        values = torch.cat([t.reshape(-1).float() for t in parts]).cpu().tolist()  # the one transfer

        # reset the accumulators (in place, on the device)
        self._g_bad.zero_(); self._g_first.fill_(math.inf)
        for t in self._a_bad:
            t.zero_()
        for t in self._a_first:
            t.fill_(math.inf)
        self._a_stats = [None] * A; self._a_hist = [None] * A; self._a_gnorm = [None] * A
        self._clip_count.zero_(); self._clip_calls = 0
        self._pending = None

        scalars, rest = values[:n_scalars], values[n_scalars:]
        gb, gf, rest = rest[: M + 1], rest[M + 1 : 2 * M + 2], rest[2 * M + 2 :]
        if A:
            ab, af, rest = rest[:A], rest[A : 2 * A], rest[2 * A :]
        else:
            ab, af = [], []
        nonfinite = sum(gb) + sum(ab)
        if self.rank == 0:
            tb.write_scalars(self.writer, n, tags, scalars)
            tb.write_scalars(self.writer, n, list(host), list(host.values()))
            self.writer.add_scalar("global/nonfinite", nonfinite, global_step=n)
            width = 5 + stats.HIST_BINS
            for i, t in enumerate(hist_tags):
                tb.write_histogram(self.writer, t, n, rest[i * width : (i + 1) * width])
        if nonfinite:
            self._report_nonfinite(n, gb, gf, ab, af)

    def _report_nonfinite(self, n, gb, gf, ab, af):
        rank = {k: i for i, k in enumerate(self._order)}
        cands = []
        for k, (c, f) in enumerate(zip(gb, gf)):
            if c:
                name = self.names[k] if k < self._M else "(parameters outside the monitored modules)"
                cands.append((f, 1, rank.get(("grad", k), len(rank) + k), "gradient", name))
        for a, (c, f) in enumerate(zip(ab, af)):
            if c:
                cands.append((f, 0, rank.get(("act", a), len(rank) + a), "activation", self.act_names[a]))
        # earliest step first; within a step forward (activations) before backward (gradients),
        # then forward order
        cands.sort(key=lambda c: c[:3])
        f, _, _, kind, name = cands[0]
        msg = (f"GradientMonitor: non-finite {kind} in module '{name}' first at step {int(f)} "
               f"(checked at step {n}; {len(cands)} module statistic(s) affected)")
        if self.first_nonfinite is None:  # the run's first, not the latest report
            self.first_nonfinite = (name, kind, int(f))
        if self.rank == 0:
            self.writer.flush()
        if self.on_nonfinite == "raise":
            raise NonFiniteError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # -- across ranks, noise scale, direction (stats.py, noise.py) -----------------------------

    def _init_distributed_stats(self, noise_scale, batch_size, noise_ema, cosine):
        self._has_dtensor = any(stats.is_dtensor(p) for p in self._params)
        # w_p: 1 where this rank's piece of parameter p counts in a cross-rank sum (stats.rank_weight)
        w = [stats.rank_weight(p, self.rank, self.world, self.sharded) for p in self._params]
        self._w = None if all(x == 1.0 for x in w) else torch.tensor(w, device=self._device)
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
        if self._noise is not None and self._log_now:
            self._noise.arm()  # for the coming logging step

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
        if self._noise is not None:
            self._noise.close()
        if self._direction is not None:
            self._direction.close()
        self._closed = True
        if self.rank == 0:
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
