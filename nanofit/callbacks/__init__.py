"""Callbacks: one concern per module; re-exported here."""
from .checkpoint import CheckpointCB
from .grads import GradAccumCB, GradClipCB
from .logging import CSVLogger, TensorBoardCB
from .mixup import CutMix, MixUp
from .precision import MixedPrecision
from .profile import CompileCB, ProfileCB
from .distributed import DDPCB
from .hooks import ActivationStats, HooksCallback
from .core import DeviceCB, SingleBatchCB, TrainCB, def_device, to_cpu, to_device
from .lr_find import LRFinderCB, SuggestedLRs
from .metrics import MetricsCB, Recorder
from .progress import ProgressCB
from .schedule import BatchSchedCB, EpochSchedCB, ParamScheduler
from .transforms import BatchTransformCB, Normalize
from .tracker import EarlyStoppingCB, ReduceLROnPlateauCB, SaveBestCB, TerminateOnNaNCB

__all__ = ["DeviceCB", "SingleBatchCB", "TrainCB", "def_device", "to_cpu", "to_device",
           "MetricsCB", "Recorder", "ProgressCB", "ParamScheduler", "BatchSchedCB",
           "EpochSchedCB", "LRFinderCB", "SuggestedLRs", "HooksCallback", "ActivationStats", "CheckpointCB",
           "EarlyStoppingCB", "SaveBestCB", "ReduceLROnPlateauCB", "TerminateOnNaNCB",
           "BatchTransformCB", "Normalize", "DDPCB",
           "GradAccumCB", "GradClipCB", "CSVLogger", "TensorBoardCB", "MixUp", "CutMix",
           "MixedPrecision", "ProfileCB", "CompileCB"]
