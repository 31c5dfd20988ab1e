"""Batch transforms on the device: BatchTransformCB and Normalize."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..learner import Callback

__all__ = ["BatchTransformCB", "Normalize"]


class Normalize:
    """(x - mean) / std per channel (dim 1) of a batch; the statistics follow x's device.

    `Normalize.from_batch(xb)` takes them from a batch; `Normalize(*dls.stats())` from data.
    """

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        self.std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if self.mean.shape != self.std.shape:
            raise ValueError(f"Normalize: mean and std need one value per channel each, got "
                             f"{tuple(self.mean.shape)} and {tuple(self.std.shape)}")
        if (self.std <= 0).any():
            raise ValueError(f"Normalize: std must be > 0, got {self.std.tolist()}")
        self._cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_batch(cls, xb: torch.Tensor) -> "Normalize":
        """Per-channel statistics of a batch (channels on dim 1)."""
        dims = [d for d in range(xb.ndim) if d != 1]
        return cls(xb.float().mean(dims), xb.float().std(dims))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype, x.ndim)
        if key not in self._cache:  # moved and shaped once per device, not per batch
            shape = (1, -1) + (1,) * (x.ndim - 2)
            self._cache[key] = (self.mean.to(x.device, x.dtype).view(shape),
                                self.std.to(x.device, x.dtype).view(shape))
        return self._cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channel statistics but the batch "
                             f"has shape {tuple(x.shape)} (channels on dim 1)")
        mean, std = self._stats(x)
        return (x - mean) / std

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation (for showing images)."""
        mean, std = self._stats(x)
        return x * std + mean

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class BatchTransformCB(Callback):
    """Applies `tfm` to the batch's inputs on the device before each batch (after DeviceCB),
    in training if `on_train`, in validation if `on_val`.

    `tfm` takes and returns the first `n_inp` batch items' first one (the inputs) by default;
    with `whole_batch=True` it takes and returns the whole batch.
    Example: `BatchTransformCB(Normalize(*dls.stats()))`
    """

    order = -5  # after DeviceCB (-10): transforms run on the device

    def __init__(self, tfm: Callable[[Any], Any], on_train: bool = True, on_val: bool = True,
                 whole_batch: bool = False) -> None:
        self.tfm, self.on_train, self.on_val, self.whole_batch = tfm, on_train, on_val, whole_batch

    def before_batch(self, learn: Any) -> None:
        if not (self.on_train if learn.training else self.on_val):
            return
        if self.whole_batch:
            learn.batch = self.tfm(learn.batch)
        else:
            batch = learn.batch
            learn.batch = (self.tfm(batch[0]), *batch[1:])
