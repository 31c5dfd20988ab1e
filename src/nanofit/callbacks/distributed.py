"""DDPCB: data-parallel training on torch.distributed (DistributedDataParallel)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch.nn.parallel import DistributedDataParallel

from ..callback import Callback, Order
from ..distributed import (
    BACKENDS,
    is_distributed,
    join_process_group,
    process_device,
    shard_loaders,
)
from ..distributed import rank as dist_rank
from ..distributed import world_size as dist_world

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["DDPCB"]


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
        if backend not in BACKENDS:
            raise ValueError(f"DDPCB: backend must be None (nccl with CUDA, else gloo) or a "
                             f"torch.distributed backend name such as 'gloo', got {backend!r}")
        self.backend = backend
        self.seed = seed
        self.find_unused_parameters = find_unused_parameters
        self.timeout_s = timeout_s
        self.active = False

    def before_fit(self, learn: Learner) -> None:
        join_process_group(self.backend, self.timeout_s)
        self.active = is_distributed()
        if not self.active:
            return
        self.device = process_device()
        learn.model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        learn.model = DistributedDataParallel(learn.model, device_ids=ids,
                                              find_unused_parameters=self.find_unused_parameters)
        self.dls = learn.dls
        learn.dls = shard_loaders(learn.dls, dist_rank(), dist_world(), self.seed, "DDPCB")

    def cleanup_fit(self, learn: Learner) -> None:
        if self.active:
            if isinstance(learn.model, DistributedDataParallel):
                learn.model = learn.model.module
            learn.dls = self.dls
            self.active = False
