"""nanofit: a small, fast, hackable training loop for PyTorch.

The names most scripts need are here (`from nanofit import Learner, DataLoaders, MetricsCB`);
the rest live in their modules: `nanofit.callbacks` (every callback), `nanofit.schedule`
(schedule functions), `nanofit.vision` (images, transforms, models), `nanofit.hooks`,
`nanofit.init`, `nanofit.optim`, `nanofit.distributed`, `nanofit.testing`. Every name that
was importable from `nanofit` before stays importable from it.
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
)
from .callbacks import (
    DDPCB,
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
from .data import DataLoaders, TensorLoader, collate_dict
from .distributed import is_rank0, rank0_only
from .hooks import Hook, Hooks, ModelSummary, model_summary
from .images import ImageFolder, show_images
from .init import GeneralRelu, init_weights, lsuv_init
from .learner import Learner
from .learners import MomentumLearner, TrainLearner, load_learner
from .models import ResBlock, conv, resnet, simple_cnn
from .optim import HPOptimizer, get_hyper, set_hyper
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
from .torch_utils import def_device, to_cpu, to_device

try:
    __version__ = version("nanofit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

# The names of `from nanofit import *` and of the README: the loop, data, the everyday
# callbacks, export. The others above stay importable from here for existing code.
__all__ = [
    "Learner", "TrainLearner", "MomentumLearner", "Callback", "Order", "EVENTS", "STEPS",
    "CancelFitException", "CancelEpochException", "CancelBatchException",
    "DataLoaders", "TensorLoader", "DeviceCB", "TrainCB", "SingleBatchCB", "MetricsCB",
    "Recorder", "ProgressCB", "ParamScheduler", "CheckpointCB", "EarlyStoppingCB",
    "SaveBestCB", "MixedPrecision", "GradAccumCB", "GradClipCB", "BatchTransformCB",
    "Normalize", "DDPCB", "load_learner", "exportable", "to_device", "to_cpu", "def_device",
]
