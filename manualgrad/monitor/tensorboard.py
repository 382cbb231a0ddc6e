"""Writing the monitor's statistics to a SummaryWriter: tags, histograms, the dashboard layout.

Tags (``<name>`` is the module's name from ``named_modules``, "model" for the root):

    grad/norm/<name>   grad/max_abs/<name>   param/norm/<name>
    update/ratio/<name>   update/log10_ratio/<name>                     (with an optimizer)
    act/mean/<name>  act/std/<name>  act/near_zero/<name>  act/dead/<name>
    act/saturation/<name>  act/grad_norm/<name>                          (activations=True)
    nonfinite/<name>   (steps with a non-finite parameter or gradient since the last log)
    global/grad_norm   global/lr/group<i>   global/clip_coef   global/clip_fraction
    global/nonfinite
    hist/grad/<name>   hist/weight/<name>   hist/act/<name>              (every hist_every)
"""
from __future__ import annotations

import math

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
}
GLOBAL_STATS = {
    "global/grad_norm": "total gradient L2 norm",
    "global/lr": "learning rate per param group",
    "global/clip_coef": "clip coefficient min(max_norm/N, 1)",
    "global/clip_fraction": "fraction of steps clipped",
    "global/nonfinite": "non-finite module-steps since the last log",
}


def tag(stat, name):
    return f"{stat}/{name}"


def write_scalars(writer, step, tags, values):
    """``values`` is a list of Python floats, one per tag.

    A torch SummaryWriter gets them as one event (one Summary holding every value): one
    add_scalar per tag costs ~20 us each and as many trips through the writer thread's queue,
    the bulk of a logging step on a small model. Readers see the same scalars."""
    file_writer = getattr(writer, "_get_file_writer", None)
    if file_writer is None:  # another writer: one call per scalar
        for t, v in zip(tags, values):
            writer.add_scalar(t, v, global_step=step)
        return
    if tags:
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in zip(tags, values)])
        file_writer().add_summary(summary, global_step=step)


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
    """One multiline chart per statistic, across all modules (a regex over their tags)."""
    modules = {
        title: ["Multiline", [rf"^{stat}/.*"]]
        for stat, title in MODULE_STATS.items()
        if stat in stats_present
    }
    globals_ = {
        title: ["Multiline", [rf"^{stat}(/.*)?$"]]
        for stat, title in GLOBAL_STATS.items()
        if stat in stats_present
    }
    return {"per module": modules, "global": globals_}
