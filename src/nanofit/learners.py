"""Learners built on the Learner: TrainLearner and MomentumLearner spell out the training
steps (the subclassing alternative to callbacks, as in the course); load_learner rebuilds one
from `learn.export`."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .augment import Normalize
from .callbacks.transforms import BatchTransformCB
from .export import read_export
from .learner import Learner

__all__ = ["TrainLearner", "MomentumLearner", "load_learner"]


class TrainLearner(Learner):
    """A Learner subclass spelling out the five steps (the subclassing alternative to TrainCB)."""

    def predict(self, x: Any = None, act: Callable | None = None) -> Any:
        if x is not None:  # inference: learn.predict(x)
            return super().predict(x, act)
        self.preds = self.model(self.batch[0])
        return None

    def get_loss(self) -> None:
        self.loss = self.loss_func(self.preds, self.batch[1])

    def backward(self) -> None:
        self.loss.backward()

    def step(self) -> None:  # type: ignore[override]  # the step method, not the count
        assert self.opt is not None, "pass opt_func= to the learner"
        self.opt.step()

    def zero_grad(self) -> None:
        assert self.opt is not None, "pass opt_func= to the learner"
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


def load_learner(path: str | Path, cpu: bool = True, allowed: tuple = ()) -> Learner:
    """A Learner for inference from `learn.export(path)`: the model rebuilt from its
    constructor (or its description as torch.nn layers) and weights, normalisation and vocab
    restored. Runs no code from the file: the constructor must be marked @nanofit.exportable
    or be one of `allowed`; described layers must be torch.nn classes of
    `nanofit.registry.LAYERS`, with plain-data arguments of the kinds listed there."""
    model, obj = read_export(path, cpu, allowed)
    cbs = []
    if obj.get("normalize"):
        cbs.append(BatchTransformCB(Normalize(obj["normalize"]["mean"], obj["normalize"]["std"])))
    learn = Learner(model, None, cbs=cbs, n_inp=obj.get("n_inp", 1))
    learn.item_ndim = obj.get("item_ndim")
    learn.vocab = obj.get("vocab")
    return learn
