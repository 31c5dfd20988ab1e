"""Small torch utilities: the default device, moving nested batches, eval mode, RNG states and
seeds, and freeing memory after an error."""
from __future__ import annotations

import gc
import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["def_device", "to_device", "to_cpu", "eval_mode", "get_rng_state", "set_rng_state",
           "loader_generators", "preserved_rng", "set_seed", "clean_mem", "loss_of", "logits_of",
           "length", "n_items"]


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def_device: torch.device = _default_device()
"""The device nanofit uses by default: cuda if available, else mps, else cpu."""


def to_device(x: Any, device: torch.device | str = def_device, non_blocking: bool = False) -> Any:
    """Move tensors to `device`, recursing into tuples, lists and dicts; other values pass."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, dict):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        moved = [to_device(v, device, non_blocking) for v in x]
        return type(x)(*moved) if hasattr(x, "_fields") else type(x)(moved)  # namedtuples too
    return x


def to_cpu(x: Any) -> Any:
    """Detach tensors and move them to the CPU, recursing into tuples, lists and dicts.

    Unlike the course's `to_cpu`, half-precision tensors keep their dtype (no float32 copy)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        moved = [to_cpu(v) for v in x]
        return type(x)(*moved) if hasattr(x, "_fields") else type(x)(moved)
    return x


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with `model` in eval mode, then give every submodule back its own mode
    (a partly frozen model keeps its mix of train and eval modules)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def get_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU, CUDA, MPS) global RNGs."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def loader_generators(dls: Any) -> list[torch.Generator]:
    """The torch.Generators that decide the order of `dls.train` and `dls.valid`, if any.

    Looks at a loader's own `generator` (TensorLoader, DataLoader) and at its sampler's
    (RandomSampler), batch sampler included.
    """
    found: list[torch.Generator] = []
    for name in ("train", "valid"):
        dl = getattr(dls, name, None)
        sampler = getattr(dl, "sampler", None)
        batch_sampler = getattr(dl, "batch_sampler", None)
        for owner in (dl, sampler, getattr(batch_sampler, "sampler", None)):
            gen = getattr(owner, "generator", None)
            if isinstance(gen, torch.Generator) and not any(gen is g for g in found):
                found.append(gen)
    return found


@contextmanager
def preserved_rng(dls: Any = None) -> Iterator[None]:
    """Run the block, then put every global RNG (and `dls`' loader generators) back, so
    that drawing a batch or running a forward pass for a look leaves training unchanged."""
    state = get_rng_state()
    gens = [(g, g.get_state()) for g in loader_generators(dls)] if dls is not None else []
    try:
        yield
    finally:
        set_rng_state(state)
        for g, s in gens:
            g.set_state(s)


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's and torch's random generators (CPU and every GPU) with `seed`.

    `deterministic=True` also makes torch use deterministic algorithms (cuDNN included; an op
    that has none raises an error) and `False` turns that mode off, as the course's
    `set_seed` does. Example: `set_seed(42)`
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator: CPU, CUDA, MPS
    if deterministic:  # cuBLAS needs this for deterministic matmuls (read when it starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic


def _clear_traceback(tb: TracebackType | None) -> None:
    """Drop the local variables of the frames of `tb` (those still running keep theirs)."""
    while tb is not None:
        frame = tb.tb_frame
        try:
            frame.clear()
        except RuntimeError:  # still running
            pass
        else:
            # Python < 3.13 keeps the dict of locals that a traceback printer (IPython's)
            # read; reading it again after clear() empties it
            frame.f_locals  # noqa: B018
        tb = tb.tb_next


def _clear_frames(exc: BaseException | None) -> None:
    """Drop the local variables of every frame in the tracebacks of `exc` and of the
    exceptions it was raised from or during."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        _clear_traceback(e.__traceback__)
        todo += [e.__cause__, e.__context__]


def _clean_tb() -> None:
    """Forget the last uncaught error that Python (and IPython) keep for the debugger."""
    _clear_traceback(getattr(sys, "last_traceback", None))
    for name in ("last_value", "last_exc"):
        _clear_frames(getattr(sys, name, None))
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)


def _clean_ipython() -> None:
    """In IPython or Jupyter: forget the last cell's error and the output cache (`Out`, `_`,
    `__`, `___`), which keep the tensors they refer to alive."""
    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return
    result = getattr(shell, "last_execution_result", None)
    for name in ("error_in_exec", "error_before_exec"):
        if getattr(result, name, None) is not None:
            _clear_frames(getattr(result, name))
            setattr(result, name, None)
    hook = getattr(shell, "displayhook", None)
    if hook is not None and getattr(hook, "do_full_cache", False):
        hook.flush()
        # the output cache is also copied into the names hidden from %who, which flush misses
        hidden = getattr(shell, "user_ns_hidden", None)
        if isinstance(hidden, dict):
            for key in list(hidden):
                if key in ("_", "__", "___"):
                    hidden[key] = ""
                elif key[:1] == "_" and key[1:].isdigit():
                    del hidden[key]


def clean_mem() -> None:
    """Free the memory that the last error keeps, and give cached GPU memory back: call it in
    a notebook after an error (say, CUDA out of memory) instead of restarting the kernel.

    It clears the frames of the last traceback (their local variables hold the tensors of
    the failed call), in IPython/Jupyter also the last cell's error and the output history
    (`Out`, `_`), then runs the garbage collector and empties torch's CUDA (and MPS) cache.
    Works without IPython and on CPU. Your own variables are kept: `del` the big ones first.
    """
    _clean_tb()
    _clean_ipython()
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.empty_cache()


# ---- model outputs that are not a plain tensor (Hugging Face ModelOutput, dicts) -------------
def _field(output: Any, name: str) -> Any:
    """`output.name` or `output[name]` (a ModelOutput has both), else None."""
    if isinstance(output, dict) or hasattr(output, "keys"):
        try:
            return output[name]
        except (KeyError, TypeError, IndexError):
            return None
    return getattr(output, name, None)


def loss_of(output: Any) -> Any:
    """The loss a model computed itself: `output.loss` / `output["loss"]`, else None."""
    return None if isinstance(output, torch.Tensor) else _field(output, "loss")


def logits_of(output: Any) -> Any:
    """The predictions in a model's output: the output itself, or its `logits` when it has
    them (a `transformers` ModelOutput, a dict)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = _field(output, "logits")
    return output if logits is None else logits


def length(obj: Any) -> int | None:
    """len(obj), or None when it has none (a torch DataLoader over an IterableDataset without
    `__len__` has the method but raises TypeError)."""
    try:
        return len(obj)
    except TypeError:
        return None


def n_items(batch: Any, n_inp: int = 1) -> int:
    """How many samples a batch holds: the length of its targets (`batch[n_inp]`), or of a
    dict batch's first tensor."""
    if isinstance(batch, dict):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return len(first) if first is not None and first.ndim else 1
    return len(batch[n_inp])
