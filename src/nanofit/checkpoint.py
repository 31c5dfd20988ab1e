"""Checkpoints: one atomically written file with everything a bit-exact resume needs.

A checkpoint holds the model, the optimizer (state and hyper-parameters), the loop position
(epoch, training batches done, whether the training phase is done), the RNG states now and at
the start of the current epoch (so the epoch's shuffled order can be replayed), and the state
of every callback with `state_dict()`. It is read with `torch.load(weights_only=True)`:
loading never runs code from the file.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .checks import check_first_batch
from .data import rebuild_loader
from .distributed import unwrap_model
from .torch_utils import get_rng_state, loader_generators, set_rng_state

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["LoopPosition", "save", "load", "save_checkpoint", "read_checkpoint", "load_checkpoint",
           "newest_checkpoint", "read_for_resume", "atomic_save", "capture_rng", "restore_rng"]

FORMAT = "nanofit.checkpoint"
VERSION = 1
SUFFIX = ".pt"


# ---- RNG states as plain tensors and numbers (what weights_only loading accepts) ------------
def capture_rng(dls: Any) -> dict[str, Any]:
    """Every global RNG and the data loaders' generators, in a form torch.load can read safely."""
    state = get_rng_state()
    name, keys, pos, has_gauss, cached = state.pop("numpy")
    state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached": cached}
    state["python"] = list(state["python"][1]), state["python"][0]
    state["loaders"] = [g.get_state() for g in loader_generators(dls)]
    return state


def restore_rng(state: dict[str, Any], dls: Any) -> None:
    """Put back what `capture_rng` captured (loader generators matched by position)."""
    state = dict(state)
    np_state = state.pop("numpy")
    keys = np_state["keys"].numpy().astype(np.uint32)
    internal, version = state.pop("python")
    full = {"python": (version, tuple(internal), None),
            "numpy": (np_state["name"], keys, np_state["pos"], np_state["has_gauss"],
                      np_state["cached"]), **state}
    set_rng_state(full)
    gens = loader_generators(dls)
    if len(gens) != len(state["loaders"]):
        warnings.warn(f"the checkpoint has {len(state['loaders'])} loader generators, the data has "
                      f"{len(gens)}: the shuffled order will differ from the original run")
    for g, s in zip(gens, state["loaders"]):
        g.set_state(s)


# ---- writing and reading ------------------------------------------------------------------
def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, flush and fsync, then rename over
    `path`: a crash at any point leaves either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # not every file system lets a folder be fsynced
    return path


def _cb_keys(cbs: list[Any]) -> list[tuple[str, Any]]:
    """Stable names for the callbacks that have state: class name, '#2' for a second one."""
    seen: dict[str, int] = {}
    out = []
    for cb in cbs:
        if not callable(getattr(cb, "state_dict", None)):
            continue
        name = type(cb).__name__
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", cb))
    return out


def save_checkpoint(learn: Learner, path: str | Path) -> Path:
    """Write everything a resume needs to `path` (atomically); returns the path."""
    pos = learn.position
    epoch, done, train_done = pos.now(learn)
    mid_valid = pos.fitting and not learn.training and not pos.phase_done
    rng = pos.valid_rng if mid_valid else capture_rng(learn.dls)
    ckpt = {
        "format": FORMAT, "version": VERSION,
        "model": unwrap_model(learn.model).state_dict(),  # loadable without DDP
        "opt": learn.opt.state_dict() if learn.opt is not None else None,
        "opt_type": type(learn.opt.opt).__name__ if learn.opt is not None else None,
        "n_batches": pos.n_train,
        "lr": learn.lr,
        "n_epochs": learn.n_epochs,
        "position": {"epoch": epoch, "batches_done": done, "train_done": train_done},
        "rng": rng,
        "epoch_rng": pos.epoch_rng if done and not train_done else None,
        "callbacks": {key: cb.state_dict() for key, cb in _cb_keys(learn.cbs)},
    }
    return atomic_save(ckpt, path)


def save(learn: Learner, path: str | Path) -> str:
    """`learn.save(path)`: write a checkpoint (atomically) that `learn.load` and
    `fit(resume=path)` read. Inside a fit, call it from after_batch, before_epoch or
    after_epoch (the loop position is exact there). Returns the path."""
    return str(save_checkpoint(learn, path))


def load(learn: Learner, path: str | Path, with_opt: bool = True) -> Learner:
    """`learn.load(path)`: the weights (and, with `with_opt`, the optimizer) from a checkpoint
    file, or the newest in a folder; `fit(resume=path)` also continues the run."""
    load_checkpoint(learn, read_checkpoint(path), with_opt)
    return learn


