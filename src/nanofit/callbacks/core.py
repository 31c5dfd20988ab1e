"""Core callbacks: the explicit training steps, moving to a device, and a one-batch smoke test."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..callback import Callback, CancelFitException, Order
from ..torch_utils import def_device, to_device

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["TrainCB", "DeviceCB", "SingleBatchCB"]


class TrainCB(Callback):
    """The five training steps made explicit; the first `n_inp` batch items go to the model."""

    def __init__(self, n_inp: int = 1) -> None:
        self.n_inp = n_inp

    def before_fit(self, learn: Learner) -> None:
        learn.n_inp = self.n_inp  # so that metrics find the targets where this callback does

    def predict(self, learn: Learner) -> None:
        learn.preds = learn.model(*learn.batch[: self.n_inp])

    def get_loss(self, learn: Learner) -> None:
        learn.loss = learn.loss_func(learn.preds, *learn.batch[self.n_inp:])

    def backward(self, learn: Learner) -> None:
        learn.loss.backward()

    def step(self, learn: Learner) -> None:
        if learn.opt is None:
            raise RuntimeError("TrainCB.step: the learner has no optimizer; pass opt_func= to "
                               "Learner")
        learn.opt.step()

    def zero_grad(self, learn: Learner) -> None:
        if learn.opt is not None:
            learn.opt.zero_grad()


class DeviceCB(Callback):
    """Moves the model to `device` at `before_fit` and every batch to it at `before_batch`."""

    order = Order.DEVICE

    def __init__(self, device: torch.device | str = def_device) -> None:
        self.device = torch.device(device)
        # Copies from pinned host memory to a GPU can overlap with compute.
        self.non_blocking = self.device.type == "cuda"

    def before_fit(self, learn: Learner) -> None:
        learn.model.to(self.device)

    def before_batch(self, learn: Learner) -> None:
        learn.batch = to_device(learn.batch, self.device, self.non_blocking)


class SingleBatchCB(Callback):
    """Runs one batch, then cancels the fit: a quick check that everything plugs together."""

    order = Order.SINGLE_BATCH

    def after_batch(self, learn: Learner) -> None:
        raise CancelFitException()
