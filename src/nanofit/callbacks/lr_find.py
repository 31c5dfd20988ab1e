"""The learning-rate finder: a short run with an exponentially growing lr, and its suggestions."""
from __future__ import annotations

import math
import warnings
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..callback import Callback, CancelEpochException, CancelFitException, Order, runs_in
from ..checks import check_fit_args
from ..optim import set_hyper
from ..plots import plot_lr_find, show_or_save
from ..state import preserve_state
from ..torch_utils import length

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["lr_find", "LRFinderCB", "SuggestedLRs", "suggest_minimum", "suggest_steep",
           "suggest_valley", "SUGGESTIONS", "descent_problem", "batch_noise"]


# The first HEAD of the sweep is never suggested: the smoothed loss there averages only a few
# batches (one at the very start), so a lucky first batch looks like the lowest loss of all.
HEAD = 0.05
# A descent is clear when the smoothed loss falls by more than the batch-to-batch noise of the
# loss and either at least MIN_DROP below its plateau level or NOISE_MULT times that noise. In
# bench/lr_find_seeds.py fresh models fall 40-50% with momentum or Adam; a fresh MLP on the
# digits under plain SGD falls only 8-10% but 5-6x the noise, and trains well at the
# suggestion; a trained model's flat curve and random labels fall 0.01-0.3x the noise.
MIN_DROP = 0.2
NOISE_MULT = 3.0


class _Descent(NamedTuple):
    first: int  # the first index a suggestion may use (the ones before are the head)
    low: int  # the lowest loss after the head (ties: the larger lr)
    plateau: float  # the level before the descent
    drop: float  # plateau - losses[low]


def _head(n: int) -> int:
    """How many of n points are the head of the sweep (at least 1, leaving at least 1)."""
    return max(0, min(n - 1, math.ceil(HEAD * n)))


def _descent(losses: Sequence[float]) -> _Descent:
    first = _head(len(losses))
    low = min(range(first, len(losses)), key=lambda i: (losses[i], -i))
    # the plateau is the 90th percentile of the losses before the minimum, so neither noise nor
    # a spike in the first batches moves it
    before = sorted(losses[first: low + 1])
    plateau = before[int(0.9 * (len(before) - 1))]
    return _Descent(first, low, plateau, plateau - losses[low])


def _clear(d: _Descent, noise: float) -> bool:
    if d.drop <= 0 or d.drop <= noise:
        return False
    return d.drop >= MIN_DROP * abs(d.plateau) or (noise > 0 and d.drop >= NOISE_MULT * noise)


