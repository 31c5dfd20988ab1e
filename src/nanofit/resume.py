"""Resuming a run where its checkpoint stopped: the loop's position, and the rest of an epoch.

The learner owns a `LoopPosition` and asks it for the batches of each phase; a checkpoint saves
what it tracks, and a resumed fit gets the interrupted epoch's remaining batches in the
original order (the skipped ones are never fetched).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import (
    capture_rng,
    for_this_rank,
    load_cb_states,
    load_checkpoint,
    restore_rng,
)
from .checks import check_first_batch
from .data import rebuild_loader

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["LoopPosition"]


# ---- skipping the batches a resumed epoch already trained on --------------------------------
class _SkipBatches:
    """A batch sampler giving the batches of `batch_sampler` after the first `skip`.

    The skipped batches are index lists only: no sample is fetched or computed.
    """

    def __init__(self, batch_sampler: Any, skip: int) -> None:
        self.batch_sampler, self.skip = batch_sampler, skip
        self.batches: list | None = None

    def materialize(self) -> None:
        self.batches = list(self.batch_sampler)[self.skip:]

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs when the DataLoader calls iter() on it, so the order is
        # drawn only by materialize(), after the loader drew its base seed (as originally).
        if self.batches is None:
            self.materialize()
        yield from self.batches or []

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


def _skipping_iterator(dl: Any, skip: int) -> Iterator[Any]:
    if callable(getattr(dl, "iter_from", None)):  # TensorLoader, ShardedTensorLoader, yours
        return dl.iter_from(skip)
    if (isinstance(dl, torch.utils.data.DataLoader) and dl.batch_sampler is not None
            and not isinstance(dl.dataset, torch.utils.data.IterableDataset)):
        skipper = _SkipBatches(dl.batch_sampler, skip)
        resumed = rebuild_loader(dl, batch_sampler=skipper, persistent_workers=False)
        it = iter(resumed)  # draws the workers' base seed, as the original epoch did
        skipper.materialize()  # then the sampler's order, as the original first batch did
        return it
    warnings.warn(f"resuming mid-epoch on a {type(dl).__name__} that cannot skip batches by "
                  f"index: fetching and dropping {skip} batches")
    it = iter(dl)
    for _ in range(skip):
        next(it)
    return it


# ---- the loop's position: what a checkpoint saves and a resume restores ----------------------
class LoopPosition:
    """Where the loop stands, kept for checkpoints: the learner owns one (`learn.position`).

    The loop asks it for the batches of each phase (`batches`); it records the RNG state at the
    start of each phase, so a checkpoint taken mid-epoch can replay the epoch's shuffled order,
    and when a fit resumes it hands out the rest of the interrupted epoch in the original order.
    """

    def __init__(self) -> None:
        self.fitting = False
        self.phase: str | None = None  # "train" or "valid" while a phase runs
        self.phase_done = False  # the current phase ran all its batches
        self.n_train = 0  # batches in this fit's training loader (0: no length)
        self.epoch_rng: dict[str, Any] | None = None  # RNGs at the training phase's start
        self.valid_rng: dict[str, Any] | None = None  # RNGs at the validation phase's start
        self._resume: dict[str, Any] | None = None  # a mid-epoch checkpoint to continue

    def start_fit(self) -> None:
        """A fit begins: nothing ran yet."""
        self.fitting, self.phase, self.phase_done, self._resume = True, None, False, None

    def end_fit(self) -> None:
        self.fitting, self._resume = False, None

    def resume(self, learn: Learner, ckpt: dict[str, Any] | None) -> tuple[int, int, bool]:
        """Put `ckpt` into the learner (weights, optimizer, callbacks, RNGs; the batch order
        comes with the first phase's batches) and return where the loop starts: (epoch,
        training batches done, training phase done). Without a checkpoint, (0, 0, False)."""
        if ckpt is None:
            return 0, 0, False
        ckpt = for_this_rank(ckpt)  # under DDP each rank's own random states
        load_checkpoint(learn, ckpt)
        pos = ckpt["position"]
        if pos["batches_done"] and not pos["train_done"]:
            # Mid-epoch: callback states go in after the resumed phase's before_epoch (which
            # resets running totals); see _resumed_batches.
            self.epoch_rng = ckpt["epoch_rng"]
            self._resume = ckpt
        else:
            load_cb_states(learn, ckpt.get("callbacks", {}))
            restore_rng(ckpt["rng"], learn.dls)
        return pos["epoch"], pos["batches_done"], pos["train_done"]

    def batches(self, learn: Learner, train: bool, start: int = 0) -> Iterator[Any]:
        """The batches of the phase that starts now, from batch `start` on. The RNG state is
        taken now (before `before_epoch`); the loader is iterated when the loop asks for the
        first batch (after it)."""
        self.phase, self.phase_done = ("train" if train else "valid"), False
        if train:
            self.n_train = learn.n_iter
            if not start:
                self.epoch_rng = capture_rng(learn.dls)
        else:
            self.valid_rng = capture_rng(learn.dls)
        return self._batches(learn, train, start)

    def _batches(self, learn: Learner, train: bool, start: int) -> Iterator[Any]:
        phase = "train" if train else "valid"
        try:
            if start:
                batches = self._resumed_batches(learn, start)
            else:
                batches = check_first_batch(iter(learn.dl), phase)
            yield from batches  # errors of the loop's body are not raised here, only the loader's
        except Exception as e:
            e.add_note(f"raised while fetching batch {learn.iter + 1} of dls.{phase} "
                       f"(epoch {learn.epoch})")
            raise
        self.phase_done = True  # read by checkpoints saved in after_epoch

    def _resumed_batches(self, learn: Learner, skip: int) -> Iterator[Any]:
        """The rest of an epoch after `skip` training batches, in the original run's order:
        the order is drawn from the epoch's starting RNG, then the RNG moves on to where it
        stood at the checkpoint."""
        ckpt, self._resume = self._resume, None
        assert ckpt is not None, "resuming mid-epoch without a checkpoint"
        load_cb_states(learn, ckpt.get("callbacks", {}))
        restore_rng(ckpt["epoch_rng"], learn.dls)
        it = _skipping_iterator(learn.dl, skip)
        restore_rng(ckpt["rng"], learn.dls)
        return it

    def now(self, learn: Learner) -> tuple[int, int, bool]:
        """Where the loop stands, as (epoch, training batches done, training phase done).

        Inside a fit it is exact at `after_batch`, `before_epoch` and `after_epoch` (in the
        middle of a batch the batch is counted as done); outside a fit the run is complete.
        """
        if not self.fitting:
            return learn.n_epochs, 0, False
        if self.phase is None:
            raise ValueError("learn.save inside a fit works from after_batch, before_epoch or "
                             "after_epoch; before the first epoch there is nothing new to save")
        if learn.training:
            if self.phase_done:  # after_epoch of the training phase
                return learn.epoch, learn.n_iter, True
            return learn.epoch, learn.iter + 1, False
        if self.phase_done:  # after_epoch of the validation phase: the epoch is complete
            return learn.epoch + 1, 0, False
        return learn.epoch, self.n_train, True  # during validation: redo it on resume
