"""MetricsCB against hand computations, its batched updates, and the Recorder."""

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanAbsoluteError

from nanofit import (
    Callback,
    CancelEpochException,
    DataLoaders,
    Learner,
    MetricsCB,
    Recorder,
    TensorLoader,
)
from tests.helpers import make_model


def uneven_dls(n_train=10, n_valid=10, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, 4, generator=g)
    y = torch.randint(0, 3, (n_train + n_valid,), generator=g)
    return DataLoaders(TensorLoader((x[:n_train], y[:n_train]), bs),
                       TensorLoader((x[n_train:], y[n_train:]), bs)), x[n_train:], y[n_train:]


class PerBatch(Callback):
    """Reads each training batch's loss and size the slow way, for the hand computation."""

    def __init__(self):
        self.rows = []

    def after_batch(self, learn):
        if learn.training:
            self.rows.append((learn.loss.item(), len(learn.batch[1])))


@pytest.mark.parametrize("update_every", [1, 2, 64])
def test_metrics_match_hand_computation_with_unequal_batches(update_every):
    dls, xv, yv = uneven_dls()  # batches of 4, 4 and 2
    metrics = MetricsCB(accuracy=MulticlassAccuracy(3, average="micro"),
                        top2=MulticlassAccuracy(3, top_k=2, average="micro"),
                        update_every=update_every)
    per_batch = PerBatch()
    learn = Learner(make_model(), dls, F.cross_entropy, lr=0.5, cbs=[metrics, per_batch])
    learn.fit(2)
    assert [(r["epoch"], r["train"]) for r in metrics.history] == \
        [(0, "train"), (0, "eval"), (1, "train"), (1, "eval")]
    assert learn.metrics is metrics

    last_train = per_batch.rows[-3:]
    expected = sum(loss * n for loss, n in last_train) / sum(n for _, n in last_train)
    assert metrics.history[2]["loss"] == pytest.approx(expected, rel=1e-6)

    with torch.no_grad():
        preds = learn.model(xv)
    valid = metrics.history[3]
    assert valid["loss"] == pytest.approx(F.cross_entropy(preds, yv).item(), rel=1e-6)
    assert valid["accuracy"] == pytest.approx((preds.argmax(1) == yv).float().mean().item())
    top2 = (preds.topk(2).indices == yv[:, None]).any(1).float().mean().item()
    assert valid["top2"] == pytest.approx(top2)
    assert all(isinstance(v, (int, float, str)) for r in metrics.history for v in r.values())


class CountingMean:
    """A duck-typed metric: mean of preds; counts its update calls."""

    def __init__(self):
        self.calls = 0
        self.reset()

    def reset(self):
        self.total, self.n = 0.0, 0

    def update(self, preds, targ):
        self.calls += 1
        self.total += preds.sum().item()
        self.n += preds.numel()

    def compute(self):
        return self.total / self.n


def test_updates_are_batched_and_results_unchanged():
    dls, xv, _ = uneven_dls(n_train=40, n_valid=40, bs=4)  # 10 batches per phase
    batched, single = CountingMean(), CountingMean()
    learn = Learner(make_model(), dls, F.cross_entropy,
                    cbs=[MetricsCB(m=batched, update_every=4), MetricsCB(m=single, update_every=1)])
    learn.fit(1, train=False)
    assert single.calls == 10 and batched.calls == 4  # 1 (checked at once) + 4 + 4 + 1 batches
    assert batched.compute() == pytest.approx(single.compute())
    with torch.no_grad():
        assert batched.compute() == pytest.approx(learn.model(xv).mean().item(), rel=1e-5)


def test_positional_metrics_named_by_class_and_bad_metrics_rejected():
    m = MetricsCB(MulticlassAccuracy(3))
    assert list(m.metrics) == ["MulticlassAccuracy"]
    with pytest.raises(TypeError, match="pass an instance"):
        MetricsCB(acc=MulticlassAccuracy)
    with pytest.raises(TypeError, match="has no update, compute method"):
        MetricsCB(acc=type("Half", (), {"reset": lambda self: None})())
    with pytest.raises(ValueError, match="record keys"):
        MetricsCB(loss=MeanAbsoluteError())


