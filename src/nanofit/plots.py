"""Matplotlib helpers. Figures are made without pyplot, so scripts need no GUI backend.
matplotlib is imported when the first figure is made, not with nanofit."""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["new_figure", "in_notebook", "show_or_save", "smooth_ema", "plot_loss", "plot_history",
           "plot_lr_find", "plot_sched", "save_figure"]


def new_figure(**kwargs: Any) -> Figure:
    """A matplotlib Figure not attached to pyplot (`kwargs` go to Figure, e.g. figsize)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (not a plain IPython terminal)."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def show_or_save(fig: Figure, path: str | Path) -> Figure:
    """Display `fig` in a notebook; elsewhere save it to `path`."""
    if in_notebook():
        from IPython.display import display

        display(fig)
        return fig
    return save_figure(fig, path)


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
    fig = new_figure(figsize=(6, 4))
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


def plot_history(history: Sequence[dict], path: str | Path | None = None) -> Figure:
    """Training and validation loss per epoch from MetricsCB records."""
    fig = new_figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for phase, label, color in (("train", "train", "tab:blue"), ("eval", "valid", "tab:orange")):
        points = [(r["epoch"], r["loss"]) for r in history if r["train"] == phase]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-", color=color, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if history:
        ax.legend()
    return save_figure(fig, path)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float],
                 suggestions: dict[str, float] | None = None,
                 path: str | Path | None = None) -> Figure:
    """Loss against learning rate on a log axis, with suggested rates marked."""
    fig = new_figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    colors = ("tab:red", "tab:green", "tab:purple")
    for (name, lr), color in zip((suggestions or {}).items(), colors):
        i = min(range(len(lrs)), key=lambda j: abs(math.log(lrs[j] / lr)))
        ax.plot([lr], [losses[i]], "o", color=color, label=f"{name}: {lr:.2e}")
    if suggestions:
        ax.legend()
    return save_figure(fig, path)


def plot_sched(values: Mapping[str, Sequence[float]], path: str | Path | None = None) -> Figure:
    """One panel per hyper-parameter, its value at every training batch."""
    names = list(values)
    fig = new_figure(figsize=(4 * max(len(names), 1), 3))
    for i, name in enumerate(names, start=1):
        ax = fig.add_subplot(1, max(len(names), 1), i)
        ax.plot(range(1, len(values[name]) + 1), values[name])
        ax.set_xlabel("training batches")
        ax.set_ylabel(name)
    fig.tight_layout()
    return save_figure(fig, path)
