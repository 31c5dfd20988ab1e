"""Checkpoints: one atomically written file with everything a bit-exact resume needs.

A checkpoint holds the model, the optimizer (state and hyper-parameters), the loop position
(epoch or round, training batches done, whether the training phase is done, steps, passes over
the training data), the RNG states now and at the start of the current pass over the training
data (so its shuffled order can be replayed), the training loader's own position when it keeps
one (`state_dict()`), and the state of every callback with `state_dict()`. It holds only
tensors and plain Python values and is read with `torch.load(weights_only=True)`: loading never
runs code from the file. A load is all or nothing: a checkpoint that does not fit the learner
is refused before anything changes.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import is_distributed, rank, unwrap_model, world_size
from .files import atomic_save, load_file, plain_state
from .loading import (
    cb_keys,
    check_loadable,
    check_weights,
    damaged,
    load_cb_states,
    load_checkpoint,
    opt_class,
)
from .sharded import SHARDED_SUFFIX, is_sharded, is_sharded_checkpoint, load_full, read_sharded
from .sharded import save_sharded as _save_sharded
from .steps import state_owner
from .torch_utils import (
    get_rng_state,
    length,
    loader_generators,
    set_rng_state,
)

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["save", "load", "save_checkpoint", "read_checkpoint", "load_checkpoint",
           "newest_checkpoint", "checkpoints_in", "gather_rng_states", "for_this_rank",
           "rng_states", "capture_rng", "restore_rng", "load_cb_states", "check_weights",
           "check_loadable", "is_weights", "atomic_save", "plain_state", "load_file",
           "consolidate", "is_sharded", "SHARDED_SUFFIX"]

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


def is_weights(value: Any) -> bool:
    """A state dict: str keys, tensor values (a module's `_extra_state` may be anything)."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
        for k, v in value.items())


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_lr(value: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                for v in values)


def _is_opt_state(value: Any) -> bool:
    """What torch's Optimizer.state_dict() gives: {'state': {...}, 'param_groups': [...]}."""
    if not isinstance(value, dict) or not isinstance(value.get("state"), dict):
        return False
    groups = value.get("param_groups")
    return isinstance(groups, list) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list)
        and all(_is_int(p) for p in g["params"]) for g in groups)


def _is_position(value: Any) -> bool:
    return (isinstance(value, dict) and _is_int(value.get("epoch"))
            and _is_int(value.get("batches_done")) and isinstance(value.get("train_done"), bool)
            and all(_is_int(value[k]) for k in ("step", "passes", "in_pass") if k in value))


def _structure_problems(ckpt: dict[str, Any]) -> list[str]:
    """What in a checkpoint's entries is not what save_checkpoint (or SaveBestCB) writes."""
    checks = [
        ("model", is_weights, "a dict of tensors"),
        ("opt", lambda v: v is None or _is_opt_state(v), "an optimizer state dict"),
        ("opt_type", lambda v: v is None or isinstance(v, str), "a class name"),
        ("lr", lambda v: v is None or _is_lr(v), "a number or a list of numbers"),
        ("n_batches", lambda v: v is None or _is_int(v), "a number of batches"),
        ("n_epochs", lambda v: v is None or _is_int(v), "a number of epochs"),
        ("total_steps", lambda v: v is None or _is_int(v), "a number of steps"),
        ("valid_every", lambda v: v is None or _is_int(v, 1), "a number of steps"),
        ("position", lambda v: v is None or _is_position(v),
         "{'epoch': int, 'batches_done': int, 'train_done': bool}"),
        ("rng", lambda v: v is None or isinstance(v, dict), "a dict of RNG states"),
        ("epoch_rng", lambda v: v is None or isinstance(v, dict), "a dict of RNG states"),
        ("ranks", lambda v: v is None or (isinstance(v, list) and all(
            isinstance(r, dict) and {"rng", "epoch_rng"} <= set(r) <= {"rng", "epoch_rng",
                                                                      "loader", "callbacks"}
            and isinstance(r.get("callbacks", {}), dict) for r in v)),
         "a list of each rank's RNG states"),
        ("callbacks", lambda v: v is None or (isinstance(v, dict)
                                              and all(isinstance(k, str) for k in v)),
         "a dict of callback states"),
    ]
    return [f"{key!r} is not {kind} (got {type(ckpt.get(key)).__name__})"
            for key, ok, kind in checks if not ok(ckpt.get(key))]


