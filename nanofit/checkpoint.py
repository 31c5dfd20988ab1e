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
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .data import TensorLoader
from .distributed import ShardedTensorLoader, unwrap_model
from .state import get_rng_state, loader_generators, set_rng_state

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "newest_checkpoint",
           "atomic_save", "capture_rng", "restore_rng", "resume_batches"]

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


def position(learn: Any) -> tuple[int, int, bool]:
    """Where the loop stands, as (epoch, training batches done, training phase done).

    Inside a fit it is exact at `after_batch`, `before_epoch` and `after_epoch` (in the middle
    of a batch the batch is counted as done); outside a fit the run is complete.
    """
    if not getattr(learn, "fitting", False):
        return learn.n_epochs, 0, False
    if learn.phase is None:
        raise ValueError("learn.save inside a fit works from after_batch, before_epoch or "
                         "after_epoch; before the first epoch there is nothing new to save")
    if learn.training:
        if learn.phase_done:  # after_epoch of the training phase
            return learn.epoch, learn.n_iter, True
        return learn.epoch, learn.iter + 1, False
    if learn.phase_done:  # after_epoch of the validation phase: the epoch is complete
        return learn.epoch + 1, 0, False
    return learn.epoch, learn.n_iter_train, True  # during validation: redo it on resume


def save_checkpoint(learn: Any, path: str | Path) -> Path:
    """Write everything a resume needs to `path` (atomically); returns the path."""
    epoch, done, train_done = position(learn)
    mid_valid = getattr(learn, "fitting", False) and not learn.training and not learn.phase_done
    rng = learn.valid_rng if mid_valid else capture_rng(learn.dls)
    ckpt = {
        "format": FORMAT, "version": VERSION,
        "model": unwrap_model(learn.model).state_dict(),  # loadable without DDP
        "opt": learn.opt.state_dict() if learn.opt is not None else None,
        "opt_type": type(learn.opt.opt).__name__ if learn.opt is not None else None,
        "n_batches": learn.n_iter_train,
        "lr": learn.lr,
        "n_epochs": learn.n_epochs,
        "position": {"epoch": epoch, "batches_done": done, "train_done": train_done},
        "rng": rng,
        "epoch_rng": getattr(learn, "epoch_rng", None) if done and not train_done else None,
        "callbacks": {key: cb.state_dict() for key, cb in _cb_keys(learn.cbs)},
    }
    return atomic_save(ckpt, path)


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
        raise ValueError(f"cannot read checkpoint {str(path)!r}: the file is truncated or "
                         f"corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "use an earlier checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a nanofit checkpoint (no '{FORMAT}' marker); "
                         "load plain state dicts with model.load_state_dict(torch.load(...))")
    if ckpt.get("version", 0) > VERSION:
        raise ValueError(f"{str(path)!r} was written by a newer nanofit (format version "
                         f"{ckpt['version']} > {VERSION}); upgrade nanofit to read it")
    ckpt["path"] = str(path)
    return ckpt


def read_for_resume(path: str | Path, learn: Any, n_epochs: int) -> dict[str, Any]:
    """Read a checkpoint to resume from, refusing or warning about what cannot work."""
    ckpt = read_checkpoint(path)
    check_resumable(ckpt, learn, n_epochs)
    return ckpt


def check_resumable(ckpt: dict[str, Any], learn: Any, n_epochs: int) -> None:
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
    n = len(train) if hasattr(train, "__len__") else None
    if ckpt.get("n_batches") and n is not None and ckpt["n_batches"] != n:
        warnings.warn(f"the checkpoint's training loader had {ckpt['n_batches']} batches, this one "
                      f"has {n}: the resumed epoch cannot follow the original order")
    if any(getattr(dl, "persistent_workers", False) for dl in (train, getattr(learn.dls, "valid", None))):
        warnings.warn("resuming with persistent_workers=True: the workers' base seed is drawn "
                      "once per run, so the resumed run's random streams can differ from the "
                      "original; use persistent_workers=False for a bit-exact resume")


def load_checkpoint(learn: Any, ckpt: dict[str, Any], with_opt: bool = True) -> None:
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


def restore_for_resume(learn: Any, ckpt: dict[str, Any]) -> tuple[int, int, bool]:
    """Everything but the batch order: weights, optimizer, callbacks, RNG. Returns the position."""
    load_checkpoint(learn, ckpt)
    pos = ckpt["position"]
    if pos["batches_done"] and not pos["train_done"]:
        # Mid-epoch: callback states go in after the resumed phase's before_epoch (which
        # resets running totals); the epoch's batch order is replayed from its starting RNG,
        # then the RNG moves to where it stood at the checkpoint. See resume_batches.
        learn.epoch_rng = ckpt["epoch_rng"]
        learn.resume_rng = ckpt["rng"]
        learn.resume_cb_states = ckpt.get("callbacks", {})
    else:
        _load_cb_states(learn, ckpt.get("callbacks", {}))
        restore_rng(ckpt["rng"], learn.dls)
    return pos["epoch"], pos["batches_done"], pos["train_done"]


def _load_cb_states(learn: Any, states: dict[str, Any]) -> None:
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
        yield from self.batches

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


def _skipping_iterator(dl: Any, skip: int) -> Iterator[Any]:
    if isinstance(dl, (TensorLoader, ShardedTensorLoader)):
        return dl.iter_from(skip)
    if (isinstance(dl, torch.utils.data.DataLoader) and dl.batch_sampler is not None
            and not isinstance(dl.dataset, torch.utils.data.IterableDataset)):
        kwargs = {k: getattr(dl, k) for k in ("num_workers", "collate_fn", "pin_memory", "timeout",
                                              "worker_init_fn", "multiprocessing_context",
                                              "generator", "prefetch_factor")}
        if kwargs["num_workers"] == 0:
            kwargs.pop("prefetch_factor")
        skipper = _SkipBatches(dl.batch_sampler, skip)
        resumed = torch.utils.data.DataLoader(dl.dataset, batch_sampler=skipper, **kwargs)
        it = iter(resumed)  # draws the workers' base seed, as the original epoch did
        skipper.materialize()  # then the sampler's order, as the original first batch did
        return it
    warnings.warn(f"resuming mid-epoch on a {type(dl).__name__} that cannot skip batches by "
                  f"index: fetching and dropping {skip} batches")
    it = iter(dl)
    for _ in range(skip):
        next(it)
    return it


def resume_batches(learn: Any, dl: Any, skip: int) -> Iterator[Any]:
    """The rest of an epoch after `skip` training batches, in the original run's order."""
    _load_cb_states(learn, learn.resume_cb_states)
    learn.resume_cb_states = None
    restore_rng(learn.epoch_rng, learn.dls)
    it = _skipping_iterator(dl, skip)
    restore_rng(learn.resume_rng, learn.dls)
    learn.resume_rng = None
    return it
