"""Writing the monitor's statistics to a SummaryWriter: tags, histograms, the dashboard layout.

Tags (``<name>`` is the module's name from ``named_modules``, "model" for the root):

    grad/norm/<name>   grad/max_abs/<name>   param/norm/<name>
    update/ratio/<name>   update/log10_ratio/<name>                     (with an optimizer)
    act/mean/<name>  act/std/<name>  act/near_zero/<name>  act/dead/<name>
    act/saturation/<name>  act/grad_norm/<name>                          (activations=True)
    nonfinite/<name>   steps with a non-finite parameter or gradient since the last log
    global/grad_norm   global/lr/group<i>   global/clip_coef   global/clip_norm_before
    global/clip_fraction   global/nonfinite (non-finite module-steps and activation-steps)
    grad/cosine_prev/<name>     cos(gradient now, gradient at the previous logging step)
    noise/B_simple   noise/tr_sigma   noise/g_sq     gradient noise scale (more than one
                                                    micro-batch or rank; see noise.py)
    hist/grad/<name>   hist/weight/<name>   hist/act/<name>              (every hist_every)

On disk: one run per layer. TensorBoard colours lines by run, so per-module statistics are
written to a run of their own for each module, ``<logdir>/layers/<dir>/`` (``layer_dir``), under
the statistic's name alone (``grad/norm``): in a chart every layer is then a line of its own
colour, named ``layers/<dir>`` in the legend. ``<dir>`` is the module name percent-encoded
(``urllib.parse.quote(name, safe="")``: letters, digits and ``_.-~`` are kept, so ``blocks.0.attn``
stays as it is and ``a/b`` becomes ``a%2Fb``); ``layer_name`` maps it back (on a case-insensitive
file system two names differing only in case share a run). Global statistics and histograms
stay in the writer's own run. A writer without a log directory (no ``get_logdir``) gets the flat
tags above in its own run.

When values reach the disk: the monitor hands its logging steps to ``write_steps`` in
bursts (every 8 logging steps or 1 s, see ``monitor.py``), each step one event per run. The
writer's own run is then written by the SummaryWriter's thread (``flush_secs``; the burst's
events as one write, framed here, when its record writer can take them); the layer runs are
appended to at the first ``write_steps`` ``min(flush_secs, 1 s)`` or more after the previous
append, by ``flush_layer_runs`` (the monitor calls it when it reports a non-finite value), and
at ``GradientMonitor.close()``, when the writer is collected, or when the interpreter exits. A
live dashboard trails by at most about two seconds plus one logging interval.

``read_run(logdir)`` reads either layout back under the flat tags.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import re
import socket
import struct
import time
import urllib.parse
import weakref

from .stats import HIST_BINS

MODULE_STATS = {  # tag prefix -> chart title in the custom-scalars layout
    "grad/norm": "gradient L2 norm",
    "grad/max_abs": "gradient max |g|",
    "param/norm": "parameter L2 norm",
    "update/ratio": "update:data ratio ||dθ||/||θ|| (1e-3 is typical)",
    "update/log10_ratio": "log10 update:data ratio (-3 is typical)",
    "act/mean": "activation mean",
    "act/std": "activation std",
    "act/near_zero": "fraction of activations near zero",
    "act/dead": "fraction of dead units",
    "act/saturation": "fraction saturated (tanh/sigmoid)",
    "act/grad_norm": "activation gradient L2 norm",
    "nonfinite": "steps with a non-finite parameter or gradient since the last log",
    "grad/cosine_prev": "cosine(gradient, gradient at the previous log)",
}
GLOBAL_STATS = {
    "global/grad_norm": "total gradient L2 norm",
    "global/lr": "learning rate per param group",
    "global/clip_coef": "clip coefficient min(max_norm/N, 1)",
    "global/clip_fraction": "fraction of steps clipped",
    "global/nonfinite": "non-finite module-steps since the last log",
    "noise/B_simple": "gradient noise scale B_simple = tr(Σ)/|G|² (samples)",
    "noise/tr_sigma": "per-sample gradient variance tr(Σ) (moving average)",
    "noise/g_sq": "squared true gradient norm |G|² (moving average)",
}


# The per-layer charts shown first, in this order (in the custom-scalars page and in plot.py);
# a name that is not (yet) a key of MODULE_STATS is skipped.
DASHBOARD = ("grad/norm", "update/ratio", "nonfinite", "noise/B_simple")

LAYERS = "layers"  # <logdir>/layers/<dir>/: the run of one module


def tag(stat, name):
    return f"{stat}/{name}"


def split_tag(tag_, _stats=None):
    """``"<stat>/<name>"`` with ``stat`` a key of MODULE_STATS -> (stat, name); None for any
    other tag. The longest matching key wins (a module name may itself contain '/')."""
    for stat in _stats or sorted(MODULE_STATS, key=len, reverse=True):
        if tag_.startswith(stat + "/") and len(tag_) > len(stat) + 1:
            return stat, tag_[len(stat) + 1 :]
    return None


def layer_dir(logdir, name):
    """The directory of module ``name``'s run: ``<logdir>/layers/<name percent-encoded>``.
    (``named_modules`` names are never ``.`` or ``..``; should one be, its dots are encoded too.)"""
    if not name:
        raise ValueError("a module's run needs a non-empty name")
    d = urllib.parse.quote(name, safe="")
    if d in (".", ".."):
        d = d.replace(".", "%2E")
    return os.path.join(logdir, LAYERS, d)


def layer_name(dirname):
    """The module name of a directory under ``<logdir>/layers/`` (inverse of ``layer_dir``)."""
    return urllib.parse.unquote(dirname)


def write_scalars(writer, step, tags, values):
    """``values`` is a list of Python floats, one per tag. Module statistics (``"<stat>/<name>"``,
    ``stat`` a key of MODULE_STATS) go to the module's run as ``<stat>``, the rest to ``writer``.

    Each run gets one event per call (one Summary holding all its values): one add_scalar per
    tag costs ~20 us and a trip through the writer thread's queue, the bulk of a logging step
    on a small model. Readers see the same scalars."""
    write_steps(writer, [(step, tags, values)])


def write_steps(writer, steps):
    """``write_scalars`` of several logging steps ``(step, tags, values)``: one event per step and
    run, all their records framed at once (``records``: one pass of numpy for every CRC). The
    writer's own events go to its event file as one write for all the steps where its record
    writer takes framed records (``_framing_writer``; a write is a trip through the writer
    thread's queue, ~25 us of a small model's step each), else one add_summary each."""
    runs = _layer_runs(writer)
    now = time.time()
    layers, own_steps = [], []  # (run name, event bytes), (step, [(tag, value)])
    for step, tags, values in steps:
        own, per_layer = [], {}
        for (t, split), v in zip(_splits(tuple(tags), tuple(MODULE_STATS) if runs is not None else None), values):
            if split is None:
                own.append((t, v))
            else:
                per_layer.setdefault(split[1], []).append((split[0], v))
        layers += [(name, scalar_event(now, step, pairs)) for name, pairs in per_layer.items()]
        if own:
            own_steps.append((step, own))
    torch_writer = getattr(writer, "_get_file_writer", None) is not None
    queue = _framing_writer(writer) if own_steps and torch_writer else None
    own_events = [scalar_event(now, step, own) for step, own in own_steps] if queue is not None else []
    framed = records([e for _, e in layers] + own_events)
    if layers:
        runs.add([(name, r) for (name, _), r in zip(layers, framed)])
    if queue is not None:
        queue.write(_Framed(b"".join(framed[len(layers):])))
    elif torch_writer:
        for step, own in own_steps:
            writer._get_file_writer().add_summary(_summary(own), global_step=step)
    else:  # another writer: one call per scalar
        for step, own in own_steps:
            for t, v in own:
                writer.add_scalar(t, v, global_step=step)


class _Framed(bytes):
    """Event records framed already (``record``): the record writer writes them as they are."""


def _framing_writer(writer):
    """The queue of the thread that writes ``writer``'s event file (torch's SummaryWriter over
    tensorboard's EventFileWriter), its record writer set to frame records with ``record`` (the
    same bytes as its own, whose CRC-32C takes a Python step per byte without TensorFlow, for
    the user's own events too) and to write ``_Framed`` bytes as they are; None for a writer
    built otherwise."""
    event_writer = getattr(writer._get_file_writer(), "event_writer", None)
    queue = getattr(event_writer, "_async_writer", None)
    records = getattr(queue, "_writer", None)
    file = getattr(records, "_writer", None)
    if type(records).__name__ != "RecordWriter" or not callable(getattr(queue, "write", None)) \
            or not callable(getattr(file, "write", None)):
        return None
    if not getattr(records, "_frames_with_manualgrad", False):
        records.write = lambda data, file=file: file.write(data if type(data) is _Framed else record(data))
        records._frames_with_manualgrad = True
    return queue


@functools.lru_cache(maxsize=64)
def _splits(tags, module_stats):
    """(tag, (stat, module) or None) per tag (None for all without layer runs: module_stats None).
    A monitor logs the same tags at every logging step, so the split is worked out once per tag
    list and set of module statistics (at every=1 it was ~7% of a small model's step)."""
    stats = sorted(module_stats or (), key=len, reverse=True)
    return tuple((t, split_tag(t, stats) if module_stats is not None else None) for t in tags)


def _summary(pairs):
    from tensorboard.compat.proto import summary_pb2

    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in pairs])


