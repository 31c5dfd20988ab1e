"""nanofit: a small, fast, hackable training loop for PyTorch."""
from .callback import (EVENTS, STEPS, Callback, CancelBatchException, CancelEpochException,
                       CancelFitException)
from .augment import compose, random_crop, random_erase, random_flip
from .callbacks import (DDPCB, CSVLogger, CompileCB, CutMix, GradAccumCB, GradClipCB, MixedPrecision,
                        MixUp, ProfileCB, TensorBoardCB, ActivationStats, BatchSchedCB, BatchTransformCB, Normalize, CheckpointCB, EarlyStoppingCB,
                        ReduceLROnPlateauCB, SaveBestCB, TerminateOnNaNCB, HooksCallback, DeviceCB, EpochSchedCB, LRFinderCB, MetricsCB,
                        ParamScheduler, ProgressCB, Recorder, SingleBatchCB, SuggestedLRs, TrainCB,
                        def_device, to_cpu, to_device)
from .distributed import is_rank0, rank0_only
from .images import ImageFolder, show_images
from .inference import exportable, load_learner
from .hooks import Hook, Hooks, ModelSummary, model_summary
from .init import GeneralRelu, init_weights, lsuv_init
from .models import ResBlock, conv, resnet, simple_cnn
from .data import DataLoaders, TensorLoader, collate_dict
from .learner import Learner
from .learners import MomentumLearner, TrainLearner
from .optim import HPOptimizer, get_hyper, set_hyper
from .schedule import (combine_scheds, flat_cos_scheds, lr_range, one_cycle_scheds, sched_cos,
                       sched_exp, sched_lin, sched_no)

__version__ = "0.1.0"

__all__ = [
    "Learner", "TrainLearner", "MomentumLearner", "Callback", "EVENTS", "STEPS",
    "CancelFitException", "CancelEpochException", "CancelBatchException",
    "TrainCB", "DeviceCB", "SingleBatchCB", "MetricsCB", "Recorder", "ProgressCB",
    "ParamScheduler", "BatchSchedCB", "EpochSchedCB", "LRFinderCB", "SuggestedLRs",
    "def_device", "to_device", "to_cpu", "DataLoaders", "TensorLoader", "collate_dict",
    "HPOptimizer", "get_hyper", "set_hyper",
    "sched_lin", "sched_cos", "sched_exp", "sched_no", "combine_scheds", "one_cycle_scheds",
    "flat_cos_scheds", "lr_range",
    "Hook", "Hooks", "HooksCallback", "ActivationStats", "ModelSummary", "model_summary",
    "init_weights", "GeneralRelu", "lsuv_init", "conv", "ResBlock", "simple_cnn", "resnet",
    "BatchTransformCB", "Normalize", "DDPCB", "rank0_only", "is_rank0",
    "MixedPrecision", "GradAccumCB", "GradClipCB", "MixUp", "CutMix", "CSVLogger", "TensorBoardCB",
    "ProfileCB", "CompileCB", "load_learner", "exportable",
    "random_crop", "random_flip", "random_erase", "compose", "ImageFolder", "show_images",
    "CheckpointCB", "EarlyStoppingCB", "SaveBestCB", "ReduceLROnPlateauCB", "TerminateOnNaNCB",
]
