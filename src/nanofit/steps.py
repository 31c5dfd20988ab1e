"""Fits counted in steps: the plan of a fit (epochs, or steps in rounds), and the loader helpers
a stream of training batches needs (`set_epoch`, a loader's own saved position).

A step-based fit, `fit(steps=N, valid_every=K)`, trains N batches drawn from passes over the
training loader one after another, in rounds of K training batches each followed by a
validation phase. A round is an epoch stage for the callbacks: `before_epoch`/`after_epoch`
fire per phase, `learn.epoch` counts rounds and `learn.n_epochs` is their number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .torch_utils import length

__all__ = ["FitPlan", "plan_fit", "set_epoch", "state_owner"]


@dataclass(frozen=True)
class FitPlan:
    """What a fit will run: `n_epochs` epochs (rounds when `by_steps`) and `total_steps`
    training batches (None: unknown, an epoch fit on a loader without a length); `valid_every`
    is the round length of a step-based fit."""

    n_epochs: int
    total_steps: int | None
    valid_every: int | None = None
    by_steps: bool = False

    def round_end(self, epoch: int) -> int:
        """The step count at which round `epoch` of a step-based fit ends."""
        assert self.by_steps and self.total_steps is not None and self.valid_every
        return min((epoch + 1) * self.valid_every, self.total_steps)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def plan_fit(train_dl: Any, n_epochs: int | None, steps: int | None,
             valid_every: int | None) -> FitPlan:
    """The plan of `fit(n_epochs)` or `fit(steps=N, valid_every=K)`; a clear error for what
    cannot work. Neither given: one epoch."""
    if isinstance(n_epochs, float) and n_epochs < 1:
        raise ValueError(f"fit: n_epochs={n_epochs!r} looks like a learning rate: the first "
                         "argument is the number of epochs; pass the rate as lr= (fit) or "
                         "lr_max= (fit_one_cycle), and the length as n_epochs or steps=")
    if n_epochs is not None and steps is not None:
        raise ValueError(f"fit: give n_epochs ({n_epochs!r}) or steps ({steps!r}), not both: "
                         "fit(3) trains 3 passes over dls.train, fit(steps=1000) 1000 batches")
    if n_epochs is not None and not _is_count(n_epochs):
        raise ValueError(f"fit: n_epochs must be an int >= 1, got {n_epochs!r}")
    if steps is not None and not _is_count(steps):
        raise ValueError(f"fit: steps must be an int >= 1 (training batches), got {steps!r}")
    if valid_every is not None and not _is_count(valid_every):
        raise ValueError(f"fit: valid_every must be an int >= 1 (training batches between "
                         f"validations) or None, got {valid_every!r}")
    n_batches = length(train_dl)
    if steps is None and valid_every is None:  # an epoch fit
        n = n_epochs or 1
        return FitPlan(n, None if n_batches is None else n * n_batches)
    if steps is None:  # epochs validated every K batches: n_epochs passes, counted in steps
        if n_batches is None:
            raise ValueError(f"fit(n_epochs, valid_every=...) needs a training loader with a "
                             f"length; {type(train_dl).__name__} has none: use "
                             f"fit(steps=N, valid_every={valid_every}) instead")
        steps = (n_epochs or 1) * n_batches
    every = valid_every or steps
    return FitPlan(math.ceil(steps / every), steps, every, True)


def set_epoch(dl: Any, epoch: int) -> None:
    """Tell the loader's sampler (a DistributedSampler, ...), the loader itself or its dataset
    (a Hugging Face streaming dataset reseeds its shuffle) which pass over the data starts, so
    it reshuffles: what DDP training needs each pass."""
    for target in (getattr(dl, "sampler", None), dl, getattr(dl, "dataset", None)):
        if callable(getattr(target, "set_epoch", None)):
            target.set_epoch(epoch)  # type: ignore[union-attr]
            return


def state_owner(dl: Any) -> Any:
    """What holds the position of loader `dl` in its own state_dict()/load_state_dict(): the
    loader itself (torchdata's StatefulDataLoader, yours), or the IterableDataset of a torch
    DataLoader without workers (a Hugging Face streaming dataset); None when nothing does."""
    def stateful(obj: Any) -> bool:
        return callable(getattr(obj, "state_dict", None)) and \
            callable(getattr(obj, "load_state_dict", None))

    if stateful(dl) and not isinstance(dl, torch.nn.Module):
        return dl
    ds = getattr(dl, "dataset", None)
    if isinstance(dl, torch.utils.data.DataLoader) and dl.num_workers == 0 and \
            isinstance(ds, torch.utils.data.IterableDataset) and stateful(ds):
        return ds
    return None
