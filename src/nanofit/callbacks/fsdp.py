"""FSDPCB: fully sharded data-parallel training (FSDP2's `fully_shard`) on torch.distributed."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..callback import Callback, Order
from ..distributed import (
    BACKENDS,
    is_dtensor,
    join_process_group,
    process_device,
    rank,
    shard_loaders,
    world_size,
)
from .distributed import DDPCB

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from ..learner import Learner

__all__ = ["FSDPCB", "repeated_blocks"]

Wrap = type | tuple[type, ...] | Callable[[nn.Module], bool] | None
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, FSDPCB's default units: the outermost submodules whose
    class occurs at least twice among the submodules that hold other modules and parameters
    (transformer layers, residual blocks, conv blocks). Leaves (a Linear) are not blocks."""
    def is_block(m: nn.Module) -> bool:
        return (m is not model and not isinstance(m, _CONTAINERS)
                and next(m.children(), None) is not None
                and next(m.parameters(), None) is not None)
    counts: dict[type, int] = {}
    for m in model.modules():
        if is_block(m):
            counts[type(m)] = counts.get(type(m), 0) + 1
    chosen: list[nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():  # pre-order: a block comes before what it holds
        if id(m) in inside:
            continue
        if is_block(m) and counts[type(m)] > 1:
            chosen.append(m)
            inside.update(id(sub) for sub in m.modules())
    return chosen


class FSDPCB(Callback):
    """Trains on every process of a torch.distributed group with the model's parameters,
    gradients and optimizer state sharded across them (FSDP2, `fully_shard`).

    At `before_fit` (under torchrun, or with a process group you initialised): puts the model
    on this process's device and applies `fully_shard` to each unit chosen by `wrap` (a module
    type, a tuple of types or a predicate; by default each repeated block, see
    `repeated_blocks`), then to the root, with `mp_policy` (FSDP's `MixedPrecisionPolicy`)
    and `reshard_after_forward`. The optimizer is then rebuilt over the sharded parameters
    (its hyper-parameters and any state carried over), and each rank gets its shard of the
    loaders, as with DDPCB (`batch_size` is per process). The model stays sharded after the
    fit (later fits, `lr_find`, `get_preds` and `learn.save` use it as it is: call them on
    every rank); the loaders are given back. Checkpoints of a sharded model are folders
    written by all ranks (torch.distributed.checkpoint). Without a process group (a single
    process) it does nothing, so the same script runs both ways.

    Example: `FSDPCB(wrap=TransformerBlock, mp_policy=MixedPrecisionPolicy(torch.bfloat16))`
    """

    order = Order.DISTRIBUTED
    main_fit_only = True

    def __init__(self, wrap: Wrap = None, mp_policy: MixedPrecisionPolicy | None = None,
                 reshard_after_forward: bool | int = True, seed: int = 0,
                 timeout_s: float = 600.0, backend: str | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"FSDPCB: backend must be None (nccl with CUDA, else gloo) or a "
                             f"torch.distributed backend name such as 'gloo', got {backend!r}")
        if not (wrap is None or isinstance(wrap, type) or callable(wrap) or (
                isinstance(wrap, tuple) and all(isinstance(t, type) for t in wrap))):
            raise TypeError(f"FSDPCB: wrap must be a module type, a tuple of types or a "
                            f"predicate module -> bool, got {wrap!r}")
        self.wrap, self.mp_policy = wrap, mp_policy
        self.reshard_after_forward = reshard_after_forward
        self.seed, self.timeout_s, self.backend = seed, timeout_s, backend
        self.active = False

    def units(self, model: nn.Module) -> list[nn.Module]:
        """The submodules that get their own `fully_shard` (before the root gets one)."""
        if self.wrap is None:
            return repeated_blocks(model)
        wrap = self.wrap
        if isinstance(wrap, (type, tuple)):
            types = wrap
            wrap = lambda m: isinstance(m, types)  # noqa: E731
        return [m for m in model.modules() if m is not model and wrap(m)]

    def before_fit(self, learn: Learner) -> None:
        if any(isinstance(cb, DDPCB) for cb in learn.cbs):
            raise ValueError("FSDPCB and DDPCB are both in cbs: use one of them (FSDPCB shards "
                             "the model, DDPCB keeps a whole copy on every process)")
        join_process_group(self.backend, self.timeout_s)
        self.active = dist.is_available() and dist.is_initialized()
        if not self.active:
            return
        if not hasattr(learn.model, "unshard"):  # FSDPModule: a later fit finds it sharded
            self._shard(learn)
        self.dls = learn.dls
        # validation unsharded: a rank with fewer batches would leave the others waiting in
        # the all-gathers of their forwards (unpadded shards differ in length)
        learn.dls = shard_loaders(learn.dls, rank(), world_size(), self.seed, "FSDPCB",
                                  shard_valid=False)

    def _shard(self, learn: Learner) -> None:
        # imported here: torch.distributed.fsdp takes most of a second to import
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = process_device()
        model = learn.model.to(device)
        mesh = init_device_mesh(device.type, (world_size(),))
        kwargs: dict[str, Any] = {"mesh": mesh,
                                  "reshard_after_forward": self.reshard_after_forward,
                                  "mp_policy": self.mp_policy or MixedPrecisionPolicy()}
        for unit in reversed(self.units(model)):  # inner units first
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        learn.model = model
        if learn.opt is not None:
            _rebuild_opt(learn)

    def cleanup_fit(self, learn: Learner) -> None:
        if self.active:
            learn.dls = self.dls
            self.active = False


def _rebuild_opt(learn: Learner) -> None:
    """An optimizer over the sharded parameters, with the old one's hyper-parameters and
    state (a state tensor shaped like its parameter is sharded like it)."""
    old = learn.opt
    if not callable(getattr(old, "state_dict", None)):  # hand-written: start it afresh
        learn.create_opt()
        return
    from torch.distributed.tensor import distribute_tensor

    assert old is not None
    state = old.state_dict()
    learn.create_opt()
    new = learn.opt
    assert new is not None
    params = [p for g in new.param_groups for p in g["params"]]
    for i, s in state["state"].items():
        p = params[i]
        for k, v in s.items():
            if is_dtensor(p) and isinstance(v, torch.Tensor) and v.shape == p.shape:
                # every rank holds the whole tensor: each keeps its own shard of it
                s[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                         src_data_rank=None)
    new.load_state_dict(state)
