"""Core callbacks: the explicit training steps, moving to a device, and a one-batch smoke test."""
from __future__ import annotations

from typing import Any

import torch

from ..learner import Callback, CancelFitException

__all__ = ["TrainCB", "DeviceCB", "SingleBatchCB", "def_device", "to_device", "to_cpu"]


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def_device: torch.device = _default_device()
"""The device nanofit uses by default: cuda if available, else mps, else cpu."""


def to_device(x: Any, device: torch.device | str = def_device, non_blocking: bool = False) -> Any:
    """Move tensors to `device`, recursing into tuples, lists and dicts; other values pass."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, dict):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        moved = [to_device(v, device, non_blocking) for v in x]
        if hasattr(x, "_fields"):  # a namedtuple keeps its type
            return type(x)(*moved)
        return type(x)(moved)
    return x


def to_cpu(x: Any) -> Any:
    """Detach tensors and move them to the CPU, recursing into tuples, lists and dicts."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        moved = [to_cpu(v) for v in x]
        return type(x)(*moved) if hasattr(x, "_fields") else type(x)(moved)
    return x


class TrainCB(Callback):
    """The five training steps made explicit; the first `n_inp` batch items go to the model."""

    def __init__(self, n_inp: int = 1) -> None:
        self.n_inp = n_inp

    def before_fit(self, learn: Any) -> None:
        learn.n_inp = self.n_inp  # so that metrics find the targets where this callback does

    def predict(self, learn: Any) -> None:
        learn.preds = learn.model(*learn.batch[: self.n_inp])

    def get_loss(self, learn: Any) -> None:
        learn.loss = learn.loss_func(learn.preds, *learn.batch[self.n_inp:])

    def backward(self, learn: Any) -> None:
        learn.loss.backward()

    def step(self, learn: Any) -> None:
        if learn.opt is None:
            raise RuntimeError("TrainCB.step: the learner has no optimizer; pass opt_func= to "
                               "Learner")
        learn.opt.step()

    def zero_grad(self, learn: Any) -> None:
        if learn.opt is not None:
            learn.opt.zero_grad()


class DeviceCB(Callback):
    """Moves the model to `device` at `before_fit` and every batch to it at `before_batch`."""

    order = -10  # before anything that looks at the batch

    def __init__(self, device: torch.device | str = def_device) -> None:
        self.device = torch.device(device)
        # Copies from pinned host memory to a GPU can overlap with compute.
        self.non_blocking = self.device.type == "cuda"

    def before_fit(self, learn: Any) -> None:
        learn.model.to(self.device)

    def before_batch(self, learn: Any) -> None:
        learn.batch = to_device(learn.batch, self.device, self.non_blocking)


class SingleBatchCB(Callback):
    """Runs one batch, then cancels the fit: a quick check that everything plugs together."""

    order = 1

    def after_batch(self, learn: Any) -> None:
        raise CancelFitException()
