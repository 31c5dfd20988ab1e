"""Early stopping, keeping the best model, lowering the lr on a plateau, stopping on NaN."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from nanofit import (
    Callback,
    CheckpointCB,
    EarlyStoppingCB,
    Learner,
    MetricsCB,
    ReduceLROnPlateauCB,
    SaveBestCB,
    TerminateOnNaNCB,
)
from tests.helpers import make_dls, make_model


class Scripted:
    """A metric whose value per validation phase follows a script."""

    def __init__(self, values):
        self.values, self.calls = list(values), -1

    def reset(self):
        pass

    def update(self, preds, targ):
        pass

    def compute(self):
        self.calls += 1  # training and validation phases both compute
        return self.values[self.calls // 2]


class SnapshotWeights(Callback):
    """Keeps the first layer's weights after every validation phase."""

    order = 100

    def __init__(self, weights):
        self.weights = weights

    def after_epoch(self, learn):
        if not learn.training:
            self.weights.append(learn.model[0].weight.detach().clone())


def test_early_stopping_stops_at_the_right_epoch(capsys):
    metric = Scripted([0.5, 0.6, 0.7, 0.69, 0.7, 0.68, 0.9, 0.9])
    stop = EarlyStoppingCB("acc", patience=3)
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[MetricsCB(acc=metric), stop])
    learn.fit(8)
    # best 0.7 at epoch 2; epochs 3, 4 (0.7 is no improvement), 5 without: stop after epoch 5
    assert stop.stopped_epoch == 5 and learn.metrics.history[-1]["epoch"] == 5
    assert "stopping after epoch 5" in capsys.readouterr().out


def test_early_stopping_min_delta_and_lower_is_better():
    metric = Scripted([1.0, 0.95, 0.94, 0.5, 0.4, 0.3])
    stop = EarlyStoppingCB("my_loss", min_delta=0.1, patience=2)
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[MetricsCB(my_loss=metric), stop])
    learn.fit(6)
    assert stop.stopped_epoch == 2  # 0.95 and 0.94 are not 0.1 better than 1.0


def test_trackers_need_metrics_and_a_known_monitor():
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[EarlyStoppingCB()])
    with pytest.raises(ValueError, match="add a MetricsCB"):
        learn.fit(1)
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[MetricsCB(), EarlyStoppingCB("accuracy")])
    with pytest.raises(ValueError, match=r"monitor='accuracy' is not among the metrics \['loss'\]"):
        learn.fit(1)


def test_save_best_reloads_the_best_weights(tmp_path):
    metric = Scripted([0.3, 0.9, 0.5, 0.4])
    weights = []
    Snapshot = partial(SnapshotWeights, weights)

    best = SaveBestCB("acc", tmp_path / "best.pt")
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.5,
                    cbs=[MetricsCB(acc=metric), best, Snapshot()])
    learn.fit(4)
    assert best.best_epoch == 1 and best.best == 0.9
    assert torch.equal(learn.model[0].weight, weights[1])


def test_reduce_lr_on_plateau():
    metric = Scripted([1.0, 0.5, 0.6, 0.7, 0.4, 0.45])
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=1.0,
                    cbs=[MetricsCB(error=metric),
                         ReduceLROnPlateauCB("error", patience=2, factor=0.1)])
    lrs = []

    class Watch(Callback):
        def before_epoch(self, learn):
            if learn.training:
                lrs.append(learn.opt.lr)

    learn.fit(6, cbs=[Watch()])
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1, 0.1])  # epochs 2 and 3 were worse


def test_terminate_on_nan_stops_before_the_step_and_keeps_the_checkpoint(tmp_path, capsys):
    class PoisonBatch(Callback):
        order = -10

        def before_batch(self, learn):
            if learn.training and learn.epoch == 1 and learn.iter == 2:
                x, y = learn.batch
                learn.batch = (x * float("nan"), y)

    ckpts = CheckpointCB(tmp_path, every_n_batches=1)
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.5,
                    cbs=[PoisonBatch(), TerminateOnNaNCB(), ckpts])
    learn.fit(3)
    out = capsys.readouterr().out
    assert "loss is nan at epoch 1, batch 2" in out
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    newest = ckpts.saved[-1]
    assert newest.name == "ckpt_00001_0000002.pt"
    learn.load(str(newest))
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_save_best_with_early_stopping_ends_with_the_best_weights(tmp_path):
    metric = Scripted([0.3, 0.9, 0.5, 0.4, 0.2])
    weights = []
    Snapshot = partial(SnapshotWeights, weights)

    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.5,
                    cbs=[MetricsCB(acc=metric), SaveBestCB("acc", tmp_path / "b.pt"),
                         EarlyStoppingCB("acc", patience=2), Snapshot()])
    learn.fit(5)
    assert learn.metrics.history[-1]["epoch"] == 3  # stopped after epoch 3 (before Snapshot ran)
    assert torch.equal(learn.model[0].weight, weights[1])
