"""Mixed precision: autocast around the forward pass and the loss; a grad scaler for fp16, and
for autocast without one (bf16) a step guard that skips steps whose gradients are not finite."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..callback import Callback, Order
from ..optim import ScalerSteps, groups

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["MixedPrecision", "SkipNonFiniteSteps"]


class SkipNonFiniteSteps(torch.amp.GradScaler):
    """What `GradScaler` does for fp16, for autocast without loss scaling (bfloat16, or float16
    on CPU): `step(opt)` skips an optimizer step whose gradients are not all finite, and counts
    it. It is a disabled GradScaler (scale 1: `scale`, `unscale_` and `update` do nothing), so
    code written for `learn.grad_scaler` (GradAccumCB, your own steps) works with it unchanged.

    The check is one `torch._foreach_norm` over the gradients as the optimizer sees them, after
    clipping and anything else at `after_backward`. Where reading its flag is free
    (`sync_free`: the CPU) the step is skipped from the host. On an accelerator nothing waits
    for the device: an optimizer with its own inf check (torch's `fused=True` Adam, AdamW,
    SGD) gets the flag as GradScaler gives it (`found_inf`) and skips exactly; any other steps
    with its gradients zeroed by a device-side mask, so nothing non-finite reaches the weights
    (momentum and Adam's averages still take that step). The counts are read on the host only
    when asked (`take`, `pending`: once per epoch).
    """

    def __init__(self, device: str = "cpu", sync_free: bool = True) -> None:
        super().__init__(device, enabled=False)
        self.sync_free = sync_free
        self.masked = False  # a step was masked rather than skipped (accelerator, not fused)
        self._steps = 0
        self._skipped = 0  # counted on the host (sync_free)
        self._skipped_on_device: torch.Tensor | None = None  # counted on the device

    def step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """`optimizer.step()` unless a gradient is inf/NaN (then skipped, and counted)."""
        self._steps += 1
        grads = [p.grad for group in groups(optimizer) for p in group.get("params", ())
                 if p.grad is not None]
        if not grads:
            return optimizer.step(*args, **kwargs)
        device = grads[0].device
        # L1 norms: inf/NaN in, inf/NaN out; finite gradients would need sum |g| > 3e38 to
        # overflow (the max-abs norm is 3x slower on CPU, the L2 overflows from |g| > 1e19)
        norms = torch.stack([n.to(device) for n in torch._foreach_norm(grads, 1)])
        bad = ~norms.isfinite().all()  # a 0-dim bool tensor on the device
        if self.sync_free:
            if bad.item():
                self._skipped += 1
                return None
            return optimizer.step(*args, **kwargs)
        self._skipped_on_device = (bad.long() if self._skipped_on_device is None
                                   else self._skipped_on_device + bad)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # GradScaler's protocol with fused optimizers: they skip the update on found_inf
            optimizer.grad_scale, optimizer.found_inf = None, bad.float()
            try:
                return optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        self.masked = True
        for g in grads:
            g.masked_fill_(bad.to(g.device, non_blocking=True), 0.0)
        return optimizer.step(*args, **kwargs)

    def pending(self) -> int:
        """Steps skipped since the last `take` (reads the device's count: one sync)."""
        on_device = 0 if self._skipped_on_device is None else int(self._skipped_on_device.item())
        return self._skipped + on_device

    def take(self) -> tuple[int, int]:
        """(skipped, attempted) steps since the last take, and start counting afresh."""
        counts = self.pending(), self._steps
        self._steps = self._skipped = 0
        self._skipped_on_device = None
        return counts


class MixedPrecision(Callback):
    """Runs predict and get_loss under `torch.autocast`: float16 with a GradScaler on CUDA,
    bfloat16 on CPU (no scaler needed). It wraps those two steps (`wrap_handler`), whichever
    callback (MixUp, TrainCB...) or Learner subclass runs them.

    With fp16 the gradients are unscaled right after backward, so GradClipCB and anything else
    at `after_backward` sees true gradients. Steps the scaler skips (inf/NaN gradients) are
    counted in `skipped`, without a host sync beyond the scaler's own, and reported at the end
    of each epoch. A batch cancelled between backward and step closes the scaler's step.

    Without a scaler (bf16) a step whose gradients are not finite is skipped too, and counted
    in `skipped` and reported at the end of the epoch (or fit): `learn.grad_scaler` is then a
    `SkipNonFiniteSteps`, a GradScaler with scale 1 whose `step` checks the gradients (after
    GradClipCB; GradAccumCB steps through it). On CPU the check reads one flag per step (free
    there); on an accelerator it never waits for the device (see SkipNonFiniteSteps).
    """

    order = Order.PRECISION

    def __init__(self, dtype: torch.dtype | None = None, n_inp: int | None = None) -> None:
        self.dtype = dtype
        self.n_inp = n_inp  # the course's MixedPrecision is a TrainCB(n_inp): the same here
        self.scaler: torch.amp.GradScaler | None = None
        self.guard: SkipNonFiniteSteps | None = None  # without a scaler: skips non-finite steps
        self._sync_free: bool | None = None  # None: reading the guard's flag is free on CPU only
        self.skipped = 0
        self._amp: ScalerSteps | None = None
        self._depth = 0  # fits in progress: get_preds called from a callback runs one inside

    def before_fit(self, learn: Learner) -> None:
        self._depth += 1
        if self.n_inp is not None:
            learn.n_inp = self.n_inp
        if self._depth > 1:  # a helper fit inside the fit: keep the running fit's state
            learn.grad_scaler = self.scaler if self.scaler is not None else self.guard
            return
        param = next(learn.model.parameters())
        self.device_type = param.device.type
        if self.dtype is None:
            self.dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        use_scaler = self.dtype == torch.float16 and self.device_type == "cuda"
        if use_scaler and self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda")
        if self.scaler is None:
            sync_free = self.device_type == "cpu" if self._sync_free is None else self._sync_free
            self.guard = SkipNonFiniteSteps(self.device_type, sync_free)
        # for callbacks that replace backward/step (GradAccumCB)
        learn.grad_scaler = self.scaler if self.scaler is not None else self.guard
        if self.scaler is not None and learn.opt is not None:
            self._amp = ScalerSteps(self.scaler, learn.opt.opt)
        self._epoch_skipped = 0

    def cleanup_fit(self, learn: Learner) -> None:
        self._depth -= 1
        if self._depth:
            return
        if self.guard is not None:  # steps skipped since the last report (a cancelled epoch...)
            self._report_guard(learn.epoch)
            self.guard = None
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
        if self.guard is not None:
            self.guard.step(learn.opt)
        elif self._amp is None:
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
        if self.guard is not None and self._depth == 1:
            # after validation too: GradAccumCB's leftover step runs after our training after_epoch
            self._report_guard(learn.epoch)

    def _report_guard(self, epoch: int) -> None:
        """Count and report the steps the guard skipped since the last report (one sync)."""
        assert self.guard is not None
        skipped, steps = self.guard.take()
        self.skipped += skipped
        if not skipped:
            return
        masked = (" (with a non-fused optimizer on an accelerator they ran with zero gradients; "
                  "fused=True skips them exactly)" if self.guard.masked else "")
        warnings.warn(f"MixedPrecision: {skipped} of {steps} optimizer step(s) in epoch {epoch} "
                      f"were skipped because their gradients were not finite (inf/NaN) under "
                      f"{self.dtype} autocast{masked}. If it keeps happening, lower the lr or "
                      "look for inf/NaN in the model and loss; on CPU, torch's bfloat16 "
                      "convolution backward can return non-finite gradients for 1x1 feature "
                      "maps: train such a model without MixedPrecision.")

    def state_dict(self) -> dict[str, Any]:
        pending = self.guard.pending() if self.guard is not None else 0
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "skipped": self.skipped + pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["scaler"] is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = state["skipped"]