def batch_noise(raw_losses: Sequence[float]) -> float:
    """The batch-to-batch noise of the loss: the standard deviation a batch's loss has around
    the trend, from the median absolute difference of successive (unsmoothed) batch losses, so
    neither the trend nor a few wild batches near divergence move it."""
    diffs = sorted(abs(b - a) for a, b in zip(raw_losses, raw_losses[1:])
                   if math.isfinite(a) and math.isfinite(b))
    if not diffs:
        return 0.0
    # for normal noise, median |x_i+1 - x_i| = 0.6745 * sqrt(2) * sigma
    return diffs[len(diffs) // 2] / (0.6745 * math.sqrt(2))


def descent_problem(lrs: Sequence[float], losses: Sequence[float],
                    noise: float = 0.0) -> str | None:
    """Why the smoothed loss curve gives no trustworthy suggestion, or None if it is fine.

    The curve needs a clear descent: past the first few percent of the sweep, the loss falls
    by more than `noise` (the loss's batch-to-batch noise, `batch_noise(raw_losses)`; lr_find
    passes it), and at least MIN_DROP (20%) below its plateau level or NOISE_MULT (3) times
    the noise."""
    d = _descent(losses)
    if _clear(d, noise):
        return None
    if d.low == d.first:
        shape = ("is lowest at the start of the sweep and only rises from there (lr "
                 f"{lrs[0]:.1e} to {lrs[-1]:.1e})")
    else:
        share = f"{max(d.drop, 0) / abs(d.plateau or 1):.0%} below its plateau " \
                f"({d.plateau:.4g} -> {losses[d.low]:.4g}"
        if d.drop < MIN_DROP * abs(d.plateau):
            shape = f"falls only {share}; a clear descent falls {MIN_DROP:.0%} or more)"
        else:
            shape = f"falls {share}), no more than the loss's batch-to-batch noise ({noise:.3g})"
    return (f"lr_find: no clear descent in the loss curve: the smoothed loss {shape}, so the "
            "suggestion is a guess (every rule then gives a tenth of the largest lr at which "
            "the loss is still near its lowest). Try more iterations (num_it=300), a smaller "
            "start_lr, and check the data and the loss (inputs matching their labels, a "
            "loss_func that fits the targets). A model that has already trained shows a flat "
            "curve too: then train below the lr where the loss starts to rise.")


def _near_lowest(lrs: Sequence[float], losses: Sequence[float], d: _Descent,
                 noise: float) -> float:
    """Every rule's answer for a curve with no clear descent: a tenth of the largest lr at
    which the loss is still near its lowest (no higher than its plateau, or than its lowest
    plus the batch noise or a tenth of the way up to its highest), so below where it rises."""
    lowest, highest = losses[d.low], max(losses[d.first:])
    near = max(d.plateau, lowest + max(noise, 0.1 * (highest - lowest)))
    edge = max(i for i in range(d.low, len(losses)) if losses[i] <= near)
    return max(lrs[edge] / 10, lrs[d.first])


# Each rule takes (lrs, losses, noise=0.0): the lrs and smoothed losses of the usable curve, and
# the loss's batch-to-batch noise (see batch_noise; 0 judges a descent by its size alone). None
# suggests a rate from the first few percent of the sweep (HEAD) or outside it. Without a clear
# descent (see descent_problem: a flat or noisy curve, or one that only rises) their lowest
# point or steepest step is noise, so all three give the same rate: a tenth of the largest lr
# at which the loss is still near its lowest.
def suggest_minimum(lrs: Sequence[float], losses: Sequence[float], noise: float = 0.0) -> float:
    """A tenth of the lr where the (smoothed) loss is lowest: safely before it turns up."""
    d = _descent(losses)
    if not _clear(d, noise):
        return _near_lowest(lrs, losses, d, noise)
    return max(lrs[d.low] / 10, lrs[d.first])


def suggest_steep(lrs: Sequence[float], losses: Sequence[float], noise: float = 0.0) -> float:
    """The lr where the loss falls fastest per decade of lr."""
    d = _descent(losses)
    if not _clear(d, noise):
        return _near_lowest(lrs, losses, d, noise)
    slopes = {i: (losses[i + 1] - losses[i]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i]))
              for i in range(d.first, len(lrs) - 1)}
    i = min(slopes, key=slopes.__getitem__)
    return math.sqrt(lrs[i] * lrs[i + 1])  # the middle of the steepest step, on the log axis


