"""Statistics the monitor computes, all on the device, none read back here.

Every function returns tensors on the device of its input; the monitor stacks them and moves
them to the host once per logging step.

    grad norm      ||g||_2 over all gradients of a module (weight and bias together)
    grad max-abs   max |g|
    param norm     ||theta||_2
    update ratio   ||theta_after - theta_before||_2 / ||theta_before||_2      (1e-3 is typical)
                   (the sums of squares and maxima on the device, their square roots and ratios
                   on the host, from the values the logging step reads back)
    activations    mean, std, fraction |y| <= eps, fraction of dead units (zero for the whole
                   batch), saturation (tanh: |y| > 0.99; sigmoid: y < 0.01 or y > 0.99)
    histogram      64 equal bins between the finite min and max, by torch.histc
"""
from __future__ import annotations

import math

import torch

HIST_BINS = 64
NEAR_ZERO = 1e-6
SATURATED = 0.99


# -- a logging step's arithmetic on the values read back (Python floats), with the IEEE results
# a float tensor would give: NaN in, NaN out; x / 0 is +-inf (0 / 0 NaN); log10(0) is -inf

TINY = torch.finfo(torch.float32).tiny


def sqrt(x):
    return math.sqrt(x) if x >= 0 else math.nan  # (a sum of squares: negative never, NaN maybe)


def div(a, b):
    try:
        return a / b
    except ZeroDivisionError:
        return math.nan if a == 0 or a != a else math.copysign(math.inf, a) * math.copysign(1.0, b)


def log10(x):
    return math.log10(x) if x > 0 else -math.inf if x == 0 else math.nan


def update_ratio(delta_norm, param_norm):
    """||delta|| / ||theta||, theta's norm at least the smallest normal float32 (a zero theta
    gives 0 for no update, a huge ratio for any)."""
    return delta_norm / (param_norm if not param_norm < TINY else TINY)


def unit_dim(module):
    """The dimension that indexes units: channels for convolutions, features otherwise."""
    return 1 if isinstance(module, torch.nn.modules.conv._ConvNd) else -1


def saturation_kind(module):
    if isinstance(module, torch.nn.Tanh):
        return "tanh"
    if isinstance(module, torch.nn.Sigmoid):
        return "sigmoid"
    return None


def activation_stats(y, dim=-1, kind=None):
    """(mean, std, near-zero fraction, dead-unit fraction, saturated fraction), shape (5,).

    A unit is one index of ``dim``; it is dead when it is exactly 0 for every other index (the
    whole batch). Saturation is 0 for modules that are neither tanh nor sigmoid.
    """
    y = y.detach().float()
    if y.dim() == 0:
        y = y.reshape(1)
    mean, std = y.mean(), y.std(correction=0)
    near_zero = (y.abs() <= NEAR_ZERO).float().mean()
    others = [d for d in range(y.dim()) if d != dim % y.dim()]
    alive = y.ne(0).amax(dim=others) if others else y.ne(0)  # (units,)
    dead = 1.0 - alive.float().mean()
    if kind == "tanh":
        sat = (y.abs() > SATURATED).float().mean()
    elif kind == "sigmoid":
        sat = ((y < 1 - SATURATED) | (y > SATURATED)).float().mean()
    else:
        sat = torch.zeros((), device=y.device)
    return torch.stack([mean, std, near_zero, dead, sat])


def histogram(t):
    """A 64-bin histogram of the finite values of ``t``, without a host sync.

    Returns a (HIST_BINS + 5,) float tensor: [min, max, num, sum, sum_squares, counts...].
    The range comes from the data on the device, so torch.histc runs on values rescaled to
    [0, 1] with a fixed Python range (histc with its own range would read min/max on the host).
    """
    t = t.detach().flatten().float()
    if t.numel() == 0:  # an empty FSDP shard: no finite value, nothing is written
        head = torch.tensor([math.inf, -math.inf, 0.0, 0.0, 0.0], device=t.device)
        return torch.cat([head, torch.zeros(HIST_BINS, device=t.device)])
    finite = torch.isfinite(t)
    lo = torch.where(finite, t, math.inf).amin()
    hi = torch.where(finite, t, -math.inf).amax()
    x = torch.where(finite, t, lo)
    width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    # u = (x - lo) / (hi - lo) in [0, 1]; non-finite elements are pushed out of range
    u = torch.where(finite, (x - lo) / width, -1.0)
    counts = torch.histc(u, bins=HIST_BINS, min=0.0, max=1.0)
    xf = x * finite
    head = torch.stack([lo, hi, finite.sum().float(), xf.sum(), (xf * xf).sum()])
    return torch.cat([head, counts])


