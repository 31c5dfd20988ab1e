"""The event contract: the Callback base, the Cancel exceptions, event names and checks."""
from __future__ import annotations

import difflib
import inspect
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["CANCELS", "Callback", "CancelFitException", "CancelEpochException",
           "CancelBatchException", "Order", "EVENTS", "STEPS", "STAGES", "check_callback",
           "note_origin", "where", "as_cbs", "build_handlers", "call_all", "run_cbs",
           "describe_loop", "describe_orders", "runs_in", "every", "BATCH_STAGE_EVENTS",
           "HandlerTables"]


class CancelFitException(Exception):
    """Raise in a callback to stop the fit; `after_cancel_fit` and `cleanup_fit` run."""


class CancelEpochException(Exception):
    """Raise in a callback to stop the current epoch phase; the next one starts."""


class CancelBatchException(Exception):
    """Raise in a callback to stop the current batch; the next batch starts."""


# The step methods: the Learner has defaults; a callback (or subclass) defining one replaces it.
STEPS = ("predict", "get_loss", "backward", "step", "zero_grad")

# A batch's steps and events in the order learner._do_batch runs them (show_training_loop).
BATCH_EVENTS = ("predict", "after_predict", "get_loss", "after_loss",
                "backward", "after_backward", "step", "after_step", "zero_grad")

# The same, in two parts as before (names kept for existing code).
PREDICT_STEPS = BATCH_EVENTS[:4]
TRAIN_STEPS = BATCH_EVENTS[4:8]  # then zero_grad, always

# stage -> (its cancel exception, before, after, after_cancel, cleanup); names built once, here.
STAGES = {
    stage: (exc, f"before_{stage}", f"after_{stage}", f"after_cancel_{stage}", f"cleanup_{stage}")
    for stage, exc in (("fit", CancelFitException), ("epoch", CancelEpochException),
                       ("batch", CancelBatchException))
}

# What raising steers the loop (anything else is an error).
CANCELS = (CancelFitException, CancelEpochException, CancelBatchException)

# Every event in the order a normal fit first reaches it.
EVENTS = (
    "before_fit", "before_epoch", "before_batch", "after_predict", "after_loss",
    "after_backward", "after_step", "after_batch", "after_epoch", "after_fit",
    "after_cancel_batch", "after_cancel_epoch", "after_cancel_fit",
    "cleanup_batch", "cleanup_epoch", "cleanup_fit",
)


# The events of one batch, where `every(n)` may thin a handler out.
BATCH_STAGE_EVENTS = ("before_batch", "after_predict", "after_loss", "after_backward",
                      "after_step", "after_batch", "after_cancel_batch", "cleanup_batch")


def every(n: int | str, valid: bool = False) -> Callable[[Callable], Callable]:
    """Run a callback's batch event method on every `n`-th training batch only: the n-th,
    2n-th, ... of the fit, counted by `learn.step`. With `valid=True` it also runs on every
    n-th batch of each validation phase (counted by `learn.iter`); otherwise never there.

    `n` is a number, or the name of an attribute of the callback holding it (read when the
    learner builds its dispatch tables: `@every("log_every")`; an attribute set to None or 0
    means never; a missing one is an error).
    It costs the other batches nothing: the learner leaves the method out of its per-batch
    dispatch table and swaps in a table with it on the batches where it is due.

    Example: `@every(100) def after_batch(self, learn): print(learn.step + 1, learn.loss)`
    """
    if isinstance(n, bool) or not (isinstance(n, str) or (isinstance(n, int) and n >= 1)):
        raise ValueError(f"every(n): n must be an int >= 1 or the name of an attribute holding "
                         f"one, got {n!r}")

    def mark(fn: Callable) -> Callable:
        if fn.__name__ not in BATCH_STAGE_EVENTS:
            raise TypeError(f"every({n!r}) decorates a batch event method "
                            f"({', '.join(BATCH_STAGE_EVENTS)}), not {fn.__name__!r}")
        fn.every = (n, valid)  # type: ignore[attr-defined]
        return fn

    return mark


