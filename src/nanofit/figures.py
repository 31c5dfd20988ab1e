"""Figures made without pyplot (scripts need no GUI backend; matplotlib is imported when the
first figure is made), and shown the right way wherever they are: in a Jupyter notebook every
figure nanofit makes shows once, as a PNG, with no magic command: when the cell ends (as
pyplot's inline backend does, so a figure changed later in the cell shows changed), or
earlier as the cell's value or through `display(fig)`, and then not again. In a script a
figure is saved when a path is given.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["new_figure", "in_notebook", "show_or_save", "save_figure", "show_when_cell_ends",
           "figure_png", "say_saved"]


def new_figure(*, show: bool = True, **kwargs: Any) -> Figure:
    """A matplotlib Figure not attached to pyplot (`kwargs` go to Figure, e.g. figsize).

    In a Jupyter notebook it shows as a PNG when the cell ends, or earlier as the cell's value
    or with `display(fig)`, once either way (`show=False`: only when displayed). Elsewhere it
    is a plain Figure: `fig.savefig(path)`.
    """
    fig = _inline_figure_class()(**kwargs)
    if show:
        show_when_cell_ends(fig)
    return fig


_InlineFigure: type | None = None  # made when the first figure is: it needs matplotlib


def _inline_figure_class() -> type:
    """`InlineFigure`: a matplotlib Figure that Jupyter shows as a PNG through `_repr_png_`,
    so a figure returned as the cell's value is an image without `%matplotlib inline`."""
    global _InlineFigure
    if _InlineFigure is None:
        from matplotlib.figure import Figure

        class InlineFigure(Figure):
            """A matplotlib Figure that shows as a PNG in Jupyter (see `new_figure`)."""

            def _repr_png_(self) -> bytes:
                _forget(self)  # displayed now (the cell's value, or display()): not again
                return figure_png(self)

        InlineFigure.__module__, InlineFigure.__qualname__ = __name__, "InlineFigure"
        _InlineFigure = InlineFigure
    return _InlineFigure


def __getattr__(name: str) -> Any:
    if name == "InlineFigure":  # what pickle looks up to rebuild a saved figure
        return _inline_figure_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def figure_png(fig: Figure) -> bytes:
    """`fig` as PNG bytes, as it is shown in a notebook and saved by `save_figure`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def in_notebook() -> bool:
    """True inside a Jupyter kernel (not a plain IPython terminal)."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()  # a Jupyter kernel's shell, or a subclass of it (Colab's)
    return shell is not None and any(c.__name__ == "ZMQInteractiveShell"
                                     for c in type(shell).__mro__)


def show_or_save(fig: Figure, path: str | Path | None, default: str | Path | None = None) -> Figure:
    """Show `fig` in a notebook (when the cell ends); elsewhere save it to `path`, and when
    `path` is the caller's `default` (the user chose none) say on stderr where it went. In a
    notebook a `path` other than the default is saved too."""
    if in_notebook():
        show_when_cell_ends(fig)
        if path is not None and str(path) != str(default):
            save_figure(fig, path)
        return fig
    save_figure(fig, path)
    if path is not None and str(path) == str(default):
        say_saved(path)
    return fig


def say_saved(path: str | Path, what: str = "plot") -> None:
    """One line on stderr naming a file written where the user did not ask for one."""
    print(f"nanofit: saved the {what} to {Path(path).resolve()}", file=sys.stderr, flush=True)



def save_figure(fig: Figure, path: str | Path | None) -> Figure:
    """Save `fig` as an image at `path` (creating folders) when a path is given; return it."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


# ---- showing figures in a notebook -------------------------------------------------------------
_pending: list[Figure] = []  # figures to show when the notebook cell ends


def show_when_cell_ends(fig: Figure) -> Figure:
    """In a Jupyter notebook, show `fig` once when the running cell ends (as pyplot's inline
    backend does), unless it was shown before that: as the cell's value or by `display`;
    elsewhere do nothing. Returns `fig`. Every figure from `new_figure` goes through here."""
    if not in_notebook():
        return fig
    from IPython import get_ipython

    shell = get_ipython()
    if _show_pending not in shell.events.callbacks["post_run_cell"]:
        shell.events.register("post_run_cell", _show_pending)
        # nanofit's figures go through _png_for_jupyter even after `%matplotlib inline`
        # registers its formatter for all Figures, so `display(fig)` also counts as shown
        png = shell.display_formatter.formatters["image/png"]
        png.for_type(_inline_figure_class(), _png_for_jupyter)
    if not any(f is fig for f in _pending):
        _pending.append(fig)
    return fig


def _forget(fig: Figure) -> None:
    """`fig` was shown: take it off the list of figures to show when the cell ends."""
    _pending[:] = [f for f in _pending if f is not fig]


def _png_for_jupyter(fig: Figure) -> Any:
    """Jupyter's PNG of a nanofit figure: `%matplotlib inline`'s (with its settings) when it
    is on, else `figure_png`'s. The figure is shown now: not again when the cell ends."""
    from IPython import get_ipython
    from matplotlib.figure import Figure

    _forget(fig)
    try:
        inline = get_ipython().display_formatter.formatters["image/png"].lookup_by_type(Figure)
    except KeyError:
        return figure_png(fig)
    return inline(fig)


def _show_pending(result: Any = None) -> None:
    from IPython import get_ipython
    from IPython.display import display

    figs = list(_pending)
    _pending.clear()
    value = getattr(result, "result", None)
    png = get_ipython().display_formatter.formatters["image/png"]
    for fig in figs:
        if fig is value and not isinstance(fig, _inline_figure_class()):
            try:  # a matplotlib Figure as the cell's value: shown if `%matplotlib inline` is on
                png.lookup(fig)
                continue
            except KeyError:
                pass
        display({"image/png": figure_png(fig), "text/plain": repr(fig)}, raw=True)