# -- across ranks: DDP, FSDP2 (DTensor), sharded -------------------------------------------
#
# A statistic of the whole model is a sum over parameters of a per-parameter sum (of squares,
# of products), and each rank holds either a replica of a parameter (DDP; Replicate) or a
# disjoint piece of it (FSDP; Shard). Summing w_p * s_p over ranks, with w_p = 1 on the rank
# that holds a piece once and 0 on its replicas, gives every element exactly once: no
# sqrt(world) error for replicas, no missing shards. One SUM all-reduce then serves them all.


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t):
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The part of ``t`` this rank holds: a DTensor's local shard, or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def full(t):
    """A DTensor as the plain tensor it stands for (a collective unless it is replicated)."""
    return t.full_tensor() if is_dtensor(t) else t


def max_abs(t):
    """max |t| as a 0-dim float32 tensor; 0 for an empty tensor (an FSDP shard can be empty)."""
    if t.numel() == 0:
        return torch.zeros((), device=t.device)
    # max(max t, -min t): no |t| temporary
    return torch.maximum(t.amax(), -t.amin()).float()


def check_placements(t):
    """NotImplementedError for a DTensor whose pieces do not add up by sums of squares."""
    from torch.distributed.tensor import Replicate, Shard

    for pl in t.placements:
        if not isinstance(pl, (Replicate, Shard)):
            raise NotImplementedError(
                f"GradientMonitor: a DTensor placed as {pl} (placements {t.placements}); only Shard and "
                "Replicate are supported (the norm of a partial sum is not a sum of the pieces' norms)"
            )


def rank_weight(t, rank, world, sharded):
    """w_p above: 1.0 if this rank's piece of ``t`` counts in a cross-rank sum, else 0.0.

    A DTensor decides from its placements: Shard dimensions of the mesh all count, Replicate
    dimensions count at mesh coordinate 0 only. A plain tensor is a shard with ``sharded=True``
    (FSDP-like, each rank a disjoint piece) and a replica otherwise (DDP: rank 0 counts).
    """
    if world == 1:
        return 1.0
    if is_dtensor(t):
        from torch.distributed.tensor import Replicate

        check_placements(t)
        mesh = t.device_mesh
        if mesh.size() != world:
            raise NotImplementedError(
                f"GradientMonitor: a DTensor on a device mesh of {mesh.size()} ranks in a world of {world}; "
                "only meshes spanning every rank are supported"
            )
        coord = mesh.get_coordinate()
        return float(all(c == 0 for c, pl in zip(coord, t.placements) if isinstance(pl, Replicate)))
    return 1.0 if sharded or rank == 0 else 0.0


# Σ x s is finite iff every x is (NaN and Inf propagate through a sum), and with |x| s <= 2.7e8
# it cannot overflow: a float32 sum of finite values can, past 3.4e38 (256 values of 1.4e36, a
# million of 3.4e32), which would name a finite tensor of an exploding run non-finite early
_PROBE_SCALE = {torch.float32: 2.0**-100, torch.bfloat16: 2.0**-100, torch.float64: 2.0**-1000}
PROBE_ROW = 256
_probe_w = {}  # (dtype, device) -> (PROBE_ROW,) of the scale


def probe_vector(dtype, device, n=PROBE_ROW):
    """(n,) of the scale s for ``dtype``: rows times it are Σ x s, by one matrix-vector product."""
    key = (dtype, device, n)
    if key not in _probe_w:
        _probe_w[key] = torch.full((n,), _PROBE_SCALE[dtype], dtype=dtype, device=device)
    return _probe_w[key]


