"""BatchTransformCB: transforms applied to each batch on the device (Normalize, augmentations)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..augment import Normalize
from ..callback import Callback, Order

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["BatchTransformCB", "Normalize"]  # Normalize lives in augment.py


class BatchTransformCB(Callback):
    """Applies `tfm` to the batch's inputs on the device before each batch (after DeviceCB),
    in training if `on_train`, in validation if `on_val`.

    `tfm` takes and returns the first `n_inp` batch items' first one (the inputs) by default;
    with `whole_batch=True` it takes and returns the whole batch.
    Example: `BatchTransformCB(Normalize(*dls.stats()))`
    """

    order = Order.TRANSFORM

    def __init__(self, tfm: Callable[[Any], Any], on_train: bool = True, on_val: bool = True,
                 whole_batch: bool = False) -> None:
        self.tfm, self.on_train, self.on_val, self.whole_batch = tfm, on_train, on_val, whole_batch

    def before_batch(self, learn: Learner) -> None:
        if not (self.on_train if learn.training else self.on_val):
            return
        if self.whole_batch:
            learn.batch = self.tfm(learn.batch)
        else:
            batch = learn.batch
            learn.batch = (self.tfm(batch[0]), *batch[1:])
