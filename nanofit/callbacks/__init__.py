"""Callbacks: one concern per module; re-exported here."""
from .hooks import ActivationStats, HooksCallback
from .core import DeviceCB, SingleBatchCB, TrainCB, def_device, to_cpu, to_device
from .lr_find import LRFinderCB, SuggestedLRs
from .metrics import MetricsCB, Recorder
from .progress import ProgressCB
from .schedule import BatchSchedCB, EpochSchedCB, ParamScheduler

__all__ = ["DeviceCB", "SingleBatchCB", "TrainCB", "def_device", "to_cpu", "to_device",
           "MetricsCB", "Recorder", "ProgressCB", "ParamScheduler", "BatchSchedCB",
           "EpochSchedCB", "LRFinderCB", "SuggestedLRs", "HooksCallback", "ActivationStats"]
