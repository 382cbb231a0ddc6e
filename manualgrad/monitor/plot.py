"""A picture of a finished run: ``python -m manualgrad.monitor.plot LOGDIR -o out.png``
(needs matplotlib: ``pip install 'manualgrad[plot]'``).

Three panels from the event files GradientMonitor wrote: per-layer gradient norm over steps,
per-layer update:data ratio with the usual 1e-3 reference line, and a heat-map of the fraction
of dead units (layers x steps; present when the run logged activations).
"""
from __future__ import annotations

import argparse

from .._extras import MissingExtra, require


def read_scalars(logdir):
    """{tag: (steps, values)} for every scalar tag in ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logdir, size_guidance={"scalars": 0})
    ea.Reload()
    out = {}
    for t in ea.Tags()["scalars"]:
        events = ea.Scalars(t)
        out[t] = ([e.step for e in events], [e.value for e in events])
    return out


def _by_module(scalars, prefix):
    return {t[len(prefix) :]: v for t, v in scalars.items() if t.startswith(prefix)}


def plot_run(logdir, out):
    """Draw the run in ``logdir`` to the image ``out``. Needs matplotlib (``pip install 'manualgrad[plot]'``)."""
    matplotlib = require("matplotlib", "plotting a run")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scalars = read_scalars(logdir)
    if not scalars:
        raise SystemExit(f"no scalars found under {logdir!r}")
    fig, axes = plt.subplots(3, 1, figsize=(9, 11), constrained_layout=True)

    ax = axes[0]
    for name, (steps, values) in _by_module(scalars, "grad/norm/").items():
        ax.plot(steps, values, label=name)
    ax.set(yscale="log", xlabel="step", ylabel="||g||", title="gradient L2 norm per layer")
    ax.legend(fontsize="small", ncol=2)

    ax = axes[1]
    ratios = _by_module(scalars, "update/ratio/")
    for name, (steps, values) in ratios.items():
        ax.plot(steps, values, label=name)
    ax.axhline(1e-3, color="k", linestyle="--", linewidth=1, label="1e-3")
    ax.set(yscale="log", xlabel="step", ylabel="||dθ|| / ||θ||", title="update:data ratio per layer")
    if not ratios:
        ax.set_title("update:data ratio per layer (not logged: no optimizer given)")
    ax.legend(fontsize="small", ncol=2)

    ax = axes[2]
    dead = _by_module(scalars, "act/dead/")
    if dead:
        names = list(dead)
        steps = sorted({s for st, _ in dead.values() for s in st})
        col = {s: i for i, s in enumerate(steps)}
        grid = np.full((len(names), len(steps)), np.nan)
        for r, name in enumerate(names):
            for s, v in zip(*dead[name]):
                grid[r, col[s]] = v
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1,
                       extent=(-0.5, len(steps) - 0.5, len(names) - 0.5, -0.5))
        ax.set_yticks(range(len(names)), names)
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        fig.colorbar(im, ax=ax, label="fraction of dead units")
        ax.set(xlabel="step", title="dead units (zero for the whole batch)")
    else:
        ax.axis("off")
        ax.set_title("dead units: not logged (run with activations=True)")
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
