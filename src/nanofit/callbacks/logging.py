"""Loggers fed by MetricsCB's records: CSVLogger and TensorBoardCB."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..callback import Callback, Order
from ..distributed import is_rank0

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["CSVLogger", "TensorBoardCB"]


def _epoch_done(learn: Learner) -> bool:
    return not learn.training or not learn.run_valid


class CSVLogger(Callback):
    """Writes one row per epoch (the MetricsCB values of both phases) to the CSV file `path`.

    An existing file is continued (a resumed run appends); new columns widen the header."""

    order = Order.LOGGER
    main_fit_only = True

    def __init__(self, path: str | Path = "history.csv") -> None:
        self.path = Path(path)

    def after_epoch(self, learn: Learner) -> None:
        metrics = learn.metrics
        if not _epoch_done(learn) or metrics is None or not is_rank0():
            return
        row = metrics.epoch_row(learn.epoch)
        rows: list[dict[str, Any]] = []
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
        columns = list(rows[0]) if rows else []
        columns += [k for k in row if k not in columns]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if rows and list(rows[0]) == columns:  # same columns: append one line
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=columns).writerow(row)
            return
        with open(self.path, "w", newline="") as f:  # new file, or new columns: rewrite it
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows([*rows, row])


class TensorBoardCB(Callback):
    """Logs to TensorBoard in `log_dir`: the training loss per batch, every MetricsCB value per
    epoch, and, with ActivationStats, each hooked layer's activation histogram per epoch.
    Needs the `tensorboard` package. Losses are read from the device once per epoch. The
    writer is open during a fit only; a later fit appends to the same run."""

    order = Order.LOGGER
    main_fit_only = True

    def __init__(self, log_dir: str | Path = "runs") -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ImportError("TensorBoardCB needs the tensorboard package: "
                              "pip install tensorboard")
        self.log_dir = Path(log_dir)
        self.writer: Any = None  # a SummaryWriter on rank 0 during a fit
        self.step = 0
        self._losses: list[torch.Tensor] = []

    def before_fit(self, learn: Learner) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a new event file in the same log_dir: TensorBoard shows the fits as one run, and
        # self.step goes on counting batches
        if is_rank0() and self.writer is None:
            self.writer = SummaryWriter(str(self.log_dir))

    def after_batch(self, learn: Learner) -> None:
        if learn.training and self.writer is not None:
            self._losses.append(learn.loss.detach())

    def after_epoch(self, learn: Learner) -> None:
        if self.writer is None:
            return
        if learn.training:
            self._write_losses()
        metrics = learn.metrics
        if _epoch_done(learn) and metrics is not None:
            at = learn.step if learn.by_steps else learn.epoch  # the x axis: steps or epochs
            for key, value in metrics.epoch_row(learn.epoch).items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, at)
            self._histograms(learn)
            self.writer.flush()

    def _write_losses(self) -> None:
        if self._losses:
            losses, self._losses = self._losses, []
            for value in torch.stack(losses).float().cpu().tolist():
                self.writer.add_scalar("train/batch_loss", value, self.step)
                self.step += 1

    def _histograms(self, learn: Learner) -> None:
        stats = next((cb for cb in learn.cbs  # an ActivationStats, found by what it offers
                      if hasattr(cb, "hists") and hasattr(cb, "names")), None)
        if stats is None:
            return
        lo, hi = stats.hist_range
        edges = torch.linspace(lo, hi, stats.bins + 1)
        for name, hist in zip(stats.names, stats.hists()):
            if hist.shape[1] == 0:
                continue
            counts = hist[:, -1]
            centres = (edges[:-1] + edges[1:]) / 2
            total = counts.sum().item()
            if total <= 0:
                continue
            self.writer.add_histogram_raw(
                f"activations/{name}", min=lo, max=hi, num=total,
                sum=float((counts * centres).sum()), sum_squares=float((counts * centres**2).sum()),
                bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),
                global_step=learn.step if learn.by_steps else learn.epoch)

    def cleanup_fit(self, learn: Learner) -> None:
        # closing stops the writer's thread; the next fit opens a new writer
        if self.writer is None:
            return
        try:
            self._write_losses()  # those of an epoch that was cancelled or failed
        finally:
            self.writer.close()
            self.writer = None
            self._losses = []
