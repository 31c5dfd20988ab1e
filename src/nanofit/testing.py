"""Helpers for checking your own training setup: `assert_resumable`."""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .callback import Callback, CancelFitException, Order
from .callbacks.checkpoint import CheckpointCB

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["assert_resumable", "learner_state"]


class _StopAfter(Callback):
    """Stops the fit right after the `at`-th training batch (counting from 0) was saved by the
    CheckpointCB, as a crash at that moment would."""

    order = Order.LAST

    def __init__(self, at: int) -> None:
        self.at, self.seen, self.stopped = at, 0, False

    def after_batch(self, learn: Learner) -> None:
        if not learn.training:
            return
        if self.seen == self.at:
            self.stopped = True
            raise CancelFitException()
        self.seen += 1


def learner_state(learn: Learner) -> dict[str, Any]:
    """What a resumed run must reproduce: weights and buffers, optimizer state, and the
    state of every callback that has one."""
    opt = learn.opt.state_dict() if learn.opt is not None else None
    return {"model": learn.model.state_dict(), "opt": opt,
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in learn.cbs
                          if callable(getattr(cb, "state_dict", None))}}


def _compare(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} (keys {sorted(map(str, a))} vs {sorted(map(str, b))})"]
        return [d for k in a for d in _compare(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} (length {len(a)} vs {len(b)})"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _compare(x, y, f"{where}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    return [] if same else [f"{where} ({a!r} vs {b!r})"]


def assert_resumable(make_learner: Callable[[], Any], n_epochs: int | None,
                     stop_at: Sequence[int], fit: str = "fit", **fit_kwargs: Any) -> None:
    """Check that training resumed from a checkpoint ends bit for bit where an uninterrupted
    run ends.

    `make_learner()` must build the same learner each time (seed it) with its callbacks. For
    each position in `stop_at` (a training batch counted from 0 over the whole fit), a run is
    stopped right after a CheckpointCB saved that batch, a fresh learner resumes from the
    file, and the final
    weights, optimizer state and callback states are compared with the uninterrupted run.
    `fit` names the method (e.g. "fit_one_cycle"); `fit_kwargs` go to it. For a step fit
    pass `n_epochs=None` and `steps=N` (and `valid_every=K`) in `fit_kwargs`.
    Raises AssertionError naming what differs.
    """
    if "cbs" in fit_kwargs:
        raise TypeError("assert_resumable: give callbacks to the learner in make_learner, so "
                        "that every run gets fresh ones")
    reference = make_learner()
    getattr(reference, fit)(n_epochs, **fit_kwargs)
    expected = learner_state(reference)
    with tempfile.TemporaryDirectory() as tmp:
        for at in stop_at:
            saver = CheckpointCB(Path(tmp) / f"stop_{at}", every_n_batches=1, every_epoch=False,
                                 keep=1)
            stop = _StopAfter(at)
            getattr(make_learner(), fit)(n_epochs, cbs=[saver, stop], **fit_kwargs)
            if not stop.stopped:
                raise AssertionError(f"stop_at={at}: the fit has only {stop.seen} training batches")
            resumed = make_learner()
            getattr(resumed, fit)(n_epochs, resume=str(saver.saved[-1]), **fit_kwargs)
            diffs = _compare(learner_state(resumed), expected, "state")
            if diffs:
                raise AssertionError(f"resuming after training batch {at} differs from the "
                                     f"uninterrupted run in: {', '.join(diffs[:8])}")
