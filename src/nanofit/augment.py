"""Batch transforms with torch ops on whole batches (N, C, H, W): Normalize and augmentations.

Each takes either the inputs tensor (and returns a tensor) or a whole batch, a tuple or list
whose first item is the inputs (and returns the batch with only that item changed), so they
work in `BatchTransformCB`, which hands its transform the whole batch as the course's does.
Randomness comes from torch's global RNG (or a `generator`), so checkpoints replay it.
Example: `BatchTransformCB(compose(random_crop(4), random_flip(), random_erase()), on_val=False)`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Normalize", "random_crop", "random_flip", "random_erase", "compose",
           "apply_to_inputs"]

TensorTfm = Callable[[torch.Tensor], torch.Tensor]
Tfm = Callable[[Any], Any]  # a tensor -> a tensor, or a batch -> the batch


def apply_to_inputs(fn: TensorTfm, b: Any, name: str | None = None) -> Any:
    """`fn(b)` for a tensor `b`; for a batch (a tuple or list, namedtuples too), the same
    batch with `fn` applied to its first item, the inputs, and the rest unchanged.

    Example (a transform of your own that works both ways):
    `def my_tfm(b): return apply_to_inputs(lambda x: x.flip(-2), b)`
    """
    if isinstance(b, torch.Tensor):
        return fn(b)
    if isinstance(b, (tuple, list)) and len(b) > 0:
        items = [fn(b[0]), *b[1:]]
        return type(b)(*items) if hasattr(b, "_fields") else type(b)(items)
    raise TypeError(f"{name or getattr(fn, '__name__', 'the transform')} takes the inputs "
                    "tensor or a batch (a non-empty tuple or list whose first item is the "
                    f"inputs), got {type(b).__name__}")


def _on_inputs(fn: TensorTfm, name: str) -> Tfm:
    """`fn`, a transform of the inputs tensor, made to take a tensor or a whole batch."""
    def tfm(b: Any) -> Any:
        return apply_to_inputs(fn, b, name)
    tfm.__name__ = tfm.__qualname__ = name
    return tfm


def compose(*tfms: TensorTfm) -> Tfm:
    """Apply `tfms` in order to the inputs: to a tensor, or to a batch's first item (so each
    of `tfms` may be a plain tensor function, e.g. a torchvision transform).

    Example: `BatchTransformCB(compose(random_crop(4), random_flip()), on_val=False)`
    """
    def composed(x: torch.Tensor) -> torch.Tensor:
        for t in tfms:
            x = t(x)
        return x
    return _on_inputs(composed, "compose")


def random_crop(padding: int = 4, generator: torch.Generator | None = None) -> Tfm:
    """Pad each image by `padding` (zeros) and crop it back at a random offset per image
    (of a tensor of images, or of a batch's inputs)."""
    def crop(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        idx = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[idx, chans, rows, cols]
    return _on_inputs(crop, "random_crop")


def random_flip(p: float = 0.5, generator: torch.Generator | None = None) -> Tfm:
    """Flip each image left-right with probability `p` (of a tensor of images, or of a
    batch's inputs)."""
    def flip(x: torch.Tensor) -> torch.Tensor:
        mask = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
        return torch.where(mask[:, None, None, None], x.flip(-1), x)
    return _on_inputs(flip, "random_flip")


def random_erase(p: float = 0.5, scale: tuple[float, float] = (0.02, 0.25),
                 generator: torch.Generator | None = None) -> Tfm:
    """With probability `p` per image, fill a random rectangle (a `scale` fraction of the
    area, square-ish) with noise of the batch's mean and std (of a tensor of images, or of a
    batch's inputs)."""
    def erase(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        area = torch.empty(n).uniform_(*scale, generator=generator) * h * w
        side = area.sqrt()
        eh, ew = side.clamp(1, h).long(), side.clamp(1, w).long()
        y0 = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
        x0 = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
        on = torch.rand(n, generator=generator) < p
        ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
        box = (((ys >= y0[:, None]) & (ys < (y0 + eh)[:, None]))[:, :, None]
               & ((xs >= x0[:, None]) & (xs < (x0 + ew)[:, None]))[:, None, :] & on[:, None, None])
        noise = torch.randn(x.shape, generator=generator).to(x.device) * x.std() + x.mean()
        return torch.where(box[:, None].to(x.device), noise.to(x.dtype), x)
    return _on_inputs(erase, "random_erase")


class Normalize:
    """(x - mean) / std per channel (dim 1) of a tensor of inputs, or of a batch's first item
    (the batch comes back with the rest unchanged); the statistics follow x's device.

    `Normalize.from_batch(xb)` takes them from a batch; `Normalize(*dls.stats())` from data.
    Example: `BatchTransformCB(Normalize(*dls.stats()))`
    """

    def __init__(self, mean: Sequence[float] | torch.Tensor,
                 std: Sequence[float] | torch.Tensor) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        self.std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if self.mean.shape != self.std.shape:
            raise ValueError(f"Normalize: mean and std need one value per channel each, got "
                             f"{tuple(self.mean.shape)} and {tuple(self.std.shape)}")
        if (self.std <= 0).any():
            raise ValueError(f"Normalize: std must be > 0, got {self.std.tolist()}")
        self._cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_batch(cls, xb: torch.Tensor) -> Normalize:
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

    def __call__(self, b: Any) -> Any:
        return apply_to_inputs(self.normalize, b, "Normalize")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a tensor of inputs."""
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