class Order:
    """Where the shipped callbacks run in each event (lower first): the whole ordering in one
    table. A callback of your own takes one of these, or a number between two of them
    (`order = Order.METRICS + 1`); the default is `Order.DEFAULT` (0)."""

    PROFILE = -1000       # ProfileCB: outermost, so it times every other handler
    DISTRIBUTED = -20     # DDPCB: the model goes to this rank's device and into DDP first
    COMPILE = -15         # CompileCB: compiles the (DDP-wrapped) model before it moves
    DEVICE = -10          # DeviceCB: model and batch on the device before anyone reads them
    TRANSFORM = -5        # BatchTransformCB: runs on the device-resident batch
    NAN_CHECK = -5        # TerminateOnNaNCB: stops at after_loss before anything acts on it
    DEFAULT = 0           # TrainCB, MixUp/CutMix, your callbacks: after the batch is ready
    SINGLE_BATCH = 1      # SingleBatchCB: cancels after the default callbacks saw the batch
    PRECISION = 5         # MixedPrecision: its backward/step are replaced by GradAccumCB's
    ACTIVATIONS = 5       # ActivationStats
    ACCUMULATE = 10       # GradAccumCB: after MixedPrecision, so its steps win
    SCHEDULE = 10         # ParamScheduler: sets hyper-parameters before the batch
    CLIP = 20             # GradClipCB: after_backward, once the gradients are unscaled
    METRICS = 50          # MetricsCB: after the steps; its record is ready at after_epoch
    RECORDER = 60         # Recorder: reads the validation record MetricsCB just wrote
    TORCH_SCHEDULE = 65   # BatchSchedCB, EpochSchedCB: step after the Recorder read the rate
    PROGRESS = 70         # ProgressCB: shows the records of MetricsCB and Recorder
    LOGGER = 75           # CSVLogger, TensorBoardCB: write MetricsCB's records
    TRACKER = 80          # EarlyStopping, SaveBest, ReduceLROnPlateau: read the records
    LR_FINDER = 100       # LRFinderCB: sets the lr last, over any scheduler
    CHECKPOINT = 1000     # CheckpointCB: saves once every other callback finished the batch
    LAST = 10_000         # internal observers (get_preds' capture, assert_resumable's stop)


class Callback:
    """Base class for callbacks: define any event method, e.g. `def after_batch(self, learn)`.

    `order` sorts callbacks (lower runs first; see `Order`). `main_fit_only = True` marks a
    callback that belongs to the training run you asked for (metrics, progress, loggers,
    schedules, trackers, checkpoints): it sits out the short fits the learner runs for you,
    `lr_find()`'s sweep and `get_preds`/`predict`/`tta`. `run_in_lr_find` or
    `run_in_inference`, if a callback sets them, decide for that one case instead.
    """

    order: int = Order.DEFAULT
    main_fit_only: bool = False


def runs_in(cb: Any, helper: str) -> bool:
    """Whether `cb` takes part in the learner's helper fit `helper` ('lr_find' or 'inference')."""
    return bool(getattr(cb, f"run_in_{helper}", not getattr(cb, "main_fit_only", False)))


def where(fn: Callable) -> str:
    """'ClassName.method' for a bound method or a plain function (seen through wrappers that
    set `__wrapped__`, like functools.wraps), for error notes and show_training_loop."""
    fn = inspect.unwrap(fn)
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return f"{type(owner).__name__}.{fn.__name__}"
    return getattr(fn, "__qualname__", repr(fn))


def note_origin(e: BaseException, fn: Callable, event: str) -> None:
    """Add 'raised in X.event' to an exception once: the innermost place is the useful one."""
    notes = getattr(e, "__notes__", ())
    if not any(n.startswith("raised in ") for n in notes):
        e.add_note(f"raised in {where(fn)} (event '{event}')")


