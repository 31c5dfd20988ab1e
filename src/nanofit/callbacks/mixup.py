"""MixUp and CutMix: mix inputs and targets within a training batch."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..callback import Callback, Order

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["MixUp", "CutMix"]


class _Mix(Callback):
    """Mixes each training batch with a shuffled copy of itself, with a weight `lam` drawn
    from Beta(alpha, alpha) per batch; the loss is lam * loss(y) + (1 - lam) * loss(y[perm]).
    Validation batches are left alone. Targets are class indices."""

    order = Order.DEFAULT

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.distrib = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
        self.lam: float = 1.0
        self.perm: torch.Tensor | None = None

    def before_batch(self, learn: Learner) -> None:
        if not learn.training:
            self.perm = None
            return
        x, *rest = learn.batch
        self.lam = float(self.distrib.sample())
        self.perm = torch.randperm(x.shape[0]).to(x.device)
        learn.batch = (self.mix(x), *rest)

    def get_loss(self, learn: Learner) -> None:
        targ = learn.batch[learn.n_inp]
        if self.perm is None:
            learn.loss = learn.loss_func(learn.preds, targ)
            return
        loss_a = learn.loss_func(learn.preds, targ)
        loss_b = learn.loss_func(learn.preds, targ[self.perm])
        learn.loss = self.lam * loss_a + (1 - self.lam) * loss_b

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MixUp(_Mix):
    """MixUp: x = lam * x + (1 - lam) * x[perm]."""

    def __init__(self, alpha: float = 0.4) -> None:
        super().__init__(alpha)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lerp(x[self.perm], x, self.lam)


class CutMix(_Mix):
    """CutMix: paste a random box of x[perm] into x; lam becomes the kept area's fraction."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cut = (1 - self.lam) ** 0.5
        bh, bw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
        x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
        out = x.clone()
        out[..., y0:y1, x0:x1] = x[self.perm][..., y0:y1, x0:x1]
        self.lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the exact share of x that is left
        return out
