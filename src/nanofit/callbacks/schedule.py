"""Hyper-parameter schedules during training: ParamScheduler, and torch's lr schedulers."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..callback import Callback, Order
from ..optim import HPOptimizer, check_lr, groups, hyper_access, supported_hypers
from ..schedule import Schedule, flat_cos_scheds, lr_range, one_cycle_scheds, sched_no
from .metrics import RECORD_KEYS

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["ParamScheduler", "BatchSchedCB", "EpochSchedCB", "fit_one_cycle", "fit_flat_cos",
           "fine_tune"]


class ParamScheduler(Callback):
    """Sets hyper-parameters (lr, mom, wd, beta) from schedules before each training batch.

    Each schedule is a function of training progress: `learn.step / learn.total_steps` in a
    step fit, `(epoch + iter / len(dl)) / n_epochs` in an epoch fit (so an epoch cut short by a
    callback does not hold the schedule back); 0 at the first batch. Or a list of such
    functions, one per param group. Validation batches do
    not advance it, and a fit without training (`fit(train=False)`) leaves the optimizer alone.
    Example: `ParamScheduler(lr=sched_cos(1e-2, 1e-5), mom=sched_no(0.9, 0.9))`
    """

    order = Order.SCHEDULE
    main_fit_only = True

    def __init__(self, **scheds: Schedule | Sequence[Schedule]) -> None:
        if not scheds:
            raise ValueError("ParamScheduler needs at least one schedule, e.g. "
                             "lr=sched_cos(1e-2, 0)")
        for name, sched in scheds.items():
            funcs = sched if isinstance(sched, (list, tuple)) else [sched]
            if not all(callable(f) for f in funcs):
                raise TypeError(f"ParamScheduler: the schedule for {name!r} must be a function of "
                                f"training progress (or a list of them), got {sched!r}")
        self.scheds = scheds
        self._plan: list[tuple[Any, Any]] | None = None

    def before_fit(self, learn: Learner) -> None:
        self._plan = None  # a validation-only fit needs no optimizer and changes nothing
        if learn.run_train:
            self._resolve(learn)

    def _resolve(self, learn: Learner) -> None:
        if learn.opt is None:
            raise ValueError("ParamScheduler needs an optimizer: it schedules learn.opt's "
                             "hyper-parameters; pass opt_func= to the Learner")
        if not learn.total_steps:
            raise ValueError(f"ParamScheduler needs to know how many training batches the fit "
                             f"runs, but dls.train ({type(learn.dls.train).__name__}) has no "
                             "length: pass fit(steps=N) (or fit_one_cycle(steps=N, ...))")
        n_groups = len(groups(learn.opt))
        plan = []  # (one schedule or a list per group, put), resolved once, not per batch
        for name, sched in self.scheds.items():
            _, put = hyper_access(learn.opt, name)
            if isinstance(sched, (list, tuple)) and len(sched) != n_groups:
                raise ValueError(f"ParamScheduler: {len(sched)} schedules for {name!r} but the "
                                 f"optimizer has {n_groups} param groups")
            plan.append((sched, put))
        self._plan = plan

    def before_batch(self, learn: Learner) -> None:
        if not learn.training:
            return
        assert learn.opt is not None and self._plan is not None  # resolved at before_epoch
        if learn.by_steps:
            pos = learn.step / learn.total_steps  # type: ignore[operator]  # known in step fits
        else:
            pos = (learn.epoch + learn.iter / learn.n_iter) / learn.n_epochs
        dicts = groups(learn.opt)  # param groups, or a hand-written optimizer's fields
        for sched, put in self._plan:
            if isinstance(sched, (list, tuple)):
                for group, f in zip(dicts, sched):
                    put(group, f(pos))
            else:
                value = sched(pos)  # one schedule for every group
                for group in dicts:
                    put(group, value)


def _torch_optimizer(learn: Learner) -> Any:
    opt = learn.opt
    return opt.opt if isinstance(opt, HPOptimizer) else opt


class _TorchSchedCB(Callback):
    order = Order.TORCH_SCHEDULE
    main_fit_only = True

    def __init__(self, sched: Callable[[Any], Any] | Any) -> None:
        if isinstance(sched, type) or (not callable(sched) and not hasattr(sched, "step")):
            raise TypeError("pass a torch lr scheduler, or a function making one from the "
                            "optimizer, e.g. partial(torch.optim.lr_scheduler.OneCycleLR, "
                            f"max_lr=0.1, total_steps=1000); got {sched!r}")
        self.sched = sched
        self.scheduler: Any = None
        self._state: dict[str, Any] | None = None  # restored before the scheduler is built

    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is None:
            return {"scheduler": self._state}
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state["scheduler"]
        if self.scheduler is not None and self._state is not None:
            self.scheduler.load_state_dict(self._state)

    def before_fit(self, learn: Learner) -> None:
        # Only for a fit that trains: a torch scheduler sets the lr as it is made, and a
        # validation-only fit must neither need an optimizer nor change its rate.
        self.scheduler, self._state = None, None
        if learn.run_train:
            self._build(learn)

    def _build(self, learn: Learner) -> None:
        if hasattr(self.sched, "step"):  # an LRScheduler instance, used as is
            self.scheduler = self.sched
        else:  # a factory: built on the learner's (torch) optimizer
            if learn.opt is None:
                raise ValueError(f"{type(self).__name__} needs an optimizer to schedule; pass "
                                 "opt_func= to the Learner")
            self.scheduler = self.sched(_torch_optimizer(learn))
        if self._state is not None:  # a resumed run: continue where the schedule stood
            self.scheduler.load_state_dict(self._state)


class BatchSchedCB(_TorchSchedCB):
    """Steps a torch lr scheduler after every training batch.

    `sched` is a scheduler, or a function taking the torch optimizer and returning one:
    `BatchSchedCB(partial(OneCycleLR, max_lr=0.1, total_steps=len(dls.train) * epochs))`
    """

    def after_batch(self, learn: Learner) -> None:
        if learn.training:
            self.scheduler.step()


class EpochSchedCB(_TorchSchedCB):
    """Steps a torch lr scheduler once per epoch: after the training phase, or, for
    `ReduceLROnPlateau`, after the validation phase with the MetricsCB value `monitor`.

    `EpochSchedCB(partial(StepLR, step_size=2, gamma=0.5))`,
    `EpochSchedCB(partial(ReduceLROnPlateau, patience=2), monitor="loss")`
    """

    def __init__(self, sched: Callable[[Any], Any] | Any, monitor: str = "loss") -> None:
        super().__init__(sched)
        self.monitor = monitor

    def _build(self, learn: Learner) -> None:
        super()._build(learn)
        self.on_metric = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self.on_metric and learn.metrics is None:
            raise ValueError("EpochSchedCB with ReduceLROnPlateau steps on a validation metric: "
                             f"add a MetricsCB to cbs (monitor={self.monitor!r})")

    def after_epoch(self, learn: Learner) -> None:
        if self.scheduler is None:  # a validation-only fit
            return
        if not self.on_metric:
            if learn.training:
                self.scheduler.step()
            return
        assert learn.metrics is not None  # checked at before_fit
        record = learn.metrics.history[-1]
        if record["train"] == "eval":
            if self.monitor not in record:
                raise ValueError(f"EpochSchedCB: monitor={self.monitor!r} is not among the "
                                 f"metrics {[k for k in record if k not in RECORD_KEYS]}")
            self.scheduler.step(record[self.monitor])


def fit_one_cycle(learn: Learner, n_epochs: int | None = None, lr_max: Any = None,
                  div: float = 25.0, div_final: float = 1e5, pct_start: float = 0.25,
                  moms: Sequence[float] | None = (0.95, 0.85, 0.95), wd: float | None = None,
                  cbs: Iterable[Any] | None = None, resume: str | None = None, *,
                  steps: int | None = None, valid_every: int | None = None) -> None:
    """`learn.fit_one_cycle(n_epochs, lr_max)` or `learn.fit_one_cycle(steps=N, lr_max=...)`:
    fit with the 1cycle policy: the lr warms up from lr_max/div to lr_max (cosine) over
    `pct_start` of training, then anneals to lr_max/div_final; momentum (when the optimizer
    uses it) moves inversely through `moms`. `lr_max` (default: `learn.lr`) may be a list, one
    per param group; `wd` sets weight decay; `cbs`, `resume`, `steps` and `valid_every` as in
    `fit`."""
    lr_max = learn.lr if lr_max is None else lr_max
    check_lr(lr_max, "fit_one_cycle")
    lrs = list(lr_max) if isinstance(lr_max, (list, tuple)) else [lr_max]
    per_group = [one_cycle_scheds(lr, div, div_final, pct_start, moms) for lr in lrs]
    scheds: dict[str, Any] = {"lr": [s["lr"] for s in per_group]}
    if "mom" in per_group[0]:
        scheds["mom"] = per_group[0]["mom"]
    _fit_scheduled(learn, scheds, wd, cbs, resume, n_epochs=n_epochs, steps=steps,
                   valid_every=valid_every)


def fit_flat_cos(learn: Learner, n_epochs: int | None = None, lr: Any = None,
                 div_final: float = 1e5, pct_start: float = 0.75, wd: float | None = None,
                 cbs: Iterable[Any] | None = None, resume: str | None = None, *,
                 steps: int | None = None, valid_every: int | None = None) -> None:
    """`learn.fit_flat_cos(n_epochs, lr)` (or `steps=N`): fit at a flat lr for `pct_start` of
    training, then anneal it to lr/div_final (cosine); `cbs`, `resume`, `steps` and
    `valid_every` as in `fit`."""
    lr = learn.lr if lr is None else lr
    check_lr(lr, "fit_flat_cos")
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr]
    scheds = {"lr": [flat_cos_scheds(v, div_final, pct_start)["lr"] for v in lrs]}
    _fit_scheduled(learn, scheds, wd, cbs, resume, n_epochs=n_epochs, steps=steps,
                   valid_every=valid_every)


def _uses_momentum(opt: Any) -> bool:
    if opt is None or "mom" not in supported_hypers(opt):
        return False
    mom = opt.mom
    return any(m > 0 for m in (mom if isinstance(mom, list) else [mom]))


def _fit_scheduled(learn: Learner, scheds: dict[str, Any], wd: float | None,
                   cbs: Iterable[Any] | None, resume: str | None, **length: Any) -> None:
    if learn.opt is None:
        learn.create_opt()
    if "mom" in scheds and not _uses_momentum(learn.opt):
        del scheds["mom"]  # plain SGD, Adagrad...: momentum is not switched on behind your back
        warnings.warn(f"{type(learn.opt).__name__} here uses no momentum, so the one-cycle "
                      "momentum schedule (moms=) is skipped; for it use "
                      "opt_func=partial(torch.optim.SGD, momentum=0.9) or torch.optim.Adam, "
                      "or pass moms=None to say you mean it", stacklevel=3)
    if len(scheds["lr"]) == 1:
        scheds["lr"] = scheds["lr"][0]  # one schedule for every param group
    if wd is not None:
        scheds["wd"] = sched_no(wd, wd)
    learn.fit(cbs=[ParamScheduler(**scheds), *(cbs or ())], resume=resume, **length)


def fine_tune(learn: Learner, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1,
              lr_mult: float = 100, pct_start: float = 0.3, div: float = 5.0,
              **kwargs: Any) -> None:
    """`learn.fine_tune(epochs)`: fastai's transfer-learning recipe: the head alone (the
    last param group) for `freeze_epochs`, then everything for `epochs` with rates from
    base_lr/2/lr_mult (first group) to base_lr/2 (last), each by one-cycle."""
    learn.freeze()
    learn.fit_one_cycle(freeze_epochs, base_lr, pct_start=0.99, **kwargs)
    base_lr /= 2
    learn.unfreeze()
    lrs = lr_range(base_lr / lr_mult, base_lr, len(learn.splits()))
    learn.fit_one_cycle(epochs, lrs if len(lrs) > 1 else lrs[0], pct_start=pct_start, div=div,
                        **kwargs)
