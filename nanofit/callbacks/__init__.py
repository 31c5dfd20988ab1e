"""Callbacks: one concern per module; re-exported here."""
from .core import DeviceCB, SingleBatchCB, TrainCB, def_device, to_cpu, to_device
from .metrics import MetricsCB, Recorder
from .progress import ProgressCB

__all__ = ["DeviceCB", "SingleBatchCB", "TrainCB", "def_device", "to_cpu", "to_device",
           "MetricsCB", "Recorder", "ProgressCB"]
