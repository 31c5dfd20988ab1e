"""Sharded checkpoints: a folder written with torch.distributed.checkpoint (DCP) when the
model's parameters are sharded (FSDP2's DTensors).

Each rank writes its own shards of the weights and optimizer state; everything else in the
checkpoint (loop position, callbacks' states, every rank's RNG states, hyper-parameters) is
the same dict `save_checkpoint` builds, stored by rank 0 next to them as `nanofit.pt`. The
folder is written under a temporary name and renamed once every rank finished, so a crash
leaves the earlier checkpoints and no half-written "newest" one.

Loading runs no code from the files: the tensors are read by DCP with
`torch.load(weights_only=True)`, DCP's `.metadata` (a pickle) through an unpickler that
builds only DCP's own metadata classes, `nanofit.pt` with `load_file`, and a checkpoint that
asks for anything but tensors is refused. A checkpoint loads into any number of processes
(DCP reshards), into a single process without torch.distributed, or into one file with
`nanofit.consolidate`.

torch.distributed.checkpoint is imported when a sharded checkpoint is written or read, not
with nanofit: it takes most of a second to import, and only FSDP runs need it.
"""
from __future__ import annotations

import os
import pickle
import secrets
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .distributed import barrier, is_dtensor, is_rank0, unwrap_model
from .files import atomic_save, fsync_folder, load_file, plain_state

__all__ = ["is_sharded", "is_sharded_checkpoint", "save_sharded", "read_sharded",
           "distribute_full",
           "load_shards", "load_full", "remove_checkpoint", "META", "SHARDED_SUFFIX"]

META = "nanofit.pt"  # the checkpoint's non-tensor part, written by rank 0
SHARDED_SUFFIX = ".dcp"  # CheckpointCB's name for checkpoint folders


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model is sharded by FSDP2's `fully_shard`: told by the module, not by its
    parameters, which FSDP holds unsharded between a forward and a backward (or all along,
    with reshard_after_forward=False); else by DTensor parameters."""
    model = unwrap_model(model)
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    if fsdp is not None and isinstance(model, getattr(fsdp, "FSDPModule", ())):
        return True
    return any(is_dtensor(p) for p in model.parameters())


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a complete sharded checkpoint folder (DCP's metadata and ours)."""
    path = Path(path)
    return path.is_dir() and (path / META).is_file() and (path / ".metadata").is_file()


def _gather_problems(failed: BaseException | None) -> list[str]:
    """Every rank's failure seen by all (a collective, so it also waits for every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [] if failed is None else [str(failed)]
    mine = None if failed is None else f"rank {dist.get_rank()}: {type(failed).__name__}: {failed}"
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [p for p in everyone if p is not None]


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file or folder; a folder is renamed to a hidden name first, so a
    crash while deleting never leaves a partial folder that looks like a checkpoint."""
    if path.is_dir():
        trash = path.parent / f".{path.name}.{secrets.token_hex(4)}.old"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---- saving -------------------------------------------------------------------------------------