def flush_layer_runs(writer):
    """Write out what the layer runs of ``writer`` hold now (a write does it at most a second
    after the previous one, close_layer_runs and the interpreter's exit do it too)."""
    runs = _RUNS.get(writer)
    if runs is not None:
        runs.flush()


def close_layer_runs(writer):
    """Flush and close the layer runs of ``writer`` (GradientMonitor.close calls this). A later
    write opens new event files next to the old ones; TensorBoard reads them all."""
    runs = _RUNS.pop(writer, None)
    if runs is not None:
        runs.finalize()  # runs.close(), once


_RUNS = weakref.WeakKeyDictionary()  # writer -> its _LayerRuns, made at the first module statistic


def _layer_runs(writer):
    runs = _RUNS.get(writer)
    if runs is None:
        get_logdir = getattr(writer, "get_logdir", None)
        if get_logdir is None:
            return None
        runs = _RUNS[writer] = _LayerRuns(get_logdir(), getattr(writer, "flush_secs", 120))
        # closed with the monitor, or else when the writer is collected or the interpreter exits
        # (a script that closes its writer but not the monitor still gets every layer's last values)
        runs.finalize = weakref.finalize(writer, runs.close)
    return runs


class _LayerRuns:
    """One event file per module under ``<logdir>/layers/``, opened at its first write.

    Written from the calling thread (no writer thread per layer, as a SummaryWriter per layer
    would start): each write is one Event holding all of a module's statistics at that step,
    kept in memory and appended to the files by the first write ``min(flush_secs, max_delay)``
    seconds after the previous flush (a live dashboard lags by little more than the logging
    interval), and on ``flush`` and ``close``.
    """

    _uid = itertools.count()
    max_delay = 1.0  # seconds

    def __init__(self, logdir, flush_secs):
        self.logdir, self.flush_secs = logdir, flush_secs
        self._files, self._pending = {}, {}  # name -> GFile, name -> [record bytes]
        self._last_flush = time.monotonic()

    def add(self, framed):
        """``framed``: (run name, one event's record) pairs, in order."""
        for name, r in framed:
            if name not in self._files:
                self._open(name)
            self._pending[name].append(r)
        if time.monotonic() - self._last_flush >= min(self.flush_secs, self.max_delay):
            self.flush()

    def _open(self, name):
        from tensorboard.compat import tf
        from tensorboard.compat.proto import event_pb2

        path = layer_dir(self.logdir, name)
        tf.io.gfile.makedirs(path)
        fname = "events.out.tfevents.%010d.%s.%s.%s" % (time.time(), socket.gethostname(), os.getpid(), next(self._uid))
        self._files[name] = tf.io.gfile.GFile(os.path.join(path, fname), "wb")
        self._pending[name] = []
        self._record(name, event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _record(self, name, event):
        self._pending[name].append(record(event.SerializeToString()))

    def flush(self):
        for name, f in self._files.items():
            if self._pending[name]:
                f.write(b"".join(self._pending[name]))
                self._pending[name].clear()
            f.flush()
        self._last_flush = time.monotonic()

    def close(self):
        self.flush()
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._pending.clear()


# -- the event file format, written here for the layer runs ---------------------------------
#
# Per logging step a layer run gets one Event of a few scalars. Through tensorboard's protobuf
# classes and RecordWriter that cost ~30 us each on the small benchmark model, most of it the
# record's CRC-32C computed byte by byte in Python (tensorboard's fallback without
# TensorFlow); one event per layer per logging step made it ~12% of a step at every=1. The wire
# format of such an Event is short, and the CRC below takes 4 bytes per Python iteration.
# tests/monitor/test_fast_paths.py compares both with tensorboard's on random data.


def _varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@functools.lru_cache(maxsize=4096)
def _value_head(tag_):
    """Summary.Value{tag} up to its simple_value's field key: (bytes, length of the value)."""
    t = tag_.encode()
    inner = b"\x0a" + _varint(len(t)) + t + b"\x15"  # tag (field 1, bytes), simple_value (field 2, float)
    return b"\x0a" + _varint(len(inner) + 4) + inner  # Summary.value (field 1, message)


def _float32(v):
    try:
        return struct.pack("<f", v)
    except OverflowError:  # a finite double beyond float32: inf, as protobuf's cast gives
        return struct.pack("<f", math.copysign(math.inf, v))


def scalar_event(wall_time, step, pairs):
    """``Event(wall_time=, step=, summary=Summary(value=[Value(tag=, simple_value=)...]))``
    serialized, as ``SerializeToString`` gives it (proto3: a step of 0 is left out)."""
    summary = b"".join(_value_head(t) + _float32(v) for t, v in pairs)
    head = b"\x09" + struct.pack("<d", wall_time)  # wall_time (field 1, double)
    if step:
        head += b"\x10" + _varint(step if step > 0 else step + (1 << 64))  # step (field 2, int64)
    return head + b"\x2a" + _varint(len(summary)) + summary  # summary (field 5, message)


def _crc_tables():
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the byte table T, and two tables
    of 16-bit indices for 4 bytes at a time: for the word w = b0 | b1 << 8 | b2 << 16 | b3 << 24
    xored into the CRC, the next CRC is LO[w & 0xffff] ^ HI[w >> 16] with LO[b0 | b1 << 8] =
    T3[b0] ^ T2[b1], HI[b2 | b3 << 8] = T1[b2] ^ T0[b3], Tk = T after k more zero bytes."""
    T0 = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        T0.append(c)
    T = [T0]
    for _ in range(3):
        T.append([(T[-1][i] >> 8) ^ T0[T[-1][i] & 0xFF] for i in range(256)])
    lo = [T[3][i & 0xFF] ^ T[2][i >> 8] for i in range(1 << 16)]
    hi = [T[1][i & 0xFF] ^ T[0][i >> 8] for i in range(1 << 16)]
    return T0, lo, hi


_CRC = None


def crc32c(data):
    """CRC-32C of ``data`` (bytes). The plain form, a byte at a time, is
    ``crc = T[(crc ^ b) & 0xff] ^ (crc >> 8)`` from ``~0``, then ``~crc``."""
    global _CRC
    if _CRC is None:
        _CRC = _crc_tables()
    T, lo, hi = _CRC
    n4 = len(data) & ~3
    crc = 0xFFFFFFFF
    for (w,) in struct.iter_unpack("<I", data[:n4]):
        crc ^= w
        crc = lo[crc & 0xFFFF] ^ hi[crc >> 16]
    for b in data[n4:]:
        crc = T[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    return _masked(crc32c(data))


def _masked(x):
    """The CRC as a record stores it: rotated right by 15 bits, plus a constant."""
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# Many records at once. The CRC register is linear in the data: from ~0 over n bytes,
#     crc = ~(Z[n] ^ K[n-1, d_0] ^ K[n-2, d_1] ^ ... ^ K[0, d_{n-1}])
# with K[k, b] what byte b followed by k zero bytes leaves in a register started at 0, and Z[n]
# what ~0 becomes after n zero bytes. With numpy that is one table lookup and one xor-reduction
# for all the bytes of all the records (~1 us a record of ~200 bytes, against ~5.5 us by crc32c).
_CRC_ROWS = 1024  # records up to this long (K: 1 MB); longer ones by crc32c
_CRC_NP = None


def _crc_numpy_tables():
    """K (flattened, K[k, b] at 256 k + b) and Z as numpy uint32 arrays (~4 ms)."""
    import numpy as np

    crc32c(b"")  # _CRC
    T = np.array(_CRC[0], dtype=np.uint32)
    K = np.empty((_CRC_ROWS, 256), dtype=np.uint32)
    K[0] = T
    for k in range(1, _CRC_ROWS):  # one more zero byte: the plain step with b = 0
        K[k] = T[K[k - 1] & 0xFF] ^ (K[k - 1] >> 8)
    Z, z = [0xFFFFFFFF], 0xFFFFFFFF
    for _ in range(_CRC_ROWS):
        z = _CRC[0][z & 0xFF] ^ (z >> 8)
        Z.append(z)
    return K.reshape(-1), np.array(Z, dtype=np.uint32)


def crc32c_many(datas):
    """[crc32c(d) for d in datas], vectorized as above for records of 1 to _CRC_ROWS bytes."""
    global _CRC_NP
    out = [None if 0 < len(d) <= _CRC_ROWS else crc32c(d) for d in datas]
    sel = [d for d in datas if 0 < len(d) <= _CRC_ROWS]
    if not sel:
        return out
    import numpy as np

    if _CRC_NP is None:
        _CRC_NP = _crc_numpy_tables()
    K, Z = _CRC_NP
    n = np.fromiter(map(len, sel), dtype=np.int64, count=len(sel))
    ends = np.cumsum(n)
    data = np.frombuffer(b"".join(sel), dtype=np.uint8)
    # byte j of a record of n bytes is followed by n-1-j: the end of its record - 1 - its index
    k = np.repeat(ends - 1, n) - np.arange(ends[-1])
    raw = np.bitwise_xor.reduceat(K[k * 256 + data], ends - n)
    crcs = iter((raw ^ Z[n] ^ np.uint32(0xFFFFFFFF)).tolist())
    return [c if c is not None else next(crcs) for c in out]


def records(datas):
    """[record(d) for d in datas], their CRCs by crc32c_many."""
    return [_record_header(len(d)) + d + struct.pack("<I", _masked(x)) for d, x in zip(datas, crc32c_many(datas))]


@functools.lru_cache(maxsize=1024)
def _record_header(n):
    header = struct.pack("<Q", n)
    return header + struct.pack("<I", masked_crc32c(header))


def record(data):
    """One record of an event file: length, its masked CRC, the data, its masked CRC."""
    return _record_header(len(data)) + data + struct.pack("<I", masked_crc32c(data))


def write_histogram(writer, tag_, step, packed):
    """``packed`` is [min, max, num, sum, sum_squares, counts...] (Python floats), as made by
    ``stats.histogram``. Nothing is written when no element is finite."""
    lo, hi, num, s, ss = packed[:5]
    counts = packed[5 : 5 + HIST_BINS]
    if num == 0 or not (math.isfinite(lo) and math.isfinite(hi)):
        return
    width = (hi - lo) / HIST_BINS
    # bucket_limits are the right edges; the last one is hi exactly
    limits = [lo + width * (i + 1) for i in range(HIST_BINS - 1)] + [hi]
    writer.add_histogram_raw(
        tag_, min=lo, max=hi, num=int(num), sum=s, sum_squares=ss,
        bucket_limits=limits, bucket_counts=counts, global_step=step,
    )


def custom_layout(stats_present):
    """One multiline chart per statistic (a regex over tags). Per layer: the statistic's tag in
    every layer run, one line (and colour) per layer, the DASHBOARD charts first; a writer without
    a log directory has the flat ``<stat>/<name>`` tags in its own run, which the regex matches
    too. A global statistic that is also a module statistic is drawn in the per-layer chart (the
    writer's own run is its line there)."""

    def regex(stat):
        return rf"^{re.escape(stat)}(/.*)?$"

    order = [s for s in DASHBOARD if s in MODULE_STATS] + [s for s in MODULE_STATS if s not in DASHBOARD]
    layers = {MODULE_STATS[s]: ["Multiline", [regex(s)]] for s in order if s in stats_present}
    globals_ = {
        title: ["Multiline", [regex(stat)]]
        for stat, title in GLOBAL_STATS.items()
        if stat in stats_present and not (stat in MODULE_STATS and stat in stats_present)
    }
    return {"per layer (one run each: layers/<name>)": layers, "global": globals_}


class MonitorRun:
    """A monitor's run read back, whatever its layout: an EventAccumulator of ``logdir`` whose
    scalars also hold every layer run's statistics under the flat tags ``<stat>/<name>``.
    Histograms, tensors and the rest come from ``logdir``'s own event files."""

    def __init__(self, logdir, size_guidance=None):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        size_guidance = size_guidance or {"scalars": 0, "histograms": 0, "tensors": 0}
        logdir = str(logdir)
        self.main = EventAccumulator(logdir, size_guidance=size_guidance)
        self.layers = {}  # module name -> EventAccumulator of its run
        root = os.path.join(logdir, LAYERS)
        if _gfile().isdir(root):
            for d in sorted(_gfile().listdir(root)):
                d = d.rstrip("/")
                if _gfile().isdir(os.path.join(root, d)):
                    self.layers[layer_name(d)] = EventAccumulator(os.path.join(root, d), size_guidance=size_guidance)
        self._flat = {}  # flat tag -> (module name, tag in its run)

    def Reload(self):
        self.main.Reload()
        self._flat = {}
        for name, ea in self.layers.items():
            ea.Reload()
            for t in ea.Tags()["scalars"]:
                self._flat[tag(t, name)] = (name, t)
        return self

    def Tags(self):
        tags = dict(self.main.Tags())
        tags["scalars"] = list(tags["scalars"]) + list(self._flat)
        return tags

    def Scalars(self, tag_):
        if tag_ in self._flat:
            name, t = self._flat[tag_]
            return self.layers[name].Scalars(t)
        return self.main.Scalars(tag_)

    def __getattr__(self, attr):  # Histograms, Tensors, ...: the writer's own run
        return getattr(self.main, attr)


def read_run(logdir, size_guidance=None):
    """``MonitorRun(logdir)``, loaded."""
    return MonitorRun(logdir, size_guidance).Reload()


def _gfile():
    from tensorboard.compat import tf

    return tf.io.gfile