def probe(t):
    """One float32 value (0-dim), finite iff every element of ``t`` is: Σ x s (s = 2^-100 for
    float32 and bfloat16, 2^-1000 for float64), over rows of PROBE_ROW by a matrix-vector
    product and the rest by a dot. float16 (|x| <= 65504), other dtypes and sparse tensors: a
    float32 sum, which cannot overflow for float16."""
    if t.dtype not in _PROBE_SCALE or t.layout != torch.strided:
        return t.sum(dtype=torch.float32)
    flat = t.reshape(-1)
    n = flat.numel()
    m = n - n % PROBE_ROW
    w = probe_vector(t.dtype, t.device)
    out = torch.mv(flat[:m].view(-1, PROBE_ROW), w).sum() if m else flat.new_zeros(())
    if n > m:
        out = out + torch.dot(flat[m:], w[: n - m])
    return out.float()


def check_sums(tensors):
    """A float32 sum per tensor (0-dim each): what is checked every step of the tensors too
    large for FiniteCheck's buffer and, with origin='trace', of every traced tensor. Its sums of
    finite values can overflow (above): for a tensor of a million elements, from a mean |x| of
    3.4e32 on. ``probe`` cannot, but costs more: on the seed MLP, whose six large tensors it would
    probe at every step, +0.4 ms a step (its matrix-vector products stream at ~30 GB/s against the
    sums' ~70), and a traced step of the small benchmark model ~8% more."""
    return [t.sum(dtype=torch.float32) for t in tensors]


