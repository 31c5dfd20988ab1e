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
    """Replaces each batch by `tfm(batch)` on the device before it is used (after DeviceCB),
    in training if `on_train`, in validation if `on_val`.

    `tfm` takes and returns the whole batch, as the course's does:
    `def _norm(b): return (b[0] - xmean) / xstd, b[1]` then `BatchTransformCB(_norm)`.
    nanofit's transforms (`Normalize`, `random_crop`, `random_flip`, `random_erase`,
    `compose`) take a batch too and change only its inputs:
    `BatchTransformCB(Normalize(*dls.stats()))`. `whole_batch=True` is the default;
    `whole_batch=False` hands `tfm` the inputs alone (`batch[0]`), for a plain tensor function
    such as a torchvision transform: `BatchTransformCB(tfms, on_val=False, whole_batch=False)`.
    """

    order = Order.TRANSFORM

    def __init__(self, tfm: Callable[[Any], Any], on_train: bool = True, on_val: bool = True,
                 whole_batch: bool = True) -> None:
        self.tfm, self.on_train, self.on_val, self.whole_batch = tfm, on_train, on_val, whole_batch

    def before_batch(self, learn: Learner) -> None:
        if self.on_train if learn.training else self.on_val:
            learn.batch = self.transform(learn.batch)

    def transform(self, batch: Any) -> Any:
        """The batch this callback makes of `batch` (whatever the phase): for code that applies
        a learner's batch transforms by hand, e.g. to show predictions."""
        if not self.whole_batch:
            return (self.tfm(batch[0]), *batch[1:])
        try:
            return self.tfm(batch)
        except (TypeError, AttributeError) as e:
            if isinstance(batch, (tuple, list)):  # probably a transform of the inputs alone
                e.add_note(f"BatchTransformCB hands its transform the whole batch (a "
                           f"{type(batch).__name__} of {len(batch)}), as the course's does; for "
                           "a transform of the inputs tensor alone pass whole_batch=False")
            raise
