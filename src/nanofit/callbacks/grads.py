"""Gradient accumulation and clipping."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..callback import Callback, Order
from ..optim import HPOptimizer, StepCount

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
    make one last, smaller step (rescaled to their mean), as a last smaller batch would; its
    gradient goes through `after_backward` (GradClipCB clips it) like any other.
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
        self._unscaled = False  # the group's gradient was unscaled; its step is still to come
        self._steps: StepCount | None = None

    def before_fit(self, learn: Learner) -> None:
        self.count, self._stepped, self._unscaled = 0, False, False
        if learn.opt is not None:
            learn.opt.zero_grad()  # nothing left over from an earlier fit
            if learn.grad_scaler is not None:
                self._steps = StepCount(learn.opt.opt)

    def cleanup_fit(self, learn: Learner) -> None:
        self._end_scaler_step(learn)
        if self._steps is not None:
            self._steps.remove()
            self._steps = None

    def backward(self, learn: Learner) -> None:
        n = len(learn.batch[learn.n_inp])
        loss = learn.loss * (n / self.n_acc)
        scaler = learn.grad_scaler  # set by MixedPrecision with fp16
        (scaler.scale(loss) if scaler is not None else loss).backward()
        self.count += n
        self._stepped = False
        learn.accumulating = self.count < self.n_acc
        if not learn.accumulating:
            self._finish_gradient(learn)

    def _finish_gradient(self, learn: Learner) -> None:
        """Make the group's gradient the one to step with: the mean over its samples (a short
        or overfull group is rescaled), unscaled (fp16), before after_backward sees it."""
        if self.count != self.n_acc:
            with torch.no_grad():
                for p in learn.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.n_acc / self.count)
        if learn.grad_scaler is not None:
            learn.grad_scaler.unscale_(_opt(learn).opt)
            self._unscaled = True

    def step(self, learn: Learner) -> None:
        if self.count >= self.n_acc:
            self._step(learn)

    def _step(self, learn: Learner) -> None:
        scaler = learn.grad_scaler
        if scaler is None or self._steps is None:
            _opt(learn).step()
        else:
            taken = self._steps.n
            scaler.step(_opt(learn).opt)
            scaler.update()
            self._unscaled = False
            if self._steps.n == taken:  # skipped by the scaler: no host sync to find out
                self.skipped += 1
                warnings.warn("GradAccumCB: an optimizer step was skipped because of inf/NaN "
                              "gradients (fp16 overflow)")
        self.count, self._stepped = 0, True

    def zero_grad(self, learn: Learner) -> None:
        if self._stepped:
            _opt(learn).zero_grad()

    def after_cancel_batch(self, learn: Learner) -> None:
        self._end_scaler_step(learn)

    def _end_scaler_step(self, learn: Learner) -> None:
        """Cancelled between unscale_ and the step: close the scaler's iteration."""
        if self._unscaled and learn.grad_scaler is not None:
            learn.grad_scaler.update()
        self._unscaled = False

    def after_epoch(self, learn: Learner) -> None:
        if learn.training and self.count > 0:  # the epoch's leftover samples: one more step
            learn.accumulating = False
            self._finish_gradient(learn)
            learn.callback("after_backward")  # its gradient is ready: GradClipCB clips it
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
