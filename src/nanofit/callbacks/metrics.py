"""Metrics per epoch phase (MetricsCB). The per-batch record for plots is in recorder.py
(`Recorder`, importable from here as before)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ..callback import Callback, Order
from ..distributed import is_distributed
from ..torch_utils import logits_of
from .recorder import Recorder  # its home is recorder.py; importable from here as before

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["MetricsCB", "Recorder", "RECORD_KEYS"]


# The keys of a MetricsCB record that are not metric values.
RECORD_KEYS = ("epoch", "step", "train")


def _to_python(value: Any) -> Any:
    """A metric's result as plain Python: a float for one number, else a (nested) list.
    Tensors and NumPy values (a hand-written metric's) alike."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.detach().cpu().tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.item() if value.size == 1 else value.tolist()
    return value


def _metric_state(m: Any) -> dict[str, Any] | None:
    """A metric's accumulated state: torchmetrics' `metric_state`, or the metric's own
    `state_dict()`; None when it has neither (its phase restarts empty on resume)."""
    if hasattr(m, "metric_state") and hasattr(m, "_update_count"):
        return {"states": {k: (v.detach().clone() if isinstance(v, torch.Tensor) else
                               [t.detach().clone() for t in v]) for k, v in m.metric_state.items()},
                "updated": m._update_count > 0}
    if callable(getattr(m, "state_dict", None)) and not isinstance(m, torch.nn.Module):
        return {"own": m.state_dict()}
    return None


def _load_metric_state(m: Any, state: dict[str, Any]) -> None:
    if "own" in state:
        m.load_state_dict(state["own"])
        return
    for k, v in state["states"].items():
        setattr(m, k, v)
    m._update_count = int(state["updated"])  # how the updates were batched does not matter
    m._computed = None  # torchmetrics caches compute(); the cache is stale now


def _check_same_keys(record: dict[str, Any]) -> None:
    """Every rank must record the same metrics, or the reductions above mixed up values."""
    keys: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(keys, sorted(record))
    if any(k != keys[0] for k in keys):
        raise ValueError("MetricsCB: the ranks record different metrics "
                         f"({dict(enumerate(keys))}); give every process the same MetricsCB")


def _shape(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)} ({x.dtype})"
    return f"type {type(x).__name__}"


class PhaseLoss:
    """The current phase's batch-size-weighted mean loss as a metric object: `compute()`."""

    def __init__(self, metrics: MetricsCB) -> None:
        self._metrics = metrics

    def compute(self) -> torch.Tensor:
        return torch.as_tensor(self._metrics.mean_loss())

    def reset(self) -> None:
        """MetricsCB resets the running totals itself at each phase's start."""


