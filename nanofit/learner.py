"""The Learner: a short training loop whose every stage emits events to callbacks.

Read this file top to bottom to know the whole loop. Everything that changes or observes
training (metrics, progress bars, schedules, devices, ...) is a callback in `nanofit.callbacks`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .callback import (EVENTS, PREDICT_STEPS, STAGES, STEPS, TRAIN_STEPS, Callback,
                       CancelBatchException, CancelEpochException, CancelFitException,
                       as_cbs, check_callback, describe_loop, note_origin)
from .checkpoint import capture_rng
from .checks import ESCAPED_CANCEL, check_first_batch, check_fit_args, describe, loss_hint
from .optim import HPOptimizer, freeze_to, make_optimizer, param_groups, set_hyper

__all__ = [
    "Callback", "CancelFitException", "CancelEpochException", "CancelBatchException",
    "EVENTS", "STEPS", "Learner",
]


class Learner:
    """Owns the model, data, loss and optimizer, and runs `fit` while calling the callbacks.

    `lr` is the rate a new optimizer starts with (a list gives one per param group); change
    the live one with `fit(lr=...)` or `learn.opt.lr = ...`. `splitter(model)` returns lists of
    parameters, one param group each (for discriminative rates and `freeze`).

    Example: `Learner(model, dls, F.cross_entropy, lr=0.1, cbs=[MetricsCB(acc)]).fit(3)`
    """

    def __init__(self, model: nn.Module, dls: Any = None, loss_func: Callable = F.mse_loss,
                 lr: float | Sequence[float] = 0.1, cbs: Iterable[Any] | None = None,
                 opt_func: Callable | None = torch.optim.SGD, n_inp: int = 1,
                 splitter: Callable[[nn.Module], list] | None = None) -> None:
        self.model, self.dls, self.loss_func, self.lr = model, dls, loss_func, lr
        self.opt_func, self.n_inp = opt_func, n_inp
        self.splitter = splitter
        self.opt = None
        self.cbs: list[Any] = []
        self.n_epochs, self.epoch, self.iter, self.n_iter, self.n_iter_train = 0, 0, 0, 0, 0
        self.dl: Any = None
        self.batch: Any = None
        self.preds: Any = None
        self.loss: Any = None
        self.fitting = self.phase_done = self.run_valid = False
        self.phase: str | None = None  # "train" or "valid" while a phase runs
        # RNG states (at the epoch's and validation's start) and resume state: see checkpoint.py
        self.epoch_rng = self.valid_rng = self.resume_rng = self.resume_cb_states = None
        self._handlers: dict[str, tuple[Callable, ...]] = {}
        self.handler_wrapper: Callable | None = None  # (event, fn) -> fn, see ProfileCB
        self.autocast: Callable | None = None  # () -> context for predict/get_loss (AMP)
        for cb in as_cbs(cbs):
            self.add_cb(cb)
        self._build_handlers()

    # ---- callbacks ------------------------------------------------------------------------
    def add_cb(self, cb: Any) -> "Learner":
        """Add a callback instance; it takes effect at once, even during a fit."""
        check_callback(cb)
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
        for name in STEPS:  # a step is replaced, as a method is overridden: the last one wins
            defined = handlers[name]
            handlers[name] = (defined[-1],) if defined else (getattr(type(self), name),)
        if self.handler_wrapper is not None:  # e.g. ProfileCB timing every handler
            handlers = {e: tuple(self.handler_wrapper(e, fn) for fn in fns)
                        for e, fns in handlers.items()}
        self._handlers = handlers

    def callback(self, event: str) -> None:
        """Run every callback's `event` method, in order, passing the learner."""
        for fn in self._handlers[event]:
            try:
                fn(self)
            except (CancelFitException, CancelEpochException, CancelBatchException):
                raise
            except BaseException as e:
                note_origin(e, fn, event)
                raise

    def show_training_loop(self) -> None:
        """Print, for each event, the callbacks that run there, in the order they run."""
        self._build_handlers()
        print(describe_loop(self._handlers))

    # ---- the loop ---------------------------------------------------------------------------
    def _with_events(self, stage: str, body: Callable[[], None]) -> None:
        cancel, before, after, after_cancel, cleanup = STAGES[stage]
        try:
            try:
                self.callback(before)
                body()
                self.callback(after)
            except cancel:
                self.callback(after_cancel)
        except BaseException as e:
            self._cleanup_while_failing(cleanup, e)
            raise
        self.callback(cleanup)

    def _cleanup_while_failing(self, cleanup: str, error: BaseException) -> None:
        """Run `cleanup` while `error` propagates; a second failure must not hide the first."""
        try:
            self.callback(cleanup)
        except Exception as second:
            if isinstance(error, (CancelFitException, CancelEpochException, CancelBatchException)):
                raise  # a real error beats a cancellation
            error.add_note(f"while cleaning up ({cleanup}), {type(second).__name__}: {second}")

    def _do_batch(self) -> None:
        run = self.callback
        if self.autocast is None:
            for event in PREDICT_STEPS:
                run(event)
        else:  # mixed precision: each forward step inside its own autocast block
            for event in PREDICT_STEPS:
                if event in STEPS:
                    with self.autocast():
                        run(event)
                else:
                    run(event)
        if self.model.training:
            try:
                for event in TRAIN_STEPS:
                    run(event)
            finally:  # a batch cancelled after backward must not leak its gradients into the next
                run("zero_grad")

    def _do_epoch(self, start: int) -> None:
        if start:  # resuming mid-epoch: the original order, minus the batches already done
            from .checkpoint import resume_batches

            batches = resume_batches(self, self.dl, start)
        else:
            batches = iter(self.dl)
            batches = check_first_batch(batches, "train" if self.training else "valid")
        for self.iter, self.batch in enumerate(batches, start):
            self._with_events("batch", self._do_batch)
        self.phase_done = True  # read by checkpoints saved in after_epoch

    def one_epoch(self, train: bool, start: int = 0) -> None:
        """Run one phase (training or validation) over `dls.train` or `dls.valid`, from batch
        `start` (a resumed epoch)."""
        self.model.train(train)
        self.phase, self.iter = ("train" if train else "valid"), start - 1
        self.dl = self.dls.train if train else self.dls.valid
        self.n_iter = len(self.dl) if hasattr(self.dl, "__len__") else 0
        self.phase_done = False
        if train:
            self.n_iter_train = self.n_iter
            if not start:  # once per epoch: lets a checkpoint mid-epoch replay this epoch's order
                self.epoch_rng = capture_rng(self.dls)
        else:
            self.valid_rng = capture_rng(self.dls)
        self._with_events("epoch", lambda: self._do_epoch(start))

    def _do_fit(self, train: bool, valid: bool, ckpt: dict | None) -> None:
        first, done, train_done = 0, 0, False
        if ckpt is not None:
            from .checkpoint import restore_for_resume

            first, done, train_done = restore_for_resume(self, ckpt)
        for self.epoch in range(first, self.n_epochs):
            resumed = self.epoch == first
            if train and not (resumed and train_done):
                self.one_epoch(True, done if resumed else 0)
            if valid:
                with torch.no_grad():
                    self.one_epoch(False)

    def fit(self, n_epochs: int = 1, train: bool = True, valid: bool = True,
            cbs: Iterable[Any] | None = None, lr: float | Sequence[float] | None = None,
            resume: str | None = None) -> None:
        """Train for `n_epochs`, each a training phase then a validation phase.

        `cbs` are added for this call only; `lr` sets the optimizer's learning rate. `resume`
        (a checkpoint file, or a folder: its newest) continues an interrupted run exactly
        where its checkpoint was taken, as if it had never stopped.
        """
        extra = as_cbs(cbs)
        for cb in extra:
            check_callback(cb)
            if any(cb is c for c in self.cbs):
                raise ValueError(f"fit(cbs=...): {type(cb).__name__} is already among the "
                                 "learner's callbacks; pass it only once")
        check_fit_args(self, n_epochs, train, valid, lr)
        ckpt = self._read_resume(resume, n_epochs)
        self.cbs.extend(extra)
        try:
            self._build_handlers()  # also picks up callbacks appended to learn.cbs directly
            if lr is not None:
                self.lr = lr
            if train:
                self._prepare_opt(lr)
            self.n_epochs = n_epochs
            self.run_valid = valid and getattr(self.dls, "valid", None) is not None
            self.fitting, self.phase = True, None
            self._with_events("fit", lambda: self._do_fit(train, valid, ckpt))
        except (CancelEpochException, CancelBatchException) as e:
            e.add_note(ESCAPED_CANCEL.format(type(e).__name__))
            raise
        finally:
            self.fitting = False
            self.cbs[:] = [c for c in self.cbs if not any(c is cb for cb in extra)]
            self._build_handlers()

    def _read_resume(self, resume: str | None, n_epochs: int) -> dict | None:
        from .checkpoint import read_for_resume

        return None if resume is None else read_for_resume(resume, self, n_epochs)

    def save(self, path: str) -> str:
        """Save a checkpoint (atomically); inside a fit, from after_batch or after_epoch."""
        from .checkpoint import save_checkpoint

        return str(save_checkpoint(self, path))

    def load(self, path: str, with_opt: bool = True) -> "Learner":
        """Load weights (and optimizer) from a checkpoint file or folder; fit(resume=) resumes."""
        from .checkpoint import load_checkpoint, read_checkpoint

        load_checkpoint(self, read_checkpoint(path), with_opt)
        return self

    @property
    def opt(self) -> HPOptimizer | None:
        """The optimizer (made by the first fit), with lr/mom/wd/beta by name; None resets it."""
        return self._opt

    @opt.setter
    def opt(self, opt: Any) -> None:
        self._opt = None if opt is None else HPOptimizer(opt)

    def splits(self) -> list[list[nn.Parameter]]:
        """The parameter groups: `splitter(model)`, or one group of all parameters."""
        return param_groups(self.model, self.splitter)

    def create_opt(self) -> None:
        """Make the optimizer: `opt_func(param_groups, lr=lr)`, one group per split."""
        if self.opt_func is not None:
            self.opt = make_optimizer(self.opt_func, self.model, self.splitter, self.lr)

    def _prepare_opt(self, lr: float | Sequence[float] | None) -> None:
        if self.opt is None:
            self.create_opt()
        elif lr is not None:
            set_hyper(self.opt, "lr", lr)

    def freeze_to(self, n: int, train_bn: bool = True) -> None:
        """Freeze the parameter groups before group `n` (negative counts from the end); with
        `train_bn` (fastai's default) batchnorm layers stay trainable everywhere."""
        freeze_to(self.model, self.splits(), n, train_bn)

    def freeze(self, train_bn: bool = True) -> None:
        """Freeze all parameter groups but the last (the head), as in fastai."""
        self.freeze_to(-1, train_bn)

    def unfreeze(self) -> None:
        """Make every parameter group trainable."""
        self.freeze_to(0, train_bn=True)

    # ---- conveniences: each drives a callback or helper from its own module ---------------
    def fit_one_cycle(self, n_epochs: int, lr_max: float | Sequence[float] | None = None,
                      div: float = 25.0, div_final: float = 1e5, pct_start: float = 0.25,
                      moms: Sequence[float] | None = (0.95, 0.85, 0.95), wd: float | None = None,
                      cbs: Iterable[Any] | None = None, resume: str | None = None) -> None:
        """Fit with the 1cycle policy: lr warms up from lr_max/div to lr_max (cosine) over
        `pct_start`, then anneals to lr_max/div_final; momentum (when the optimizer uses it)
        moves inversely. `lr_max` may be a list per param group; `resume` as in `fit`."""
        from .callbacks.schedule import fit_one_cycle
        fit_one_cycle(self, n_epochs, lr_max, div, div_final, pct_start, moms, wd, cbs, resume)

    def fit_flat_cos(self, n_epochs: int, lr: float | Sequence[float] | None = None,
                     div_final: float = 1e5, pct_start: float = 0.75, wd: float | None = None,
                     cbs: Iterable[Any] | None = None, resume: str | None = None) -> None:
        """Fit at a flat lr for `pct_start` of training, then anneal it to lr/div_final (cosine)."""
        from .callbacks.schedule import fit_flat_cos
        fit_flat_cos(self, n_epochs, lr, div_final, pct_start, wd, cbs, resume)

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1,
                  lr_mult: float = 100, pct_start: float = 0.3, div: float = 5.0,
                  **kwargs: Any) -> None:
        """fastai's recipe: the head alone for `freeze_epochs`, then everything for `epochs`
        with rates from base_lr/2/lr_mult (first group) to base_lr/2 (last), by one-cycle."""
        from .callbacks.schedule import fine_tune
        fine_tune(self, epochs, base_lr, freeze_epochs, lr_mult, pct_start, div, **kwargs)

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                stop_div: bool = True, suggest: Sequence[str] = ("valley",), plot: bool = True,
                plot_path: str = "lr_find.png") -> Any:
        """Grow the lr from `start_lr` to `end_lr` over `num_it` training batches and return
        the suggested rate(s) (`.valley`, `.minimum`, `.steep`). Leaves no trace: `lr_find();
        fit()` trains exactly as `fit()` alone. The curve is in `learn.lr_finder`."""
        from .callbacks.lr_find import lr_find
        return lr_find(self, start_lr, end_lr, num_it, stop_div, suggest, plot, plot_path)

    def get_preds(self, dl: Any = None, with_input: bool = False, with_loss: bool = False,
                  act: Callable | None = None) -> tuple:
        """(preds, targets) for every batch of `dl` (default `dls.valid`), in order, on the CPU;
        `with_input` prepends the inputs as the model saw them, `with_loss` appends per-item
        losses, `act` (e.g. softmax) is applied to the predictions."""
        from .inference import get_preds
        return get_preds(self, dl, with_input, with_loss, act)

    def tta(self, n: int = 4, tfm: Callable | None = None, dl: Any = None,
            act: Callable | None = None) -> tuple:
        """(preds, targets) averaged over the plain data and `n` copies augmented by `tfm`
        (default: random left-right flips)."""
        from .inference import tta
        return tta(self, n, tfm, dl, act)

    def export(self, path: str, model_fn: Callable | None = None, args: tuple = (),
               kwargs: dict | None = None) -> str:
        """Save weights, model constructor and arguments, normalisation and vocab for
        `nanofit.load_learner` (nothing is pickled)."""
        from .inference import export
        return str(export(self, path, model_fn, args, kwargs))

    def show_results(self, n: int = 9, ncols: int | None = None, path: str | None = None) -> Any:
        """The first `n` validation images titled 'prediction / target'; a Figure."""
        from .images import show_results
        return show_results(self, n, ncols, path)

    def summary(self, flops: bool = True) -> Any:
        """Leaf modules with output shapes, parameters and MFLOPs, from one batch of data."""
        from .hooks import learner_summary
        return learner_summary(self, flops)

    # ---- the five steps: defaults that a callback or a subclass may replace -----------------
    def predict(self, x: Any = None, act: Callable | None = None) -> Any:
        """Two uses, told apart by `x`. As the loop's step (no argument): preds =
        model(*inputs), the inputs being the first `n_inp` batch items. For inference,
        `learn.predict(x)`: the prediction for one item (no batch dimension) or a batch, in
        eval mode with the validation transforms; `act` (e.g. softmax) is applied to it."""
        if x is None:
            self.preds = self.model(*self.batch[: self.n_inp])
            return None
        from .inference import predict

        return predict(self, x, act)

    def get_loss(self) -> None:
        """loss = loss_func(preds, *targets), the targets being the rest of the batch."""
        targets = self.batch[self.n_inp:]
        try:
            self.loss = self.loss_func(self.preds, *targets)
        except Exception as e:
            got = ", ".join(describe(t) for t in (self.preds, *targets))
            e.add_note(f"loss_func got {got} (epoch {self.epoch}, batch {self.iter})"
                       + loss_hint(self.preds, targets))
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
        if self.opt is not None:  # runs even after a failed step: must not hide that error
            self.opt.zero_grad()

    @property
    def training(self) -> bool:
        """True during a training phase (the model is in train mode)."""
        return self.model.training