# ---- checkpoints --------------------------------------------------------------------------------
def rng_states(learn: Learner) -> dict[str, Any]:
    """This process's RNG states for a checkpoint taken now: `rng` (now, or at the validation
    phase's start when saved in the middle of it: validation is redone on resume),
    `epoch_rng` (at the start of the pass over the training data, to replay its order
    mid-pass) and `loader`, the training loader's own position if it keeps one."""
    pos = learn.position
    epoch, done, train_done = pos.now(learn)
    mid_valid = pos.fitting and not learn.training and not pos.phase_done
    # after a step fit too: a resume with more steps continues its stream
    mid_pass = (done and not train_done) or (pos.plan.by_steps and pos.in_pass > 0)
    owner = state_owner(getattr(learn.dls, "train", None))
    return {"rng": pos.valid_rng if mid_valid else capture_rng(learn.dls),
            "epoch_rng": pos.epoch_rng if mid_pass else None,
            "loader": None if owner is None else owner.state_dict()}


def gather_rng_states(learn: Learner) -> list[dict[str, Any]] | None:
    """Every rank's own state, on every rank: its `rng_states` and its callbacks' states (a
    MetricsCB sums its own shard's batches). A collective: all ranks call it at the same
    point, as CheckpointCB does; None without torch.distributed."""
    if not is_distributed():
        return None
    mine = {**rng_states(learn),
            "callbacks": {key: cb.state_dict() for key, cb in cb_keys(learn.cbs)}}
    states: list[Any] = [None] * world_size()
    dist.all_gather_object(states, mine)
    return states


def for_this_rank(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with this rank's own RNG states (saved by every rank of a DDP run:
    per-rank seeds, dropout and augmentations resume exactly); as saved otherwise."""
    ranks = ckpt.get("ranks")
    if not ranks:
        return ckpt
    if len(ranks) != world_size():
        warnings.warn(f"checkpoint {ckpt.get('path')!r} was saved by {len(ranks)} processes and "
                      f"is resumed by {world_size()}: every rank gets rank 0's random states, so "
                      "the resumed run is not bit-exact")
        return ckpt
    mine = dict(ranks[rank()])
    states = _CallbackStates(mine.pop("callbacks", None) or ckpt.get("callbacks") or {})
    states.path = str(ckpt.get("path", "?"))
    return {**ckpt, **mine, "callbacks": states}


def save_checkpoint(learn: Learner, path: str | Path,
                    ranks: list[dict[str, Any]] | None = None) -> Path:
    """Write everything a resume needs to `path` (atomically); returns the path. Values are
    stored as tensors and plain Python (see `plain_state`), so the file always loads. `ranks`
    (from `gather_rng_states`) adds every rank's RNG states, restored each to its own.
    A sharded model (FSDP) is saved as a folder by every rank together: see sharded.py."""
    pos = learn.position
    epoch, done, train_done = pos.now(learn)
    states = rng_states(learn)
    train = getattr(learn.dls, "train", None)
    opt_state = None
    if learn.opt is not None and callable(getattr(learn.opt, "state_dict", None)):
        opt_state = learn.opt.state_dict()
    elif learn.opt is not None:
        warnings.warn(f"{type(learn.opt).__name__} has no state_dict(): the checkpoint holds no "
                      "optimizer state, so a resumed run starts it afresh (not bit-exact); "
                      "give the optimizer state_dict()/load_state_dict() to save it")
    ckpt = {
        "format": FORMAT, "version": VERSION,
        "model": unwrap_model(learn.model).state_dict(),  # loadable without DDP
        "opt": opt_state,
        "opt_type": opt_class(learn.opt) if opt_state is not None else None,
        "n_batches": length(train) or 0,
        "lr": learn.lr,
        "n_epochs": learn.n_epochs,
        "total_steps": pos.plan.total_steps if pos.plan.by_steps else None,
        "valid_every": pos.plan.valid_every if pos.plan.by_steps else None,
        "position": {"epoch": epoch, "batches_done": done, "train_done": train_done,
                     "step": pos.steps_done(learn), "passes": pos.passes,
                     "in_pass": pos.in_pass},
        **states,
        "ranks": ranks,
        "callbacks": {key: cb.state_dict() for key, cb in cb_keys(learn.cbs)},
    }
    if is_sharded(learn.model):  # each rank writes its shards (a collective)
        return _save_sharded(ckpt, learn.model, learn.opt, path)
    return atomic_save(plain_state(ckpt, "checkpoint"), path)


def save(learn: Learner, path: str | Path) -> str:
    """`learn.save(path)`: write a checkpoint (atomically) that `learn.load` and
    `fit(resume=path)` read. Inside a fit, call it from after_batch, before_epoch or
    after_epoch (the loop position is exact there). Returns the path."""
    return str(save_checkpoint(learn, path))


def load(learn: Learner, path: str | Path, with_opt: bool = True) -> Learner:
    """`learn.load(path)`: the weights (and, with `with_opt`, the optimizer) from a checkpoint
    file, or the newest in a folder; `fit(resume=path)` also continues the run. All or
    nothing: a checkpoint that does not fit leaves the learner as it was."""
    load_checkpoint(learn, read_checkpoint(path), with_opt)
    return learn


def checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoint files (*.pt) and complete sharded checkpoint folders in `folder`."""
    return [f for f in folder.glob("*") if not f.name.startswith(".") and (
        (f.suffix == SUFFIX and f.is_file()) or is_sharded_checkpoint(f))]


