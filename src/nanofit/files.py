"""Files that survive crashes and hold nothing but data: plain values, atomic writes, safe reads.

Checkpoints and exports are written with `atomic_save` (a crash leaves the old file or the new
one, with the process umask's mode) after `plain_state` turned every value into plain Python or
tensors, so `load_file` can read them with `torch.load(weights_only=True)`: loading never runs
code from a file, and any damage is an error naming the file.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

__all__ = ["plain_state", "atomic_save", "load_file", "fsync_folder"]


# ---- plain values: all that torch.load(weights_only=True) reads back --------------------------
_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.device,
           torch.dtype, torch.Size)


def plain_state(obj: Any, where: str = "state") -> Any:
    """`obj` with every value a checkpoint cannot hold turned into plain Python: NumPy numbers
    and 0-d arrays into int/float/bool, other arrays into lists, paths into str, tuple/dict
    subclasses (namedtuples, defaultdicts) into tuple/dict. Tensors stay; parts that need no
    change are returned as they are. Anything else is refused here, naming where it is
    (`where`), rather than written into a file that would then refuse to load."""
    if type(obj) in _LEAVES or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        return _plain_dict(obj, where)
    if isinstance(obj, (list, tuple, set, frozenset)):
        return _plain_collection(obj, where)
    return _plain_scalar(obj, where)


def _plain_dict(obj: dict, where: str) -> dict:
    items = [(plain_state(k, where), v if type(v) in _LEAVES else plain_state(v, f"{where}[{k!r}]"))
             for k, v in obj.items()]
    kept = type(obj) in (dict, OrderedDict)
    if kept and all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, obj.items())):
        return obj  # unchanged: a module's state dict keeps its _metadata
    out = OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if hasattr(obj, "_metadata"):
        out._metadata = obj._metadata  # type: ignore[attr-defined]
    return out


def _plain_collection(obj: list | tuple | set | frozenset, where: str) -> Any:
    items = [x if type(x) in _LEAVES else plain_state(x, f"{where}[{i}]")
             for i, x in enumerate(obj)]
    if type(obj) in (list, tuple, set) and all(x is y for x, y in zip(items, obj)):
        return obj
    if isinstance(obj, (set, frozenset)):
        return set(items)
    return items if isinstance(obj, list) else tuple(items)  # namedtuples become tuples


def _plain_scalar(obj: Any, where: str) -> Any:
    if isinstance(obj, np.ndarray):
        return plain_state(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return plain_state(obj.item(), where)
    # Subclasses of the plain types (IntEnum, StrEnum...) would pickle as their own class.
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, complex):
        return complex(obj)
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"cannot save {where}: it is a {type(obj).__module__}.{type(obj).__name__}, "
                    "and nanofit files hold only tensors and plain Python values (numbers, "
                    "strings, lists, tuples, dicts), so that loading them runs no code; "
                    "return such values from state_dict()")


# ---- writing files ----------------------------------------------------------------------------
def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, flush and fsync, then rename over
    `path`: a crash at any point leaves either the old file or the new one, never half. A
    failure to write raises an OSError of the same kind (errno) naming `path`, and leaves no
    temporary file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _new_temp_file(path)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    fsync_folder(path.parent)  # make the rename itself durable
    return path


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """A new, empty file next to `path`, opened for writing. Created with mode 0o666 as
    open() and torch.save do, so the OS applies the umask (no need to read it); mkstemp's
    0o600 would survive the rename."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def _write_error(path: Path, e: OSError) -> OSError:
    """`e` (its errno, so its class: PermissionError...) told as a failure to write `path`."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is not None and str(e.filename) != str(path):
        reason += f": {str(e.filename)!r}"
    message = f"cannot write {str(path)!r} ({reason}); an earlier file there is unchanged"
    return OSError(e.errno, message) if e.errno is not None else OSError(message)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (where the file system allows)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # not every file system lets a folder be fsynced


# ---- reading files ----------------------------------------------------------------------------
def load_file(path: Path, what: str, fix: str, map_location: Any = "cpu") -> Any:
    """torch.load(path, weights_only=True): no code from the file runs. Whatever torch raises
    about the file's content becomes a ValueError naming the file, `what` it should be and
    the `fix`; failing to open it (permissions...) is the OSError of open(), naming it."""
    with open(path, "rb") as f:
        try:
            return torch.load(f, map_location=map_location, weights_only=True)
        except Exception as e:  # the unpickler and the zip reader raise all kinds
            raise _read_error(path, what, fix, e) from _cause(e)


def _read_error(path: Path, what: str, fix: str, e: Exception) -> ValueError:
    unsafe = _unsafe_global(e)
    if unsafe:
        return ValueError(f"refusing to load {what} {str(path)!r}: it holds objects other than "
                          f"tensors and plain data (it names {unsafe}), and nanofit never runs "
                          "code from a file")
    return ValueError(f"cannot read {what} {str(path)!r}: the file is truncated or corrupt "
                      f"({type(e).__name__}: {_reason(e)}); {fix}")


def _unsafe_global(e: Exception) -> str | None:
    # torch's two wordings: "Unsupported global: GLOBAL x.y" and, for blocked modules (os,
    # posix, subprocess...), "Trying to load unsupported GLOBAL posix.system whose module..."
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(e))
    return found[1] if found else None


def _cause(e: Exception) -> Exception | None:
    """Chain torch's error, except its advice to load an unsafe file with weights_only=False."""
    return None if _unsafe_global(e) else e


def _reason(e: BaseException) -> str:
    """The useful line of torch's message (the unpickler's own error, not its advice)."""
    text = str(e)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    lines = [found[1]] if found else [line for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else "no details"
