"""The gradient noise scale and the direction of successive gradients, on logging steps only.

Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A.1). With per-sample gradients g_i of mean G and covariance Sigma, the gradient of a
batch of B samples has E|g_B|^2 = |G|^2 + tr(Sigma) / B. Two batch sizes B_small < B_big give
two equations, hence the unbiased estimates

    |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

and the simple noise scale B_simple = tr(Sigma) / |G|^2: the batch size above which a larger
batch stops buying a proportionally larger step. A step already has both sizes when it has K
micro-batches of b samples on each of R ranks (K R > 1):

    G_small   the gradient of one micro-batch on one rank (B_small = b), seen by a tensor hook on
              every parameter before it is accumulated into ``.grad`` and before DDP's all-reduce;
              |G_small|^2 is the mean of the K R squared norms
    G_big     ``.grad`` at the end of the step's last backward (after DDP's all-reduce, before any
              unscaling or clipping; B_big = K R b)

Sharded parameters (FSDP2's ``fully_shard``, or ``sharded=True``) never see a rank's own
gradient: FSDP reduce-scatters it (the mean over ranks) into the shard's ``.grad``. There the
small batch is the increment of ``.grad`` over one backward (B_small = R b: its squared norm is
summed over the shards like every other statistic), measured from a copy of the shard's
``.grad`` taken when the backward starts (a tensor hook on the model's output), so it needs K > 1
micro-batches. A step where a backward ran without reducing (``set_requires_gradient_sync(False)``)
is skipped: its increments are not the micro-batches'.

Both are taken in the units of that final ``.grad``: micro-batch gradients are multiplied by K,
as if the loss had been divided by K (the usual accumulation). ``noise/g_sq`` and
``noise/tr_sigma`` are therefore the true |G|^2 and tr(Sigma) when each micro-batch loss is a
mean divided by K, K^2 times them when it is not, and S^2 times them under a loss scale S (AMP).
B_simple is a ratio and depends on none of these factors. One step's estimates are noisy (|G|^2
can come out negative); as the paper recommends, B_simple is the ratio of exponential moving
averages of the two over logging steps, and ``noise/g_sq``, ``noise/tr_sigma`` are those
averages (bias-corrected like Adam's moments); a step whose estimates are not finite (a NaN
gradient, an AMP overflow) is left out of them. Nothing is logged for a step with one
micro-batch on one rank.

b is dim 0 of the first tensor in the arguments of the model's forward (the mean over the step's
micro-batches, which are assumed of equal size), or ``batch_size``; under torch.compile the
forward is hidden and ``batch_size`` is needed (a warning says so).

Cost: on other steps, one forward pre-hook on the model that returns at once (~4 us of Python
per forward on CPU; none on one process without gradient accumulation, see ``NoiseScale``);
the parameters' hooks exist only during logging steps (one, counting backward passes, on one
process without accumulation). On a logging step, one squared norm per parameter and
micro-batch, one foreach norm of ``.grad`` per backward (after the first on one process), and a
few scalars in the monitor's one all-reduce and one transfer; with sharded parameters, a copy
of the shard's gradients during the logging step. No host sync.

Direction stability (``grad/cosine_prev/<name>``): per module, cos(g_t, g_s) between the final
gradient at this logging step t and at the previous logging step s. It keeps one copy of the
gradients between logging steps: as much memory as the gradients themselves (this rank's
shard under FSDP); ``cosine=False`` saves it.
"""
from __future__ import annotations

import math
import warnings

import torch

from . import stats


def estimates(g_small_sq, g_big_sq, b_small, b_big):
    """The unbiased (|G|^2, tr(Sigma)) from squared norms at two batch sizes (any shape)."""
    # |G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    # tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
    tr_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g_sq, tr_sigma


def _first_grad_output(output):
    for t in torch.utils._pytree.tree_leaves(output):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return t
    return None


def _reduces_gradients(model):
    """False when an FSDP2 module of ``model`` was told not to reduce (``set_requires_gradient_sync(False)``)."""
    for m in model.modules():
        state = getattr(m, "_get_fsdp_state", None)
        if state is not None:
            for group in getattr(state(), "_fsdp_param_groups", ()):
                if not getattr(group, "reduce_grads", True):
                    return False
    return True


def _first_batch_size(args, kwargs):
    if args and type(args[0]) is torch.Tensor and args[0].dim() > 0:  # the common case, without pytree
        return args[0].shape[0]
    for a in torch.utils._pytree.tree_leaves((args, kwargs)):  # tensors inside dicts and tuples too
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return a.shape[0]
    return None


