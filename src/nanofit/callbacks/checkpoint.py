"""CheckpointCB: periodic checkpoints, mid-epoch included, and a checkpoint on Ctrl-C."""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..callback import Callback, Order
from ..checkpoint import SUFFIX, gather_rng_states, save_checkpoint
from ..distributed import barrier, is_rank0
from ..sharded import SHARDED_SUFFIX, is_sharded, remove_checkpoint

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["CheckpointCB"]


class _CtrlC:
    """The one SIGINT handler of every CheckpointCB in a running fit. The first to start
    installs it and the last to finish puts back the handler it found, whatever the number
    of callbacks and the order they finish in. Ctrl-C asks each of them to save and stop."""

    def __init__(self) -> None:
        self.cbs: list[CheckpointCB] = []
        self.previous: Any = None

    def join(self, cb: CheckpointCB) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        if not self.cbs:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        self.cbs.append(cb)

    def leave(self, cb: CheckpointCB) -> None:
        mine = [i for i, c in enumerate(self.cbs) if c is cb]
        if not mine:
            return
        del self.cbs[mine[-1]]
        if not self.cbs and signal.getsignal(signal.SIGINT) == self.handle:
            signal.signal(signal.SIGINT, self.previous)  # unless someone else replaced ours
            self.previous = None

    def saved_by_all(self, cb: CheckpointCB) -> bool:
        """Whether `cb` is the last of them to run: the one to stop the fit, once all saved."""
        return not self.cbs or self.cbs[-1] is cb

    def handle(self, signum: int, frame: Any) -> None:
        if any(cb.interrupted for cb in self.cbs):  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        for cb in self.cbs:
            cb.interrupted = True
        print("\nnanofit: interrupted; finishing this batch and saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


_CTRL_C = _CtrlC()


def _mtime(f: Path) -> int | None:
    """When `f` was last changed; None if it is gone meanwhile (rank 0 prunes)."""
    try:
        return f.stat().st_mtime_ns
    except FileNotFoundError:
        return None


class CheckpointCB(Callback):
    """Saves checkpoints into the folder `path` every `every_n_batches` training batches
    and/or after every epoch, keeping the newest `keep` files.

    Ctrl-C during the fit does not stop in the middle of a batch: the batch finishes, a
    checkpoint is saved, every cleanup runs and KeyboardInterrupt reaches you; a second
    Ctrl-C stops at once. Resume with `learn.fit(n_epochs, resume=path)`.
    """

    order = Order.CHECKPOINT
    main_fit_only = True

    def __init__(self, path: str | Path, every_n_batches: int | None = None,
                 every_epoch: bool = True, keep: int | None = 1) -> None:
        if every_n_batches is not None and every_n_batches < 1:
            raise ValueError("CheckpointCB: every_n_batches must be >= 1 or None, got "
                             f"{every_n_batches}")
        if keep is not None and keep < 1:
            raise ValueError(f"CheckpointCB: keep must be >= 1 or None (keep all), got {keep}")
        self.path = Path(path)
        self.every_n_batches = every_n_batches
        self.every_epoch = every_epoch
        self.keep = keep
        self.saved: list[Path] = []
        self.interrupted = False  # set by Ctrl-C: finish the batch, save, then stop

    def before_fit(self, learn: Learner) -> None:
        if is_rank0():
            self.path.mkdir(parents=True, exist_ok=True)
        self.interrupted = False
        # Files already there (an earlier run, or the run being resumed) count towards `keep`.
        found = [*self.path.glob(f"ckpt_*{SUFFIX}"), *self.path.glob(f"ckpt_*{SHARDED_SUFFIX}")]
        dated = [(_mtime(f), f) for f in found]
        existing = [f for t, f in sorted((t, f) for t, f in dated if t is not None)]
        kept = [f for f in self.saved if f.exists()]
        self.saved = [f for f in existing if f not in self.saved] + kept
        _CTRL_C.join(self)

    def cleanup_fit(self, learn: Learner) -> None:
        _CTRL_C.leave(self)

    # ---- when to save -----------------------------------------------------------------------
    def after_batch(self, learn: Learner) -> None:
        if self.interrupted:
            path = self.save(learn)  # (only rank 0 lists what it saved: use the path)
            if _CTRL_C.saved_by_all(self):
                raise KeyboardInterrupt(f"interrupted; checkpoint saved to {path}")
            return
        n = self.every_n_batches  # counted over the fit's training batches (learn.step)
        if n and learn.training and (learn.step + 1) % n == 0:
            self.save(learn)

    def after_epoch(self, learn: Learner) -> None:
        last_phase = not learn.training or not learn.run_valid
        if self.every_epoch and last_phase:
            self.save(learn)

    def after_cancel_fit(self, learn: Learner) -> None:
        # Stopped at an epoch's end (early stopping): keep that epoch too. A cancel in the
        # middle of a batch (TerminateOnNaNCB) leaves the last good checkpoint as it is.
        epoch_done = not learn.training or not learn.run_valid
        if self.every_epoch and learn.position.phase_done and epoch_done:
            self.save(learn)
        self._stop_if_interrupted(learn)

    def after_fit(self, learn: Learner) -> None:
        self._stop_if_interrupted(learn)

    def _stop_if_interrupted(self, learn: Learner) -> None:
        if self.interrupted:  # Ctrl-C came after the last batch: the fit is complete, say so
            path = self.save(learn)
            if _CTRL_C.saved_by_all(self):
                raise KeyboardInterrupt(f"interrupted; checkpoint saved to {path}")

    def save(self, learn: Learner) -> Path:
        """Save a checkpoint now, named by its loop position; prune old ones. Under
        torch.distributed only rank 0 writes, except for a sharded model (FSDP): then every
        rank writes its shards into one checkpoint folder."""
        epoch, done, train_done = learn.position.now(learn)
        sharded = is_sharded(learn.model)
        suffix = SHARDED_SUFFIX if sharded else SUFFIX
        name = f"ckpt_{epoch:05d}_{done:07d}{'_t' if train_done else ''}{suffix}"
        # every rank's random states, gathered by all ranks at this same point (not for a
        # Ctrl-C save, which one rank may make alone: that one holds rank 0's states only)
        ranks = None if self.interrupted else gather_rng_states(learn)
        if not is_rank0() and not sharded:
            return self.path / name
        path = save_checkpoint(learn, self.path / name, ranks)
        if is_rank0():
            if path in self.saved:
                self.saved.remove(path)
            self.saved.append(path)
            while self.keep is not None and len(self.saved) > self.keep:
                remove_checkpoint(self.saved.pop(0))
        if sharded:
            barrier()  # the folder is pruned before any rank goes on (and may read it)
        return path
