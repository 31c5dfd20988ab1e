"""ProfileCB (time per event and callback) and CompileCB (torch.compile)."""
from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..callback import Callback, Order, where

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["ProfileCB", "CompileCB"]


class ProfileCB(Callback):
    """Times every callback method and training step per event, and prints a table at the
    end of the fit (slowest first), so a slow callback is seen instead of guessed.

    Times are host (wall-clock) times: GPU work shows up where something waits for it.
    Costs two clock reads per handler call while it is there."""

    order = Order.PROFILE
    main_fit_only = True

    def __init__(self, file: Any = None) -> None:
        self.file = file
        self.times: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def wrap_handler(self, event: str, fn: Callable) -> Callable:
        """Time `fn` (every handler of every event, while this callback is in the fit)."""
        key = (event, where(fn))
        times, calls, clock = self.times, self.calls, time.perf_counter

        @functools.wraps(fn)
        def timed(learn: Learner) -> None:
            start = clock()
            try:
                fn(learn)
            finally:
                times[key] += clock() - start
                calls[key] += 1
        return timed

    def before_fit(self, learn: Learner) -> None:
        self.times.clear()
        self.calls.clear()

    def table(self) -> str:
        """The timings as text: event, handler, calls, total ms, microseconds per call."""
        rows = sorted(self.times.items(), key=lambda kv: -kv[1])
        lines = [f"{'event':<16}{'handler':<34}{'calls':>8}{'total ms':>11}{'us/call':>10}"]
        for (event, name), total in rows:
            n = self.calls[(event, name)]
            lines.append(f"{event:<16}{name:<34}{n:>8}{total * 1e3:>11.2f}{total / n * 1e6:>10.1f}")
        return "\n".join(lines)

    def cleanup_fit(self, learn: Learner) -> None:
        print(self.table(), file=self.file)


class CompileCB(Callback):
    """Compiles the model with `torch.compile(**kwargs)` for the fit; the original module is
    put back in `cleanup_fit` (weights are shared, so checkpoints stay plain)."""

    order = Order.COMPILE
    run_in_lr_find = False

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.original: torch.nn.Module | None = None

    def before_fit(self, learn: Learner) -> None:
        self.original = learn.model
        learn.model = torch.compile(learn.model, **self.kwargs)  # type: ignore[assignment]

    def cleanup_fit(self, learn: Learner) -> None:
        if self.original is not None:
            learn.model, self.original = self.original, None
