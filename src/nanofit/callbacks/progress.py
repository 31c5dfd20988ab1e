"""Progress display: tqdm bars in a terminal; in a Jupyter notebook, bars and a table that grows
one row per epoch, as one output updated in place; one plain line per epoch elsewhere."""
from __future__ import annotations

import html
import io
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

import torch
from tqdm import tqdm

from ..callback import Callback, Order
from ..distributed import is_rank0
from ..plots import figure_png, in_notebook, plot_history, say_saved

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["ProgressCB"]


def _isatty(f: TextIO) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _fmt_time(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes:02d}:{secs:02d}"


def _format_row(columns: list[str], row: Mapping[str, Any]) -> str:
    """A table line: each cell padded to its column's name (at least 8 characters)."""
    return "  ".join(_fmt(row.get(c, "")).ljust(max(len(c), 8)) for c in columns).rstrip()


def _in_table_order(columns: list[str], learn: Learner) -> list[str]:
    """epoch, the training columns, the validation columns, time; within a phase the loss
    first, then the metrics in the order MetricsCB got them: the same order in every fit."""
    names = ["loss", *learn.metrics.metrics] if learn.metrics is not None else []

    def key(column: str) -> tuple[int, int]:
        phase, _, name = column.partition("_")
        if column in ("epoch", "step", "time"):
            return (0 if column != "time" else 3, 0)
        if phase in ("train", "valid"):
            return (1 if phase == "train" else 2,
                    names.index(name) if name in names else len(names))
        return (2, len(names) + 1)
    return sorted(dict.fromkeys(columns), key=key)  # stable: unknown names keep their order


def _batch_size(batch: Any) -> int:
    """The number of samples in a batch: the length of its first tensor (1 if it has none)."""
    if isinstance(batch, torch.Tensor):
        return len(batch) if batch.ndim else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    return 1


class _NotebookBar:
    """A progress bar drawn by a `_NotebookView`, with the part of tqdm's interface that
    ProgressCB uses (update, set_postfix_str, close)."""

    def __init__(self, view: _NotebookView, total: int | None, desc: str, leave: bool) -> None:
        self.view, self.total, self.desc, self.leave = view, total, desc, leave
        self.n, self.postfix, self.start = 0, "", time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.view.changed()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        self.view.close_bar(self)

    def text(self) -> str:
        """`train 3/8 [00:01<00:02, 2.9 it/s, loss 0.4321]`, as tqdm writes it."""
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        timing = _fmt_time(elapsed)
        if self.total and rate > 0:
            timing += f"<{_fmt_time((self.total - self.n) / rate)}"
        extra = f", {rate:.1f} it/s" if rate > 0 and self.n else ""
        return f"{self.desc} {count} [{timing}{extra}{', ' + self.postfix if self.postfix else ''}]"

    def html(self) -> str:
        value = f'value="{self.n}" max="{self.total}" ' if self.total else ""
        return (f'<div><progress {value}style="width:300px;height:1em;vertical-align:middle">'
                f"</progress> <span>{html.escape(self.text())}</span></div>")


class _NotebookView:
    """ProgressCB's display in a notebook: its bars and its table as one output, shown with an
    IPython display handle and updated in place at most every `refresh` seconds, so a fit of
    any length is one output (HTML; text for front ends without it)."""

    def __init__(self, refresh: float) -> None:
        self.refresh = refresh
        self.bars: list[_NotebookBar] = []
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self._handle: Any = None
        self._next_show = 0.0

    def bar(self, total: int | None, desc: str, leave: bool = False) -> _NotebookBar:
        bar = _NotebookBar(self, total, desc, leave)
        self.bars.append(bar)
        self.changed()
        return bar

    def close_bar(self, bar: _NotebookBar) -> None:
        if not bar.leave:
            self.bars = [b for b in self.bars if b is not bar]
        self.changed()

    def set_table(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        self.columns, self.rows = list(columns), list(rows)
        self.changed()

    def changed(self) -> None:
        """Redraw, unless the last redraw was less than `refresh` seconds ago."""
        now = time.monotonic()
        if now >= self._next_show:
            self.show()
            self._next_show = now + self.refresh

    def show(self) -> None:
        """Draw now: the first time as a new output, then in place of it."""
        from IPython.display import display

        if self._handle is None:
            self._handle = display(self, display_id=True)
        else:
            self._handle.update(self)

    def _repr_html_(self) -> str:
        parts = [b.html() for b in self.bars]
        if self.columns:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>"
                                            for c in self.columns) + "</tr>" for r in self.rows)
            parts.append(f'<table border="1" class="dataframe"><thead><tr style="text-align: '
                         f'left;">{head}</tr></thead><tbody>{body}</tbody></table>')
        return "<div>" + "".join(parts) + "</div>"

    def __repr__(self) -> str:
        lines = [b.text() for b in self.bars]
        if self.columns:
            lines.append(_format_row(self.columns, dict(zip(self.columns, self.columns))))
            lines += [_format_row(self.columns, r) for r in self.rows]
        return "\n".join(lines)