class NoiseScale:
    """Hooks armed for one logging step; ``sums`` and ``put`` are called from the monitor's ``_log``."""

    def __init__(self, mon, batch_size=None, ema=0.9, per_rank=True):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"noise_ema must be in [0, 1), got {ema}")
        self.mon, self.batch_size, self.beta = mon, batch_size, float(ema)
        self.per_rank = per_rank  # False: sharded parameters, increments of .grad
        self._handles = []  # the parameters' hooks, during a logging step
        self._kind = None  # which: "count" (one, counting backward passes), "each" (every parameter's)
        self._armed = False
        self._warned = False
        # Module hooks are not added and removed at every logging step (under torch.compile that
        # would recompile each time); they do nothing unless armed or while compiling: under
        # torch.compile the forward is not seen, so pass ``batch_size`` (and, with sharded
        # parameters, no increments are measured). The batch-size hook (none when ``batch_size``
        # is given) is needed only when a step can have two batch sizes: always under
        # torch.distributed, on one process only with gradient accumulation. On one process it
        # goes at the first logging step with one backward (any hook on the model costs ~4 us of
        # Python per forward), and comes back for good at a logging step with several, which
        # then has no noise scale (its batch size was not seen). Likewise the parameters'
        # hooks: after a logging step with one backward, one hook (on the first parameter)
        # only counts the backward passes of the next logging steps, until one has several.
        model = mon.model
        self._module_handles = []
        self._size_handle = None
        self._for_good = mon.world > 1  # hooks settled: several batch sizes seen, or several ranks
        self._count_only = False  # one parameter hook, counting backward passes
        if batch_size is None:
            self._size_handle = model.register_forward_pre_hook(self._size_hook, with_kwargs=True)
        if not per_rank:
            self._module_handles.append(model.register_forward_hook(self._output_hook))
        self._ema_g = self._ema_tr = None  # moving averages of |G|^2 and tr(Sigma) (host floats)
        self._decay = None  # beta^t, t = logging steps averaged (a host float)
        self._reset()

    def _reset(self):
        self._small = []  # (parameter index, |g|^2 of one micro-batch on this rank)
        self._increments = None  # sharded: Σ over backwards of |increment of .grad|^2 per module
        self._base = None  # sharded: .grad when the current backward started
        self._unreduced = False  # sharded: a backward ran without reducing gradients
        self._big = None  # |.grad|^2 per module (+ rest) after the latest backward, weighted across ranks
        self._backwards = 0  # backward passes seen this step (K)
        self._sizes = []  # samples per micro-batch seen by the forward
        self._queued = False

    # -- hooks, registered for a logging step only -------------------------------------------

    def arm(self):
        if self._armed:
            return
        self._reset()
        self._armed = True
        kind = ("count" if self._count_only else "each") if self.per_rank else None
        if kind == self._kind:  # the hooks of the previous logging step, kept (every=1)
            return
        self.disarm()
        self._armed, self._kind = True, kind
        if kind == "count":
            self._handles.append(self.mon._params[0].register_hook(self._count_hook))
        elif kind == "each":
            for i, p in enumerate(self.mon._params):
                self._handles.append(p.register_hook(self._grad_hook(i)))

    def pause(self):
        """The logging step is over: its hooks stay until the monitor knows whether the next
        step logs too (``arm``: kept; ``disarm``: removed; at every=1 that saves registering
        and removing them every step)."""
        self._armed = False

    def disarm(self):
        self._armed = False
        self._kind = None
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def close(self):
        self.disarm()
        if self._size_handle is not None:
            self._size_handle.remove()
            self._size_handle = None
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()

    def _size_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling() or not self._armed:
            return
        if torch.is_grad_enabled() and self.batch_size is None:
            b = _first_batch_size(args, kwargs)
            if b is not None:
                self._sizes.append(b)

    def _count_hook(self, grad):
        # one process, one backward per step so far: only the number of backward passes is
        # needed (a second one turns every hook on for the next logging step, and this step has
        # no noise scale: its micro-batch norms were not taken). The hook on a parameter runs
        # once per backward that reaches it.
        self._backwards += 1

    def _grad_hook(self, i):
        def hook(grad):
            # this micro-batch's gradient on this rank, before accumulation and all-reduce
            self._small.append((i, torch.linalg.vector_norm(grad.detach(), dtype=torch.float32) ** 2))
            if not self._queued:
                self._queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._queue_end)
        return hook

    def _output_hook(self, module, args, output):
        if torch.compiler.is_compiling() or not self._armed:
            return
        out = _first_grad_output(output) if torch.is_grad_enabled() else None
        if out is not None:
            out.register_hook(self._backward_starts)

    def _backward_starts(self, grad):
        # the gradient reaches the model's output: no parameter's .grad has changed yet
        if self._queued:
            return
        self._queued = True
        self._unreduced |= not _reduces_gradients(self.mon.model)
        self._base = [g.clone() for g in self.mon._grads()]
        torch.autograd.Variable._execution_engine.queue_callback(self._queue_end)

    def _queue_end(self):
        # Runs after the backward; DDP queues the callback that waits for its all-reduce during
        # the backward, so a callback queued from here runs after it, on the all-reduced .grad.
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self):
        self._queued = False
        self._backwards += 1
        if self.per_rank and self.mon.world == 1 and self._backwards == 1:
            # one process: G_big is needed from the step's last backward only if it is not the
            # first (one backward on one process has no noise scale)
            return
        grads = self.mon._grads()
        norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
        self._big = self.mon._across(norms * norms)
        if self._base is not None:
            # this backward's increment of .grad (a 0-dim zero stands in for a missing .grad)
            inc = [g - b if g.shape == b.shape else g for g, b in zip(grads, self._base)]
            n = torch.stack(torch._foreach_norm(inc, 2.0, dtype=torch.float32))
            sq = self.mon._across(n * n)
            self._increments = sq if self._increments is None else self._increments + sq
            self._base = None

    # -- at the logging step -------------------------------------------------------------------

    def _measured(self):
        """The micro-batch size b, or None when this step has no two batch sizes to compare."""
        b = self.batch_size or (sum(self._sizes) / len(self._sizes) if self._sizes else None)
        if self._big is None or b is None:
            return None
        # (decided from what every rank knows alike: the all-reduce needs the same parts everywhere)
        if self.per_rank and self._backwards * self.mon.world < 2:
            return None
        if not self.per_rank and (self._increments is None or self._backwards < 2 or self._unreduced):
            return None
        return b

    def sums(self):
        """Per-rank sums to add up across ranks: [Σ |G_small|^2 per module, |G_big|^2 per module]."""
        self.pause()
        if self.per_rank and not self._for_good and self._backwards:  # one process
            if self._backwards > 1:  # accumulation: every hook back, for good
                self._for_good = True
                missing = self._count_only or (self.batch_size is None and self._size_handle is None)
                self._count_only = False
                if self.batch_size is None and self._size_handle is None:
                    self._size_handle = self.mon.model.register_forward_pre_hook(self._size_hook, with_kwargs=True)
                if missing:  # this step's micro-batch norms or batch size were not seen
                    return []
            else:
                self._count_only = True
                if self._size_handle is not None:
                    self._size_handle.remove()
                    self._size_handle = None
        if self._measured() is None:
            if self._sizes == [] and self.batch_size is None and self._backwards * self.mon.world > 1 and not self._warned:
                self._warned = True
                warnings.warn("GradientMonitor: no noise scale: the batch size was not seen (no tensor argument "
                              "in the model's forward, or torch.compile hid it); pass batch_size=",
                              RuntimeWarning, stacklevel=2)
            return []
        if not self.per_rank:
            return [self._increments, self._big]
        per_param = torch.zeros(len(self.mon._params), device=self.mon._device)
        if self._small:
            idx = torch.tensor([i for i, _ in self._small], device=self.mon._device)
            per_param.index_add_(0, idx, torch.stack([s for _, s in self._small]))
        return [self.mon._across(per_param, weighted=False), self._big]  # every rank's own micro-batches

    def put(self, put, g_sq, reduced):
        """``reduced``: what ``sums`` returned, summed across ranks and read back (lists of floats;
        ``g_sq`` is not needed here)."""
        b, K, R = self._measured(), self._backwards, self.mon.world
        self._reset()
        if b is None or not reduced:  # (not reduced: sums() left this step out)
            return
        small_sum, big = reduced  # per module (+ rest), read back: Python floats
        # per rank: K R micro-batch gradients of b samples; sharded: K increments of R b samples
        n_small, b_small = (K * R, b) if self.per_rank else (K, R * b)
        # |G_small|^2: their mean squared norm, in units of the final .grad (x K^2)
        g_small_sq = math.fsum(small_sum) / n_small * K**2
        g_sq, tr_sigma = estimates(g_small_sq, math.fsum(big), b_small, K * R * b)
        beta = self.beta
        if self._ema_g is None:
            self._ema_g = self._ema_tr = 0.0
            self._decay = 1.0
        # a non-finite step (a NaN gradient, an AMP overflow) is left out: one would poison the
        # averages for the rest of the run
        if math.isfinite(g_sq) and math.isfinite(tr_sigma):
            self._ema_g = beta * self._ema_g + (1 - beta) * g_sq
            self._ema_tr = beta * self._ema_tr + (1 - beta) * tr_sigma
            self._decay *= beta
        correction = 1.0 - self._decay  # Adam's bias correction 1 - beta^t
        put("noise/B_simple", None, stats.div(self._ema_tr, self._ema_g))
        put("noise/tr_sigma", None, stats.div(self._ema_tr, correction))
        put("noise/g_sq", None, stats.div(self._ema_g, correction))