class MetricsCB(Callback):
    """Computes metrics and the batch-size-weighted mean loss for every epoch phase.

    Metrics are torchmetrics objects, or anything with `update(preds, targ)`, `compute()` and
    `reset()`. After each phase a record `{'epoch', 'step', 'train': 'train'|'eval', 'loss',
    <name>...}` is appended to `history` (`step`: training batches done in the fit); the learner
    gets `learn.metrics = self`.

    Targets are `batch[n_inp]`; for a dict batch, `batch[target]` (default "labels", the Hugging
    Face name). Predictions are `learn.preds`, or their `logits` when the model returns an
    output with logits (a `transformers` ModelOutput, a dict): `MetricsCB(acc, target="labels")`.

    Per batch this only keeps references to the detached predictions, targets and loss: they are
    concatenated and given to each metric's `update` once every `update_every` batches (or when
    `max_buffered` prediction elements are held), because a metric call costs about as much as a
    small model's whole step. Results are the same for metrics that accumulate over samples (all
    torchmetrics metrics do); set `update_every=1` for a metric that must see single batches.

    Example: `MetricsCB(accuracy=MulticlassAccuracy(num_classes=10))`
    """

    order = Order.METRICS
    main_fit_only = True

    def __init__(self, *ms: Any, update_every: int = 64, max_buffered: int = 2**24,
                 target: str | int | None = None, **metrics: Any) -> None:
        for m in ms:
            metrics[type(m).__name__] = m
        for name, m in metrics.items():
            if isinstance(m, type):
                raise TypeError(f"MetricsCB got the class {m.__name__} for {name!r}; "
                                f"pass an instance, e.g. {m.__name__}(...)")
            missing = [a for a in ("update", "compute", "reset")
                       if not callable(getattr(m, a, None))]
            if missing:
                raise TypeError(f"MetricsCB: metric {name!r} ({type(m).__name__}) has no "
                                f"{', '.join(missing)} method; use a torchmetrics metric or an "
                                "object with update(preds, targ), compute() and reset()")
        if {"loss", "epoch", "step", "train"} & set(metrics):
            raise ValueError("MetricsCB: 'loss', 'epoch', 'step' and 'train' are record keys; "
                             "name the metric differently")
        if update_every < 1:
            raise ValueError(f"MetricsCB: update_every must be >= 1, got {update_every}")
        self.metrics: dict[str, Any] = metrics
        self.target = target
        self.by_steps = False  # set at before_fit: records of a step fit show the step
        self.update_every = update_every
        self.max_buffered = max_buffered
        self.history: list[dict[str, Any]] = []
        self.loss = PhaseLoss(self)  # the course's `metrics.loss`: the phase's mean loss
        self._fit_start = 0  # where this fit's records start in history
        self._checked = False
        self._clear_buffers()
        self._reset_totals()

    def _clear_buffers(self) -> None:
        self._preds: list[Any] = []
        self._targs: list[Any] = []
        self._losses: list[torch.Tensor] = []
        self._ns: list[int] = []
        self._buffered = 0

    def _reset_totals(self) -> None:
        self._loss_sum: torch.Tensor | float = 0.0
        self._count = 0

    def before_fit(self, learn: Learner) -> None:
        learn.metrics = self
        self.by_steps = learn.by_steps  # rows carry the step (fit(steps=...))
        self._checked = False
        self._fit_start = len(self.history)

    def before_epoch(self, learn: Learner) -> None:
        for m in self.metrics.values():
            m.reset()
        self._clear_buffers()
        self._reset_totals()

    def after_batch(self, learn: Learner) -> None:
        batch = learn.batch
        key = self.target if self.target is not None else (
            "labels" if isinstance(batch, dict) else learn.n_inp)
        try:
            targ = batch[key]
        except (IndexError, KeyError, TypeError):
            if isinstance(batch, dict):
                raise ValueError(f"MetricsCB needs the targets at batch[{key!r}], but the dict "
                                 f"batch has the keys {list(batch)}; name them with "
                                 "MetricsCB(..., target='<key>')") from None
            if isinstance(key, str):
                raise ValueError(f"MetricsCB(target={key!r}) names a key of a dict batch, but "
                                 f"the batch is a {type(batch).__name__}; leave target out "
                                 "(targets are batch[n_inp]) or give an index") from None
            raise ValueError(f"MetricsCB needs the targets at batch[{key}] (after the "
                             f"n_inp={learn.n_inp} inputs), but the batch is "
                             f"{type(batch).__name__} of length "
                             f"{len(batch) if hasattr(batch, '__len__') else '?'}; "
                             "set Learner(n_inp=...) or yield (inputs..., targets)") from None
        preds = learn.preds
        if not isinstance(preds, torch.Tensor):
            preds = logits_of(preds)
        if isinstance(preds, torch.Tensor):
            preds = preds.detach()
            self._buffered += preds.numel()
        self._preds.append(preds)
        self._targs.append(targ)
        self._losses.append(learn.loss.detach())
        self._ns.append(len(targ))
        if (len(self._ns) >= self.update_every or self._buffered >= self.max_buffered
                or not self._checked):  # the first batch goes through at once: errors show early
            self.flush()
            self._checked = True

    def flush(self) -> None:
        """Hand the buffered batches to the metrics and the loss total."""
        if not self._ns:
            return
        device = self._losses[-1].device  # batches restored from a checkpoint sit on the CPU
        losses = torch.stack([x.to(device) for x in self._losses]).float()
        weights = torch.tensor(self._ns, dtype=torch.float32).to(losses.device, non_blocking=True)
        self._loss_sum = self._loss_sum + (losses * weights).sum()
        self._count += sum(self._ns)
        if self.metrics:
            for preds, targ in self._joined():
                for name, m in self.metrics.items():
                    if isinstance(m, torch.nn.Module) and isinstance(preds, torch.Tensor):
                        m.to(preds.device)
                    try:
                        m.update(preds, targ)
                    except Exception as e:
                        e.add_note(f"metric {name!r} ({type(m).__name__}) got preds of "
                                   f"{_shape(preds)} and targets of {_shape(targ)}")
                        raise
        self._clear_buffers()

    def _joined(self) -> list[tuple[Any, Any]]:
        """One (preds, targ) pair for all buffered batches, or the single batches if they differ."""
        ps, ts = self._preds, self._targs
        tensors = all(isinstance(x, torch.Tensor) for x in ps + ts)
        if len(ps) > 1 and tensors and len({p.shape[1:] for p in ps}) == 1 \
                and len({t.shape[1:] for t in ts}) == 1:
            dp, dt = ps[-1].device, ts[-1].device
            return [(torch.cat([p.to(dp) for p in ps]), torch.cat([t.to(dt) for t in ts]))]
        return list(zip(ps, ts))

    def compute(self) -> dict[str, Any]:
        """The current phase's loss and metrics as plain Python values (one host sync).

        Under torch.distributed the loss is the sample-weighted mean over all ranks and
        torchmetrics metrics sync their states, so every rank gets the same numbers."""
        values = {"loss": _to_python(self.mean_loss())}
        for name, m in self.metrics.items():
            values[name] = _to_python(m.compute())
        return values

    def mean_loss(self) -> Any:
        """The batch-size-weighted mean loss of the current phase (over all ranks)."""
        self.flush()
        loss_sum, count = self._loss_sum, self._count
        if is_distributed():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            total = torch.tensor([float(loss_sum), float(count)], dtype=torch.float64,
                                 device=device)
            dist.all_reduce(total)
            loss_sum, n = total[0].item(), total[1].item()
        else:
            n = count
        return loss_sum / n if n else float("nan")

    def after_epoch(self, learn: Learner) -> None:
        record = {"epoch": learn.epoch, "step": learn.step,
                  "train": "train" if learn.training else "eval"}
        record.update(self.compute())
        if is_distributed():
            _check_same_keys(record)
        self.history.append(record)
        self._log(record)

    def _log(self, record: dict[str, Any]) -> None:
        """Called with each phase's record, once per phase. Nothing by default (ProgressCB and
        the loggers show the records); the course's subclasses override it (a W&B logger) or
        replace it (`learn.metrics._log = ...`), as in miniai."""

    @property
    def all_metrics(self) -> dict[str, Any]:
        """The metrics and the loss by name, each with `compute()`, as the course's MetricsCB."""
        return {**self.metrics, "loss": self.loss}

    def cleanup_epoch(self, learn: Learner) -> None:
        self._clear_buffers()  # a cancelled or failed phase must not hold on to its tensors

    def epoch_row(self, epoch: int) -> dict[str, Any]:
        """The latest records of `epoch` as one row, {'epoch', 'train_loss', ..., 'valid_loss',
        ...} ('step' after 'epoch' in a step fit): the format of the progress table, CSVLogger
        and TensorBoardCB."""
        row: dict[str, Any] = {"epoch": epoch}
        latest: list[dict[str, Any]] = []
        for record in reversed(self.history[self._fit_start:]):  # this fit's, not older ones
            if record["epoch"] != epoch or any(r["train"] == record["train"] for r in latest):
                break
            latest.insert(0, record)
        for record in latest:
            prefix = "train" if record["train"] == "train" else "valid"
            if self.by_steps and "step" in record:
                row["step"] = record["step"]
            row.update({f"{prefix}_{k}": v for k, v in record.items()
                        if k not in ("epoch", "step", "train")})
        return row

    def state_dict(self) -> dict[str, Any]:
        """The history and everything of the current phase so far: running totals, metric
        states and the batches not yet handed to the metrics. Saving does not flush, so a run
        that saved a checkpoint adds up its numbers in the same order as one that did not."""
        loss_sum = self._loss_sum
        if isinstance(loss_sum, torch.Tensor):
            loss_sum = loss_sum.detach().clone()
        return {"history": copy.deepcopy(self.history), "fit_start": self._fit_start,
                "loss_sum": loss_sum,
                "count": self._count, "checked": self._checked,
                "pending": {"preds": list(self._preds), "targs": list(self._targs),
                            "losses": list(self._losses), "ns": list(self._ns),
                            "buffered": self._buffered},
                "metrics": {name: _metric_state(m) for name, m in self.metrics.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = copy.deepcopy(state["history"])
        self._fit_start = state.get("fit_start", 0)
        self._loss_sum, self._count = state.get("loss_sum", 0.0), state.get("count", 0)
        self._checked = state.get("checked", self._checked)
        pending = state.get("pending")
        self._clear_buffers()
        if pending:
            self._preds, self._targs = list(pending["preds"]), list(pending["targs"])
            self._losses, self._ns = list(pending["losses"]), list(pending["ns"])
            self._buffered = pending["buffered"]
        for name, m_state in state.get("metrics", {}).items():
            if name in self.metrics and m_state is not None:
                _load_metric_state(self.metrics[name], m_state)

