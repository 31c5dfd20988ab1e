"""DDPCB: data-parallel training on torch.distributed (DistributedDataParallel)."""
from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ..callback import Callback, Order
from ..data import DataLoaders, TensorLoader, rebuild_loader
from ..distributed import ShardedTensorLoader, ShardSampler, is_distributed, torchrun_env

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["DDPCB"]


def _leave() -> None:
    """Wait for the other ranks, then close the process group (an open gloo group can abort
    the interpreter at exit)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


class DDPCB(Callback):
    """Trains on every process of a torch.distributed group with DistributedDataParallel.

    At `before_fit`: joins the process group (initialising it from torchrun's environment if
    needed, with `backend`: by default nccl with CUDA, gloo on CPU), puts the model on this
    process's device and wraps it in DDP, and gives each rank its shard of the loaders
    (DistributedSampler for torch DataLoaders, index sharding for TensorLoader; the training
    shard is padded so every rank runs the same number of batches, the validation shard is not,
    so no sample counts twice). Each rank's batch_size is per process: the global batch is
    batch_size * world_size. `cleanup_fit` un-wraps the model and restores the loaders. Only
    rank 0 shows progress and writes files; MetricsCB reduces its values over all ranks. Without
    a process group (a single process) it does nothing.
    """

    order = Order.DISTRIBUTED
    main_fit_only = True

    def __init__(self, seed: int = 0, find_unused_parameters: bool = False,
                 timeout_s: float = 600.0, backend: str | None = None) -> None:
        if backend not in (None, "nccl", "gloo", "mpi", "ucc", "xccl"):
            raise ValueError(f"DDPCB: backend must be None (nccl with CUDA, else gloo) or a "
                             f"torch.distributed backend name such as 'gloo', got {backend!r}")
        self.backend = backend
        self.seed = seed
        self.find_unused_parameters = find_unused_parameters
        self.timeout_s = timeout_s
        self.active = False

    def _join(self) -> None:
        if dist.is_available() and not dist.is_initialized() and torchrun_env():
            backend = self.backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":  # each process on its own GPU before the group exists
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=timedelta(seconds=self.timeout_s))
            atexit.register(_leave)  # we made the group: close it cleanly when Python exits

    def before_fit(self, learn: Learner) -> None:
        self._join()
        self.active = is_distributed()
        if not self.active:
            return
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count()))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        learn.model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        learn.model = DistributedDataParallel(learn.model, device_ids=ids,
                                              find_unused_parameters=self.find_unused_parameters)
        self.dls = learn.dls
        learn.dls = DataLoaders(self._shard(learn.dls.train, train=True),
                                self._shard(getattr(learn.dls, "valid", None), train=False))

    def _shard(self, dl: Any, train: bool) -> Any:
        if dl is None:
            return None
        if isinstance(dl, TensorLoader):
            return ShardedTensorLoader(dl, self.rank, self.world, pad=train, seed=self.seed)
        if isinstance(dl, DataLoader) and dl.batch_size is not None and not isinstance(
                dl.dataset, torch.utils.data.IterableDataset):
            sampler: torch.utils.data.Sampler
            if train:
                sampler = DistributedSampler(dl.dataset, self.world, self.rank,
                                             shuffle=isinstance(dl.sampler, RandomSampler),
                                             seed=self.seed)
            else:
                sampler = ShardSampler(len(dl.dataset), self.rank, self.world)  # type: ignore[arg-type]
            return rebuild_loader(dl, sampler=sampler)
        raise TypeError(f"DDPCB cannot shard a {type(dl).__name__}: use a TensorLoader or a "
                        "torch DataLoader over a map-style dataset (or shard it yourself and "
                        "leave DDPCB out of the loaders by giving each rank its own data)")

    def cleanup_fit(self, learn: Learner) -> None:
        if self.active:
            if isinstance(learn.model, DistributedDataParallel):
                learn.model = learn.model.module
            learn.dls = self.dls
            self.active = False
