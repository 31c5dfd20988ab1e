"""Putting a learner back exactly as it was after a block (lr_find's sweep), all in memory."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from .distributed import is_dtensor
from .steps import state_owner
from .torch_utils import get_rng_state, loader_generators, preserved_rng, set_rng_state

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["preserve_state", "preserved_loop", "removed_cbs",
           # at home in torch_utils; importable from here as before
           "get_rng_state", "set_rng_state", "loader_generators"]

LOOP_STATE = ("lr", "n_epochs", "epochs", "epoch", "iter", "n_iter", "dl", "batch", "preds",
              "loss", "run_train", "run_valid", "step", "total_steps", "by_steps")


@contextmanager
def preserved_loop(learn: Learner) -> Iterator[None]:
    """Run the block (a helper fit: get_preds, lr_find), then give the learner back its loop
    state: the position and attributes of a fit in progress, and each module's train/eval
    mode. So `learn.predict(x)` from inside a callback leaves the running fit as it was."""
    attrs = {k: getattr(learn, k) for k in LOOP_STATE}
    position = learn.position  # the block's fit gets its own: the outer one's stream goes on
    learn.position = type(position)()
    modes = [(m, m.training) for m in learn.model.modules()]
    try:
        yield
    finally:
        for k, v in attrs.items():
            setattr(learn, k, v)
        learn.position = position
        for m, mode in modes:
            m.training = mode


@contextmanager
def removed_cbs(learn: Learner, cbs: Iterable[Any]) -> Iterator[Learner]:
    """`with learn.removed_cbs(cbs):` runs the block without the callbacks `cbs` (e.g. the
    ones that sit out a helper fit); then the callbacks, in their order, and the state they
    share (`Learner.SHARED`: learn.metrics...) are back as they were."""
    saved, shared = list(learn.cbs), {k: getattr(learn, k) for k in learn.SHARED}
    learn.cbs[:] = [c for c in saved if not any(c is r for r in cbs)]
    learn.refresh_cbs()
    try:
        yield learn
    finally:
        learn.cbs[:] = saved
        for k, v in shared.items():
            setattr(learn, k, v)
        learn.refresh_cbs()


@contextmanager
def preserve_state(learn: Learner) -> Iterator[None]:
    """Run the block, then put the learner back exactly as it was, whatever the block did.

    Restores model parameters and buffers (values, devices, dtypes), train/eval mode,
    `requires_grad` flags and gradients, the optimizer (or its absence) with its state and
    hyper-parameters, the state of each callback with `state_dict()`/`load_state_dict()`, the
    learner's loop attributes and position, every global RNG, the data loaders'
    generators and the position of loaders that keep one (`state_dict()`). (The list of
    callbacks: `learn.removed_cbs`.)
    """
    model = learn.model
    # Every parameter and buffer (non-persistent ones too), with its device and dtype.
    params = [(p, p.detach().clone()) for p in model.parameters()]
    buffers = [(m, name, b.detach().clone()) for m in model.modules()
               for name, b in m.named_buffers(recurse=False)]
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    opt = learn.opt
    # A hand-written optimizer (no state_dict) gets its attributes back (lr...); state it
    # keeps on the parameters themselves is not restored.
    stateful = opt is not None and callable(getattr(opt, "state_dict", None))
    opt_state = copy.deepcopy(opt.state_dict()) if stateful and opt is not None else None
    opt_attrs = dict(vars(opt)) if opt is not None and not stateful else None
    cb_states = [(cb, copy.deepcopy(cb.state_dict())) for cb in learn.cbs
                 if callable(getattr(cb, "state_dict", None))]
    idle_loaders = [dl for dl in _loaders(learn.dls) if getattr(dl, "_iterator", "") is None]
    with preserved_rng(learn.dls), preserved_loop(learn):
        # loaders that keep their own position (StatefulDataLoader, a HF streaming dataset);
        # taken after the RNGs: a fresh loader's state_dict() draws its generator's seed
        positions = [(owner, copy.deepcopy(owner.state_dict())) for dl in _loaders(learn.dls)
                     if (owner := state_owner(dl)) is not None]
        try:
            yield
        finally:
            for p, saved in params:
                _put_back(p, saved)
            for m, name, saved in buffers:
                m._buffers[name] = saved
            for p, flag, grad in zip(model.parameters(), flags, grads):
                p.requires_grad_(flag)
                p.grad = grad
            learn.opt = opt
            if opt is not None and opt_state is not None:
                opt.load_state_dict(opt_state)
            elif opt is not None and opt_attrs is not None:
                vars(opt).update(opt_attrs)
            for cb, state in cb_states:
                cb.load_state_dict(state)
            for dl in idle_loaders:  # persistent workers started meanwhile carry RNG state
                _stop_workers(dl)
            for owner, position in positions:
                owner.load_state_dict(position)


def _put_back(p: torch.nn.Parameter, saved: torch.Tensor) -> None:
    """Give the parameter its saved value (and device and dtype). A sharded parameter
    (FSDP's DTensor) is copied into in place: FSDP all-gathers from its storage."""
    if is_dtensor(p) and (p.shape, p.dtype, p.device) == (
            saved.shape, saved.dtype, saved.device):
        with torch.no_grad():
            p.copy_(saved)
    else:
        p.data = saved


def _loaders(dls: Any) -> list[Any]:
    return [dl for dl in (getattr(dls, "train", None), getattr(dls, "valid", None))
            if dl is not None]


def _stop_workers(dl: Any) -> None:
    """Shut down a torch DataLoader's persistent worker processes, as if never iterated."""
    iterator = getattr(dl, "_iterator", None)
    if iterator is not None:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        dl._iterator = None
