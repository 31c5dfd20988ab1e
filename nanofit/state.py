"""Capturing and restoring training state in memory: RNGs, loader generators, the learner."""
from __future__ import annotations

import copy
import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state", "loader_generators", "preserve_state"]


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
def preserve_state(learn: Any) -> Iterator[None]:
    """Run the block, then put the learner back exactly as it was, whatever the block did.

    Restores model parameters and buffers (values, devices, dtypes), train/eval mode, `requires_grad` flags and gradients,
    the optimizer (or its absence) with its state and hyper-parameters, the callbacks list and
    the state of each callback with `state_dict()`/`load_state_dict()`, the learner's loop
    attributes, every global RNG and the data loaders' generators. All in memory.
    """
    model = learn.model
    # Every parameter and buffer (non-persistent ones too), with its device and dtype.
    params = [(p, p.detach().clone()) for p in model.parameters()]
    buffers = [(m, name, b.detach().clone()) for m in model.modules()
               for name, b in m.named_buffers(recurse=False)]
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    opt = learn.opt
    opt_state = copy.deepcopy(opt.state_dict()) if opt is not None else None
    cbs = list(learn.cbs)
    cb_states = [(cb, copy.deepcopy(cb.state_dict())) for cb in cbs
                 if callable(getattr(cb, "state_dict", None))]
    attrs = {k: getattr(learn, k) for k in ("lr", "n_epochs", "epoch", "iter", "n_iter", "dl",
                                            "batch", "preds", "loss", "phase_done",
                                            "n_iter_train", "epoch_rng", "valid_rng")}
    rng = get_rng_state()
    gens = [(g, g.get_state()) for g in loader_generators(learn.dls)]
    idle_loaders = [dl for dl in _loaders(learn.dls) if getattr(dl, "_iterator", "") is None]
    try:
        yield
    finally:
        for p, saved in params:
            p.data = saved
        for m, name, saved in buffers:
            m._buffers[name] = saved
        for m, mode in zip(model.modules(), modes):
            m.training = mode
        for p, flag, grad in zip(model.parameters(), flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        learn.opt = opt
        if opt is not None:
            opt.load_state_dict(opt_state)
        learn.cbs[:] = cbs
        learn._build_handlers()
        for cb, state in cb_states:
            cb.load_state_dict(state)
        for k, v in attrs.items():
            setattr(learn, k, v)
        set_rng_state(rng)
        for g, s in gens:
            g.set_state(s)
        for dl in idle_loaders:  # persistent workers started meanwhile carry RNG state: stop them
            _stop_workers(dl)


def _loaders(dls: Any) -> list[Any]:
    return [dl for dl in (getattr(dls, "train", None), getattr(dls, "valid", None)) if dl is not None]


def _stop_workers(dl: Any) -> None:
    """Shut down a torch DataLoader's persistent worker processes, as if never iterated."""
    iterator = getattr(dl, "_iterator", None)
    if iterator is not None:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        dl._iterator = None