def newest_checkpoint(folder: str | Path) -> Path:
    """The most recently written checkpoint file in `folder`."""
    folder = Path(folder)
    files = [f for f in folder.glob(f"*{SUFFIX}") if f.is_file()]
    if not files:
        raise FileNotFoundError(f"no checkpoint (*{SUFFIX}) in folder {str(folder)!r}")
    return max(files, key=lambda f: (f.stat().st_mtime_ns, f.name))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint file (or the newest in a folder) without running its code."""
    path = Path(path)
    if path.is_dir():
        path = newest_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {str(path)!r}: it holds objects other than tensors "
                         f"and plain data, and nanofit never runs code from a checkpoint "
                         f"({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot read checkpoint {str(path)!r}: the file is truncated or "
                         f"corrupt ({type(e).__name__}: {first}); "
                         "use an earlier checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a nanofit checkpoint (no '{FORMAT}' marker); "
                         "load plain state dicts with model.load_state_dict(torch.load(...))")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{str(path)!r} was written by a newer nanofit (format version "
                         f"{ckpt['version']} > {VERSION}); upgrade nanofit to read it")
    ckpt["path"] = str(path)
    return ckpt


def read_for_resume(path: str | Path, learn: Learner, n_epochs: int) -> dict[str, Any]:
    """Read a checkpoint to resume from, refusing or warning about what cannot work."""
    ckpt = read_checkpoint(path)
    check_resumable(ckpt, learn, n_epochs)
    return ckpt


def check_resumable(ckpt: dict[str, Any], learn: Learner, n_epochs: int) -> None:
    """Refuse or warn about resuming from `ckpt` into this fit."""
    pos = ckpt.get("position")
    if not isinstance(pos, dict):
        raise ValueError(f"{ckpt['path']!r} holds weights only (e.g. from SaveBestCB), not a "
                         "training position: load it with learn.load(path), or resume from a "
                         "CheckpointCB file")
    if pos["epoch"] >= n_epochs:
        raise ValueError(f"checkpoint {ckpt['path']!r} is at epoch {pos['epoch']}, so "
                         f"fit({n_epochs}, resume=...) has nothing left to do; ask for more epochs")
    if ckpt.get("n_epochs") not in (None, n_epochs):
        warnings.warn(f"resuming a {ckpt['n_epochs']}-epoch run as a {n_epochs}-epoch fit: "
                      "schedules over the whole fit (one-cycle...) will not match the original")
    train = getattr(learn.dls, "train", None)
    n = len(train) if train is not None and hasattr(train, "__len__") else None
    if ckpt.get("n_batches") and n is not None and ckpt["n_batches"] != n:
        warnings.warn(f"the checkpoint's training loader had {ckpt['n_batches']} batches, this one "
                      f"has {n}: the resumed epoch cannot follow the original order")
    loaders = (train, getattr(learn.dls, "valid", None))
    if any(getattr(dl, "persistent_workers", False) for dl in loaders):
        warnings.warn("resuming with persistent_workers=True: the workers' base seed is drawn "
                      "once per run, so the resumed run's random streams can differ from the "
                      "original; use persistent_workers=False for a bit-exact resume")


def load_checkpoint(learn: Learner, ckpt: dict[str, Any], with_opt: bool = True) -> None:
    """Put the checkpoint's model weights (and optimizer) into the learner."""
    try:
        unwrap_model(learn.model).load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {ckpt['path']!r} does not fit this model: {e}") from None
    if with_opt and ckpt.get("opt") is not None:
        if learn.opt is None:
            learn.lr = ckpt.get("lr", learn.lr)
            learn.create_opt()
        if learn.opt is None:
            return
        saved, mine = ckpt.get("opt_type"), type(learn.opt.opt).__name__
        if saved is not None and saved != mine:
            raise ValueError(f"checkpoint {ckpt['path']!r} holds a {saved} optimizer, the learner "
                             f"has {mine}: use the same opt_func, or load(path, with_opt=False)")
        try:
            learn.opt.load_state_dict(ckpt["opt"])
        except ValueError as e:
            raise ValueError(f"checkpoint {ckpt['path']!r}: its optimizer does not fit this "
                             f"learner's ({e}); the param groups come from Learner(splitter=...), "
                             "which must match the run that saved it") from None


def _load_cb_states(learn: Learner, states: dict[str, Any]) -> None:
    mine = dict(_cb_keys(learn.cbs))
    missing = sorted(set(states) - set(mine))
    if missing:
        warnings.warn(f"the checkpoint has state for callbacks {missing} that this fit does not "
                      "have; their state is ignored")
    for key, cb in mine.items():
        if key in states:
            cb.load_state_dict(states[key])


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
        load_checkpoint(learn, ckpt)
        pos = ckpt["position"]
        if pos["batches_done"] and not pos["train_done"]:
            # Mid-epoch: callback states go in after the resumed phase's before_epoch (which
            # resets running totals); see _resumed_batches.
            self.epoch_rng = ckpt["epoch_rng"]
            self._resume = ckpt
        else:
            _load_cb_states(learn, ckpt.get("callbacks", {}))
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
        _load_cb_states(learn, ckpt.get("callbacks", {}))
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
