"""The event contract: the Callback base, the Cancel exceptions, event names and checks."""
from __future__ import annotations

import difflib
import warnings
from typing import Any, Callable

__all__ = ["Callback", "CancelFitException", "CancelEpochException", "CancelBatchException",
           "EVENTS", "STEPS", "STAGES", "PREDICT_STEPS", "TRAIN_STEPS", "check_callback", "note_origin", "where", "as_cbs", "describe_loop"]


class CancelFitException(Exception):
    """Raise in a callback to stop the fit; `after_cancel_fit` and `cleanup_fit` run."""


class CancelEpochException(Exception):
    """Raise in a callback to stop the current epoch phase; the next one starts."""


class CancelBatchException(Exception):
    """Raise in a callback to stop the current batch; the next batch starts."""


# The step methods: the Learner has defaults; a callback (or subclass) defining one replaces it.
STEPS = ("predict", "get_loss", "backward", "step", "zero_grad")

# The batch's steps and events, in order; the loop and show_training_loop both read these.
PREDICT_STEPS = ("predict", "after_predict", "get_loss", "after_loss")
TRAIN_STEPS = ("backward", "after_backward", "step", "after_step")  # then zero_grad, always

# stage -> (its cancel exception, before, after, after_cancel, cleanup); names built once, here.
STAGES = {
    stage: (exc, f"before_{stage}", f"after_{stage}", f"after_cancel_{stage}", f"cleanup_{stage}")
    for stage, exc in (("fit", CancelFitException), ("epoch", CancelEpochException),
                       ("batch", CancelBatchException))
}

# Every event in the order a normal fit first reaches it.
EVENTS = (
    "before_fit", "before_epoch", "before_batch", "after_predict", "after_loss",
    "after_backward", "after_step", "after_batch", "after_epoch", "after_fit",
    "after_cancel_batch", "after_cancel_epoch", "after_cancel_fit",
    "cleanup_batch", "cleanup_epoch", "cleanup_fit",
)


class Callback:
    """Base class for callbacks: define any event method, e.g. `def after_batch(self, learn)`.

    `order` sorts callbacks (lower runs first). `run_in_lr_find = False` keeps a callback out
    of `learn.lr_find()` (e.g. schedules, which would fight its learning rate), and
    `run_in_inference = False` out of `get_preds`/`predict`/`tta` (metrics, loggers...).
    """

    order: int = 0
    run_in_lr_find: bool = True
    run_in_inference: bool = True  # False: sits out get_preds/predict/tta (metrics, loggers...)


def where(fn: Callable) -> str:
    """'ClassName.method' for a bound method or a plain function, for error notes."""
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return f"{type(owner).__name__}.{fn.__name__}"
    return getattr(fn, "__qualname__", repr(fn))


def note_origin(e: BaseException, fn: Callable, event: str) -> None:
    """Add 'raised in X.event' to an exception once: the innermost place is the useful one."""
    notes = getattr(e, "__notes__", ())
    if not any(n.startswith("raised in ") for n in notes):
        e.add_note(f"raised in {where(fn)} (event '{event}')")


def check_callback(cb: Any) -> None:
    """Reject what cannot be a callback, and warn about event names with typos."""
    if isinstance(cb, type):
        raise TypeError(f"cbs got the class {cb.__name__}, not an instance of it; "
                        f"pass {cb.__name__}() instead")
    if not hasattr(cb, "order"):
        raise TypeError(f"cbs got {cb!r} of type {type(cb).__name__}, which has no `order` "
                        "attribute; subclass nanofit.Callback or give it `order = 0`")
    known = set(EVENTS) | set(STEPS)  # close to an event but none of them: probably a typo
    for name in dir(type(cb)):
        if name.startswith("_") or name in known or not callable(getattr(type(cb), name)):
            continue
        close = difflib.get_close_matches(name, EVENTS + STEPS, n=1, cutoff=0.85)
        if close:
            warnings.warn(f"{type(cb).__name__}.{name} matches no event and will never run; "
                          f"did you mean {close[0]!r}?", UserWarning, stacklevel=4)


def as_cbs(cbs: Any) -> list[Any]:
    """Callbacks as a list: None gives [], a single callback gives [it]."""
    if cbs is None:
        return []
    if isinstance(cbs, type) or hasattr(cbs, "order"):
        return [cbs]
    return list(cbs)


def describe_loop(handlers: dict[str, tuple[Callable, ...]]) -> str:
    """The training loop as text: each event, indented by stage, with what runs there."""
    indent = {"fit": 0, "epoch": 2, "batch": 4}
    lines = []

    def add(event: str, depth: int) -> None:
        names = [where(fn) for fn in handlers[event]]
        lines.append(" " * depth + f"{event}: " + (", ".join(names) if names else "-"))

    for stage in ("fit", "epoch", "batch"):
        add(STAGES[stage][1], indent[stage])
    for event in PREDICT_STEPS + TRAIN_STEPS + ("zero_grad",):
        add(event, 6)
    for stage in ("batch", "epoch", "fit"):
        for event in STAGES[stage][2:]:
            add(event, indent[stage])
    return "\n".join(lines)
