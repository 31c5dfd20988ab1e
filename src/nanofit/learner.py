"""The Learner: a short training loop whose every stage emits events to callbacks.

Read this file top to bottom to know the whole loop. Everything that changes or observes
training (metrics, progress bars, schedules, devices, ...) is a callback in `nanofit.callbacks`;
the conveniences at the end are one-line facades over the modules that implement them.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, inference, optim, resumable, state
from . import export as exporting
from .callback import (
    CANCELS,
    NEVER,
    STAGES,
    CancelEpochException,
    as_cbs,
    build_tables,
    call_all,
    check_callback,
    describe_loop,
    note_origin,
)
from .callbacks import lr_find as finder
from .callbacks import schedule as scheduling
from .callbacks.lr_find import LRFinderCB
from .callbacks.metrics import MetricsCB
from .callbacks.recorder import Recorder
from .checks import (
    ESCAPED_CANCEL,
    check_fit_args,
    hint_silent_fit,
    model_loss,
    note_loss_error,
    note_predict_error,
)
from .hooks import learner_summary
from .optim import HPOptimizer, lr_problem, set_hyper, with_hypers
from .resume import LoopPosition
from .steps import plan_fit
from .torch_utils import length

__all__ = ["Learner"]


class Learner:
    """Owns the model, data, loss and optimizer, and runs `fit` while calling the callbacks.

    `lr` is the rate a new optimizer starts with (a list gives one per param group); change
    the live one with `fit(lr=...)` or `learn.opt.lr = ...`. `splitter(model)` returns lists of
    parameters, one param group each (for discriminative rates and `freeze`).

    Example: `Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[MetricsCB(acc)]).fit(3)`
    """

    # State that callbacks share, set by its owner at before_fit; reset when a fit starts, so
    # no callback reads one left over from an earlier fit. metrics and recorder stay readable
    # after the fit; grad_scaler is cleared by MixedPrecision at cleanup_fit.
    SHARED = ("metrics", "recorder", "grad_scaler", "accumulating")

    # `learn.step` is the loop's count of training batches (see __init__); the class's `step`
    # method below stays the loop's default optimizer step, found on the class by the dispatch
    # tables (a subclass or a callback may replace it). Call `learn.opt.step()` to step by hand.
    step: int

    def __init__(self, model: nn.Module, dls: Any = None, loss_func: Callable | None = F.mse_loss,
                 lr: float | Sequence[float] = 0.1, cbs: Iterable[Any] | None = None,
                 opt_func: Callable | None = torch.optim.SGD, n_inp: int = 1,
                 splitter: Callable[[nn.Module], list] | None = None) -> None:
        self.model, self.dls, self.lr = model, dls, lr
        self.loss_func: Any = loss_func  # None: the model computes the loss (preds.loss)
        self.opt_func, self.n_inp, self.splitter = opt_func, n_inp, splitter
        self.opt = None
        self.cbs: list[Any] = []
        # The loop's state: callbacks read and write it.
        self.n_epochs, self.epoch, self.iter, self.n_iter = 0, 0, 0, 0
        self.epochs = range(0)  # range(n_epochs) in a fit, as the course's callbacks read it
        # Training batches done in this fit (before the current one, during a batch), the
        # fit's total (None: unknown), and whether it counts steps (fit(steps=...)).
        self.step, self.by_steps = 0, False
        self.total_steps: int | None = None
        self.dl: Any = None
        self.batch: Any = None
        self.preds: Any = None
        self.loss: Any = None
        self.run_train = self.run_valid = False  # the phases this fit runs
        self.position = LoopPosition()  # where the loop is, for checkpoints
        # Shared by callbacks (see SHARED): MetricsCB, Recorder, MixedPrecision, GradAccumCB.
        self.metrics: MetricsCB | None = None
        self.recorder: Recorder | None = None
        self.grad_scaler: torch.amp.GradScaler | None = None  # fp16 scaler, for custom steps
        self.accumulating = False  # GradAccumCB is gathering gradients: no step this batch
        # Results and what an exported learner carries (load_learner).
        self.lr_finder: LRFinderCB | None = None
        self.vocab: list[str] | None = None
        self.item_ndim: int | None = None
        self._handlers: dict[str, tuple[Callable, ...]] = {}
        self._due = NEVER  # the next training step where an every(n) method runs
        self._due_now: tuple[int, bool] | None = None  # (batch index, training) of a due batch
        for cb in as_cbs(cbs):
            self.add_cb(cb)
        self.refresh_cbs()

    # ---- callbacks ------------------------------------------------------------------------
    def add_cb(self, cb: Any) -> Learner:
        """Add a callback instance; it takes effect at once, even during a fit."""
        check_callback(cb)
        self.cbs.append(cb)
        self.refresh_cbs()
        return self

    def rm_cb(self, cb: Any) -> Learner:
        """Remove a callback instance added earlier."""
        if not any(cb is c for c in self.cbs):
            raise ValueError(f"rm_cb: {cb!r} is not among this learner's callbacks "
                             f"{[type(c).__name__ for c in self.cbs]}")
        self.cbs[:] = [c for c in self.cbs if c is not cb]
        self.refresh_cbs()
        return self

    def refresh_cbs(self) -> None:
        """Rebuild the tables the loop dispatches from (after changing `learn.cbs` by hand;
        add_cb, rm_cb and fit do it themselves). Never per batch."""
        self._tables = build_tables(self.cbs, type(self))
        due = self._due_now  # inside a batch where every(n) methods run: keep them running
        self._handlers = self._tables.base if due is None else self._tables.at(*due)
        self._due = self._tables.next_due(self.step)

    def callback(self, event: str) -> None:
        """Run every callback's `event` method, in order, passing the learner."""
        for fn in self._handlers[event]:
            try:
                fn(self)
            except CANCELS:
                raise
            except BaseException as e:
                note_origin(e, fn, event)
                if event == "predict":
                    note_predict_error(e, self)  # a batch on another device or dtype
                raise

    def show_training_loop(self) -> None:
        """Print the callbacks with their orders, then, for each event, what runs there."""
        self.refresh_cbs()
        print(describe_loop(self._tables.full, self.cbs, self._tables.marks))

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self, n_epochs: int | None = None, train: bool = True, valid: bool = True,
            cbs: Iterable[Any] | None = None, lr: float | Sequence[float] | None = None,
            resume: str | None = None, *, steps: int | None = None,
            valid_every: int | None = None) -> None:
        """Train for `n_epochs` (default 1), each a training phase then a validation phase;
        or for `steps` training batches, drawn from as many passes over `dls.train` as needed.

        `valid_every=K` validates after every K training batches: a round of K batches and a
        validation is then an epoch stage for the callbacks (without it a step fit validates
        once, at the end). `cbs` are added for this call only; `lr` sets the optimizer's
        learning rate. `resume` (a checkpoint file, or a folder: its newest) continues an
        interrupted run exactly where its checkpoint was taken, as if it had never stopped.
        """
        extra = as_cbs(cbs)
        plan = plan_fit(getattr(self.dls, "train", None), n_epochs, steps, valid_every)
        check_fit_args(self, plan.n_epochs, train, valid, lr, extra)
        ckpt = None if resume is None else resumable.read_for_resume(resume, self, plan)
        self.cbs.extend(extra)
        try:
            if lr is not None:
                self.lr = lr
            self._prepare_opt(lr, train)
            self.n_epochs, self.epochs = plan.n_epochs, range(plan.n_epochs)
            self.step, self.total_steps, self.by_steps = 0, plan.total_steps, plan.by_steps
            self.run_train = train
            self.run_valid = valid and getattr(self.dls, "valid", None) is not None
            self.metrics = self.recorder = self.grad_scaler = None
            self.accumulating = False
            self.position.start_fit(plan)
            self.refresh_cbs()  # also picks up callbacks appended to learn.cbs directly
            hint_silent_fit(self)
            with warnings.catch_warnings():  # torch only warns when an element-wise loss
                # broadcasts preds (64, 1) against targets (64,): an error at the first batch
                warnings.filterwarnings("error", "Using a target size", UserWarning)
                self._with_events("fit", lambda: self._do_fit(train, valid, ckpt))
        except CANCELS as e:  # CancelFitException stops at the fit: this one escaped its stage
            e.add_note(ESCAPED_CANCEL.format(type(e).__name__))
            raise
        finally:
            self.position.end_fit()
            self.cbs[:] = [c for c in self.cbs if not any(c is cb for cb in extra)]
            self.refresh_cbs()

    def _do_fit(self, train: bool, valid: bool, ckpt: dict | None) -> None:
        first_epoch, first_batch, train_done = self.position.resume(self, ckpt)
        self._due = self._tables.next_due(self.step)  # a resumed fit's steps count on
        # learn.epochs itself, unless resuming: a course ProgressCB wraps it in a progress bar
        epochs = self.epochs if first_epoch == 0 else range(first_epoch, self.n_epochs)
        for self.epoch in epochs:
            resumed = self.epoch == first_epoch
            if train and not (resumed and train_done):
                self.one_epoch(True, first_batch if resumed else 0)
                if self.position.dry_round:  # the stream ended before this round began
                    break
            if valid:
                with torch.no_grad():
                    self.one_epoch(False)
            if self.position.ran_dry:  # a stream that ended before the steps were done
                break

    def one_epoch(self, train: bool, start: int = 0) -> None:
        """Run one phase (training or validation) over `dls.train` or `dls.valid`, from batch
        `start` (a resumed epoch); in a step fit, the training phase is the round's batches."""
        self.model.train(train)
        self.dl = self.dls.train if train else self.dls.valid
        if train and self.by_steps:  # the round ends at a multiple of valid_every
            self.n_iter = self.position.plan.round_end(self.epoch) - self.step + start
        else:
            self.n_iter = length(self.dl) or 0
        self.iter = start - 1
        batches = self.position.batches(self, train, start)
        body = self._train_batches if train else self._valid_batches
        self._with_events("epoch", lambda: body(batches, start))

    def _train_batches(self, batches: Iterator[Any], start: int) -> None:
        for self.iter, self.batch in enumerate(batches, start):
            try:
                # an every(n) method may run on this batch (>=: a fit nested in this one, such
                # as get_preds in a callback, may have left _due behind: the table says)
                if self.step >= self._due:
                    self._due_batch(self.step, True)
                else:
                    self._with_events("batch", self._do_batch)
            finally:
                self.step += 1

    def _valid_batches(self, batches: Iterator[Any], start: int) -> None:
        due = self._tables.next_due(0, train=False)
        try:
            for self.iter, self.batch in enumerate(batches, start):
                if self.iter >= due:
                    due = self._due_batch(self.iter, False)
                else:
                    self._with_events("batch", self._do_batch)
        except CancelEpochException:  # stops validation early: after_epoch still computes
            self.position.phase_done = True  # the metrics over the batches seen so far

    def _due_batch(self, index: int, train: bool) -> int:
        """Run a batch with the dispatch table that includes the every(n) methods due on it;
        return the next batch index where some are due."""
        self._due_now = (index, train)
        self._handlers = self._tables.at(index, train)
        try:
            self._with_events("batch", self._do_batch)
        finally:
            self._due_now = None
            self._handlers = self._tables.base  # rebuilt if a callback changed the callbacks
            nxt = self._tables.next_due(index + 1, train)
            if train:
                self._due = nxt
        return nxt

    def _do_batch(self) -> None:
        run = self.callback
        run("predict")
        run("after_predict")
        run("get_loss")
        run("after_loss")
        if not self.model.training:
            return
        try:
            run("backward")
            run("after_backward")
            run("step")
            run("after_step")
        finally:  # a batch cancelled after backward must not leak its gradients into the next
            run("zero_grad")

    def _with_events(self, stage: str, body: Callable[[], None]) -> None:
        cancel, before, after, after_cancel, cleanup = STAGES[stage]
        try:
            try:
                self.callback(before)
                body()
                self.callback(after)
            except cancel:
                self.callback(after_cancel)
        except BaseException as error:
            try:  # the cleanup still runs; a second failure must not hide the first
                call_all(self._handlers[cleanup], self, cleanup)
            except Exception as second:
                if isinstance(error, CANCELS):
                    raise  # a real error beats a cancellation
                error.add_note(f"while cleaning up ({cleanup}), {type(second).__name__}: "
                               f"{second}")
            raise
        call_all(self._handlers[cleanup], self, cleanup)  # every callback's, even if one fails

    # ---- the five steps: defaults that a callback or a subclass may replace -----------------
    def predict(self, x: Any = None, act: Callable | None = None) -> Any:
        """Two uses, told apart by `x`:
        - the loop's step, `predict()` (miniai's): preds = model(*inputs), the inputs being
          the first `n_inp` batch items; a dict batch goes in as keyword arguments,
          model(**batch) (a Hugging Face model). Callbacks and subclasses replace this one.
        - inference, `learn.predict(x)` (fastai's): `nanofit.inference.predict`, the prediction
          for one item or a batch, in eval mode with the validation transforms; `act` (e.g.
          softmax) is applied to it."""
        if x is None:
            batch = self.batch
            if isinstance(batch, dict):
                self.preds = self.model(**batch)
            else:
                self.preds = self.model(*batch[: self.n_inp])
            return None
        return inference.predict(self, x, act)

    def get_loss(self) -> None:
        """loss = loss_func(preds, *targets), the targets being the rest of the batch. With
        `loss_func=None` the loss is the one the model computed (`preds.loss`, a Hugging Face
        model given labels); a dict batch's target is `batch["labels"]`."""
        try:
            if self.loss_func is None:
                self.loss = model_loss(self.preds)
            elif isinstance(self.batch, dict):
                self.loss = self.loss_func(self.preds, self.batch["labels"])
            else:
                self.loss = self.loss_func(self.preds, *self.batch[self.n_inp:])
        except Exception as e:
            note_loss_error(e, self)  # what it got, and the usual fix
            raise

    def backward(self) -> None:
        """loss.backward()"""
        self.loss.backward()

    def step(self) -> None:  # type: ignore[no-redef]  # the method; learn.step is the count
        """opt.step(): the loop's default step (the class's method; `learn.step` on a learner
        is the number of training batches done)."""
        if self.opt is None:
            raise RuntimeError("step: the learner has no optimizer; pass opt_func= to Learner "
                               "or replace `step` in a callback")
        self.opt.step()

    def zero_grad(self) -> None:
        """opt.zero_grad()"""
        if self.opt is not None:  # runs even after a failed step: must not hide that error
            self.opt.zero_grad()

    @property
    def training(self) -> bool:
        """True during a training phase (the model is in train mode)."""
        return self.model.training

    # ---- the optimizer ------------------------------------------------------------------------
    @property
    def opt(self) -> HPOptimizer | None:
        """The torch optimizer (made by the first fit), with lr/mom/wd/beta by name
        (`HPOptimizer`); one you assign gets them too. None makes the next fit build one."""
        return self._opt

    @opt.setter
    def opt(self, opt: Any) -> None:
        self._opt = with_hypers(opt)

    def _prepare_opt(self, lr: float | Sequence[float] | None, train: bool) -> None:
        if self.opt is None:  # also for validation alone, when it can: callbacks may read it
            if train or (lr_problem(self.lr) is None and next(self.model.parameters(), None)
                         is not None):
                self.create_opt()
        elif lr is not None and train:
            set_hyper(self.opt, "lr", lr)

    # ---- conveniences: the functions that do the work, documented where they are defined ------
    removed_cbs = state.removed_cbs
    save = checkpoint.save
    load = checkpoint.load
    create_opt = optim.create_opt
    splits = optim.splits
    freeze_to = optim.freeze_to
    freeze = optim.freeze
    unfreeze = optim.unfreeze
    fit_one_cycle = scheduling.fit_one_cycle
    fit_flat_cos = scheduling.fit_flat_cos
    fine_tune = scheduling.fine_tune
    lr_find = finder.lr_find
    get_preds = inference.get_preds
    capture_preds = inference.capture_preds
    tta = inference.tta
    export = exporting.export
    show_results = inference.show_results
    summary = learner_summary
