"""Hyper-parameter schedules during training: ParamScheduler, and torch's lr schedulers."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..learner import Callback
from ..optim import HPOptimizer, hyper_access
from ..schedule import Schedule

__all__ = ["ParamScheduler", "BatchSchedCB", "EpochSchedCB"]


class ParamScheduler(Callback):
    """Sets hyper-parameters (lr, mom, wd, beta) from schedules before each training batch.

    Each schedule is a function of `pct_train = (epoch + iter / len(dl)) / n_epochs`, or a list
    of such functions, one per param group. Validation batches do not advance it.
    Example: `ParamScheduler(lr=sched_cos(1e-2, 1e-5), mom=sched_no(0.9, 0.9))`
    """

    order = 10
    run_in_lr_find = False  # the LR finder drives the learning rate itself

    def __init__(self, **scheds: Schedule | Sequence[Schedule]) -> None:
        if not scheds:
            raise ValueError("ParamScheduler needs at least one schedule, e.g. lr=sched_cos(1e-2, 0)")
        for name, sched in scheds.items():
            funcs = sched if isinstance(sched, (list, tuple)) else [sched]
            if not all(callable(f) for f in funcs):
                raise TypeError(f"ParamScheduler: the schedule for {name!r} must be a function of "
                                f"training progress (or a list of them), got {sched!r}")
        self.scheds = scheds

    def before_fit(self, learn: Any) -> None:
        if learn.opt is None:
            raise ValueError("ParamScheduler needs an optimizer: it schedules learn.opt's "
                             "hyper-parameters, and fit(train=False) makes none")
        if not hasattr(learn.dls.train, "__len__"):
            raise ValueError("ParamScheduler needs a training loader with a length (len(dl)) "
                             "to know how far through training each batch is")
        n_groups = len(learn.opt.param_groups)
        self._plan = []  # (one schedule or a list per group, put), resolved once, not per batch
        for name, sched in self.scheds.items():
            _, put = hyper_access(learn.opt, name)
            if isinstance(sched, (list, tuple)) and len(sched) != n_groups:
                raise ValueError(f"ParamScheduler: {len(sched)} schedules for {name!r} but the "
                                 f"optimizer has {n_groups} param groups")
            self._plan.append((sched, put))

    def before_batch(self, learn: Any) -> None:
        if not learn.training:
            return
        pos = (learn.epoch + learn.iter / learn.n_iter) / learn.n_epochs
        groups = learn.opt.param_groups
        for sched, put in self._plan:
            if isinstance(sched, (list, tuple)):
                for group, f in zip(groups, sched):
                    put(group, f(pos))
            else:
                value = sched(pos)  # once, whatever the number of groups
                for group in groups:
                    put(group, value)


def _torch_optimizer(learn: Any) -> Any:
    opt = learn.opt
    return opt.opt if isinstance(opt, HPOptimizer) else opt


class _TorchSchedCB(Callback):
    order = 65  # steps after the Recorder (60) has read the rate this batch/epoch used
    run_in_lr_find = False

    def __init__(self, sched: Callable[[Any], Any] | Any) -> None:
        if isinstance(sched, type) or (not callable(sched) and not hasattr(sched, "step")):
            raise TypeError("pass a torch lr scheduler, or a function making one from the "
                            "optimizer, e.g. partial(torch.optim.lr_scheduler.OneCycleLR, "
                            f"max_lr=0.1, total_steps=1000); got {sched!r}")
        self.sched = sched
        self.scheduler: Any = None

    def before_fit(self, learn: Any) -> None:
        if hasattr(self.sched, "step"):  # an LRScheduler instance, used as is
            self.scheduler = self.sched
        else:  # a factory: built here on the learner's (torch) optimizer
            self.scheduler = self.sched(_torch_optimizer(learn))


class BatchSchedCB(_TorchSchedCB):
    """Steps a torch lr scheduler after every training batch.

    `sched` is a scheduler, or a function taking the torch optimizer and returning one:
    `BatchSchedCB(partial(OneCycleLR, max_lr=0.1, total_steps=len(dls.train) * epochs))`
    """

    def after_batch(self, learn: Any) -> None:
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

    def before_fit(self, learn: Any) -> None:
        super().before_fit(learn)
        self.on_metric = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self.on_metric and getattr(learn, "metrics", None) not in learn.cbs:
            raise ValueError("EpochSchedCB with ReduceLROnPlateau steps on a validation metric: "
                             f"add a MetricsCB to cbs (monitor={self.monitor!r})")

    def after_epoch(self, learn: Any) -> None:
        if not self.on_metric:
            if learn.training:
                self.scheduler.step()
            return
        record = learn.metrics.history[-1]
        if record["train"] == "eval":
            if self.monitor not in record:
                raise ValueError(f"EpochSchedCB: monitor={self.monitor!r} is not among the "
                                 f"metrics {[k for k in record if k not in ('epoch', 'train')]}")
            self.scheduler.step(record[self.monitor])