def _split(ckpt: dict[str, Any], model: torch.nn.Module,
           opt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's tensors for DCP (flat keys `model.<name>`, `opt.<param>.<key>`) and
    the rest, with the optimizer state's layout, for `nanofit.pt`."""
    weights = ckpt["model"]
    tensors = {f"model.{k}": v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    meta = {**ckpt, "model": {k: v for k, v in weights.items()
                              if not isinstance(v, torch.Tensor)}}
    layout: dict[str, Any] = {"params": [], "opt_keys": {}}
    osd = ckpt.get("opt")
    if osd is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        try:
            order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        except KeyError as e:
            raise ValueError("a sharded checkpoint names the optimizer's parameters by their "
                             "names in the model, and the optimizer holds a parameter that is "
                             "not the model's; build the optimizer over learn.model") from e
        other: dict[int, dict[str, Any]] = {}
        for i, state in osd["state"].items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"opt.{order[i]}.{k}"] = v
                    layout["opt_keys"].setdefault(i, []).append(k)
                else:
                    other.setdefault(i, {})[k] = v
        layout["params"] = order
        meta["opt"] = {"state": other, "param_groups": osd["param_groups"]}
    meta["sharded"] = layout
    return tensors, meta


def save_sharded(ckpt: dict[str, Any], model: torch.nn.Module, opt: Any,
                 path: str | Path) -> Path:
    """Write the checkpoint `ckpt` (as `save_checkpoint` builds it, its model and optimizer
    state sharded) as the folder `path`. A collective: every rank calls it at the same point.
    The folder appears, complete, only after every rank finished writing."""
    path = Path(path)
    tensors, meta = _split(ckpt, unwrap_model(model), opt)
    meta = plain_state(meta, "checkpoint")  # refuse what cannot be stored before anyone writes
    tmp = path.parent / f".{path.name}.tmp"
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir()
    barrier()
    failed: BaseException | None = None
    try:
        import torch.distributed.checkpoint as dcp

        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        if is_rank0():
            atomic_save(meta, tmp / META)
    except Exception as e:
        failed = e
    # every rank wrote its part, or one failed: then every rank raises and none renames
    problems = _gather_problems(failed)
    if problems and is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written folder stays behind
    if failed is not None:
        raise failed
    if problems:
        raise RuntimeError(f"saving the sharded checkpoint {str(path)!r} failed on another "
                           f"rank: {problems[0]}")
    if is_rank0():
        if path.exists():  # the same position saved again
            remove_checkpoint(path)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    barrier()  # the folder exists for every rank before any goes on
    return path


# ---- reading ------------------------------------------------------------------------------------
_DCP = "torch.distributed.checkpoint"
_ALLOWED = {(f"{_DCP}.metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "BytesStorageMetadata", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")} | {
    (f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` building only its own data classes, torch dtypes, sizes and
    paths: a file naming anything else is refused, so reading it runs no code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}: nanofit "
                                     "never runs code from a file")


_READER: Any = None


def _safe_reader(path: Path) -> Any:
    """DCP's file reader for `path`, reading its metadata with `_MetadataUnpickler` and
    refusing to read anything but tensors (DCP unpickles other values with
    weights_only=False). The class is made on first use (DCP is imported then)."""
    global _READER
    if _READER is None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
        from torch.distributed.checkpoint.planner import LoadItemType

        class SafeReader(FileSystemReader):
            def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
                with open(Path(self.path) / ".metadata", "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
                if not isinstance(metadata, Metadata):
                    raise ValueError(f"its .metadata holds a {type(metadata).__name__}, not "
                                     "DCP's Metadata")
                metadata.storage_meta = metadata.storage_meta or StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                return metadata

            def read_data(self, plan: Any, planner: Any) -> Any:
                if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
                    raise ValueError("a sharded nanofit checkpoint holds tensors only; "
                                     "refusing to unpickle other values from it")
                return super().read_data(plan, planner)

        _READER = SafeReader
    return _READER(path)


def _damaged(path: Path, problem: str) -> ValueError:
    return ValueError(f"checkpoint {str(path)!r} is damaged or was not written by nanofit: "
                      f"{problem}; use an earlier checkpoint")


def _tensor_metadata(path: Path) -> dict[str, Any]:
    """DCP's metadata of each tensor in the checkpoint folder (size, dtype), by key."""
    try:
        md = _safe_reader(path).read_metadata()
    except Exception as e:
        raise _damaged(path, f"its DCP metadata does not load ({type(e).__name__}: {e})") from e
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    return {k: v for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def read_sharded(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a sharded checkpoint folder, without its tensors: `model` holds
    tensors on the meta device with the saved names, shapes and dtypes (for the checks made
    before anything loads); `load_shards` reads the tensors themselves."""
    path = Path(path)
    ckpt = load_file(path / META, "checkpoint", "use an earlier checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("sharded"), dict):
        return ckpt  # read_checkpoint names what is wrong
    layout = ckpt["sharded"]
    params, keys = layout.get("params"), layout.get("opt_keys")
    if not (isinstance(params, list) and all(isinstance(p, str) for p in params)
            and isinstance(keys, dict) and all(
                isinstance(i, int) and 0 <= i < len(params) and isinstance(ks, list)
                and all(isinstance(k, str) for k in ks) for i, ks in keys.items())):
        raise _damaged(path, "its optimizer layout ('sharded') is not what nanofit writes")
    md = _tensor_metadata(path)
    weights = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype, device="meta")
               for k, m in md.items() if k.startswith("model.")}
    missing = [f"opt.{params[i]}.{k}" for i, ks in keys.items() for k in ks
               if f"opt.{params[i]}.{k}" not in md]
    if missing:
        raise _damaged(path, f"its optimizer state lacks {missing[:3]}")
    extra = ckpt.get("model")
    ckpt["model"] = {**weights, **(extra if isinstance(extra, dict) else {})}
    ckpt["sharded"] = {**layout, "path": str(path)}
    return ckpt


def _read(ckpt: dict[str, Any], targets: dict[str, torch.Tensor], no_dist: bool) -> None:
    path = Path(ckpt["sharded"]["path"])
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: we know
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(targets, storage_reader=_safe_reader(path), no_dist=no_dist)
    except Exception as e:
        raise _damaged(path, f"its shards do not load ({type(e).__name__}: {e})") from e


def _with_tensors(ckpt: dict[str, Any], targets: dict[str, torch.Tensor],
                  with_opt: bool) -> dict[str, Any]:
    """`ckpt` with the tensors read into `targets` in the places a checkpoint file has them."""
    out = dict(ckpt)
    out["model"] = {k: targets.get(f"model.{k}", v) for k, v in ckpt["model"].items()}
    osd, layout = ckpt.get("opt"), ckpt["sharded"]
    if with_opt and osd is not None:
        state = {i: dict(s) for i, s in osd["state"].items()}
        for i, ks in layout["opt_keys"].items():
            for k in ks:
                state.setdefault(i, {})[k] = targets[f"opt.{layout['params'][i]}.{k}"]
        out["opt"] = {"state": dict(sorted(state.items())),
                      "param_groups": osd["param_groups"]}
    return out


def load_shards(model: torch.nn.Module, ckpt: dict[str, Any], with_opt: bool) -> dict[str, Any]:
    """`ckpt` (from `read_sharded`, checked against the learner) with its tensors read, laid
    out like this model's: sharded as its parameters under FSDP (DCP reshards whatever the
    number of processes that saved it), whole otherwise. Nothing in the model changes."""
    model = unwrap_model(model)
    md = _tensor_metadata(Path(ckpt["sharded"]["path"]))
    mine = model.state_dict()
    targets: dict[str, torch.Tensor] = {}
    for k in ckpt["model"]:
        saved = md.get(f"model.{k}")
        if saved is not None and isinstance(mine.get(k), torch.Tensor):
            targets[f"model.{k}"] = torch.empty_like(mine[k], dtype=saved.properties.dtype)
    layout = ckpt["sharded"]
    if with_opt and ckpt.get("opt") is not None:
        params = dict(model.named_parameters())
        for i, ks in layout["opt_keys"].items():
            p = params.get(layout["params"][i])
            for k in ks:
                key = f"opt.{layout['params'][i]}.{k}"
                m = md[key]
                if p is not None and tuple(m.size) == tuple(p.shape):  # sharded as its param
                    targets[key] = torch.empty_like(p, dtype=m.properties.dtype)
                else:  # a step count, or a state that is not shaped like the parameter
                    targets[key] = torch.empty(m.size, dtype=m.properties.dtype)
    _read(ckpt, targets, no_dist=not is_sharded(model))
    out = _with_tensors(ckpt, targets, with_opt)
    if hasattr(mine, "_metadata"):  # the modules' state-dict versions, as a file has them
        out["model"] = type(mine)(out["model"])
        out["model"]._metadata = mine._metadata
    return out


def distribute_full(model: torch.nn.Module, opt: Any, ckpt: dict[str, Any]) -> dict[str, Any]:
    """A single-file checkpoint (whole tensors, read by every rank) made to fit a sharded
    model: each weight, and each optimizer state tensor shaped like its parameter, becomes
    this rank's shard of it, placed as the model's are. Nothing changes in the learner."""
    from torch.distributed.tensor import distribute_tensor

    def like(full: Any, target: Any) -> Any:
        if is_dtensor(target) and isinstance(full, torch.Tensor) and full.shape == target.shape:
            return distribute_tensor(full.to(target.device), target.device_mesh,
                                     target.placements, src_data_rank=None)
        return full

    own = unwrap_model(model).state_dict()
    out = {**ckpt, "model": {k: like(v, own.get(k)) for k, v in ckpt["model"].items()}}
    if ckpt.get("opt") is not None:
        params = ([p for g in opt.param_groups for p in g["params"]] if opt is not None
                  else list(unwrap_model(model).parameters()))
        state = {i: {k: like(v, params[int(i)]) if int(i) < len(params) else v
                     for k, v in st.items()} for i, st in ckpt["opt"]["state"].items()}
        out["opt"] = {**ckpt["opt"], "state": state}
    return out


def load_full(ckpt: dict[str, Any]) -> dict[str, Any]:
    """`ckpt` (from `read_sharded`) with every tensor read whole, in this process alone: the
    content of a single-file checkpoint (`nanofit.consolidate`)."""
    md = _tensor_metadata(Path(ckpt["sharded"]["path"]))
    targets = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items()}
    _read(ckpt, targets, no_dist=True)
    out = _with_tensors(ckpt, targets, with_opt=True)
    del out["sharded"]
    return out
