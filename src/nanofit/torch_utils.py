"""Small torch utilities: the default device, moving nested batches, eval mode and RNG states."""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["def_device", "to_device", "to_cpu", "eval_mode", "get_rng_state", "set_rng_state",
           "loader_generators", "preserved_rng"]


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
