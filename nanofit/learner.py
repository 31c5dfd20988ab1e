"""The Learner: a short training loop whose every stage emits events to callbacks.

Read this file top to bottom to know the whole loop. Everything that changes or observes
training (metrics, progress bars, schedules, devices, ...) is a callback in `nanofit.callbacks`.
"""
from __future__ import annotations

import difflib
import math
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Callback", "CancelFitException", "CancelEpochException", "CancelBatchException",
    "EVENTS", "STEPS", "Learner", "TrainLearner", "MomentumLearner",
]


class CancelFitException(Exception):
    """Raise in a callback to stop the fit; `after_cancel_fit` and `cleanup_fit` run."""


class CancelEpochException(Exception):
    """Raise in a callback to stop the current epoch phase; the next one starts."""


class CancelBatchException(Exception):
    """Raise in a callback to stop the current batch; the next batch starts."""


# The step methods: the Learner has defaults; a callback (or subclass) defining one replaces it.
STEPS = ("predict", "get_loss", "backward", "step", "zero_grad")

# stage -> (its cancel exception, before, after, after_cancel, cleanup); names built once, here.
_STAGES = {
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
    """Base class for callbacks: define any event method, e.g. `def after_batch(self, learn)`."""

    order: int = 0


def _where(fn: Callable) -> str:
    """'ClassName.method' for a bound method or a plain function, for error notes."""
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        return f"{type(owner).__name__}.{fn.__name__}"
    return getattr(fn, "__qualname__", repr(fn))


def _note_origin(e: BaseException, fn: Callable, event: str) -> None:
    """Add 'raised in X.event' to an exception once: the innermost place is the useful one."""
    notes = getattr(e, "__notes__", ())
    if not any(n.startswith("raised in ") for n in notes):
        e.add_note(f"raised in {_where(fn)} (event '{event}')")


def _check_callback(cb: Any) -> None:
    """Reject what cannot be a callback, and warn about event names with typos."""
    if isinstance(cb, type):
        raise TypeError(f"cbs got the class {cb.__name__}, not an instance of it; "
                        f"pass {cb.__name__}() instead")
    if not hasattr(cb, "order"):
        raise TypeError(f"cbs got {cb!r} of type {type(cb).__name__}, which has no `order` "
                        "attribute; subclass nanofit.Callback or give it `order = 0`")
    known = set(EVENTS) | set(STEPS)
    for name in dir(type(cb)):
        if name.startswith("_") or name in known or not callable(getattr(type(cb), name)):
            continue
        close = difflib.get_close_matches(name, EVENTS + STEPS, n=1, cutoff=0.85)
        if close:
            warnings.warn(f"{type(cb).__name__}.{name} matches no event and will never run; "
                          f"did you mean {close[0]!r}?", UserWarning, stacklevel=4)


class Learner:
    """Owns the model, data, loss and optimizer, and runs `fit` while calling the callbacks.

    Example: `Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[MetricsCB(acc)]).fit(3)`
    """

    def __init__(self, model: nn.Module, dls: Any = None, loss_func: Callable = F.mse_loss,
                 lr: float = 0.1, cbs: Iterable[Any] | None = None,
                 opt_func: Callable | None = torch.optim.SGD, n_inp: int = 1) -> None:
        self.model = model
        self.dls = dls
        self.loss_func = loss_func
        self.lr = lr
        self.opt_func = opt_func
        self.n_inp = n_inp
        self.opt: torch.optim.Optimizer | None = None
        self.cbs: list[Any] = []
        self.n_epochs, self.epoch, self.iter, self.n_iter = 0, 0, 0, 0
        self.dl: Any = None
        self.batch: Any = None
        self.preds: Any = None
        self.loss: Any = None
        self._handlers: dict[str, tuple[Callable, ...]] = {}
        for cb in cbs or ():
            self.add_cb(cb)
        self._build_handlers()

    # ---- callbacks ------------------------------------------------------------------------
    def add_cb(self, cb: Any) -> "Learner":
        """Add a callback instance; it takes effect at once, even during a fit."""
        _check_callback(cb)
        self.cbs.append(cb)
        self._build_handlers()
        return self

    def rm_cb(self, cb: Any) -> "Learner":
        """Remove a callback instance added earlier."""
        try:
            self.cbs.remove(cb)
        except ValueError:
            raise ValueError(f"rm_cb: {cb!r} is not among this learner's callbacks "
                             f"{[type(c).__name__ for c in self.cbs]}") from None
        self._build_handlers()
        return self

    def _build_handlers(self) -> None:
        # Sorted once here, so the loop only walks ready-made tuples of bound methods.
        ordered = sorted(self.cbs, key=lambda cb: cb.order)  # sorted() is stable: ties keep order
        handlers: dict[str, tuple[Callable, ...]] = {}
        for name in EVENTS + STEPS:
            handlers[name] = tuple(m for m in (getattr(cb, name, None) for cb in ordered)
                                   if callable(m))
        for name in STEPS:  # no callback defines the step: the (sub)class's own method runs
            if not handlers[name]:
                handlers[name] = (getattr(type(self), name),)
        self._handlers = handlers

    def callback(self, event: str) -> None:
        """Run every callback's `event` method, in order, passing the learner."""
        for fn in self._handlers[event]:
            try:
                fn(self)
            except (CancelFitException, CancelEpochException, CancelBatchException):
                raise
            except BaseException as e:
                _note_origin(e, fn, event)
                raise

    def show_training_loop(self) -> None:
        """Print, for each event, the callbacks that run there, in the order they run."""
        self._build_handlers()
        print(self._describe_loop())

    def _describe_loop(self) -> str:
        indent = {"fit": 0, "epoch": 2, "batch": 4}
        lines = []

        def add(event: str, depth: int) -> None:
            names = [_where(fn) for fn in self._handlers[event]]
            lines.append(" " * depth + f"{event}: " + (", ".join(names) if names else "-"))

        for stage in ("fit", "epoch", "batch"):
            add(_STAGES[stage][1], indent[stage])
        for event in ("predict", "after_predict", "get_loss", "after_loss", "backward",
                      "after_backward", "step", "after_step", "zero_grad"):
            add(event, 6)
        for stage in ("batch", "epoch", "fit"):
            for event in _STAGES[stage][2:]:
                add(event, indent[stage])
        return "\n".join(lines)

    # ---- the loop ---------------------------------------------------------------------------
    def _with_events(self, stage: str, body: Callable[[], None]) -> None:
        cancel, before, after, after_cancel, cleanup = _STAGES[stage]
        try:
            self.callback(before)
            body()
            self.callback(after)
        except cancel:
            self.callback(after_cancel)
        finally:
            self.callback(cleanup)

    def _do_batch(self) -> None:
        run = self.callback
        run("predict")
        run("after_predict")
        run("get_loss")
        run("after_loss")
        if self.model.training:
            run("backward")
            run("after_backward")
            run("step")
            run("after_step")
            run("zero_grad")

    def _do_epoch(self) -> None:
        for self.iter, self.batch in enumerate(self.dl):
            self._with_events("batch", self._do_batch)

    def one_epoch(self, train: bool) -> None:
        """Run one phase (training or validation) over `dls.train` or `dls.valid`."""
        self.model.train(train)
        self.dl = self.dls.train if train else self.dls.valid
        self.n_iter = len(self.dl) if hasattr(self.dl, "__len__") else 0
        self._with_events("epoch", self._do_epoch)

    def _do_fit(self, train: bool, valid: bool) -> None:
        for self.epoch in range(self.n_epochs):
            if train:
                self.one_epoch(True)
            if valid:
                with torch.no_grad():
                    self.one_epoch(False)

    def fit(self, n_epochs: int = 1, train: bool = True, valid: bool = True,
            cbs: Iterable[Any] | None = None, lr: float | None = None) -> None:
        """Train for `n_epochs`, each a training phase then a validation phase.

        `cbs` are added for this call only; `lr` sets the optimizer's learning rate.
        """
        extra = list(cbs or ())
        for cb in extra:
            _check_callback(cb)
        self._check_fit_args(n_epochs, train, valid, lr)
        self.cbs.extend(extra)
        try:
            self._build_handlers()  # also picks up callbacks appended to learn.cbs directly
            if lr is not None:
                self.lr = lr
            if train:
                self._prepare_opt(lr)
            self.n_epochs = n_epochs
            self._with_events("fit", lambda: self._do_fit(train, valid))
        finally:
            for cb in extra:
                self.cbs.remove(cb)
            self._build_handlers()

    def _check_fit_args(self, n_epochs: int, train: bool, valid: bool, lr: float | None) -> None:
        if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or n_epochs < 1:
            raise ValueError(f"fit: n_epochs must be an int >= 1, got {n_epochs!r}")
        value = self.lr if lr is None else lr
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0):
            raise ValueError(f"fit: lr must be a finite number > 0, got {value!r}")
        if self.dls is None:
            raise ValueError("fit: the learner has no data; pass dls=DataLoaders(train_dl, valid_dl)")
        for phase, wanted in (("train", train), ("valid", valid)):
            if not wanted:
                continue
            dl = getattr(self.dls, phase, None)
            if dl is None:
                raise ValueError(f"fit: dls has no `{phase}` loader ({type(self.dls).__name__}); "
                                 f"pass nanofit.DataLoaders(train_dl, valid_dl) or fit({phase}=False)")
            if hasattr(dl, "__len__") and len(dl) == 0:
                raise ValueError(f"fit: dls.{phase} yields no batches (len 0); check the dataset "
                                 "size and batch_size/drop_last")
        if train and not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("fit: the model has no trainable parameters (none requires grad); "
                             "unfreeze some or call fit(train=False)")

    def _prepare_opt(self, lr: float | None) -> None:
        if self.opt is None:
            if self.opt_func is not None:
                self.opt = self.opt_func(self.model.parameters(), lr=self.lr)
        elif lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr

    # ---- the five steps: defaults that a callback or a subclass may replace -----------------
    def predict(self) -> None:
        """preds = model(*inputs), the inputs being the first `n_inp` items of the batch."""
        self.preds = self.model(*self.batch[: self.n_inp])

    def get_loss(self) -> None:
        """loss = loss_func(preds, *targets), the targets being the rest of the batch."""
        targets = self.batch[self.n_inp:]
        try:
            self.loss = self.loss_func(self.preds, *targets)
        except Exception as e:
            e.add_note("loss_func got " + ", ".join(_describe(t) for t in (self.preds, *targets)))
            raise

    def backward(self) -> None:
        """loss.backward()"""
        self.loss.backward()

    def step(self) -> None:
        """opt.step()"""
        if self.opt is None:
            raise RuntimeError("step: the learner has no optimizer; pass opt_func= to Learner "
                               "or replace `step` in a callback")
        self.opt.step()

    def zero_grad(self) -> None:
        """opt.zero_grad()"""
        self.opt.zero_grad()

    @property
    def training(self) -> bool:
        """True during a training phase (the model is in train mode)."""
        return self.model.training


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


class TrainLearner(Learner):
    """A Learner subclass spelling out the five steps (the subclassing alternative to TrainCB)."""

    def predict(self) -> None:
        self.preds = self.model(self.batch[0])

    def get_loss(self) -> None:
        self.loss = self.loss_func(self.preds, self.batch[1])

    def backward(self) -> None:
        self.loss.backward()

    def step(self) -> None:
        self.opt.step()

    def zero_grad(self) -> None:
        self.opt.zero_grad()


class MomentumLearner(TrainLearner):
    """Keeps `mom` times the old gradients instead of zeroing them (SGD momentum, by hand)."""

    def __init__(self, model: nn.Module, dls: Any = None, loss_func: Callable = F.mse_loss,
                 lr: float | None = None, cbs: Iterable[Any] | None = None,
                 opt_func: Callable = torch.optim.SGD, mom: float = 0.85) -> None:
        self.mom = mom
        super().__init__(model, dls, loss_func, lr if lr is not None else 0.1, cbs, opt_func)

    def zero_grad(self) -> None:
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.mom)