class Direction:
    """cos(g_t, g_s) per module between successive logging steps."""

    def __init__(self, mon):
        self.mon = mon
        self._prev = None  # the gradients at the previous logging step (this rank's pieces)
        self._prev_buf = None  # ... the small ones as the monitor's check buffer held them
        self._prev_sq = None  # their squared norms per module, summed across ranks
        self._dot = None

    def before_update(self, grads):
        check = self.mon._check
        if check.filled and len(check.span(0, len(grads))[1]):
            return self._from_buffer(grads, check)
        if self._prev_buf is not None:  # the last log kept the buffer and the large ones only
            self._prev = self._prev_buf = None
        if self._prev is not None:
            # <g_t, g_s> per parameter (0 where a .grad appeared or vanished in between)
            if all(g.shape == q.shape and g.dtype == torch.float32 for g, q in zip(grads, self._prev)):
                # float32: g * q for all in one foreach call, then a sum each
                dots = [t.sum() for t in torch._foreach_mul(grads, self._prev)]
            else:
                dots = [
                    torch.dot(g.reshape(-1).float(), q.reshape(-1).float()) if g.shape == q.shape else self.mon._zero
                    for g, q in zip(grads, self._prev)
                ]
            self._dot = self.mon._across(torch.stack(dots))
        if self._prev is not None and all(g.shape == q.shape and g.dtype == q.dtype for g, q in zip(grads, self._prev)):
            torch._foreach_copy_(self._prev, grads)  # into the copies kept from the previous log: no allocation
        else:
            self._prev = [g.clone(memory_format=torch.contiguous_format) for g in grads]

    def _from_buffer(self, grads, check):
        """``before_update`` when the monitor's check (stats.FiniteCheck of the gradients, then
        the parameters) holds this step's small gradients in its buffer, one row or more each
        (zeros after them): the dots of those are the rows' dots with the rows kept from the
        previous logging step, summed per module, in three calls whatever their number; the
        large ones as above."""
        buf, _, alone = check.span(0, len(grads))  # the gradients' rows
        if self._prev_buf is not None:
            # <g_t, g_s> per entry of the check: per row, then per large gradient   (entries,)
            dots = torch.linalg.vecdot(buf, self._prev_buf)
            if alone:
                dots = torch.cat([dots, torch.stack([
                    torch.dot(grads[i].reshape(-1).float(), q.reshape(-1).float()) if grads[i].shape == q.shape
                    else self.mon._zero for i, q in zip(alone, self._prev)]).to(dots.device)])
            self._dot = self.mon._grad_entries_by_module(dots)  #               (M+1,)
            self._prev_buf.copy_(buf)
        else:
            self._prev_buf = buf.clone()
        large = [grads[i] for i in alone]
        if not large:
            self._prev = []
        elif self._prev is not None and len(self._prev) == len(large) and all(
                g.shape == q.shape and g.dtype == q.dtype for g, q in zip(large, self._prev)):
            torch._foreach_copy_(self._prev, large)  # into the copies kept from the previous log: no allocation
        else:
            self._prev = [g.clone(memory_format=torch.contiguous_format) for g in large]

    def sums(self):
        return [] if self._dot is None else [self._dot]

    def put(self, put, g_sq, reduced):
        if reduced:
            (dot,) = reduced
            # cos = <g_t, g_s> / (|g_t| |g_s|), per module and the rest (not logged)  (M+1,)
            put("grad/cosine_prev", self.mon.names,
                [stats.div(d, stats.sqrt(a * b)) for d, a, b in zip(dot, g_sq, self._prev_sq)])
        self._prev_sq = g_sq
        self._dot = None

    def close(self):
        self._prev = self._prev_buf = None