def call_all(handlers: Sequence[Callable], learn: Any, event: str) -> None:
    """Run every handler even when one fails (cleanup events: each callback releases what it
    holds); then raise the first error, with a note for each later one."""
    first: BaseException | None = None
    for fn in handlers:
        try:
            fn(learn)
        except BaseException as e:
            if first is None:
                note_origin(e, fn, event)
                first = e
            else:
                first.add_note(f"then {where(fn)} (event '{event}') raised "
                               f"{type(e).__name__}: {e}")
    if first is not None:
        raise first


def run_cbs(cbs: Iterable[Any], method_nm: str, learn: Any = None) -> None:
    """Call `method_nm(learn)` on each callback that has it, sorted by `order` (the course's
    helper; the Learner dispatches from prebuilt tables instead)."""
    for cb in sorted(cbs, key=lambda c: getattr(c, "order", 0)):
        method = getattr(cb, method_nm, None)
        if method is not None:
            method(learn)


def check_callback(cb: Any) -> None:
    """Reject what cannot be a callback, and warn about event names with typos."""
    if isinstance(cb, type):
        raise TypeError(f"cbs got the class {cb.__name__}, not an instance of it; "
                        f"pass {cb.__name__}() instead")
    if not hasattr(cb, "order"):
        raise TypeError(f"cbs got {cb!r} of type {type(cb).__name__}, which has no `order` "
                        "attribute; subclass nanofit.Callback or give it `order = 0`")
    known = set(EVENTS) | set(STEPS) | {"wrap_handler"}  # close to an event: probably a typo
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


def describe_loop(handlers: dict[str, tuple[Callable, ...]], cbs: Sequence[Any] = (),
                  marks: dict[str, tuple[tuple[int, bool] | None, ...]] | None = None) -> str:
    """The training loop as text: the callbacks `cbs` with their orders, then each event,
    indented by stage, with what runs there (`marks`: the every(n) of each handler)."""
    indent = {"fit": 0, "epoch": 2, "batch": 4}
    lines = []

    def name(event: str, j: int, fn: Callable) -> str:
        mks = (marks or {}).get(event, ())
        mk = mks[j] if j < len(mks) else None
        if mk is not None:
            n, valid = mk
            return f"{where(fn)} (every {n}{', valid too' if valid else ''})" if n else \
                f"{where(fn)} (never)"
        return where(fn)

    def add(event: str, depth: int) -> None:
        names = [name(event, j, fn) for j, fn in enumerate(handlers[event])]
        lines.append(" " * depth + f"{event}: " + (", ".join(names) if names else "-"))

    for stage in ("fit", "epoch", "batch"):
        add(STAGES[stage][1], indent[stage])
    for event in BATCH_EVENTS:
        add(event, 6)
    for stage in ("batch", "epoch", "fit"):
        for event in STAGES[stage][2:]:
            add(event, indent[stage])
    return describe_orders(list(cbs)) + "\n" + "\n".join(lines)


def describe_orders(cbs: list[Any]) -> str:
    """The callbacks in the order they run, each with its `order` and the `Order` name it has."""
    names: dict[int, list[str]] = {}
    for name, value in vars(Order).items():
        if not name.startswith("_"):
            names.setdefault(value, []).append(name)
    rows = [f"  {cb.order:>6}  {'/'.join(names.get(cb.order, [])):<22}{type(cb).__name__}"
            for cb in sorted(cbs, key=lambda c: c.order)]
    return "callbacks (order, name):\n" + ("\n".join(rows) if rows else "  -")


def _every_of(cb: Any, method: Callable) -> tuple[int, bool] | None:
    """(n, on validation too) for a method decorated with `every`, resolved on `cb`; None for
    a method that runs on every batch. n == 0: never."""
    mark = getattr(method, "every", None)
    if mark is None:
        return None
    n, valid = mark
    if isinstance(n, str):
        if not hasattr(cb, n):
            raise AttributeError(f"{type(cb).__name__}.{method.__name__} is marked every({n!r}), "
                                 f"but {type(cb).__name__} has no attribute {n!r}: set "
                                 f"self.{n} (an int >= 1; None or 0: never) or fix the name")
        value = getattr(cb, n)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ValueError(f"{type(cb).__name__}.{n} = {value!r}: every({n!r}) needs an int "
                             ">= 1 there (or None / 0 for never)")
        n = value or 0
    return n, valid


