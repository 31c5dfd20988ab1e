"""Resuming a run where its checkpoint stopped: the loop's position, and the rest of an epoch.

The learner owns a `LoopPosition` and asks it for the batches of each phase; a checkpoint saves
what it tracks, and a resumed fit gets the interrupted epoch's remaining batches in the
original order (the skipped ones are never fetched).
"""
from __future__ import annotations

import itertools
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .callback import CancelEpochException
from .checkpoint import (
    capture_rng,
    for_this_rank,
    load_cb_states,
    load_checkpoint,
    restore_rng,
)
from .checks import check_first_batch
from .data import rebuild_loader
from .steps import FitPlan, set_epoch, state_owner
from .torch_utils import length

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
    if state_owner(dl) is not None:  # its saved position was loaded at the resume
        return iter(dl)
    if callable(getattr(dl, "iter_from", None)):  # TensorLoader, ShardedTensorLoader, yours
        return dl.iter_from(skip)
    if (isinstance(dl, torch.utils.data.DataLoader) and dl.batch_sampler is not None
            and not isinstance(dl.dataset, torch.utils.data.IterableDataset)):
        skipper = _SkipBatches(dl.batch_sampler, skip)
        resumed = rebuild_loader(dl, batch_sampler=skipper, persistent_workers=False)
        it = iter(resumed)  # draws the workers' base seed, as the original epoch did
        skipper.materialize()  # then the sampler's order, as the original first batch did
        return it
    if length(dl) is None:
        warnings.warn(f"resuming on a {type(dl).__name__} stream that has no saved position "
                      f"(no state_dict()): it cannot be repositioned, so training continues "
                      f"from a new stream, not after the {skip} batches already drawn from it "
                      "(samples may repeat); use a torchdata StatefulDataLoader or a dataset "
                      "with state_dict() for an exact resume")
        return iter(dl)
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
    start of each pass over the training data, so a checkpoint taken mid-pass can replay the
    pass's shuffled order, and when a fit resumes it hands out the rest of the interrupted pass
    in the original order. In a step-based fit the training batches come from one stream of
    passes over `dls.train`, taken a round at a time.
    """

    def __init__(self) -> None:
        self.fitting = False
        self.plan = FitPlan(0, None)  # what the fit runs (epochs, or steps in rounds)
        self.phase: str | None = None  # "train" or "valid" while a phase runs
        self.phase_done = False  # the current phase ran all its batches
        self.n_train = 0  # batches in this training phase (0: unknown)
        self.round_start = 0  # learn.step when this training phase's first batch came
        self.epoch_rng: dict[str, Any] | None = None  # RNGs at the training pass's start
        self.valid_rng: dict[str, Any] | None = None  # RNGs at the validation phase's start
        self.passes = 0  # passes over dls.train started in this (step-based) fit
        self.in_pass = 0  # batches drawn from the current pass
        self.ran_dry = False  # the training stream ended before the fit's steps were done
        self.dry_round = False  # ... and before the current round's first batch
        self._stream: Iterator[Any] | None = None  # a step-based fit's training batches
        self._resume: dict[str, Any] | None = None  # a mid-phase checkpoint to continue

    def start_fit(self, plan: FitPlan | None = None) -> None:
        """A fit begins: nothing ran yet."""
        self.fitting, self.phase, self.phase_done, self._resume = True, None, False, None
        self.plan = plan or FitPlan(0, None)
        self.passes, self.in_pass, self.ran_dry, self._stream = 0, 0, False, None
        self.dry_round = False

    def end_fit(self) -> None:
        self.fitting, self._resume, self._stream = False, None, None

    def resume(self, learn: Learner, ckpt: dict[str, Any] | None) -> tuple[int, int, bool]:
        """Put `ckpt` into the learner (weights, optimizer, callbacks, RNGs, the loader's own
        position; the batch order comes with the first phase's batches) and return where the
        loop starts: (epoch, training batches done, training phase done). Without a
        checkpoint, (0, 0, False)."""
        if ckpt is None:
            return 0, 0, False
        ckpt = for_this_rank(ckpt)  # under DDP each rank's own random states
        load_checkpoint(learn, ckpt)
        pos = self._replanned(ckpt)
        ckpt = {**ckpt, "position": pos}
        learn.step = pos.get("step", self._old_step(pos, ckpt))
        owner = state_owner(getattr(learn.dls, "train", None))
        if owner is not None and ckpt.get("loader") is not None:
            owner.load_state_dict(ckpt["loader"])
        self.epoch_rng = ckpt.get("epoch_rng")
        mid_phase = pos["batches_done"] and not pos["train_done"]
        if mid_phase:
            # Callback states go in after the resumed phase's before_epoch (which resets
            # running totals), and the RNGs after it too; see _reposition.
            self._resume = ckpt
        else:
            load_cb_states(learn, ckpt.get("callbacks", {}))
        if self.plan.by_steps:
            self.passes, self.in_pass = pos.get("passes", 0), pos.get("in_pass", 0)
            if not mid_phase and self.passes:  # between rounds: the pass goes on
                self._stream = self._pass_stream(learn, self._reposition(learn, ckpt))
        if not mid_phase:
            restore_rng(ckpt["rng"], learn.dls)
        return pos["epoch"], pos["batches_done"], pos["train_done"]

    def _replanned(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's position in this fit's rounds: a step fit resumed with other
        steps or valid_every (warned about) goes on from the step it reached."""
        pos = dict(ckpt["position"])
        plan = self.plan
        saved = (ckpt.get("total_steps"), ckpt.get("valid_every"))
        if plan.by_steps and plan.valid_every and saved != (plan.total_steps, plan.valid_every):
            step = pos.get("step", 0)
            pos.update(epoch=step // plan.valid_every, batches_done=step % plan.valid_every,
                       train_done=False)
        return pos

    @staticmethod
    def _old_step(pos: dict[str, Any], ckpt: dict[str, Any]) -> int:
        """learn.step for a checkpoint written before steps were saved (epoch fits)."""
        n = ckpt.get("n_batches") or 0
        return pos["epoch"] * n + (n if pos["train_done"] else pos["batches_done"])

    def batches(self, learn: Learner, train: bool, start: int = 0) -> Iterator[Any]:
        """The batches of the phase that starts now, from batch `start` on. The RNG state is
        taken now (before `before_epoch`); the loader is iterated when the loop asks for the
        first batch (after it)."""
        self.phase, self.phase_done = ("train" if train else "valid"), False
        if not train:
            self.valid_rng = capture_rng(learn.dls)
            return self._batches(learn, False, 0)
        self.n_train, self.round_start = learn.n_iter, learn.step - start
        if self.plan.by_steps:
            return self._round(learn, learn.n_iter - start)
        if not start:
            set_epoch(learn.dl, learn.epoch)  # a DistributedSampler reshuffles per pass
            self.epoch_rng = capture_rng(learn.dls)
        return self._batches(learn, True, start)

    def _batches(self, learn: Learner, train: bool, start: int) -> Iterator[Any]:
        phase = "train" if train else "valid"
        try:
            if start:
                ckpt, self._resume = self._resume, None
                assert ckpt is not None, "resuming mid-epoch without a checkpoint"
                batches = self._reposition(learn, ckpt)
            else:
                batches = check_first_batch(iter(learn.dl), phase)
            yield from batches  # errors of the loop's body are not raised here, only the loader's
        except Exception as e:
            e.add_note(f"raised while fetching batch {learn.iter + 1} of dls.{phase} "
                       f"(epoch {learn.epoch})")
            raise
        self.phase_done = True  # read by checkpoints saved in after_epoch

    def _reposition(self, learn: Learner, ckpt: dict[str, Any]) -> Iterator[Any]:
        """The rest of the interrupted pass over dls.train, in the original run's order: the
        order is drawn from the pass's starting RNG, then the RNG moves on to where it stood
        at the checkpoint. Mid-phase, the callbacks' states go in first (after before_epoch)."""
        pos = ckpt["position"]
        mid_phase = pos["batches_done"] and not pos["train_done"]
        if mid_phase:
            load_cb_states(learn, ckpt.get("callbacks", {}))
        by_steps = self.plan.by_steps
        dl = learn.dls.train
        skip = pos.get("in_pass", 0) if by_steps else pos["batches_done"]
        set_epoch(dl, self.passes - 1 if by_steps else learn.epoch)
        restore_rng(ckpt["epoch_rng"], learn.dls)
        it = _skipping_iterator(dl, skip)
        restore_rng(ckpt["rng"], learn.dls)
        return it

    # ---- a step-based fit's stream of training batches -------------------------------------
    def _round(self, learn: Learner, n: int) -> Iterator[Any]:
        """The next `n` training batches of the stream: the round's training phase."""
        try:
            if self._stream is None:
                ckpt, self._resume = self._resume, None
                resumed = None if ckpt is None else self._reposition(learn, ckpt)
                self._stream = self._pass_stream(learn, resumed)
            first = learn.step
            yield from itertools.islice(self._stream, n)
        except Exception as e:
            e.add_note(f"raised while fetching training batch {learn.step + 1} (pass "
                       f"{self.passes} over dls.train)")
            raise
        if self.ran_dry:
            # Ended before this round's first batch: the round did not happen (cancelled,
            # so no callback records an empty phase) and the fit ends; else it validates.
            self.dry_round = learn.step == first and n > 0
            then = "now" if self.dry_round or not learn.run_valid else \
                "after this round's validation"
            print(f"nanofit: dls.train ran dry after {learn.step} of {learn.total_steps} "
                  f"steps: ending the fit {then}", file=sys.stderr, flush=True)
            if self.dry_round:
                raise CancelEpochException()
        self.phase_done = True

    def _pass_stream(self, learn: Learner, it: Iterator[Any] | None) -> Iterator[Any]:
        """Passes over dls.train one after another (`it`: the rest of a resumed one first),
        each reshuffled as the loader does by itself. A loader without a length is one
        stream: when it ends, `ran_dry` is set and the stream ends."""
        dl = learn.dls.train
        while True:
            fresh = it is None
            if it is None:
                set_epoch(dl, self.passes)
                self.epoch_rng = capture_rng(learn.dls)
                self.passes, self.in_pass = self.passes + 1, 0
                it = iter(dl) if self.passes > 1 else check_first_batch(iter(dl), "train")
            drawn = self.in_pass
            for batch in it:
                self.in_pass += 1
                yield batch
            it = None
            if length(dl) is None or (fresh and self.in_pass == drawn):
                self.ran_dry = True
                return

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

    def steps_done(self, learn: Learner) -> int:
        """Training batches done in this fit at the point `now` describes."""
        if not self.fitting:
            return learn.step
        epoch, done, train_done = self.now(learn)
        if learn.training and not train_done:
            return self.round_start + done
        return learn.step
