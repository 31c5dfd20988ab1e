"""Gradient accumulation and clipping."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..callback import Callback, Order
from ..optim import HPOptimizer, ScalerSteps
from ..torch_utils import n_items

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
    recorder see) stays the true per-sample loss. The samples left over at an epoch's last
    batch make one smaller step there (rescaled to their mean), as a last smaller batch would,
    clipped like the others. (A loader without a length cannot say which batch is its last:
    its leftover group steps after the epoch, without `after_backward`, so unclipped.)
    Pick `n_acc` as a multiple of the batch size; with batchnorm the statistics still see
    the small batches. With MixedPrecision it steps through `learn.grad_scaler` (fp16: the
    GradScaler; bf16: the check that skips steps with inf/NaN gradients); while it
    accumulates, `learn.accumulating` is True (GradClipCB then waits for the step).
    """

    order = Order.ACCUMULATE
    run_in_inference = False  # nothing to accumulate, and gathered gradients must stay

    def __init__(self, n_acc: int) -> None:
        if n_acc < 1:
            raise ValueError(f"GradAccumCB: n_acc must be >= 1 samples, got {n_acc}")
        self.n_acc = n_acc
        self.count = 0
        self.skipped = 0
        self._stepped = False
        self._amp: ScalerSteps | None = None
        self._fsdp: Any = None  # a sharded model (FSDP2): no gradient sync while accumulating
        self._no_sync = False

    def before_fit(self, learn: Learner) -> None:
        self.count, self._stepped = 0, False
        if learn.opt is not None:
            learn.opt.zero_grad()  # nothing left over from an earlier fit
            if learn.grad_scaler is not None:
                self._amp = ScalerSteps(learn.grad_scaler, learn.opt.opt)
        # FSDPCB (before us) sharded it: between steps, keep the gradients unreduced and the
        # parameters gathered, as fully_shard allows
        model = learn.model
        self._fsdp = model if hasattr(model, "set_requires_gradient_sync") else None

    def cleanup_fit(self, learn: Learner) -> None:
        self._sync(True)
        self._fsdp = None
        if self._amp is not None:
            self._amp.end()
            self._amp.remove()
            self._amp = None

    def backward(self, learn: Learner) -> None:
        n = n_items(learn.batch, learn.n_inp)
        loss = learn.loss * (n / self.n_acc)
        last = learn.n_iter > 0 and learn.iter == learn.n_iter - 1  # the epoch's last batch
        learn.accumulating = self.count + n < self.n_acc and not last
        if self._fsdp is not None:
            self._sync(not learn.accumulating)
        scaler = learn.grad_scaler  # set by MixedPrecision (fp16: scales the loss; bf16: 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        self.count += n
        self._stepped = False
        if not learn.accumulating:
            self._finish_gradient(learn)

    def _finish_gradient(self, learn: Learner) -> None:
        """Make the group's gradient the one to step with, before after_backward sees it: the
        mean over its samples (a short or overfull group is rescaled), unscaled (fp16)."""
        if self.count != self.n_acc:
            with torch.no_grad():
                for p in learn.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.n_acc / self.count)
        if self._amp is not None:
            self._amp.unscale()

    def _sync(self, sync: bool) -> None:
        """Tell FSDP whether this backward reduces the gradients (the group's last) or only
        accumulates them unsharded, keeping the parameters gathered (only on a change)."""
        if self._fsdp is not None and self._no_sync == sync:
            self._fsdp.set_requires_gradient_sync(sync)
            self._fsdp.set_reshard_after_backward(sync)
            self._no_sync = not sync

    def step(self, learn: Learner) -> None:
        if not learn.accumulating:
            self._step(learn)

    def _step(self, learn: Learner) -> None:
        if self._amp is None:
            _opt(learn).step()
        elif not self._amp.step():  # skipped by the scaler: no host sync to find out
            self.skipped += 1
            if self._amp.scaler.is_enabled():  # else MixedPrecision's bf16 check reports it
                warnings.warn("GradAccumCB: an optimizer step was skipped because of inf/NaN "
                              "gradients (fp16 overflow)")
        self.count, self._stepped = 0, True

    def zero_grad(self, learn: Learner) -> None:
        if self._stepped:
            _opt(learn).zero_grad()

    def cleanup_batch(self, learn: Learner) -> None:
        if self._amp is not None:
            self._amp.end()  # cancelled between backward and step

    def after_epoch(self, learn: Learner) -> None:
        if learn.training and self.count > 0:  # a loader without a length: its leftover group
            self._finish_gradient(learn)
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
