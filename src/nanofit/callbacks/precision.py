"""Mixed precision: autocast around the forward pass and the loss; a grad scaler for fp16."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..callback import Callback, Order
from ..optim import StepCount

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["MixedPrecision"]


class MixedPrecision(Callback):
    """Runs predict and get_loss under `torch.autocast`: float16 with a GradScaler on CUDA,
    bfloat16 on CPU (no scaler needed). It wraps those two steps (`wrap_handler`), whichever
    callback (MixUp, TrainCB...) or Learner subclass runs them.

    With fp16 the gradients are unscaled right after backward, so GradClipCB and anything else
    at `after_backward` sees true gradients. Steps the scaler skips (inf/NaN gradients) are
    counted in `skipped`, without a host sync beyond the scaler's own, and reported at the end
    of each epoch. A batch cancelled after backward ends the scaler's step cleanly.
    """

    order = Order.PRECISION

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.scaler: torch.amp.GradScaler | None = None
        self.skipped = 0
        self._steps: StepCount | None = None
        self._unscaled = False  # unscale_ ran for a step that has not been taken yet

    def before_fit(self, learn: Learner) -> None:
        param = next(learn.model.parameters())
        self.device_type = param.device.type
        if self.dtype is None:
            self.dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        use_scaler = self.dtype == torch.float16 and self.device_type == "cuda"
        if use_scaler and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda")
        learn.grad_scaler = self.scaler  # for callbacks that replace backward/step (GradAccumCB)
        if self.scaler is not None and learn.opt is not None:
            self._steps = StepCount(learn.opt.opt)
        self._epoch_skipped, self._unscaled = 0, False

    def cleanup_fit(self, learn: Learner) -> None:
        self._end_scaler_step()  # a fit stopped between backward and step
        learn.grad_scaler = None
        if self._steps is not None:
            self._steps.remove()
            self._steps = None

    def wrap_handler(self, event: str, fn: Callable[[Learner], None]) -> Callable[[Learner], None]:
        """The forward steps (predict, get_loss) run inside autocast; the rest as they are."""
        if event not in ("predict", "get_loss"):
            return fn

        def autocast(learn: Learner) -> None:
            with torch.autocast(self.device_type, dtype=self.dtype):
                fn(learn)
        autocast.__wrapped__ = fn  # type: ignore[attr-defined]
        return autocast

    def backward(self, learn: Learner) -> None:
        if self.scaler is None:
            learn.loss.backward()
            return
        self.scaler.scale(learn.loss).backward()
        assert learn.opt is not None  # training batches have one
        self.scaler.unscale_(learn.opt.opt)  # true gradients for clipping and inspection
        self._unscaled = True

    def step(self, learn: Learner) -> None:
        assert learn.opt is not None  # training batches have one
        if self.scaler is None or self._steps is None:
            learn.opt.step()
            return
        taken = self._steps.n
        self.scaler.step(learn.opt.opt)
        self.scaler.update()
        self._unscaled = False
        if self._steps.n == taken:  # the scaler skipped this step: inf/NaN gradients
            self.skipped += 1
            self._epoch_skipped += 1

    def after_cancel_batch(self, learn: Learner) -> None:
        self._end_scaler_step()

    def _end_scaler_step(self) -> None:
        """A batch was cancelled after unscale_ and before the step: close the scaler's
        iteration (update), or its next unscale_ would fail."""
        if self._unscaled and self.scaler is not None:
            self.scaler.update()
        self._unscaled = False

    def after_epoch(self, learn: Learner) -> None:
        if learn.training and self._epoch_skipped:
            warnings.warn(f"MixedPrecision: {self._epoch_skipped} optimizer step(s) in epoch "
                          f"{learn.epoch} were skipped because of inf/NaN gradients (fp16 "
                          "overflow)")
            self._epoch_skipped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["scaler"] is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = state["skipped"]
