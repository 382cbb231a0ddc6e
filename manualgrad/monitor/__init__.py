"""Gradient monitoring hooks that log to TensorBoard.

    from torch.utils.tensorboard import SummaryWriter  # tensorboard comes with manualgrad
    writer = SummaryWriter("runs/exp1")
    with manualgrad.monitor.GradientMonitor(model, writer, optimizer=opt, every=50, hist_every=1000):
        for x, y in loader:
            loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()

- ``monitor.py``: the hooks and when they run (``GradientMonitor``, ``NonFiniteError``).
- ``origin.py``: where the first non-finite value is born (``NonFiniteOrigin``, ``origin='trace'``).
- ``stats.py``: the statistics, computed on the device.
- ``noise.py``: the gradient noise scale and the cosine between successive logged gradients.
- ``tensorboard.py``: tags, one TensorBoard run per layer (``<logdir>/layers/<name>/``), histograms,
  the custom-scalars layout; ``read_run(logdir)`` reads a run back under the flat tags.
- ``plot.py``: ``python -m manualgrad.monitor.plot LOGDIR -o out.png``.
"""
from .monitor import GradientMonitor, NonFiniteError

__all__ = ["GradientMonitor", "NonFiniteError"]
