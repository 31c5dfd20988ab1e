"""ProgressCB: clean lines when not a terminal, bars in a terminal, the loss plot."""
import io

import pytest
import torch.nn.functional as F

from nanofit import Learner, MetricsCB, ProgressCB, Recorder
from tests.helpers import make_dls, make_model


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_not_a_terminal_prints_one_clean_line_per_epoch():
    out = io.StringIO()
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[MetricsCB(), ProgressCB(file=out)])
    learn.fit(3)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 4  # header + one row per epoch
    assert lines[0].split() == ["epoch", "train_loss", "valid_loss", "time"]
    history = learn.metrics.history
    for epoch, line in enumerate(lines[1:]):
        cells = line.split()
        assert cells[0] == str(epoch)
        assert float(cells[1]) == pytest.approx(history[2 * epoch]["loss"], abs=1e-4)
        assert float(cells[2]) == pytest.approx(history[2 * epoch + 1]["loss"], abs=1e-4)


def test_rows_with_training_only():
    out = io.StringIO()
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[MetricsCB(), ProgressCB(file=out)])
    learn.fit(2, valid=False)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["epoch", "train_loss", "time"] and len(lines) == 3


def test_terminal_shows_bars_updated_in_place():
    out = FakeTerminal()
    cb = ProgressCB(file=out)
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[MetricsCB(), cb])
    learn.fit(2)
    text = out.getvalue()
    assert "\r" in text and "epochs" in text and "train" in text
    assert "epoch" in text and "valid_loss" in text
    assert cb._bar is None and cb._epoch_bar is None  # closed in cleanup


@pytest.mark.parametrize("with_recorder", [True, False])
def test_plot_writes_a_png_after_every_epoch(tmp_path, with_recorder):
    path = tmp_path / "live.png"
    cbs = [MetricsCB(), ProgressCB(plot=True, plot_path=str(path), file=io.StringIO())]
    if with_recorder:
        cbs.append(Recorder())
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=cbs)
    learn.fit(1)
    first = path.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    learn.fit(2)
    assert path.read_bytes() != first  # redrawn with the new epochs


def test_rows_without_metrics_and_with_a_stale_metrics_cb():
    learn = Learner(make_model(), make_dls(), F.cross_entropy)
    learn.fit(1, cbs=[MetricsCB()])  # leaves learn.metrics behind
    out = io.StringIO()
    learn.fit(2, cbs=[ProgressCB(file=out)])
    lines = out.getvalue().splitlines()
    assert [line.split()[:1] for line in lines] == [["epoch"], ["0"], ["1"]]
    assert "loss" not in lines[0]


def test_header_grows_when_a_later_epoch_has_more_columns():
    from nanofit import Callback, CancelEpochException

    class SkipFirstTraining(Callback):
        def before_epoch(self, learn):
            if learn.training and learn.epoch == 0:
                raise CancelEpochException()

    out = io.StringIO()
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[SkipFirstTraining(), MetricsCB(), ProgressCB(file=out)])
    learn.fit(2)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["epoch", "valid_loss", "time"]
    # the grown header keeps the table's order: training columns before validation ones
    assert lines[2].split() == ["epoch", "train_loss", "valid_loss", "time"]
    assert len(lines[3].split()) == 4


def test_callbacks_reused_across_learners_and_fits_show_only_their_fit():
    # The course passes one list of callbacks to every learner and fit.
    out = io.StringIO()
    metrics, progress = MetricsCB(), ProgressCB(file=out)
    first = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[metrics, progress])
    first.fit(1)
    second = Learner(make_model(seed=1), make_dls(), F.cross_entropy, cbs=[metrics, progress])
    out.seek(0)
    out.truncate()
    second.fit(1, valid=False)  # no validation: no valid_loss, not the first learner's
    assert out.getvalue().splitlines()[0].split() == ["epoch", "train_loss", "time"]
    out.seek(0)
    out.truncate()
    second.fit(1, train=False)  # validation only: no train_loss from the fit before
    assert out.getvalue().splitlines()[0].split() == ["epoch", "valid_loss", "time"]


def test_metricscb_as_the_course_subclasses_it():
    logged = []

    class WandBLikeCB(MetricsCB):  # the course's W&B callback overrides _log
        def _log(self, d):
            logged.append(dict(d))

    metrics = WandBLikeCB()
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[metrics])
    learn.fit(2)
    assert [(d["epoch"], d["train"]) for d in logged] == [
        (0, "train"), (0, "eval"), (1, "train"), (1, "eval")]  # once per phase
    assert set(metrics.all_metrics) == {"loss"} and metrics.all_metrics["loss"] is metrics.loss
    assert float(metrics.loss.compute()) == pytest.approx(logged[-1]["loss"])
    seen = []
    learn.metrics._log = seen.append  # the course's ProgressCB replaces it on the instance
    learn.fit(1)
    assert len(seen) == 2
