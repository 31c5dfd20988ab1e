"""Matplotlib helpers. Figures are made without pyplot, so scripts need no GUI backend."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

__all__ = ["smooth_ema", "plot_loss", "save_figure"]


def smooth_ema(values: Sequence[float], beta: float | None = None) -> list[float]:
    """Exponential moving average with bias correction (fastai's smoothed loss).

    `beta=None` picks a window of about a thirtieth of the curve (at most fastai's 0.98), so
    short runs are not drawn lagging far behind their raw values.
    """
    if beta is None:
        beta = min(0.98, max(0.5, 1 - 30 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def save_figure(fig: Figure, path: str | Path | None) -> Figure:
    """Save `fig` as an image at `path` (creating folders) when a path is given; return it."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def plot_loss(train_losses: Sequence[float], valid_losses: Sequence[tuple[int, float]] = (),
              smooth: float | None = None, path: str | Path | None = None) -> Figure:
    """Plot training loss per batch (raw and smoothed) and validation loss at epoch ends.

    `valid_losses` holds `(batches_seen, loss)` pairs. Returns the Figure; saves it to `path`.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    if train_losses:
        steps = range(1, len(train_losses) + 1)
        ax.plot(steps, train_losses, color="tab:blue", alpha=0.3, label="train (per batch)")
        ax.plot(steps, smooth_ema(train_losses, smooth), color="tab:blue", label="train (smoothed)")
    if valid_losses:
        xs, ys = zip(*valid_losses)
        ax.plot(xs, ys, "o-", color="tab:orange", label="valid (per epoch)")
    ax.set_xlabel("training batches")
    ax.set_ylabel("loss")
    if train_losses or valid_losses:
        ax.legend()
    return save_figure(fig, path)
