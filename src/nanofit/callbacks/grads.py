"""Gradient accumulation and clipping."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..callback import Callback, Order
from ..optim import HPOptimizer

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["GradAccumCB", "GradClipCB"]


def _opt(learn: Learner) -> HPOptimizer:
    if learn.opt is None:
        raise RuntimeError("GradAccumCB steps the optimizer, and the learner has none; pass "
                           "opt_func= to Learner")
    return learn.opt


class GradAccumCB(Callback):
    """Steps the optimizer once `n_acc` samples have been seen, as one batch of that size.

    Each batch's loss is scaled by batch_size / n_acc for backward only, so the accumulated
    gradient is that of the mean loss over the samples; `learn.loss` (what metrics and the
    recorder see) stays the true per-sample loss. Samples left over at the end of an epoch
    make one last, smaller step (rescaled to their mean), as a last smaller batch would.
    Pick `n_acc` as a multiple of the batch size; with batchnorm the statistics still see
    the small batches. With MixedPrecision (fp16) it uses `learn.grad_scaler`; while it
    accumulates, `learn.accumulating` is True (GradClipCB then waits for the step).
    """

    order = Order.ACCUMULATE

    def __init__(self, n_acc: int) -> None:
        if n_acc < 1:
            raise ValueError(f"GradAccumCB: n_acc must be >= 1 samples, got {n_acc}")
        self.n_acc = n_acc
        self.count = 0
        self.skipped = 0
        self._stepped = False

    def before_fit(self, learn: Learner) -> None:
        self.count, self._stepped = 0, False
        if learn.opt is not None:
            learn.opt.zero_grad()  # nothing left over from an earlier fit

    def backward(self, learn: Learner) -> None:
        n = len(learn.batch[learn.n_inp])
        loss = learn.loss * (n / self.n_acc)
        scaler = learn.grad_scaler  # set by MixedPrecision with fp16
        (scaler.scale(loss) if scaler is not None else loss).backward()
        self.count += n
        self._stepped = False
        learn.accumulating = self.count < self.n_acc
        if scaler is not None and not learn.accumulating:
            scaler.unscale_(_opt(learn).opt)  # true gradients for clipping, once per step

    def step(self, learn: Learner) -> None:
        if self.count >= self.n_acc:
            self._step(learn)

    def _step(self, learn: Learner) -> None:
        if self.count != self.n_acc:  # a short (or overfull) group: the mean over its samples
            with torch.no_grad():
                for p in learn.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.n_acc / self.count)
        scaler = learn.grad_scaler
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(_opt(learn).opt)
            scaler.update()
            if scaler.get_scale() < before:
                self.skipped += 1
                warnings.warn("GradAccumCB: an optimizer step was skipped because of inf/NaN "
                              "gradients (fp16 overflow)")
        else:
            _opt(learn).step()
        self.count, self._stepped = 0, True

    def zero_grad(self, learn: Learner) -> None:
        if self._stepped:
            _opt(learn).zero_grad()

    def after_epoch(self, learn: Learner) -> None:
        if learn.training and self.count > 0:  # the epoch's leftover samples
            scaler = learn.grad_scaler
            if scaler is not None:
                scaler.unscale_(_opt(learn).opt)
            self._step(learn)
            _opt(learn).zero_grad()
        learn.accumulating = False

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


class GradClipCB(Callback):
    """Clips the total gradient norm to `max_norm` before each optimizer step (after
    MixedPrecision unscaled it; with GradAccumCB only at the step, on the summed gradient);
    the norm before clipping is in `last_norm` (a device tensor: no sync)."""

    order = Order.CLIP

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm, self.norm_type = max_norm, norm_type
        self.last_norm: torch.Tensor | None = None

    def after_backward(self, learn: Learner) -> None:
        if learn.accumulating:
            return
        self.last_norm = torch.nn.utils.clip_grad_norm_(learn.model.parameters(), self.max_norm,
                                                        self.norm_type)
