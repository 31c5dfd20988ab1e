"""torch.distributed helpers: who am I, run on rank 0 only, join the process group, shard
the loaders (what DDPCB and FSDPCB share)."""
from __future__ import annotations

import atexit
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .data import DataLoaders, TensorLoader, rebuild_loader

__all__ = ["is_distributed", "rank", "world_size", "is_rank0", "rank0_only", "torchrun_env",
           "ShardedTensorLoader", "ShardSampler", "unwrap_model", "join_process_group",
           "process_device", "shard_loaders", "is_dtensor", "barrier",
           "BACKENDS"]

BACKENDS = (None, "nccl", "gloo", "mpi", "ucc", "xccl")


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK variable, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank0() -> bool:
    """True on rank 0, and always when not distributed: the process that prints and writes."""
    return rank() == 0


def rank0_only(fn: Callable) -> Callable:
    """Decorator: run `fn` on rank 0 only (other ranks get None). For prints, plots, files."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_rank0() else None
    return wrapper


def torchrun_env() -> bool:
    """True when started by torchrun (or another launcher setting its variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a DTensor (FSDP2's sharded parameters). Asked without importing
    torch.distributed.tensor (0.6 s, so `import nanofit` stays light): until something
    imported it, nothing can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_FAILED = False  # an exception escaped: this rank is going down while the others may not be


def _note_failure(hook: Callable) -> Callable:
    def excepthook(*args: Any) -> None:
        global _FAILED
        _FAILED = True
        hook(*args)
    return excepthook


def _leave() -> None:
    """Wait for the other ranks, then close the process group (an open gloo group can abort
    the interpreter at exit). After an uncaught exception, close it without waiting: the
    other ranks may be inside a collective that never ends, and closing ends it for them
    (torchrun then restarts or stops the group at once)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if not _FAILED:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def join_process_group(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Initialise the process group from torchrun's environment unless one is running (or
    this process was not started by torchrun): `backend` nccl with CUDA, else gloo."""
    if dist.is_available() and not dist.is_initialized() and torchrun_env():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":  # each process on its own GPU before the group exists
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = timedelta(seconds=timeout_s)
        store = _attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        atexit.register(_leave)  # we made the group: close it cleanly when Python exits
        sys.excepthook = _note_failure(sys.excepthook)


def _attempt_store(timeout: timedelta) -> Any:
    """torchrun's store for this attempt of the job, or None (not under torchrun's agent).

    After a restart (`--max-restarts`) the workers meet again in the store of torchrun's
    agent, which outlives them, and torch's env:// setup uses it without a per-attempt
    prefix: the new group could read the dead group's addresses and fail to connect
    ("Connection refused"). Each attempt gets its own key space here, as torch once did."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"nanofit/attempt_{attempt}", store)


def process_device() -> torch.device:
    """This process's device: its GPU (`LOCAL_RANK`, made current) with CUDA, else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank() % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def shard_loaders(dls: Any, rank: int, world: int, seed: int = 0, who: str = "DDPCB",
                  shard_valid: bool = True) -> Any:
    """This rank's share of `dls`: DistributedSampler (training, padded) or ShardSampler
    (validation, not padded) for torch DataLoaders over map-style datasets, index sharding
    for TensorLoader. `shard_valid=False` gives every rank all the validation data (FSDP:
    each forward is a collective, so every rank must run as many batches; the means over
    ranks are those of the data, counted once per rank)."""
    valid = getattr(dls, "valid", None)
    return DataLoaders(_shard(dls.train, rank, world, seed, True, who),
                       _shard(valid, rank, world, seed, False, who) if shard_valid else valid)


def _shard(dl: Any, rank: int, world: int, seed: int, train: bool, who: str) -> Any:
    if dl is None:
        return None
    if isinstance(dl, TensorLoader):
        return ShardedTensorLoader(dl, rank, world, pad=train, seed=seed)
    if isinstance(dl, DataLoader) and dl.batch_size is not None and not isinstance(
            dl.dataset, torch.utils.data.IterableDataset):
        sampler: torch.utils.data.Sampler
        if train:
            sampler = DistributedSampler(dl.dataset, world, rank,
                                         shuffle=isinstance(dl.sampler, RandomSampler),
                                         seed=seed)
        else:
            sampler = ShardSampler(len(dl.dataset), rank, world)  # type: ignore[arg-type]
        return rebuild_loader(dl, sampler=sampler)
    if isinstance(getattr(dl, "dataset", None), torch.utils.data.IterableDataset):
        raise TypeError(f"{who} cannot shard a {type(dl).__name__} over an IterableDataset "
                        f"({type(dl.dataset).__name__}): it has no indices to split. Give each "
                        "rank its own part of the stream in the dataset (torch.distributed's "
                        "rank and world size), or use a map-style dataset or a TensorLoader")
    raise TypeError(f"{who} cannot shard a {type(dl).__name__}: use a TensorLoader or a "
                    f"torch DataLoader over a map-style dataset (or shard it yourself and "
                    f"leave {who} out of the loaders by giving each rank its own data)")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel (or similar `.module`) wrapper."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, ... of a dataset of `n`: no padding, so no sample is seen
    twice (shards may differ in length by one). For validation."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class ShardedTensorLoader:
    """This rank's share of a TensorLoader: every `world`-th sample of the epoch's order.

    With `pad` (training), the order is padded by repeating its start so every rank gets the
    same number of batches, as DistributedSampler does; without it (validation) no sample is
    repeated. Shuffled orders are drawn from `seed + epoch` (`set_epoch`), the same on every
    rank. The union of the ranks' k-th batches is the k-th batch of size batch_size * world
    of the unsharded order.
    """

    def __init__(self, loader: TensorLoader, rank: int, world: int, pad: bool,
                 seed: int = 0) -> None:
        self.loader, self.rank, self.world, self.pad, self.seed = loader, rank, world, pad, seed
        self.tensors, self.batch_size = loader.tensors, loader.batch_size
        self.epoch = 0
        n = loader.n
        self.n_local = math.ceil(n / world) if pad else len(range(rank, n, world))

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffled order of `epoch` (the same on every rank)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.loader.drop_last:
            return self.n_local // self.batch_size
        return math.ceil(self.n_local / self.batch_size)

    def _indices(self) -> torch.Tensor:
        n = self.loader.n
        if self.loader.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.pad and n % self.world:
            order = torch.cat([order, order[: self.world - n % self.world]])
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """The batches from batch `start` on (resuming), without gathering the skipped ones."""
        idx = self._indices().to(self.tensors[0].device)
        bs = self.batch_size

        def batches() -> Iterator[tuple[torch.Tensor, ...]]:
            for i in range(start * bs, len(self) * bs, bs):
                part = idx[i: i + bs]
                yield tuple(t.index_select(0, part) for t in self.tensors)
        return batches()
