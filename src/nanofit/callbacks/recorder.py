"""Recorder: the loss and hyper-parameters of every training batch, for plots."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..callback import Callback, Order
from ..optim import groups, hyper_access, supported_hypers
from ..plots import plot_loss, plot_sched

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["Recorder"]


class Recorder(Callback):
    """Records the loss and the hyper-parameters of every training batch, for plots.

    `hps` names the hyper-parameters to record (default: all of lr, mom, wd, beta that the
    optimizer has), read from its last param group (the head, as in fastai) at the end of each
    training batch: the values its step used. `valid_losses` needs a MetricsCB. Losses stay on
    the device and are copied to the host a few hundred at a time.
    """

    order = Order.RECORDER
    main_fit_only = True

    def __init__(self, *hps: str, sync_every: int = 256) -> None:
        self.names = hps or None
        self.sync_every = sync_every
        self.losses: list[float] = []
        self.hps: dict[str, list[float]] = {}
        self.valid_losses: list[tuple[int, float]] = []
        self._pending: list[torch.Tensor] = []
        self._getters: list[tuple[list, Any]] = []

    @property
    def lrs(self) -> list[float]:
        """The learning rate of every training batch."""
        return self.hps.get("lr", [])

    def before_fit(self, learn: Learner) -> None:
        learn.recorder = self
        self.losses, self.valid_losses, self._pending = [], [], []
        opt = learn.opt
        names = self.names if self.names else supported_hypers(opt) if opt is not None else []
        self.hps = {name: [] for name in names}
        # Resolved once: per batch only list appends of plain dict reads remain.
        self._getters = [(self.hps[n], hyper_access(opt, n)[0]) for n in names]

    def after_batch(self, learn: Learner) -> None:
        if not learn.training:
            return
        self._pending.append(learn.loss.detach())
        group = groups(learn.opt)[-1]  # the head's; read each batch (load_state_dict
        # replaces the list), from a hand-written optimizer's fields too
        for values, get in self._getters:
            v = get(group)
            values.append(v.detach().clone() if isinstance(v, torch.Tensor) else v)
        if len(self._pending) >= self.sync_every:
            self._sync()

    def _sync(self) -> None:
        if self._pending:
            self.losses.extend(torch.stack(self._pending).float().cpu().tolist())
            self._pending = []

    def after_epoch(self, learn: Learner) -> None:
        self._sync()
        metrics = learn.metrics
        if not learn.training and metrics is not None and metrics.history:
            self.valid_losses.append((len(self.losses), metrics.history[-1]["loss"]))

    def cleanup_fit(self, learn: Learner) -> None:
        self._sync()

    def state_dict(self) -> dict[str, Any]:
        """The recorded losses and hyper-parameters, as plain Python values."""
        self._sync()
        return copy.deepcopy({"losses": self.losses, "hps": self.hps,
                              "valid_losses": self.valid_losses})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = copy.deepcopy(state)
        self.losses, self.valid_losses = state["losses"], state["valid_losses"]
        for name, values in state["hps"].items():  # in place: the per-batch readers keep the lists
            self.hps.setdefault(name, [])[:] = values
        self._pending = []

    def plot_loss(self, path: str | Path | None = None, smooth: float | None = None,
                  show: bool = True):
        """Training loss per batch (raw and smoothed) and validation loss per epoch; a Figure,
        saved to `path` if given. In a notebook it shows once, inline (`show=False`: only if
        displayed)."""
        self._sync()
        return plot_loss(self.losses, self.valid_losses, smooth=smooth, path=path, show=show)

    def plot_sched(self, path: str | Path | None = None):
        """Each recorded hyper-parameter that changes, per training batch (the constant ones
        are named in the title); a Figure, saved to `path` if given, shown once in a notebook."""
        values = {k: [float(v) for v in vs] for k, vs in self.hps.items()}
        return plot_sched(values, path=path)
