"""Schedule functions: each maps training progress `pos` in [0, 1] to a value.

`sched_cos(1., 0.)(0.5) == 0.5`; `combine_scheds([0.25, 0.75], [sched_cos(a, b), sched_cos(b, c)])`
joins them into one function over the whole of training.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = ["Schedule", "sched_lin", "sched_cos", "sched_exp", "sched_no", "combine_scheds",
           "one_cycle_scheds", "flat_cos_scheds", "lr_range"]

Schedule = Callable[[float], float]


def sched_lin(start: float, end: float) -> Schedule:
    """Linear from `start` to `end`."""
    return lambda pos: start + pos * (end - start)


def sched_cos(start: float, end: float) -> Schedule:
    """Half a cosine from `start` to `end`: slow at both ends."""
    return lambda pos: start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def sched_exp(start: float, end: float) -> Schedule:
    """Exponential (geometric) from `start` to `end`; both must be > 0."""
    if start <= 0 or end <= 0:
        raise ValueError(f"sched_exp needs start and end > 0, got {start} and {end}")
    return lambda pos: start * (end / start) ** pos


def sched_no(start: float, end: float) -> Schedule:
    """Constant at `start` (`end` is ignored): a flat stretch in `combine_scheds`."""
    return lambda pos: start


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Schedule]) -> Schedule:
    """One schedule made of `scheds`, the i-th running for the fraction `pcts[i]` of training."""
    if len(pcts) != len(scheds):
        raise ValueError(f"combine_scheds got {len(pcts)} fractions and {len(scheds)} schedules")
    if any(p < 0 for p in pcts) or not math.isclose(sum(pcts), 1.0, abs_tol=1e-6):
        raise ValueError(f"combine_scheds: fractions must be >= 0 and sum to 1, got {list(pcts)}")
    ends, total = [], 0.0
    for p in pcts:
        total += p
        ends.append(total)
    ends[-1] = 1.0
    starts = [0.0] + ends[:-1]
    pairs = [(start, end, s) for start, end, s in zip(starts, ends, scheds) if end > start]

    def combined(pos: float) -> float:
        # the segment holding pos (the last one for pos >= 1)
        start, end, sched = next((seg for seg in pairs if pos < seg[1]), pairs[-1])
        return sched(min(max((pos - start) / (end - start), 0.0), 1.0))
    return combined


def one_cycle_scheds(lr_max: float, div: float = 25.0, div_final: float = 1e5,
                     pct_start: float = 0.25,
                     moms: Sequence[float] | None = (0.95, 0.85, 0.95)) -> dict[str, Schedule]:
    """The 1cycle policy: lr warms up from lr_max/div to lr_max by cosine over `pct_start`,
    then anneals to lr_max/div_final; momentum moves the opposite way."""
    pcts = [pct_start, 1 - pct_start]
    scheds = {"lr": combine_scheds(pcts, [sched_cos(lr_max / div, lr_max),
                                          sched_cos(lr_max, lr_max / div_final)])}
    if moms is not None:
        scheds["mom"] = combine_scheds(pcts, [sched_cos(moms[0], moms[1]),
                                              sched_cos(moms[1], moms[2])])
    return scheds


def flat_cos_scheds(lr: float, div_final: float = 1e5,
                    pct_start: float = 0.75) -> dict[str, Schedule]:
    """A flat lr for `pct_start` of training, then a cosine anneal to lr/div_final."""
    return {"lr": combine_scheds([pct_start, 1 - pct_start],
                                 [sched_no(lr, lr), sched_cos(lr, lr / div_final)])}


def lr_range(lr_low: float, lr_high: float, n_groups: int) -> list[float]:
    """Discriminative learning rates: `n_groups` values spaced geometrically, low to high."""
    if n_groups == 1:
        return [lr_high]
    step = (lr_high / lr_low) ** (1 / (n_groups - 1))
    return [lr_low * step**i for i in range(n_groups)]
