"""nanofit: a small, fast, hackable training loop for PyTorch."""
from .callbacks import (DeviceCB, MetricsCB, ProgressCB, Recorder, SingleBatchCB, TrainCB,
                        def_device, to_cpu, to_device)
from .data import DataLoaders, TensorLoader, collate_dict
from .learner import (EVENTS, STEPS, Callback, CancelBatchException, CancelEpochException,
                      CancelFitException, Learner, MomentumLearner, TrainLearner)

__version__ = "0.1.0"

__all__ = [
    "Learner", "TrainLearner", "MomentumLearner", "Callback", "EVENTS", "STEPS",
    "CancelFitException", "CancelEpochException", "CancelBatchException",
    "TrainCB", "DeviceCB", "SingleBatchCB", "MetricsCB", "Recorder", "ProgressCB",
    "def_device", "to_device", "to_cpu", "DataLoaders", "TensorLoader", "collate_dict",
]
