"""TrainCB, DeviceCB, SingleBatchCB and the device helpers."""
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

from nanofit import Callback, DeviceCB, Learner, SingleBatchCB, def_device, to_cpu, to_device
from tests.helpers import make_dls, make_model


def test_def_device_is_cpu_without_accelerators():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    assert def_device == torch.device("cpu")


def test_to_device_and_to_cpu_recurse_into_containers():
    Pair = namedtuple("Pair", "x y")
    t = torch.ones(2, requires_grad=True) * 2
    batch = {"a": (t, [t, 3]), "b": Pair(t, "s"), "c": None}
    moved = to_device(batch, "meta")
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert (moved["a"][1][1] == 3 and isinstance(moved["a"], tuple)
            and isinstance(moved["a"][1], list))
    assert (isinstance(moved["b"], Pair) and moved["b"].x.device.type == "meta"
            and moved["b"].y == "s")
    back = to_cpu(batch)
    assert not back["a"][0].requires_grad and back["b"].x.device.type == "cpu"


def test_device_cb_moves_model_and_every_batch():
    seen = []

    class Look(Callback):
        order = 0  # after DeviceCB (-10)

        def before_batch(self, learn):
            seen.append({t.device.type for t in learn.batch})

    learn = Learner(make_model(), make_dls(n_train=24, n_valid=16, bs=8), F.cross_entropy,
                    cbs=[Look(), DeviceCB("meta")])
    learn.fit(2)  # "meta" tensors have shapes but no data: any device works for this check
    assert seen == [{"meta"}] * 10
    assert next(learn.model.parameters()).device.type == "meta"


def test_single_batch_cb_runs_one_batch():
    count = []

    class Count(Callback):
        def after_batch(self, learn):
            count.append(learn.iter)

    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[SingleBatchCB(), Count()])
    learn.fit(3)
    assert count == [0] and learn.epoch == 0 and learn.training