class FiniteCheck:
    """Is each tensor of a fixed list finite: checked on the device every step, one row per step.

    The plain form is a ``probe`` per tensor: a kernel or more and one 0-dim tensor each.
    Kept until the next logging step, those are many small tensors to stack and free there (on
    the small benchmark model, 50 steps of 6 gradients: ~0.3 ms, in a cold logging step). Here
    every float32, float16 or bfloat16 tensor (held exactly in float32: a logging step reads the
    norms there) of up to ``FLAT_MAX`` elements on ``device`` is copied into one float32 buffer
    (one foreach copy), each from the start of a row of ``C`` elements (padding zeros after it),
    and each row's Σ x s is taken at once (``probe``'s sums: one matrix-vector product with a
    row of s): one tensor per step, whatever the number of parameters. The others (larger ones,
    where the copy would cost more than the kernel it saves; float64 ones; on another device)
    are summed on their own (``check_sums``). ``__call__`` returns one float32 value per *entry*
    (a row of the buffer, or a tensor summed alone): tensor i is non-finite iff one of its
    entries is (``per_tensor``; the rows cannot overflow, the sums of large tensors can).
    Memory: a float32 copy of the small tensors, each padded to whole rows.
    """

    FLAT_MAX = 1 << 14  # elements: the copy costs about what the kernel it saves does here
    EXACT = (torch.float32, torch.float16, torch.bfloat16)  # copied exactly into float32
    ROWS = 1024  # about this many rows at most (C grows with the buffer)

    def __init__(self, like, device):
        """``like``: tensors of the shapes and dtypes the checked ones will have, in order."""
        flat = [i for i, t in enumerate(like)
                if t.numel() <= self.FLAT_MAX and t.device == device and t.dtype in self.EXACT]
        total = sum(like[i].numel() for i in flat)
        C = 256
        while total > C * self.ROWS:
            C *= 2
        rows = [-(-like[i].numel() // C) for i in flat]  # ceil
        self._buf = torch.zeros(sum(rows), C, device=device)
        self._scale = probe_vector(torch.float32, device, C)  # Σ x s per row (``probe``): no overflow
        self._at, start = {}, 0  # tensor i -> (offset, shape) of its copy in the buffer
        for i, r in zip(flat, rows):
            self._at[i] = (start * C, like[i].shape)
            start += r
        views = [self.view(i) for i in flat]
        self._views, self._flat = views, flat
        self._all_flat = len(flat) == len(like)
        in_buf = set(flat)
        self._alone = [i for i in range(len(like)) if i not in in_buf]
        # entry -> tensor index: the buffer's rows, then the tensors summed alone
        self.owner = [i for i, r in zip(flat, rows) for _ in range(r)] + self._alone
        self.row_owner = torch.tensor(self.owner[: len(self._buf)], dtype=torch.long, device=device)
        self.n = len(like)
        self.filled = False  # the buffer holds the last call's tensors (the small ones)
        self._spans = {}  # (lo, hi) -> (rows, alone) of tensors lo <= i < hi
        self._views_of = {}  # (lo, hi) -> span(lo, hi)

    def view(self, i, buf=None, row0=0):
        """Tensor i's copy in the buffer, or at the same place in ``buf``, the buffer's rows from
        ``row0`` on; None for a tensor summed alone."""
        if i not in self._at:
            return None
        start, shape = self._at[i]
        start -= row0 * self._buf.shape[1]
        return (self._buf if buf is None else buf).view(-1)[start : start + shape.numel()].view(shape)

    def rows_of(self, lo, hi):
        """The buffer's rows of tensors lo <= i < hi (a slice: the small ones are laid out in
        order, so their rows are consecutive) and the indices among them of those summed alone.
        Their entries, in ``__call__``'s order: those rows, then those tensors."""
        if (lo, hi) not in self._spans:
            owners = self.owner[: len(self._buf)]
            r0 = sum(1 for i in owners if i < lo)
            self._spans[lo, hi] = (slice(r0, r0 + sum(1 for i in owners if lo <= i < hi)),
                                   [i for i in self._alone if lo <= i < hi])
        return self._spans[lo, hi]

    def span(self, lo, hi):
        """The copies of tensors lo <= i < hi as the last call made them: (their rows (R, C), the
        owner of each row (R,), the indices among them of the tensors summed alone). Views made
        once (a slice costs ~1.5 us, and a logging step takes several)."""
        if (lo, hi) not in self._views_of:
            rows, alone = self.rows_of(lo, hi)
            self._views_of[lo, hi] = (self._buf[rows], self.row_owner[rows], alone)
        return self._views_of[lo, hi]

    def owners(self, lo, hi):
        """The owner of each entry of tensors lo <= i < hi (a list, in ``__call__``'s order)."""
        rows, alone = self.rows_of(lo, hi)
        return self.owner[rows] + alone

    def __call__(self, tensors):
        """(entries,) float32 on the device; no host sync."""
        parts = []
        if self._views:
            # no autograd (gradients of a create_graph backward require grad); torch.no_grad()
            # costs ~2 us of Python per use, the switch itself ~0.1 us
            grad_mode = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)
            try:
                torch._foreach_copy_(self._views, tensors if self._all_flat else [tensors[i] for i in self._flat])
            except RuntimeError:  # an unexpected gradient (sparse, another shape): the plain form
                self.filled = False
                return self._fallback(tensors)
            finally:
                torch._C._set_grad_enabled(grad_mode)
            self.filled = True
            parts.append(torch.mv(self._buf, self._scale))
        if self._alone:
            with torch.no_grad():
                parts.append(torch.stack(check_sums([tensors[i] for i in self._alone])).to(self._buf.device))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _fallback(self, tensors):
        """The same entries from the plain form: each tensor's probe in its first entry, 0 in the others."""
        first = {}
        for e, i in enumerate(self.owner):
            first.setdefault(i, e)
        with torch.no_grad():
            sums = [probe(tensors[i]) for i in first]
        out = torch.zeros(len(self.owner), device=self._buf.device)
        out[list(first.values())] = torch.stack(sums).to(out.device)
        return out

    def per_tensor(self, values):
        """Host side: one value per tensor from one per entry (Python floats): NaN where the
        tensor was non-finite, 0.0 where it was finite."""
        out = [0.0] * self.n
        for i, v in zip(self.owner, values):
            if not math.isfinite(v):
                out[i] = math.nan
        return out
