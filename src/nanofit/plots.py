"""The plots: losses, the lr finder's curve, schedules, and the course's image helpers.
(How figures are made and shown: figures.py; these names are importable from here too.)"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .figures import (
    figure_png,
    in_notebook,
    new_figure,
    save_figure,
    say_saved,
    show_or_save,
    show_when_cell_ends,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["new_figure", "in_notebook", "show_or_save", "smooth_ema", "plot_loss", "plot_history",
           "plot_lr_find", "plot_sched", "save_figure", "show_image", "subplots", "get_grid",
           "grid_shape", "as_image_array", "show_when_cell_ends", "figure_png", "say_saved"]


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


def plot_loss(train_losses: Sequence[float], valid_losses: Sequence[tuple[int, float]] = (),
              smooth: float | None = None, path: str | Path | None = None,
              show: bool = True) -> Figure:
    """Plot training loss per batch (raw and smoothed) and validation loss at epoch ends.

    `valid_losses` holds `(batches_seen, loss)` pairs. Returns the Figure; saves it to `path`;
    in a notebook it shows once (`show=False`: only when displayed, see `new_figure`).
    """
    fig = new_figure(figsize=(6, 4), show=show)
    ax = fig.add_subplot()
    if train_losses:
        steps = range(1, len(train_losses) + 1)
        ax.plot(steps, train_losses, color="tab:blue", alpha=0.3, label="train (per batch)")
        ax.plot(steps, smooth_ema(train_losses, smooth), color="tab:blue", label="train (smoothed)")
    if valid_losses:
        xs, ys = zip(*valid_losses)
        ax.plot(xs, ys, "o-", color="tab:orange", label="valid")
    ax.set_xlabel("training batches")
    ax.set_ylabel("loss")
    if train_losses or valid_losses:
        ax.legend()
    return save_figure(fig, path)


def plot_history(history: Sequence[dict], path: str | Path | None = None,
                 show: bool = True, by_steps: bool = False) -> Figure:
    """Training and validation loss per epoch from MetricsCB records (`show` as in plot_loss);
    `by_steps`: against the training steps done (a step fit's rounds)."""
    fig = new_figure(figsize=(6, 4), show=show)
    ax = fig.add_subplot()
    x = "step" if by_steps else "epoch"
    for phase, label, color in (("train", "train", "tab:blue"), ("eval", "valid", "tab:orange")):
        points = [(r[x], r["loss"]) for r in history if r["train"] == phase and x in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-", color=color, label=label)
    ax.set_xlabel("training steps" if by_steps else "epoch")
    ax.set_ylabel("loss")
    if history:
        ax.legend()
    return save_figure(fig, path)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float],
                 suggestions: dict[str, float] | None = None,
                 path: str | Path | None = None, show: bool = True) -> Figure:
    """Loss against learning rate on a log axis, with suggested rates marked.

    The divergent tail is clipped, so the useful part fills the plot instead of a spike to
    1e6 or inf: the loss axis stops at the loss the curve started from (the highest before
    its lowest point, and at least 10% above the lowest), the points past where the curve
    last rose above that are left out, and those that are not finite too.
    """
    fig = new_figure(figsize=(6, 4), show=show)
    ax = fig.add_subplot()
    lrs, losses, ylim = _lr_find_view(lrs, losses)
    ax.plot(lrs, losses, color="tab:blue")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    colors = ("tab:red", "tab:green", "tab:purple")
    for (name, lr), color in zip((suggestions or {}).items(), colors):
        if not lrs:
            break
        i = min(range(len(lrs)), key=lambda j: abs(math.log(lrs[j] / lr)))
        ax.plot([lr], [losses[i]], "o", color=color, label=f"{name}: {lr:.2e}")
    if suggestions and lrs:
        ax.legend()
    return save_figure(fig, path)


def _lr_find_view(lrs: Sequence[float], losses: Sequence[float]
                  ) -> tuple[list[float], list[float], tuple[float, float] | None]:
    """The points of an lr_find curve worth drawing, and the loss axis's limits (see
    plot_lr_find)."""
    points = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    if not points:
        return [], [], None
    low = min(range(len(points)), key=lambda i: points[i][1])
    bottom = points[low][1]
    top = max(max(loss for _, loss in points[: low + 1]), bottom + 0.1 * abs(bottom))
    end = len(points)
    while end > low + 2 and points[end - 2][1] > top:  # keep one point going off the top
        end -= 1
    margin = 0.05 * (top - bottom)
    ylim = (bottom - margin, top + margin) if top > bottom else None
    return [lr for lr, _ in points[:end]], [loss for _, loss in points[:end]], ylim


def plot_sched(values: Mapping[str, Sequence[float]], path: str | Path | None = None,
               show: bool = True) -> Figure:
    """One panel per hyper-parameter that changes, its value at every training batch; the
    ones that never change are named with their value in the title instead (when none
    changes, the first still gets its panel)."""
    changing = [n for n, vs in values.items() if len(set(vs)) > 1]
    if not changing and values:
        changing = [next(iter(values))]
    constant = {n: vs[0] for n, vs in values.items() if n not in changing and len(vs)}
    fig = new_figure(figsize=(4 * max(len(changing), 1), 3), show=show)
    for i, name in enumerate(changing, start=1):
        ax = fig.add_subplot(1, max(len(changing), 1), i)
        ax.plot(range(1, len(values[name]) + 1), values[name])
        ax.set_xlabel("training batches")
        ax.set_ylabel(name)
    if constant:
        fig.suptitle("constant: " + ", ".join(f"{n} {v:g}" for n, v in constant.items()),
                     fontsize="medium")
    fig.tight_layout()
    return save_figure(fig, path)


# ---- the course's image helpers -----------------------------------------------------------------
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
        fig = new_figure(figsize=figsize)  # shows when the cell ends, in a notebook
        ax = fig.add_subplot()
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
    fig = new_figure(figsize=figsize, **kwargs)  # shows when the cell ends, in a notebook
    axs = fig.subplots(nrows, ncols, **grid)
    if not isinstance(axs, np.ndarray):
        axs = np.array([axs])
    if suptitle is not None:
        fig.suptitle(suptitle)
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
