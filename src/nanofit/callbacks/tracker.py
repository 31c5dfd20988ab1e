"""Callbacks that watch the validation metrics: early stopping, keeping the best model,
lowering the lr on a plateau; and stopping on a NaN loss."""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..callback import Callback, CancelFitException, Order
from ..checkpoint import FORMAT, VERSION
from ..distributed import is_distributed, is_rank0, unwrap_model
from ..files import atomic_save
from ..sharded import is_sharded
from .metrics import RECORD_KEYS
from .schedule import EpochSchedCB

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["EarlyStoppingCB", "SaveBestCB", "ReduceLROnPlateauCB", "TerminateOnNaNCB"]


def _lower_is_better(monitor: str) -> bool:
    return any(word in monitor for word in ("loss", "error", "mse", "mae", "perplexity"))


class _Tracker(Callback):
    """Reads `monitor` from MetricsCB's validation record after each epoch and tells whether
    it improved on the best so far by more than `min_delta`."""

    order = Order.TRACKER
    main_fit_only = True

    def __init__(self, monitor: str = "loss", comp: Callable[[float, float], bool] | None = None,
                 min_delta: float = 0.0) -> None:
        self.monitor = monitor
        if comp is None:
            comp = operator.lt if _lower_is_better(monitor) else operator.gt
        self.comp, self.min_delta = comp, abs(min_delta)
        self.best: float | None = None

    def before_fit(self, learn: Learner) -> None:
        if learn.metrics is None:
            raise ValueError(f"{type(self).__name__} watches the validation {self.monitor!r} "
                             "computed by MetricsCB: add a MetricsCB to cbs")
        self.best = None

    def improved(self, learn: Learner) -> bool | None:
        """None outside a validation record; else whether `monitor` beat the best."""
        if learn.training:
            return None
        assert learn.metrics is not None  # checked at before_fit
        record = learn.metrics.history[-1]
        if self.monitor not in record:
            raise ValueError(f"{type(self).__name__}: monitor={self.monitor!r} is not among the "
                             f"metrics {[k for k in record if k not in RECORD_KEYS]}")
        value = record[self.monitor]
        # lower is better: must beat best - min_delta; higher is better: best + min_delta
        shifted = value + self.min_delta if self.comp(0, 1) else value - self.min_delta
        if self.best is None or (math.isfinite(value) and self.comp(shifted, self.best)):
            self.best = value
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]


class EarlyStoppingCB(_Tracker):
    """Stops the fit when the validation `monitor` has not improved for `patience` epochs.

    `comp` defaults to "lower is better" for names with loss/error, else "higher is better".
    """

    def __init__(self, monitor: str = "loss", comp: Callable | None = None,
                 min_delta: float = 0.0, patience: int = 1) -> None:
        super().__init__(monitor, comp, min_delta)
        self.patience = patience
        self.wait = 0
        self.stopped_epoch: int | None = None

    def before_fit(self, learn: Learner) -> None:
        super().before_fit(learn)
        self.wait, self.stopped_epoch = 0, None

    def after_epoch(self, learn: Learner) -> None:
        better = self.improved(learn)
        if better is None:
            return
        self.wait = 0 if better else self.wait + 1
        if self.wait >= self.patience:
            self.stopped_epoch = learn.epoch
            if is_rank0():
                unit, at = ("rounds", f"step {learn.step}") if learn.by_steps else \
                    ("epochs", f"epoch {learn.epoch}")
                print(f"EarlyStoppingCB: no improvement of {self.monitor!r} in {self.wait} "
                      f"{unit}; stopping after {at} (best {self.best:.4g})")
            raise CancelFitException()

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state["best"], state["wait"]


class SaveBestCB(_Tracker):
    """Saves the model weights to the file `path` whenever the validation `monitor` improves;
    with `reload_at_end`, the learner ends the fit with the best weights."""

    def __init__(self, monitor: str = "loss", path: str | Path = "best.pt",
                 comp: Callable | None = None, min_delta: float = 0.0,
                 reload_at_end: bool = True) -> None:
        super().__init__(monitor, comp, min_delta)
        self.path = Path(path)
        self.reload_at_end = reload_at_end
        self.best_epoch: int | None = None

    def before_fit(self, learn: Learner) -> None:
        super().before_fit(learn)
        if is_sharded(learn.model):  # sharded by FSDPCB (which runs first)
            raise ValueError("SaveBestCB writes the whole model from rank 0, but FSDPCB shards "
                             "it: use CheckpointCB(path, keep=...) for sharded checkpoints and "
                             "nanofit.consolidate(...) for one file")

    def after_epoch(self, learn: Learner) -> None:
        if self.improved(learn):
            if is_rank0():  # every rank keeps the same best; one writes it
                atomic_save({"format": FORMAT, "version": VERSION, "position": None,
                             "model": unwrap_model(learn.model).state_dict()}, self.path)
            if is_distributed():
                dist.barrier()  # the file exists before any rank may reload it
            self.best_epoch = learn.epoch

    def after_fit(self, learn: Learner) -> None:
        if self.reload_at_end and self.best_epoch is not None:
            learn.load(str(self.path), with_opt=False)

    after_cancel_fit = after_fit  # early stopping too ends with the best weights

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class ReduceLROnPlateauCB(EpochSchedCB):
    """Multiplies the lr by `factor` when the validation `monitor` has not improved for
    `patience` epochs (torch's ReduceLROnPlateau, driven by MetricsCB's values)."""

    def __init__(self, monitor: str = "loss", patience: int = 1, factor: float = 0.2,
                 min_lr: float = 0.0, comp: Callable | None = None) -> None:
        lower = _lower_is_better(monitor) if comp is None else comp(0, 1)
        sched = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min" if lower else "max",
                        patience=patience - 1, factor=factor, min_lr=min_lr)
        super().__init__(sched, monitor=monitor)


class TerminateOnNaNCB(Callback):
    """Stops the fit as soon as a training loss is NaN or infinite, before that batch's step,
    so the weights (and the last checkpoint) stay good. Reads the loss every batch: one host
    sync per batch, which on a GPU costs a little speed."""

    order = Order.NAN_CHECK

    def after_loss(self, learn: Learner) -> None:
        if learn.training and not torch.isfinite(learn.loss).all():
            print(f"TerminateOnNaNCB: loss is {learn.loss.item()} at epoch {learn.epoch}, "
                  f"batch {learn.iter}; stopping before the step")
            self.epoch, self.iter = learn.epoch, learn.iter
            raise CancelFitException()