def _written(f: Path) -> tuple[int, str] | None:
    """When `f` was written, or None if it is gone (another process pruned it)."""
    try:
        return (f / "nanofit.pt" if f.is_dir() else f).stat().st_mtime_ns, f.name
    except FileNotFoundError:
        return None


def newest_checkpoint(folder: str | Path) -> Path:
    """The most recently written checkpoint in `folder`: a file, or a sharded checkpoint's
    folder (FSDP)."""
    folder = Path(folder)
    found = [(w, f) for f in checkpoints_in(folder) if (w := _written(f)) is not None]
    if not found:
        raise FileNotFoundError(f"no checkpoint (*{SUFFIX}, or a sharded checkpoint folder) "
                                f"in folder {str(folder)!r}")
    return max(found)[1]


class _CallbackStates(dict):
    """The callbacks' states read from a checkpoint, and the file they came from (`path`),
    which errors name."""

    path = "?"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint file (or the newest in a folder) without running its code.
    Every problem with the file is a ValueError naming it (FileNotFoundError if missing)."""
    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        path = newest_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if is_sharded_checkpoint(path):  # its tensors are read by load_checkpoint (DCP)
        ckpt = read_sharded(path)
    else:
        ckpt = load_file(path, "checkpoint", "use an earlier checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a nanofit checkpoint (no '{FORMAT}' marker); "
                         "load plain state dicts with model.load_state_dict(torch.load(...))")
    if not _is_int(ckpt.get("version"), 1):
        raise damaged(str(path), f"its format version is {ckpt.get('version')!r}")
    if ckpt["version"] > VERSION:
        raise ValueError(f"{str(path)!r} was written by a newer nanofit (format version "
                         f"{ckpt['version']} > {VERSION}); upgrade nanofit to read it")
    problems = _structure_problems(ckpt)
    if problems:
        raise damaged(str(path), "; ".join(problems))
    ckpt["path"] = str(path)
    ckpt["callbacks"] = _CallbackStates(ckpt.get("callbacks") or {})
    ckpt["callbacks"].path = str(path)
    return ckpt


def consolidate(ckpt_dir: str | Path, out_file: str | Path) -> Path:
    """Write the sharded checkpoint `ckpt_dir` (a folder saved under FSDP, or a folder of
    them: its newest) as one checkpoint file, which `learn.load` and `fit(resume=...)` read
    without torch.distributed. Runs in a single process; returns the file's path."""
    ckpt = read_checkpoint(ckpt_dir)
    if "sharded" not in ckpt:
        raise ValueError(f"{ckpt['path']!r} is a checkpoint file already, not a sharded "
                         "checkpoint folder")
    full = load_full(ckpt)
    del full["path"]
    return atomic_save(plain_state(full, "checkpoint"), out_file)
