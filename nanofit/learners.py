"""Learner subclasses that spell out the training steps (the subclassing alternative to
callbacks): TrainLearner, and MomentumLearner as in the course."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .learner import Learner

__all__ = ["TrainLearner", "MomentumLearner"]


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
