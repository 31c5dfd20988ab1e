"""The learning-rate finder: a short run with an exponentially growing lr, and its suggestions."""
from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..callback import Callback, CancelEpochException, CancelFitException, Order, runs_in
from ..checks import check_fit_args
from ..optim import set_hyper
from ..plots import plot_lr_find, show_or_save
from ..state import preserve_state

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["lr_find", "LRFinderCB", "SuggestedLRs", "suggest_minimum", "suggest_steep",
           "suggest_valley", "SUGGESTIONS"]


def suggest_minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """A tenth of the lr where the (smoothed) loss is lowest: safely before it turns up."""
    i = min(range(len(losses)), key=losses.__getitem__)
    return lrs[i] / 10


def suggest_steep(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr where the loss falls fastest per decade of lr."""
    if len(lrs) < 2:
        return lrs[0]
    slopes = [(losses[i + 1] - losses[i]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i]))
              for i in range(len(lrs) - 1)]
    i = min(range(len(slopes)), key=slopes.__getitem__)
    return math.sqrt(lrs[i] * lrs[i + 1])  # the middle of the steepest step, on the log axis


def suggest_valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The middle of the descent into the lowest loss, on the log axis.

    The descent runs from where the loss last stood near its plateau (within a tenth of the
    drop) to its lowest point; the plateau level is the 90th percentile of the losses before
    the minimum, so neither noise nor the first few batches move it. The middle sits well
    inside the rates where training makes progress, away from the edge of divergence.
    """
    low = min(range(len(losses)), key=losses.__getitem__)
    before = sorted(losses[: low + 1])
    plateau = before[int(0.9 * (len(before) - 1))]
    drop = plateau - losses[low]
    if drop <= 0:
        return lrs[low]
    start = max(i for i in range(low + 1) if losses[i] >= losses[low] + 0.9 * drop)
    return math.sqrt(lrs[start] * lrs[low])


SUGGESTIONS = {"valley": suggest_valley, "minimum": suggest_minimum, "steep": suggest_steep}


_SUGGESTED: dict[tuple[str, ...], type] = {}  # one named tuple type per set of names asked


def SuggestedLRs(**values: float) -> Any:  # noqa: N802  (used like fastai's named tuple)
    """The LR finder's suggestions: a named tuple of the ones asked for, in the order asked, as
    plain floats (as fastai returns them): `valley, = learn.lr_find()`,
    `learn.lr_find(suggest=("valley", "steep")).steep`, `[float(v) for v in res]`."""
    names = tuple(values)
    if names not in _SUGGESTED:
        _SUGGESTED[names] = namedtuple("SuggestedLRs", names)
    return _SUGGESTED[names](*(float(v) for v in values.values()))


class LRFinderCB(Callback):
    """Raises the lr exponentially from `start_lr` to `end_lr` over `num_it` training batches
    (or by a factor `gamma` per batch, as the course's LRFinderCB), records the smoothed
    loss, and cancels the fit when done or when the loss diverges (smoothed loss above
    `max_mult` times its minimum, or not finite). Use it through `learn.lr_find()`.
    """

    order = Order.LR_FINDER

    def __init__(self, start_lr: float = 1e-7, end_lr: float | None = None, num_it: int = 100,
                 stop_div: bool = True, beta: float = 0.98, gamma: float | None = None,
                 max_mult: float = 4.0) -> None:
        if num_it < 2:
            raise ValueError(f"lr_find needs num_it >= 2, got {num_it}")
        if gamma is not None:
            if end_lr is not None or gamma <= 1:
                raise ValueError(f"lr_find: give gamma > 1 (the lr's growth per batch) or "
                                 f"end_lr, not both; got gamma={gamma}, end_lr={end_lr}")
            # in log space: gamma ** (num_it - 1) overflows a float for long sweeps; the loss
            # diverges long before 1e10 anyway
            end_lr = start_lr * math.exp(min((num_it - 1) * math.log(gamma),
                                             math.log(max(1e10 / start_lr, 1.0))))
        end_lr = 10.0 if end_lr is None else end_lr
        if not 0 < start_lr < end_lr:
            raise ValueError(f"lr_find needs 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
        if max_mult <= 1:
            raise ValueError(f"lr_find: max_mult (divergence at max_mult x the lowest loss) "
                             f"must be > 1, got {max_mult}")
        self.start_lr, self.end_lr, self.num_it = start_lr, end_lr, num_it
        # In log space: a long sweep cannot overflow, and gamma stays the exact growth.
        self._log_span = math.log(end_lr / start_lr)
        self._log_growth = math.log(gamma) if gamma else self._log_span / (num_it - 1)
        self.stop_div, self.beta, self.max_mult = stop_div, beta, max_mult
        self.lrs: list[float] = []
        self.raw_losses: list[float] = []
        self.losses: list[float] = []  # smoothed

    def lr_at(self, i: int) -> float:
        """The lr of batch i: geometric steps from start_lr (i=0) to end_lr (i=num_it-1)."""
        return self.start_lr * math.exp(min(i * self._log_growth, self._log_span))

    def before_fit(self, learn: Learner) -> None:
        self.lrs, self.raw_losses, self.losses = [], [], []
        self._avg, self._best = 0.0, math.inf

    def before_epoch(self, learn: Learner) -> None:
        if not learn.training:
            raise CancelEpochException()

    def before_batch(self, learn: Learner) -> None:
        lr = self.lr_at(len(self.lrs))
        set_hyper(learn.opt, "lr", lr)
        self.lrs.append(lr)

    def after_batch(self, learn: Learner) -> None:
        loss = learn.loss.item()  # one sync per batch is fine for a ~100-batch search
        self.raw_losses.append(loss)
        i = len(self.raw_losses)
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta**i)
        self.losses.append(smooth)
        if math.isfinite(smooth):
            self._best = min(self._best, smooth)
        diverged = not math.isfinite(smooth) or smooth > self.max_mult * self._best
        if (self.stop_div and diverged) or i >= self.num_it:
            raise CancelFitException()

    def suggest(self, names: Sequence[str] = ("valley", "minimum", "steep")) -> Any:
        """Suggested learning rates from the recorded curve, by method name."""
        unknown = [n for n in names if n not in SUGGESTIONS]
        if unknown:
            raise ValueError(f"unknown lr_find suggestion {unknown}; choose from "
                             f"{list(SUGGESTIONS)}")
        # The curve up to where it diverges (the stop_div rule: not finite, or above max_mult
        # times the lowest loss so far): beyond that it says nothing about good rates.
        lrs, losses, lowest = [], [], math.inf
        for lr, loss in zip(self.lrs, self.losses):
            if not math.isfinite(loss) or loss > self.max_mult * lowest:
                break
            lrs.append(lr)
            losses.append(loss)
            lowest = min(lowest, loss)
        if len(lrs) < 2:
            raise ValueError(f"lr_find recorded {len(lrs)} usable losses, too few to suggest a "
                             "learning rate; lower start_lr, raise num_it, or check the data "
                             "and loss")
        if not names:
            raise ValueError("lr_find: suggest= names no suggestion; ask for at least one of "
                             f"{list(SUGGESTIONS)}")
        return SuggestedLRs(**{n: SUGGESTIONS[n](lrs, losses) for n in dict.fromkeys(names)})

    def plot(self, suggestions: Any = None, path: str | Path | None = None):
        """Smoothed loss against lr (log axis) with the suggestions marked; returns the Figure."""
        marks = {} if suggestions is None else suggestions._asdict()
        return plot_lr_find(self.lrs, self.losses, marks, path=path)


def lr_find(learn: Learner, start_lr: float = 1e-7, end_lr: float | None = None,
            num_it: int = 100, stop_div: bool = True, suggest: Sequence[str] = ("valley",),
            plot: bool = True, plot_path: str = "lr_find.png", gamma: float | None = None,
            max_mult: float = 4.0, max_epochs: int | None = None) -> Any:
    """`learn.lr_find()`: grow the lr from `start_lr` to `end_lr` (default 10) over `num_it`
    training batches and return the suggested rate(s) (`.valley`, `.minimum`, `.steep`, as
    asked in `suggest`). The course's form works too: `lr_find(gamma=1.3, max_mult=3,
    start_lr=1e-5, max_epochs=10)` grows the lr by `gamma` per batch for up to `max_epochs`
    epochs; the sweep stops when the smoothed loss passes `max_mult` times its minimum.
    Leaves no trace: `lr_find(); fit()` trains exactly as `fit()` alone; callbacks with
    `main_fit_only` (schedules, metrics, loggers...) sit it out. The curve is in
    `learn.lr_finder`; `plot` shows it in a notebook, else saves it to `plot_path`."""
    check_fit_args(learn, 1, True, False, None)
    sized = hasattr(learn.dls.train, "__len__")
    n_batches = len(learn.dls.train) if sized else 1
    if max_epochs is not None:
        if not sized:
            raise ValueError("lr_find(max_epochs=...) needs a training loader with a length; "
                             "give num_it (training batches) instead")
        num_it = max_epochs * n_batches
    finder = LRFinderCB(start_lr, end_lr, num_it, stop_div, gamma=gamma, max_mult=max_mult)
    # Enough epochs to reach num_it batches; the finder cancels the fit when done.
    sitting_out = [cb for cb in learn.cbs if not runs_in(cb, "lr_find")]
    with preserve_state(learn), learn.removed_cbs(sitting_out):
        learn.fit(math.ceil(num_it / n_batches), valid=False, cbs=[finder])
    learn.lr_finder = finder
    suggestions = finder.suggest(suggest)
    if plot:
        show_or_save(finder.plot(suggestions), plot_path)
    return suggestions
