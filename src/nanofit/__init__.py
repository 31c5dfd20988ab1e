"""nanofit: a small, fast, hackable training loop for PyTorch.

Everyday names are here (`from nanofit import Learner, DataLoaders, MetricsCB`); each also
lives in a module that groups it with its kind: `nanofit.callbacks` (every callback),
`nanofit.schedule` (schedule functions), `nanofit.vision` (images, transforms, models),
`nanofit.hooks`, `nanofit.init`, `nanofit.optim`, `nanofit.distributed`, `nanofit.testing`.
"""
from importlib.metadata import PackageNotFoundError, version

from .augment import Normalize, compose, random_crop, random_erase, random_flip
from .callback import (
    EVENTS,
    STEPS,
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    Order,
    every,
    run_cbs,
)
from .callbacks import (
    DDPCB,
    FSDPCB,
    ActivationStats,
    BatchSchedCB,
    BatchTransformCB,
    CheckpointCB,
    CompileCB,
    CSVLogger,
    CutMix,
    DeviceCB,
    EarlyStoppingCB,
    EpochSchedCB,
    GradAccumCB,
    GradClipCB,
    HooksCallback,
    LRFinderCB,
    MetricsCB,
    MixedPrecision,
    MixUp,
    ParamScheduler,
    ProfileCB,
    ProgressCB,
    Recorder,
    ReduceLROnPlateauCB,
    SaveBestCB,
    SingleBatchCB,
    SuggestedLRs,
    TensorBoardCB,
    TerminateOnNaNCB,
    TrainCB,
)
from .checkpoint import consolidate
from .data import DataLoaders, TensorLoader, collate_dict
from .distributed import is_rank0, rank0_only
from .hooks import Hook, Hooks, ModelSummary, append_stats, get_hist, get_min, model_summary
from .images import ImageFolder, show_images
from .init import GeneralRelu, init_weights, lsuv_init
from .learner import Learner
from .learners import MomentumLearner, TrainLearner, load_learner
from .models import ResBlock, conv, resnet, simple_cnn
from .optim import HPOptimizer, get_hyper, set_hyper
from .plots import get_grid, show_image, subplots
from .registry import exportable
from .schedule import (
    combine_scheds,
    flat_cos_scheds,
    lr_range,
    one_cycle_scheds,
    sched_cos,
    sched_exp,
    sched_lin,
    sched_no,
)
from .torch_utils import clean_mem, def_device, set_seed, to_cpu, to_device

try:
    __version__ = version("nanofit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

# `from nanofit import *` gives every name nanofit has exported so far (notebooks rely on
# it); each also has a home module where the README points: nanofit.callbacks, .vision,
# .schedule, .hooks, .init, .optim, .distributed.
__all__ = [
    "Learner", "TrainLearner", "MomentumLearner", "Callback", "Order", "EVENTS", "STEPS", "every",
    "CancelFitException", "CancelEpochException", "CancelBatchException",
    "TrainCB", "DeviceCB", "SingleBatchCB", "MetricsCB", "Recorder", "ProgressCB",
    "ParamScheduler", "BatchSchedCB", "EpochSchedCB", "LRFinderCB", "SuggestedLRs",
    "def_device", "to_device", "to_cpu", "DataLoaders", "TensorLoader", "collate_dict",
    "HPOptimizer", "get_hyper", "set_hyper",
    "sched_lin", "sched_cos", "sched_exp", "sched_no", "combine_scheds", "one_cycle_scheds",
    "flat_cos_scheds", "lr_range",
    "Hook", "Hooks", "append_stats", "get_hist", "get_min", "run_cbs", "HooksCallback",
    "ActivationStats", "ModelSummary", "model_summary",
    "init_weights", "GeneralRelu", "lsuv_init", "conv", "ResBlock", "simple_cnn", "resnet",
    "BatchTransformCB", "Normalize", "DDPCB", "FSDPCB", "consolidate", "rank0_only",
    "is_rank0",
    "MixedPrecision", "GradAccumCB", "GradClipCB", "MixUp", "CutMix", "CSVLogger",
    "TensorBoardCB", "ProfileCB", "CompileCB", "load_learner", "exportable",
    "random_crop", "random_flip", "random_erase", "compose", "ImageFolder", "show_images",
    "CheckpointCB", "EarlyStoppingCB", "SaveBestCB", "ReduceLROnPlateauCB", "TerminateOnNaNCB",
    "set_seed", "clean_mem", "show_image", "subplots", "get_grid",
]