def test_cancelled_phase_writes_no_record():
    class CancelTrain(Callback):
        def after_batch(self, learn):
            if learn.training:
                raise CancelEpochException()

    dls, _, _ = uneven_dls()
    metrics = MetricsCB()
    Learner(make_model(), dls, F.cross_entropy, cbs=[metrics, CancelTrain()]).fit(2)
    assert [r["train"] for r in metrics.history] == ["eval", "eval"]
    assert not metrics._preds  # buffers released


def test_recorder_keeps_every_training_batch_loss_and_lr(tmp_path):
    dls, _, _ = uneven_dls(n_train=12, bs=4)  # 3 training batches an epoch
    per_batch, rec, metrics = PerBatch(), Recorder(sync_every=2), MetricsCB()
    learn = Learner(make_model(), dls, F.cross_entropy, lr=0.25, cbs=[per_batch, rec, metrics])
    learn.fit(3)
    assert learn.recorder is rec
    assert rec.losses == pytest.approx([loss for loss, _ in per_batch.rows])
    assert rec.lrs == [0.25] * 9
    assert [x for x, _ in rec.valid_losses] == [3, 6, 9]
    eval_losses = [r["loss"] for r in metrics.history if r["train"] == "eval"]
    assert [v for _, v in rec.valid_losses] == eval_losses
    fig = rec.plot_loss(path=tmp_path / "plots" / "loss.png")
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000
    assert len(fig.axes[0].lines) == 3


def test_metric_states_follow_the_model_device():
    from torch import nn

    from nanofit import CancelFitException, DeviceCB

    class DeviceMetric(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("total", torch.zeros(()))

        def update(self, preds, targ):
            assert self.total.device == preds.device
            self.total += preds.sum()

        def compute(self):
            return self.total

        def reset(self):
            self.total.zero_()

    class StopAfterMetrics(Callback):
        order = 100

        def after_batch(self, learn):
            raise CancelFitException()  # before the loss is read: meta tensors have no value

    metric = DeviceMetric()
    dls, _, _ = uneven_dls()
    # "meta" tensors have shapes but no data: a stand-in for a GPU on a machine without one.
    Learner(make_model(), dls, F.cross_entropy,
            cbs=[DeviceCB("meta"), MetricsCB(m=metric), StopAfterMetrics()]).fit(1)
    assert metric.total.device.type == "meta"


def test_missing_targets_are_reported_clearly():
    x = torch.randn(8, 4)
    dls = DataLoaders(TensorLoader((x,), 4), TensorLoader((x,), 4))

    class NoTargetLoss(Callback):
        def get_loss(self, learn):
            learn.loss = learn.preds.pow(2).mean()

    learn = Learner(make_model(), dls, cbs=[NoTargetLoss(), MetricsCB()])
    with pytest.raises(ValueError, match=r"MetricsCB needs the targets at batch\[1\]"):
        learn.fit(1)


def test_metric_error_names_the_metric_and_shapes_at_the_first_batch():
    dls, _, _ = uneven_dls()
    seen = []

    class Count(Callback):
        def after_batch(self, learn):
            seen.append(learn.iter)

    learn = Learner(make_model(), dls, F.cross_entropy,
                    cbs=[MetricsCB(mae=MeanAbsoluteError()), Count()])
    with pytest.raises(RuntimeError) as info:
        learn.fit(1)
    notes = "\n".join(info.value.__notes__)
    assert "metric 'mae' (MeanAbsoluteError) got preds of shape (4, 3)" in notes
    assert "targets of shape (4,)" in notes
    assert seen == [0]  # it failed on the first batch, not after a whole epoch


def test_epoch_row_uses_only_the_latest_records_of_that_epoch():
    dls, _, _ = uneven_dls()
    metrics = MetricsCB()
    learn = Learner(make_model(), dls, F.cross_entropy, cbs=[metrics])
    learn.fit(1)
    assert set(metrics.epoch_row(0)) == {"epoch", "train_loss", "valid_loss"}
    learn.fit(1, train=False)  # a second fit's epoch 0: validation only
    row = metrics.epoch_row(0)
    assert set(row) == {"epoch", "valid_loss"} and row["valid_loss"] == metrics.history[-1]["loss"]