def suggest_valley(lrs: Sequence[float], losses: Sequence[float], noise: float = 0.0) -> float:
    """The middle of the descent into the lowest loss, on the log axis.

    The descent runs from where the loss last stood near its plateau (within a tenth of the
    drop) to its lowest point; the plateau level is the 90th percentile of the losses before
    the minimum, so neither noise nor the first few batches move it. The middle sits well
    inside the rates where training makes progress, away from the edge of divergence.
    """
    d = _descent(losses)
    if not _clear(d, noise):
        return _near_lowest(lrs, losses, d, noise)
    start = max(i for i in range(d.first, d.low + 1)
                if losses[i] >= losses[d.low] + 0.9 * d.drop)
    return math.sqrt(lrs[start] * lrs[d.low])


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
        # The head of the planned sweep (to end_lr, or 1e10 with gamma) does not count towards
        # the lowest loss that divergence is measured against: its smoothed losses average a
        # few batches, and one lucky first batch must not make the rest look divergent.
        planned = min(num_it, 1 + math.ceil(self._log_span / self._log_growth))
        self._head = _head(planned)
        self.stopped_early = False  # the sweep diverged before num_it batches
        self.lrs: list[float] = []
        self.raw_losses: list[float] = []
        self.losses: list[float] = []  # smoothed

    def lr_at(self, i: int) -> float:
        """The lr of batch i: geometric steps from start_lr (i=0) to end_lr (i=num_it-1)."""
        return self.start_lr * math.exp(min(i * self._log_growth, self._log_span))

    def before_fit(self, learn: Learner) -> None:
        self.lrs, self.raw_losses, self.losses = [], [], []
        self.stopped_early = False
        self._avg, self._lowest = 0.0, math.inf

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
        diverged = not math.isfinite(smooth) or smooth > self.max_mult * self._lowest
        if math.isfinite(smooth) and i > self._head:
            self._lowest = min(self._lowest, smooth)
        if (self.stop_div and diverged) or i >= self.num_it:
            self.stopped_early = i < self.num_it  # diverged before the planned end
            raise CancelFitException()

    def suggest(self, names: Sequence[str] = ("valley", "minimum", "steep")) -> Any:
        """Suggested learning rates from the recorded curve, by method name."""
        unknown = [n for n in names if n not in SUGGESTIONS]
        if unknown:
            raise ValueError(f"unknown lr_find suggestion {unknown}; choose from "
                             f"{list(SUGGESTIONS)}")
        # The curve up to where it diverges (the stop_div rule: not finite, or above max_mult
        # times the lowest loss so far past the head): beyond that it says nothing about good
        # rates.
        lrs, losses, lowest = [], [], math.inf
        for i, (lr, loss) in enumerate(zip(self.lrs, self.losses)):
            if not math.isfinite(loss) or loss > self.max_mult * lowest:
                break
            lrs.append(lr)
            losses.append(loss)
            if i >= self._head:
                lowest = min(lowest, loss)
        if len(lrs) < 2:
            raise ValueError(f"lr_find recorded {len(lrs)} usable losses, too few to suggest a "
                             "learning rate; lower start_lr, raise num_it, or check the data "
                             "and loss")
        if not names:
            raise ValueError("lr_find: suggest= names no suggestion; ask for at least one of "
                             f"{list(SUGGESTIONS)}")
        d = _descent(losses)
        noise = batch_noise(self.raw_losses[d.first: len(losses)])
        problem = descent_problem(lrs, losses, noise)
        if problem is not None:
            warnings.warn(problem, stacklevel=3)  # learn.lr_find() -> lr_find -> suggest
        return SuggestedLRs(**{n: SUGGESTIONS[n](lrs, losses, noise)
                               for n in dict.fromkeys(names)})

    def plot(self, suggestions: Any = None, path: str | Path | None = None):
        """Smoothed loss against lr (log axis) with the suggestions marked, the divergent tail
        clipped; returns the Figure (saved to `path` if given; in a notebook it shows once)."""
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
    Suggestions never come from the first 5% of the sweep nor lie outside it, and a curve
    with no clear descent (a flat, noisy or only rising loss) warns: see `descent_problem`.
    Leaves no trace: `lr_find(); fit()` trains exactly as `fit()` alone; callbacks with
    `main_fit_only` (schedules, metrics, loggers...) sit it out. The curve is in
    `learn.lr_finder`; `plot` shows it in a notebook, else saves it to `plot_path`."""
    check_fit_args(learn, 1, True, False, None)
    n_batches = length(learn.dls.train)
    if max_epochs is not None:
        if n_batches is None:
            raise ValueError("lr_find(max_epochs=...) needs a training loader with a length; "
                             "give num_it (training batches) instead")
        num_it = max_epochs * n_batches
    finder = LRFinderCB(start_lr, end_lr, num_it, stop_div, gamma=gamma, max_mult=max_mult)
    # num_it batches, from as many passes as needed; the finder may cancel the fit earlier.
    sitting_out = [cb for cb in learn.cbs if not runs_in(cb, "lr_find")]
    with preserve_state(learn), learn.removed_cbs(sitting_out):
        learn.fit(steps=num_it, valid=False, cbs=[finder])
    learn.lr_finder = finder
    if len(finder.lrs) < num_it and not finder.stopped_early:  # the stream ran dry
        reached = finder.lrs[-1] if finder.lrs else start_lr
        warnings.warn(f"lr_find: dls.train ran out after {len(finder.lrs)} of num_it={num_it} "
                      f"batches, so the sweep only reached lr {reached:.2g}: give a longer "
                      "stream or a smaller num_it", stacklevel=2)
    suggestions = finder.suggest(suggest)
    if plot:
        # in a script, a plot saved where the user did not say is named on stderr
        show_or_save(finder.plot(suggestions), plot_path, default="lr_find.png")
    return suggestions