NEVER = sys.maxsize  # the batch index where no every(n) method is ever due


class HandlerTables:
    """The learner's dispatch tables. `full` has every handler of every event, in order;
    `base`, the one the loop uses on most batches, leaves out the methods marked `every(n)`.
    On a batch where some are due the loop swaps in `at(index)`: base with those merged back
    in their place (built once per set of due methods, then cached). So the loop pays one int
    comparison per batch (with `next_due`) and a thinned method costs nothing in between."""

    def __init__(self, full: dict[str, tuple[Callable, ...]],
                 marks: dict[str, tuple[tuple[int, bool] | None, ...]]) -> None:
        self.full, self.marks = full, marks
        self.base = {e: tuple(fn for fn, mk in zip(fns, marks[e]) if mk is None)
                     for e, fns in full.items()}
        self._cache: dict[tuple[tuple[str, int], ...], dict[str, tuple[Callable, ...]]] = {}
        # (event, index in the event's handlers, n, on validation too) of each every(n) method
        self._marked = [(e, j, mk[0], mk[1]) for e, mks in marks.items()
                        for j, mk in enumerate(mks) if mk is not None and mk[0]]
        self._ns = {True: sorted({n for _, _, n, _ in self._marked}),
                    False: sorted({n for _, _, n, valid in self._marked if valid})}

    def next_due(self, index: int, train: bool = True) -> int:
        """The first batch index >= `index` (0-based) where some `every(n)` method is due
        (index i is due for n when (i + 1) % n == 0); NEVER when none ever is."""
        ns = self._ns[train]
        if not ns:
            return NEVER
        return min(index + (-(index + 1)) % n for n in ns)

    def at(self, index: int, train: bool = True) -> dict[str, tuple[Callable, ...]]:
        """The table for batch `index` (0-based) of a training (or validation) phase."""
        due = tuple((e, j) for e, j, n, valid in self._marked
                    if (train or valid) and (index + 1) % n == 0)
        table = self._cache.get(due)
        if table is None:
            table = dict(self.base)
            for event in {e for e, _ in due}:
                table[event] = tuple(fn for j, (fn, mk) in enumerate(zip(self.full[event],
                                                                         self.marks[event]))
                                     if mk is None or (event, j) in due)
            self._cache[due] = table
        return table


def build_tables(cbs: list[Any], defaults: type) -> HandlerTables:
    """Each event's and step's handlers, ready for the loop: the callbacks' bound methods in
    `order` (ties keep list order). A step is replaced as a method is overridden: the last
    callback defining it wins, else `defaults` (the Learner's class) has it. A callback's
    `wrap_handler(event, fn)` then wraps the handlers (ProfileCB, MixedPrecision); the lowest
    order wraps outermost. Methods marked `every(n)` are kept apart (`HandlerTables`). Built
    when the callbacks change, so the loop walks plain tuples."""
    ordered = sorted(cbs, key=lambda cb: cb.order)
    found = {name: [(cb, m) for cb in ordered if callable(m := getattr(cb, name, None))]
             for name in EVENTS + STEPS}
    handlers = {name: tuple(m for _, m in pairs) for name, pairs in found.items()}
    marks = {name: tuple(_every_of(cb, m) for cb, m in pairs) for name, pairs in found.items()}
    for name in STEPS:
        handlers[name] = handlers[name][-1:] or (getattr(defaults, name),)
        marks[name] = (None,)
    for cb in reversed(ordered):
        wrap = getattr(cb, "wrap_handler", None)
        if callable(wrap):
            handlers = {e: tuple(wrap(e, fn) for fn in fns) for e, fns in handlers.items()}
    return HandlerTables(handlers, marks)


def build_handlers(cbs: list[Any], defaults: type) -> dict[str, tuple[Callable, ...]]:
    """Every event's handlers, `every(n)` methods included (see `build_tables`)."""
    return build_tables(cbs, defaults).full
