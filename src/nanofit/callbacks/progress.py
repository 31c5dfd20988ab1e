"""Progress display: tqdm bars in a terminal or notebook, one plain line per epoch elsewhere."""
from __future__ import annotations

import io
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from ..callback import Callback, Order
from ..distributed import is_rank0
from ..plots import in_notebook, plot_history

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


def _in_table_order(columns: list[str], learn: Learner) -> list[str]:
    """epoch, the training columns, the validation columns, time; within a phase the loss
    first, then the metrics in the order MetricsCB got them: the same order in every fit."""
    names = ["loss", *learn.metrics.metrics] if learn.metrics is not None else []

    def key(column: str) -> tuple[int, int]:
        phase, _, name = column.partition("_")
        if column in ("epoch", "time"):
            return (0 if column == "epoch" else 3, 0)
        if phase in ("train", "valid"):
            return (1 if phase == "train" else 2,
                    names.index(name) if name in names else len(names))
        return (2, len(names) + 1)
    return sorted(dict.fromkeys(columns), key=key)  # stable: unknown names keep their order


class ProgressCB(Callback):
    """Shows progress over epochs and batches and a table row of metrics per epoch.

    In a terminal the bars update in place; in a notebook they render there; when the output
    is not a terminal (CI logs, files, pipes) only one clean line per epoch is printed.
    The training loss on the bar is read from the device at most every `refresh` seconds.
    `plot=True` draws the loss curves (per batch from a Recorder if there is one, else per
    epoch): live in a notebook, else saved to `plot_path` after every epoch.
    """

    order = Order.PROGRESS
    main_fit_only = True

    def __init__(self, plot: bool = False, file: TextIO | None = None,
                 plot_path: str = "loss.png", refresh: float = 0.5) -> None:
        self.plot = plot
        self.file = file
        self.plot_path = plot_path
        self.refresh = refresh
        self.rows: list[dict[str, Any]] = []
        self._columns: list[str] | None = None
        self._row: dict[str, Any] | None = None
        self._epoch_bar = self._bar = None
        self._display = None

    # ---- events -----------------------------------------------------------------------------
    def before_fit(self, learn: Learner) -> None:
        self.out = self.file if self.file is not None else sys.stdout
        self.mode = "notebook" if in_notebook() else "terminal" if _isatty(self.out) else "plain"
        if not is_rank0():  # under torch.distributed only rank 0 shows progress
            self.mode, self.out = "plain", io.StringIO()
        self.rows, self._columns, self._row, self._display = [], None, None, None
        self._row_done = False
        if self.mode != "plain":
            self._epoch_bar = self._tqdm(total=learn.n_epochs, desc="epochs", leave=True)

    def before_epoch(self, learn: Learner) -> None:
        if self._row is None or self._row["epoch"] != learn.epoch:
            self._finish_row(learn)
            self._row = {"epoch": learn.epoch}
            self._row_done = False
            self._t0 = time.monotonic()
        if self.mode != "plain":
            total = learn.n_iter or None
            desc = "train" if learn.training else "valid"
            self._bar = self._tqdm(total=total, desc=desc, leave=False)
            self._next_refresh = time.monotonic() + self.refresh

    def after_batch(self, learn: Learner) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.update()
        if learn.training:
            now = time.monotonic()
            if now >= self._next_refresh:  # reading the loss syncs with the device: rarely
                bar.set_postfix_str(f"loss {learn.loss.item():.4f}", refresh=False)
                self._next_refresh = now + self.refresh

    def after_epoch(self, learn: Learner) -> None:
        if self._row is None:
            return
        self._row_done = True
        if learn.metrics is not None and learn.metrics.history:
            self._row.update(learn.metrics.epoch_row(learn.epoch))

    def cleanup_epoch(self, learn: Learner) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def cleanup_fit(self, learn: Learner) -> None:
        self._finish_row(learn)
        if self._epoch_bar is not None:
            self._epoch_bar.close()
            self._epoch_bar = None

    # ---- output -----------------------------------------------------------------------------
    def _tqdm(self, **kw: Any):
        if self.mode == "notebook":  # the notebook bar needs ipywidgets: only import it there
            from tqdm.auto import tqdm as notebook_tqdm

            return notebook_tqdm(file=self.out, dynamic_ncols=True, **kw)
        return tqdm(file=self.out, dynamic_ncols=True, **kw)

    def _finish_row(self, learn: Learner) -> None:
        """Print the finished epoch's row (once all its phases ran) and update the plot."""
        row, self._row = self._row, None
        if row is None or not self._row_done:  # no phase of that epoch completed
            return
        row["time"] = _fmt_time(time.monotonic() - self._t0)
        self.rows.append(row)
        columns = list(row) if self._columns is None else self._columns
        new = [c for c in row if c not in columns]
        if self._columns is None or new:  # a (new) header when the columns first show or grow
            self._columns = _in_table_order(columns + new, learn)
            self._write(self._format(dict(zip(self._columns, self._columns))))
        self._write(self._format(row))
        if self._epoch_bar is not None:
            self._epoch_bar.update()
        if self.plot and is_rank0():
            self._draw(learn)

    def _format(self, row: dict[str, Any]) -> str:
        cols = self._columns or list(row)
        cells = [_fmt(row.get(c, "")).ljust(max(len(c), 8)) for c in cols]
        return "  ".join(cells).rstrip()

    def _write(self, line: str) -> None:
        if self.mode == "plain":
            print(line, file=self.out, flush=True)
        else:
            tqdm.write(line, file=self.out)

    def _draw(self, learn: Learner) -> None:
        if learn.recorder is not None:
            fig = learn.recorder.plot_loss()  # every training batch
        else:  # epochs only: add a Recorder for every batch
            fig = plot_history(learn.metrics.history if learn.metrics is not None else [])
        if self.mode != "notebook":
            fig.savefig(self.plot_path, dpi=100, bbox_inches="tight")
            return
        from IPython.display import Image, display

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        image = Image(data=buf.getvalue())
        if self._display is None:
            self._display = display(image, display_id=True)
        else:
            self._display.update(image)
