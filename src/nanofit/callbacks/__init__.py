"""Callbacks: one concern per module, re-exported here (`from nanofit.callbacks import ...`).

Names follow one convention, `<What>CB`; the names the course and fastai use (`Recorder`,
`MixedPrecision`, `MixUp`, ...) are the same classes under their familiar names.
"""
# Importable from here as before the package had layers (their homes are below callbacks).
from ..augment import Normalize  # noqa: E402  (kept apart: not a callback)
from ..checkpoint import consolidate  # noqa: E402  (CheckpointCB's FSDP folders -> one file)
from ..torch_utils import def_device, to_cpu, to_device  # noqa: E402
from .checkpoint import CheckpointCB
from .core import DeviceCB, SingleBatchCB, TrainCB
from .distributed import DDPCB
from .fsdp import FSDPCB
from .grads import GradAccumCB, GradClipCB
from .hooks import ActivationStats, HooksCallback
from .logging import CSVLogger, TensorBoardCB
from .lr_find import LRFinderCB, SuggestedLRs
from .metrics import MetricsCB
from .mixup import CutMix, MixUp
from .precision import MixedPrecision
from .profile import CompileCB, ProfileCB
from .progress import ProgressCB
from .recorder import Recorder
from .schedule import BatchSchedCB, EpochSchedCB, ParamScheduler
from .tracker import EarlyStoppingCB, ReduceLROnPlateauCB, SaveBestCB, TerminateOnNaNCB
from .transforms import BatchTransformCB

# The `<What>CB` names of the callbacks known by their course/fastai names.
RecorderCB = Recorder
ParamSchedulerCB = ParamScheduler
HooksCB = HooksCallback
ActivationStatsCB = ActivationStats
MixedPrecisionCB = MixedPrecision
MixUpCB = MixUp
CutMixCB = CutMix
CSVLoggerCB = CSVLogger

__all__ = ["DeviceCB", "SingleBatchCB", "TrainCB", "MetricsCB", "Recorder", "RecorderCB",
           "ProgressCB", "ParamScheduler", "ParamSchedulerCB", "BatchSchedCB", "EpochSchedCB",
           "LRFinderCB", "SuggestedLRs", "HooksCallback", "HooksCB", "ActivationStats",
           "ActivationStatsCB", "CheckpointCB", "EarlyStoppingCB", "SaveBestCB",
           "ReduceLROnPlateauCB", "TerminateOnNaNCB", "BatchTransformCB", "DDPCB", "FSDPCB",
           "GradAccumCB",
           "GradClipCB", "CSVLogger", "CSVLoggerCB", "TensorBoardCB", "MixUp", "MixUpCB",
           "CutMix", "CutMixCB", "MixedPrecision", "MixedPrecisionCB", "ProfileCB", "CompileCB",
           "Normalize", "def_device", "to_cpu", "to_device", "consolidate"]
