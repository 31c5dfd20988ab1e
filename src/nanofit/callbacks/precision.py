"""Mixed precision: autocast around the forward pass and the loss; a grad scaler for fp16."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..callback import Callback, Order
from ..optim import ScalerSteps

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
    of each epoch. A batch cancelled between backward and step closes the scaler's step.
    """

    order = Order.PRECISION

    def __init__(self, dtype: torch.dtype | None = None, n_inp: int | None = None) -> None:
        self.dtype = dtype
        self.n_inp = n_inp  # the course's MixedPrecision is a TrainCB(n_inp): the same here
        self.scaler: torch.amp.GradScaler | None = None
        self.skipped = 0
        self._amp: ScalerSteps | None = None
        self._depth = 0  # fits in progress: get_preds called from a callback runs one inside

    def before_fit(self, learn: Learner) -> None:
        self._depth += 1
        if self.n_inp is not None:
            learn.n_inp = self.n_inp
        if self._depth > 1:  # a helper fit inside the fit: keep the running fit's state
            learn.grad_scaler = self.scaler
            return
        param = next(learn.model.parameters())
        self.device_type = param.device.type
        if self.dtype is None:
            self.dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        use_scaler = self.dtype == torch.float16 and self.device_type == "cuda"
        if use_scaler and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda")
        learn.grad_scaler = self.scaler  # for callbacks that replace backward/step (GradAccumCB)
        if self.scaler is not None and learn.opt is not None:
            self._amp = ScalerSteps(self.scaler, learn.opt.opt)
        self._epoch_skipped = 0

    def cleanup_fit(self, learn: Learner) -> None:
        self._depth -= 1
        if self._depth:
            return
        learn.grad_scaler = None
        if self._amp is not None:
            self._amp.end()  # a fit stopped between backward and step
            self._amp.remove()
            self._amp = None

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
        if self.scaler is None or self._amp is None:
            learn.loss.backward()
            return
        self.scaler.scale(learn.loss).backward()
        self._amp.unscale()  # true gradients for clipping and inspection

    def step(self, learn: Learner) -> None:
        assert learn.opt is not None  # training batches have one
        if self._amp is None:
            learn.opt.step()
        elif not self._amp.step():  # the scaler skipped it: inf/NaN gradients
            self.skipped += 1
            self._epoch_skipped += 1

    def cleanup_batch(self, learn: Learner) -> None:
        if self._amp is not None:
            self._amp.end()  # cancelled (batch, epoch or fit) between backward and step

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