class ProgressCB(Callback):
    """Shows progress over epochs and batches and a table row of metrics per epoch.

    In a terminal the bars update in place. In a Jupyter notebook (when `file` is not given)
    the bars and an HTML table growing one row per epoch are one output, updated in place
    (no ipywidgets needed). When the output is not a terminal (CI logs, files, pipes) only one
    clean line per epoch is printed. The table shows MetricsCB's values; without a MetricsCB
    it shows the batch-size-weighted mean training and validation loss, summed on the device
    and read once per phase (under torch.distributed, rank 0's batches). The training loss on
    the bar is read from the device at most every `refresh` seconds.

    `plot=True` draws the loss curves (per batch from a Recorder if there is one, else per
    epoch): live in the notebook's output, else saved after every epoch to `plot_path`
    (default `loss.png` in the working folder, named on stderr).
    """

    order = Order.PROGRESS
    main_fit_only = True

    def __init__(self, plot: bool = False, file: TextIO | None = None,
                 plot_path: str | None = None, refresh: float = 0.5) -> None:
        self.plot = plot
        self.file = file
        self.plot_path = plot_path
        self.refresh = refresh
        self.rows: list[dict[str, Any]] = []
        self._columns: list[str] | None = None
        self._row: dict[str, Any] | None = None
        self._epoch_bar: Any = None
        self._bar: Any = None
        self._view: _NotebookView | None = None
        self._display: Any = None
        self._track = False
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0

    # ---- events -----------------------------------------------------------------------------
    def before_fit(self, learn: Learner) -> None:
        self.out = self.file if self.file is not None else sys.stdout
        if self.file is None and in_notebook():
            self.mode = "notebook"
        else:
            self.mode = "terminal" if _isatty(self.out) else "plain"
        if not is_rank0():  # under torch.distributed only rank 0 shows progress
            self.mode, self.out = "plain", io.StringIO()
        self.rows, self._columns, self._row, self._display = [], None, None, None
        self._row_epoch = -1
        self._row_done = False
        self._said_where = False
        self._view = _NotebookView(self.refresh) if self.mode == "notebook" else None
        if self.mode != "plain":
            self._epoch_bar = self._tqdm(total=learn.n_epochs,
                                         desc="rounds" if learn.by_steps else "epochs", leave=True)

    def before_epoch(self, learn: Learner) -> None:
        if self._row is None or self._row_epoch != learn.epoch:
            self._finish_row(learn)
            bar = self._epoch_bar
            if bar is not None and bar.n < learn.epoch:  # a resumed fit starts past epoch 0
                bar.update(learn.epoch - bar.n)
            self._row_epoch = learn.epoch
            self._row = {} if learn.by_steps else {"epoch": learn.epoch}  # step: at its end
            self._row_done = False
            self._t0 = time.monotonic()
        self._track = learn.metrics is None  # no MetricsCB: the loss is summed here
        self._loss_sum, self._loss_n = None, 0
        if self.mode != "plain":
            total = learn.n_iter or None
            desc = "train" if learn.training else "valid"
            self._bar = self._tqdm(total=total, desc=desc, leave=False)
            self._next_refresh = time.monotonic() + self.refresh

    def after_batch(self, learn: Learner) -> None:
        if self._track:
            self._add_loss(learn.loss, learn.batch)
        bar = self._bar
        if bar is None:
            return
        bar.update()
        if learn.training:
            now = time.monotonic()
            if now >= self._next_refresh:  # reading the loss syncs with the device: rarely
                bar.set_postfix_str(f"loss {learn.loss.item():.4f}", refresh=False)
                self._next_refresh = now + self.refresh

    def _add_loss(self, loss: Any, batch: Any) -> None:
        """Add the batch's loss, times its size, to the phase's total on the device (no sync)."""
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach()
        if loss.ndim:
            loss = loss.mean()
        n = _batch_size(batch)
        if self._loss_sum is None:
            dtype = torch.promote_types(loss.dtype, torch.float32)
            self._loss_sum = torch.zeros((), dtype=dtype, device=loss.device)
        self._loss_sum.add_(loss, alpha=n)
        self._loss_n += n

    def after_epoch(self, learn: Learner) -> None:
        if self._row is None:
            return
        self._row_done = True
        if learn.by_steps:  # a step fit's rows: the steps done when the round ended
            self._row["step"] = learn.step
        if learn.metrics is not None and learn.metrics.history:
            row = learn.metrics.epoch_row(learn.epoch)
            if learn.by_steps:
                del row["epoch"]
            self._row.update(row)
        elif self._track and self._loss_sum is not None:  # the one read of the phase's loss
            phase = "train" if learn.training else "valid"
            self._row[f"{phase}_loss"] = (self._loss_sum / self._loss_n).item()

    def cleanup_epoch(self, learn: Learner) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._loss_sum = None

    def cleanup_fit(self, learn: Learner) -> None:
        self._finish_row(learn)
        if self._epoch_bar is not None:
            self._epoch_bar.close()
            self._epoch_bar = None
        if self._view is not None:
            self._view.show()  # the final state, whatever the time since the last redraw
            self._view = None

    # ---- output -----------------------------------------------------------------------------
    def _tqdm(self, total: int | None, desc: str, leave: bool) -> Any:
        if self._view is not None:
            return self._view.bar(total, desc, leave)
        return tqdm(file=self.out, dynamic_ncols=True, total=total, desc=desc, leave=leave)

    def _finish_row(self, learn: Learner) -> None:
        """Show the finished epoch's row (once all its phases ran) and update the plot."""
        row, self._row = self._row, None
        if row is None or not self._row_done:  # no phase of that epoch completed
            return
        row["time"] = _fmt_time(time.monotonic() - self._t0)
        self.rows.append(row)
        columns = list(row) if self._columns is None else self._columns
        new = [c for c in row if c not in columns]
        if self._columns is None or new:  # a (new) header when the columns first show or grow
            self._columns = _in_table_order(columns + new, learn)
            if self._view is None:
                self._write(self._format(dict(zip(self._columns, self._columns))))
        if self._view is not None:
            self._view.set_table(self._columns, self.rows)
        else:
            self._write(self._format(row))
        if self._epoch_bar is not None:
            self._epoch_bar.update()
        if self.plot and is_rank0():
            self._draw(learn)

    def _format(self, row: dict[str, Any]) -> str:
        return _format_row(self._columns or list(row), row)

    def _write(self, line: str) -> None:
        if self.mode == "plain":
            print(line, file=self.out, flush=True)
        else:
            tqdm.write(line, file=self.out)

    def _draw(self, learn: Learner) -> None:
        if learn.recorder is not None:
            fig = learn.recorder.plot_loss(show=False)  # every training batch
        else:  # epochs only: add a Recorder for every batch
            fig = plot_history(self._history(learn), show=False, by_steps=learn.by_steps)
        if self.mode != "notebook":
            path = self.plot_path if self.plot_path is not None else "loss.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            if self.plot_path is None and not self._said_where:
                say_saved(path, "loss plot")
                self._said_where = True
            return
        from IPython.display import Image, display

        image = Image(data=figure_png(fig))
        if self._display is None:
            self._display = display(image, display_id=True)
        else:
            self._display.update(image)

    def _history(self, learn: Learner) -> list[dict[str, Any]]:
        """MetricsCB's records, or the same records made from this fit's rows without one."""
        if learn.metrics is not None:
            return learn.metrics.history
        return [{"epoch": row.get("epoch"), "step": row.get("step"),
                 "train": "train" if phase == "train" else "eval", "loss": row[f"{phase}_loss"]}
                for row in self.rows for phase in ("train", "valid") if f"{phase}_loss" in row]
