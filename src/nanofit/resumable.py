"""Whether a checkpoint can resume this fit: every refusal and warning comes before the fit
changes anything (`fit(resume=...)` reads its checkpoint here)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import (
    SHARDED_SUFFIX,
    SUFFIX,
    checkpoints_in,
    is_sharded_checkpoint,
    read_checkpoint,
    restore_rng,
)
from .distributed import is_rank0
from .loading import check_loadable, damaged
from .steps import FitPlan
from .torch_utils import length, preserved_rng

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["read_for_resume", "check_resumable", "RunComplete"]


def read_for_resume(path: str | Path, learn: Learner,
                    plan: FitPlan | int) -> dict[str, Any] | None:
    """Read a checkpoint to resume from, refusing or warning about what cannot work. Refused
    before the fit changes anything: the weights, optimizer and RNG states are checked here.

    A folder that holds no checkpoint yet (or does not exist yet) gives None with a one-line
    notice: the fit starts from scratch, so one command serves the first start and every
    restart (`torchrun --max-restarts`); a folder whose newest checkpoint ends the fit gives
    it too (the fit loads it and has nothing left to run). A missing *file* is an error, and so
    is a file that leaves nothing to train."""
    folder = Path(path)
    if (folder.is_dir() and not is_sharded_checkpoint(folder) and not checkpoints_in(folder)) \
            or (not folder.exists() and folder.suffix not in (SUFFIX, SHARDED_SUFFIX)):
        if is_rank0():
            print(f"nanofit: no checkpoint in {str(folder)!r} yet: starting from scratch",
                  file=sys.stderr, flush=True)
        return None
    ckpt = read_checkpoint(path)
    try:
        check_resumable(ckpt, learn, plan)
    except RunComplete:
        if not folder.is_dir() or is_sharded_checkpoint(folder):
            raise  # a checkpoint named by the user: asking for nothing more is a mistake
        # A restart (torchrun, a job queue) of a run that had finished: the fit loads its
        # final state (callbacks' too, under the process group its callbacks join) and its
        # loop has nothing left to run
        if is_rank0():
            print(f"nanofit: the run in {str(folder)!r} is complete: loading its final state "
                  f"({Path(ckpt['path']).name}); nothing left to train", file=sys.stderr,
                  flush=True)
        check_loadable(learn, ckpt)
        _check_rng_states(ckpt, learn)
        return ckpt
    check_loadable(learn, ckpt)
    _check_rng_states(ckpt, learn)
    if is_rank0():
        pos = ckpt["position"]
        where = (f"step {pos['step']}" if ckpt.get("total_steps") is not None and "step" in pos
                 else f"epoch {pos['epoch']}, {pos['batches_done']} training batches done")
        print(f"nanofit: resuming from {ckpt['path']} ({where})", file=sys.stderr, flush=True)
    return ckpt


class RunComplete(ValueError):
    """The checkpoint is at the end of the fit asked for: nothing is left to train."""


def check_resumable(ckpt: dict[str, Any], learn: Learner, plan: FitPlan | int) -> None:
    """Refuse or warn about resuming from `ckpt` into this fit (`plan`: its FitPlan, or a
    number of epochs)."""
    if isinstance(plan, int):
        plan = FitPlan(plan, None)
    pos = ckpt.get("position")
    if not isinstance(pos, dict):
        raise ValueError(f"{ckpt['path']!r} holds weights only (e.g. from SaveBestCB), not a "
                         "training position: load it with learn.load(path), or resume from a "
                         "CheckpointCB file")
    saved_by_steps = ckpt.get("total_steps") is not None
    if saved_by_steps != plan.by_steps:
        was = (f"fit(steps={ckpt['total_steps']}, valid_every={ckpt.get('valid_every')})"
               if saved_by_steps else f"fit({ckpt.get('n_epochs')})")
        kind = "counted in steps" if saved_by_steps else "of whole epochs, validated per epoch"
        raise ValueError(f"checkpoint {ckpt['path']!r} comes from a {was} run ({kind}); "
                         f"resume it with the same kind of fit, e.g. {was[:-1]}, resume=...)")
    same_plan = (ckpt.get("total_steps"), ckpt.get("valid_every")) == (plan.total_steps,
                                                                      plan.valid_every)
    if plan.by_steps:
        # the same fit: nothing left once its last round, validation included, is complete
        done = pos["epoch"] >= plan.n_epochs if same_plan else \
            pos.get("step", 0) >= (plan.total_steps or 0)
        if done:
            raise RunComplete(f"checkpoint {ckpt['path']!r} is at step {pos.get('step')}, so "
                             f"fit(steps={plan.total_steps}, resume=...) has nothing left to do; "
                             "ask for more steps")
        if not same_plan:
            warnings.warn(f"resuming a fit(steps={ckpt['total_steps']}, valid_every="
                          f"{ckpt.get('valid_every')}) run as fit(steps={plan.total_steps}, "
                          f"valid_every={plan.valid_every}): rounds and schedules over the whole "
                          "fit (one-cycle...) will not match the original")
    else:
        n_epochs = plan.n_epochs
        if pos["epoch"] >= n_epochs:
            raise RunComplete(f"checkpoint {ckpt['path']!r} is at epoch {pos['epoch']}, so "
                             f"fit({n_epochs}, resume=...) has nothing left to do; ask for more "
                             "epochs")
        if ckpt.get("n_epochs") not in (None, n_epochs):
            warnings.warn(f"resuming a {ckpt['n_epochs']}-epoch run as a {n_epochs}-epoch fit: "
                          "schedules over the whole fit (one-cycle...) will not match the "
                          "original")
    train = getattr(learn.dls, "train", None)
    n = length(train)
    # saved by several processes (DDP, FSDP): each had its shard, which DDPCB/FSDPCB make
    # only once the fit starts, so the whole loader here is longer
    sharded_data = bool(ckpt.get("ranks"))
    if ckpt.get("n_batches") and n is not None and ckpt["n_batches"] != n and not sharded_data:
        warnings.warn(f"the checkpoint's training loader had {ckpt['n_batches']} batches, this one "
                      f"has {n}: the resumed epoch cannot follow the original order")
    loaders = (train, getattr(learn.dls, "valid", None))
    if any(getattr(dl, "persistent_workers", False) for dl in loaders):
        warnings.warn("resuming with persistent_workers=True: the workers' base seed is drawn "
                      "once per run, so the resumed run's random streams can differ from the "
                      "original; use persistent_workers=False for a bit-exact resume")


def _check_rng_states(ckpt: dict[str, Any], learn: Learner) -> None:
    """Refuse RNG states that would not restore, by restoring them and then putting every RNG
    back as it was."""
    pos = ckpt["position"]
    mid_epoch = pos["batches_done"] and not pos["train_done"]
    # mid-pass (a step fit's stream too): the pass's order is replayed from its starting RNG
    replays = mid_epoch or ckpt.get("epoch_rng") is not None or bool(pos.get("in_pass"))
    for key in ("rng", "epoch_rng") if replays else ("rng",):
        try:
            with preserved_rng(learn.dls), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the real restore warns, if need be
                restore_rng(ckpt[key], learn.dls)
        except Exception as e:
            raise damaged(ckpt["path"], f"its RNG state {key!r} does not restore "
                                         f"({type(e).__name__}: {e})") from e
