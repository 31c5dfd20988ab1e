"""Matplotlib helpers. Figures are made without pyplot, so scripts need no GUI backend.
matplotlib is imported when the first figure is made, not with nanofit.

The course's image helpers are here too (`show_image`, `subplots`, `get_grid`): in a Jupyter
notebook the figures they make show when the cell ends, as pyplot's would.
"""
from __future__ import annotations

import io
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["new_figure", "in_notebook", "show_or_save", "smooth_ema", "plot_loss", "plot_history",
           "plot_lr_find", "plot_sched", "save_figure", "show_image", "subplots", "get_grid",
           "grid_shape", "as_image_array", "show_when_cell_ends"]


def new_figure(**kwargs: Any) -> Figure:
    """A matplotlib Figure not attached to pyplot (`kwargs` go to Figure, e.g. figsize)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (not a plain IPython terminal)."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()  # a Jupyter kernel's shell, or a subclass of it (Colab's)
    return shell is not None and any(c.__name__ == "ZMQInteractiveShell"
                                     for c in type(shell).__mro__)


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


# ---- the course's image helpers -----------------------------------------------------------------
_pending: list[Figure] = []  # figures to show when the notebook cell ends


def show_when_cell_ends(fig: Figure) -> Figure:
    """In a Jupyter notebook, show `fig` when the running cell ends (as pyplot's inline
    backend does), unless the cell's value is that figure and Jupyter shows it anyway;
    elsewhere do nothing. Returns `fig`."""
    if not in_notebook():
        return fig
    from IPython import get_ipython

    shell = get_ipython()
    if _show_pending not in shell.events.callbacks["post_run_cell"]:
        shell.events.register("post_run_cell", _show_pending)
    if not any(f is fig for f in _pending):
        _pending.append(fig)
    return fig


def _show_pending(result: Any = None) -> None:
    from IPython import get_ipython
    from IPython.display import Image, display

    figs = list(_pending)
    _pending.clear()
    value = getattr(result, "result", None)
    png = get_ipython().display_formatter.formatters["image/png"]
    for fig in figs:
        if fig is value:
            try:
                png.lookup(fig)  # Jupyter draws the cell's value itself: don't show it twice
                continue
            except KeyError:
                pass
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        display(Image(data=buf.getvalue()))


def as_image_array(im: Any) -> np.ndarray:
    """A numpy array matplotlib can show, from a tensor (channels first: CHW, or HW), a numpy
    array (HWC or HW) or a PIL image; a single channel is dropped (HW)."""
    if all(hasattr(im, a) for a in ("cpu", "permute", "detach")):  # a torch tensor
        im = im.detach().cpu()
        if im.ndim == 3 and im.shape[0] < 5:
            im = im.permute(1, 2, 0)
        if im.is_floating_point():
            im = im.float()  # numpy has no bfloat16
        im = im.numpy()
    elif not isinstance(im, np.ndarray):
        im = np.array(im)
    if im.ndim == 3 and im.shape[-1] == 1:
        im = im[..., 0]
    return im


def show_image(im: Any, ax: Axes | None = None, figsize: tuple[float, float] | None = None,
               title: str | None = None, noframe: bool = True, **kwargs: Any) -> Axes:
    """Show an image (tensor CHW or HW, numpy array, PIL image) on `ax`, or on a new figure
    of `figsize`; returns the Axes. `kwargs` go to matplotlib's `imshow` (cmap, vmin, ...).

    Example: `show_image(xb[0], title="a digit", cmap="gray")`
    """
    im = as_image_array(im)
    if ax is None:
        fig = new_figure(figsize=figsize)
        ax = fig.add_subplot()
        show_when_cell_ends(fig)
    ax.imshow(im, **kwargs)
    if title is not None:
        ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if noframe:
        ax.axis("off")
    return ax


# what Figure.subplots takes; the rest of subplots' kwargs go to the Figure (dpi, layout, ...)
_GRID_ARGS = ("sharex", "sharey", "squeeze", "width_ratios", "height_ratios", "subplot_kw",
              "gridspec_kw")


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None,
             imsize: float = 3, suptitle: str | None = None,
             **kwargs: Any) -> tuple[Figure, np.ndarray]:
    """A figure with `nrows` x `ncols` axes for images of `imsize` inches (unless `figsize`
    is given), and the axes as a numpy array (one axes gives an array of one). `kwargs` go
    to `Figure.subplots` (sharex, sharey, squeeze, subplot_kw, gridspec_kw, ...) or to the
    Figure (dpi, layout, ...). Made without pyplot; in a notebook it shows when the cell ends.

    Example: `fig, axs = subplots(1, 2, imsize=2); show_image(x, ax=axs[0])`
    """
    if figsize is None:
        figsize = (ncols * imsize, nrows * imsize)
    grid = {k: kwargs.pop(k) for k in _GRID_ARGS if k in kwargs}
    fig = new_figure(figsize=figsize, **kwargs)
    axs = fig.subplots(nrows, ncols, **grid)
    if not isinstance(axs, np.ndarray):
        axs = np.array([axs])
    if suptitle is not None:
        fig.suptitle(suptitle)
    show_when_cell_ends(fig)
    return fig, axs


def grid_shape(n: int, nrows: int | None = None, ncols: int | None = None) -> tuple[int, int]:
    """(nrows, ncols) of a grid for `n` images: one missing is worked out from `n`; with
    neither, `isqrt(n)` rows of as many columns as needed (a little wider than tall)."""
    if n < 1:
        raise ValueError(f"a grid needs n >= 1 images, got {n}")
    if nrows:
        ncols = ncols or math.ceil(n / nrows)
    elif ncols:
        nrows = math.ceil(n / ncols)
    else:
        nrows = math.isqrt(n)
        ncols = math.ceil(n / nrows)
    if nrows * ncols < n:
        raise ValueError(f"nrows={nrows} x ncols={ncols} gives {nrows * ncols} axes, fewer than "
                         f"the {n} images; give one of them and let the other follow")
    return nrows, ncols


def get_grid(n: int, nrows: int | None = None, ncols: int | None = None,
             title: str | None = None, weight: str = "bold", size: float = 14,
             **kwargs: Any) -> tuple[Figure, np.ndarray]:
    """A figure with a grid of axes for `n` images and the axes (a numpy array); the axes
    past the n-th are turned off. The grid is `nrows` x `ncols` (see `grid_shape` for the
    defaults). `title` goes above the figure in `weight` and `size`; `kwargs` go to
    `subplots` (imsize, figsize, ...).

    Example: `fig, axs = get_grid(8, imsize=1.5)`, then
    `for x, ax in zip(xb, axs.flat): show_image(x, ax=ax)`
    """
    nrows, ncols = grid_shape(n, nrows, ncols)
    fig, axs = subplots(nrows, ncols, **kwargs)
    for ax in axs.flat[n:]:
        ax.set_axis_off()
    if title is not None:
        fig.suptitle(title, weight=weight, size=size)
    return fig, axs
