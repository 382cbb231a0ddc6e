"""A picture of a finished run: ``python -m manualgrad.monitor.plot LOGDIR -o out.png``
(needs matplotlib: ``pip install 'manualgrad[plot]'``).

The dashboard's per-layer charts from the event files GradientMonitor wrote, one colour per
layer (the same in every panel) and a legend naming each: gradient norm, update:data ratio
(with the usual 1e-3 reference line), non-finite count and gradient noise scale when the run
logged them (the run's own noise scale as a black dashed line), then a heat-map of the
fraction of dead units (layers x steps; present when the run logged activations).
"""
from __future__ import annotations

import argparse
import re

from .._extras import MissingExtra, require
from . import tensorboard as tb

# (statistic, y label, log scale, title); tb.DASHBOARD's order
PANELS = {
    "grad/norm": ("||g||", True, "gradient L2 norm per layer"),
    "update/ratio": ("||dθ|| / ||θ||", True, "update:data ratio per layer"),
    "nonfinite": ("steps", False, "steps with a non-finite parameter or gradient per layer, since the previous log"),
    "noise/B_simple": ("B_simple", True, "gradient noise scale B_simple = tr(Σ) / |G|² per layer"),
}


def read_scalars(logdir):
    """{tag: (steps, values)} for every scalar tag in ``logdir``, the per-layer runs' under the
    flat tags ``<stat>/<name>`` (as ``tensorboard.read_run``)."""
    run = tb.read_run(logdir, size_guidance={"scalars": 0})
    out = {}
    for t in run.Tags()["scalars"]:
        events = run.Scalars(t)
        out[t] = ([e.step for e in events], [e.value for e in events])
    return out


def natural_key(name):
    """'2' before '10', 'blocks.2.fc' before 'blocks.10.fc'."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _by_module(scalars, stat):
    prefix = stat + "/"
    found = {t[len(prefix) :]: v for t, v in scalars.items() if t.startswith(prefix)}
    return dict(sorted(found.items(), key=lambda kv: natural_key(kv[0])))


def layer_colours(names):
    """One colour per layer: tab10 up to 10 layers, tab20 up to 20, then viridis along the list
    (input side dark, output side yellow)."""
    import matplotlib

    if len(names) <= 10:
        cmap = [matplotlib.colormaps["tab10"](i) for i in range(len(names))]
    elif len(names) <= 20:
        cmap = [matplotlib.colormaps["tab20"](i) for i in range(len(names))]
    else:
        cmap = [matplotlib.colormaps["viridis"](i / (len(names) - 1)) for i in range(len(names))]
    return dict(zip(names, cmap))


def draw_run(logdir):
    """The figure of the run in ``logdir`` (matplotlib, Agg backend); ``plot_run`` saves it."""
    matplotlib = require("matplotlib", "plotting a run")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    scalars = read_scalars(logdir)
    if not scalars:
        raise SystemExit(f"no scalars found under {logdir!r}")
    per_stat = {stat: _by_module(scalars, stat) for stat in PANELS}
    # grad/norm and update/ratio always (the latter says why it is empty), the others when logged
    shown = [s for s in PANELS if s in ("grad/norm", "update/ratio") or per_stat[s] or s in scalars]
    dead = _by_module(scalars, "act/dead")
    names = sorted({n for s in shown for n in per_stat[s]}, key=natural_key)
    colour = layer_colours(names)

    rows = len(shown) + bool(dead)
    fig, axes = plt.subplots(rows, 1, figsize=(10, 3.4 * rows), constrained_layout=True, squeeze=False)
    axes = axes[:, 0]
    for ax, stat in zip(axes, shown):
        ylabel, log, title = PANELS[stat]
        for name, (steps, values) in per_stat[stat].items():
            ax.plot(steps, values, color=colour[name], label=name, marker="o" if len(steps) < 30 else None, ms=3)
        if stat == "update/ratio":
            ax.axhline(1e-3, color="k", linestyle=":", linewidth=1, label="1e-3 (typical)")
            if not per_stat[stat]:
                title += " (not logged: no optimizer given)"
        if stat == "noise/B_simple" and stat in scalars:
            ax.plot(*scalars[stat], color="k", linestyle="--", label="whole model")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        if log and ax.lines:
            ax.set_yscale("log")
        if stat == "nonfinite":  # a count: whole numbers from 0, at least 0..1 shown
            top = max(1.0, ax.get_ylim()[1])
            ax.set_ylim(-0.05 * top, top)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="layer", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1),
                      ncol=1 + len(names) // 16)

    if dead:
        ax = axes[-1]
        dnames = list(dead)
        steps = sorted({s for st, _ in dead.values() for s in st})
        col = {s: i for i, s in enumerate(steps)}
        grid = np.full((len(dnames), len(steps)), np.nan)
        for r, name in enumerate(dnames):
            for s, v in zip(*dead[name]):
                grid[r, col[s]] = v
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1,
                       extent=(-0.5, len(steps) - 0.5, len(dnames) - 0.5, -0.5))
        ax.set_yticks(range(len(dnames)), dnames)
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        fig.colorbar(im, ax=ax, label="fraction of dead units")
        ax.set(xlabel="step", title="dead units (zero for the whole batch)")
    else:
        fig.supxlabel("dead units: not logged (run with activations=True)", fontsize="small")
    return fig


def plot_run(logdir, out):
    """Draw the run in ``logdir`` to the image ``out``. Needs matplotlib (``pip install 'manualgrad[plot]'``)."""
    fig = draw_run(logdir)
    import matplotlib.pyplot as plt

    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logdir", help="a run directory written by GradientMonitor")
    p.add_argument("-o", "--out", default="monitor.png", help="output image (default monitor.png)")
    args = p.parse_args(argv)
    try:
        print(plot_run(args.logdir, args.out))
    except MissingExtra as e:  # one line on stderr, exit code 1
        raise SystemExit(f"python -m manualgrad.monitor.plot: error: {e}") from None


if __name__ == "__main__":
    main()
