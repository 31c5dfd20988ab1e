"""CSVLogger, TensorBoardCB, ProfileCB, CompileCB."""
import csv
import io
import os
import threading

import pytest
import torch
import torch.nn.functional as F

from nanofit import (
    ActivationStats,
    Callback,
    CancelFitException,
    CheckpointCB,
    CompileCB,
    CSVLogger,
    Learner,
    MetricsCB,
    Order,
    ProfileCB,
    ProgressCB,
    TensorBoardCB,
)
from tests.helpers import make_dls, make_model


def test_csv_rows_per_epoch_and_append_on_resume(tmp_path):
    path = tmp_path / "log" / "history.csv"
    ckpts = tmp_path / "ckpts"

    class Crash(CheckpointCB):
        def after_epoch(self, learn):
            super().after_epoch(learn)
            if not learn.training and learn.epoch == 1:
                raise RuntimeError("crash")

    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[MetricsCB(), CSVLogger(path)])
    with pytest.raises(RuntimeError):
        learn.fit(4, cbs=[Crash(ckpts)])
    resumed = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[MetricsCB(), CSVLogger(path)])
    resumed.fit(4, resume=str(ckpts))
    rows = list(csv.DictReader(open(path)))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert list(rows[0]) == ["epoch", "train_loss", "valid_loss"]
    hist = resumed.metrics.history
    assert float(rows[3]["valid_loss"]) == pytest.approx(hist[-1]["loss"])


def test_tensorboard_event_file(tmp_path):
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[MetricsCB(), ActivationStats(torch.nn.ReLU), TensorBoardCB(tmp_path)])
    learn.fit(2)
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/batch_loss", "train/loss", "valid/loss"} <= set(tags["scalars"])
    assert len(acc.Scalars("train/batch_loss")) == 10  # 5 batches x 2 epochs
    assert any(t.startswith("activations/") for t in tags["histograms"])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files with /proc")
def test_csv_logger_holds_no_open_file(tmp_path):
    path = tmp_path / "history.csv"
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[MetricsCB(), CSVLogger(path)])
    learn.fit(2)
    open_files = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    assert path.exists() and os.path.realpath(path) not in open_files


def test_tensorboard_closes_its_writer_and_later_fits_go_on(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[MetricsCB(), TensorBoardCB(tmp_path)])
    threads = set(threading.enumerate())
    learn.fit(1)
    assert not set(threading.enumerate()) - threads  # the writer's thread is gone
    learn.fit(2)

    class StopAtThirdBatch(Callback):
        order = Order.LOGGER + 1

        def after_batch(self, learn):
            if learn.iter == 2:
                raise CancelFitException()

    learn.fit(1, cbs=[StopAtThirdBatch()])  # the losses of a cancelled epoch are written too
    assert not set(threading.enumerate()) - threads
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 3  # one per fit, one run
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/batch_loss")] == list(range(18))  # 5 + 10 + 3
    assert len(acc.Scalars("valid/loss")) == 3


def test_profile_table_lists_every_callback_that_ran():
    out = io.StringIO()
    prof = ProfileCB(file=out)
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[MetricsCB(), ProgressCB(file=io.StringIO()), prof])
    learn.fit(1)
    table = out.getvalue()
    for name in ("MetricsCB.after_batch", "ProgressCB.after_batch", "MetricsCB.after_epoch",
                 "Learner.predict", "Learner.backward", "Learner.step"):
        assert name in table, name
    assert prof.calls[("after_batch", "MetricsCB.after_batch")] == 8  # 5 train + 3 valid
    learn.rm_cb(prof)
    learn.fit(1)  # without the callback nothing is timed (or wrapped) any more
    assert prof.calls[("after_batch", "MetricsCB.after_batch")] == 8


def test_compile_trains_on_cpu():
    # aot_eager traces and compiles the graphs without generating C++ (fast, no compiler);
    # CompileCB() alone uses inductor, which needs a C++ compiler.
    try:
        torch.compile(torch.nn.Linear(2, 2), backend="aot_eager")(torch.zeros(1, 2))
    except Exception as e:
        pytest.skip(f"torch.compile is unavailable here: {type(e).__name__}: {e}")
    model = make_model()
    learn = Learner(model, make_dls(), F.cross_entropy, lr=0.5,
                    cbs=[CompileCB(backend="aot_eager"), MetricsCB()])
    before = model[0].weight.detach().clone()
    learn.fit(2)
    assert learn.model is model  # un-wrapped after the fit
    assert not torch.equal(before, model[0].weight)
    losses = [r["loss"] for r in learn.metrics.history if r["train"] == "train"]
    assert losses[-1] < losses[0]
