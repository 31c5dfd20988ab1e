"""Gradient accumulation and clipping."""
from __future__ import annotations

from typing import Any

import torch

from ..learner import Callback

__all__ = ["GradAccumCB", "GradClipCB"]


class GradAccumCB(Callback):
    """Steps the optimizer once `n_acc` samples have been seen, as one batch of that size.

    Each batch's loss is scaled by batch_size / n_acc for backward only, so the accumulated
    gradient is that of the mean loss over all the samples; `learn.loss` (what metrics and
    the recorder see) stays the true per-sample loss. Use it without batchnorm, whose
    statistics still see the small batches.
    """

    order = 10  # its backward/step/zero_grad replace the learner's defaults

    def __init__(self, n_acc: int) -> None:
        if n_acc < 1:
            raise ValueError(f"GradAccumCB: n_acc must be >= 1 samples, got {n_acc}")
        self.n_acc = n_acc
        self.count = 0

    def before_fit(self, learn: Any) -> None:
        self.count = 0

    def backward(self, learn: Any) -> None:
        n = len(learn.batch[learn.n_inp])
        loss = learn.loss * (n / self.n_acc)
        scaler = getattr(learn, "grad_scaler", None)  # set by MixedPrecision with fp16
        (scaler.scale(loss) if scaler is not None else loss).backward()
        self.count += n
        self._stepped = False
        if scaler is not None and self.count >= self.n_acc:
            scaler.unscale_(learn.opt.opt)  # true gradients for clipping, once per step

    def step(self, learn: Any) -> None:
        if self.count < self.n_acc:
            return
        scaler = getattr(learn, "grad_scaler", None)
        if scaler is not None:
            scaler.step(learn.opt.opt)
            scaler.update()
        else:
            learn.opt.step()
        self.count, self._stepped = 0, True

    def zero_grad(self, learn: Any) -> None:
        if getattr(self, "_stepped", False):
            learn.opt.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


class GradClipCB(Callback):
    """Clips the total gradient norm to `max_norm` after backward (after MixedPrecision has
    unscaled it); the norm before clipping is in `last_norm` (a device tensor: no sync)."""

    order = 20  # after MixedPrecision (5) in after_backward

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm, self.norm_type = max_norm, norm_type
        self.last_norm: torch.Tensor | None = None

    def after_backward(self, learn: Any) -> None:
        self.last_norm = torch.nn.utils.clip_grad_norm_(learn.model.parameters(), self.max_norm,
                                                        self.norm_type)
