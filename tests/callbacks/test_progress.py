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


def test_without_metrics_cb_the_rows_show_the_losses_it_summed_itself():
    # uneven last batches (42 = 5 x 8 + 2, 20 = 8 + 8 + 4): the mean is weighted by batch size
    def fit(*cbs):
        learn = Learner(make_model(), make_dls(n_train=42), F.cross_entropy)
        learn.fit(1, cbs=[MetricsCB()])  # leaves learn.metrics behind: the next fit clears it
        out = io.StringIO()
        learn.fit(2, cbs=[*cbs, ProgressCB(file=out)])
        return [line.split()[:-1] for line in out.getvalue().splitlines()]  # without the time

    alone, with_metrics = fit(), fit(MetricsCB())
    assert alone[0] == ["epoch", "train_loss", "valid_loss"]
    assert len(alone) == 3
    assert alone == with_metrics  # the same numbers as MetricsCB's


def test_without_metrics_cb_the_loss_is_read_once_per_phase(monkeypatch):
    import torch

    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or item(t))
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[ProgressCB(file=io.StringIO())])
    learn.fit(3)  # 5 training and 3 validation batches an epoch
    assert len(reads) == 6


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


def test_default_plot_path_is_named_on_stderr_once_per_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    learn = Learner(make_model(), make_dls(), F.cross_entropy)
    learn.fit(2, cbs=[ProgressCB(plot=True, file=io.StringIO())])  # writes after each epoch
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "loss.png") in err
    chosen = tmp_path / "chosen.png"
    learn.fit(1, cbs=[ProgressCB(plot=True, plot_path=str(chosen), file=io.StringIO())])
    assert chosen.exists() and capsys.readouterr().err == ""  # a path the user chose: no note


class FakeDisplay:
    """IPython.display.display with display_id=True, recording what a notebook would get."""

    def __init__(self):
        self.outputs = []  # one entry per output; updates replace it

    def __call__(self, obj, display_id=None):
        assert display_id is True
        index = len(self.outputs)
        self.outputs.append(self.bundle(obj))
        fake = self

        class Handle:
            def update(self, new):
                fake.outputs[index] = fake.bundle(new)
                fake.updates += 1
        return Handle()

    updates = 0

    @staticmethod
    def bundle(obj):
        html = getattr(obj, "_repr_html_", None)
        return {"text/html": html() if html else None, "text/plain": repr(obj),
                "image/png": getattr(obj, "data", None) if type(obj).__name__ == "Image" else None}


@pytest.mark.parametrize("plot", [False, True])
def test_in_a_notebook_a_fit_is_one_output_updated_in_place(monkeypatch, capsys, plot):
    pytest.importorskip("IPython")
    import IPython.display

    from nanofit.callbacks import progress

    fake = FakeDisplay()
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", fake)
    cbs = [ProgressCB(plot=plot, refresh=0)]  # refresh=0: redraw at every change
    learn = Learner(make_model(), make_dls(n_train=200), F.cross_entropy, cbs=cbs)
    learn.fit(3)  # 25 training + 3 validation batches an epoch
    assert capsys.readouterr().out == ""  # nothing printed: no flood of lines
    assert len(fake.outputs) == (2 if plot else 1)  # the bars and table (and the live plot)
    assert fake.updates > 3 * 28  # updated in place, batch by batch
    html, text = fake.outputs[0]["text/html"], fake.outputs[0]["text/plain"]
    assert "<table" in html and "train_loss" in html and "valid_loss" in html
    assert html.count("<tr>") == 3 and "epochs 3/3" in html  # one row per epoch; the bar
    assert "train " not in text and text.splitlines()[1].split() == [
        "epoch", "train_loss", "valid_loss", "time"]  # the phase bars are gone at the end
    if plot:
        assert fake.outputs[1]["image/png"][:4] == b"\x89PNG"


def test_in_a_notebook_redraws_at_most_every_refresh_seconds(monkeypatch):
    pytest.importorskip("IPython")
    import IPython.display

    from nanofit.callbacks import progress

    fake = FakeDisplay()
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", fake)
    learn = Learner(make_model(), make_dls(n_train=400), F.cross_entropy,
                    cbs=[ProgressCB(refresh=60)])
    learn.fit(3)
    assert len(fake.outputs) == 1 and fake.updates == 1  # only the final state, at the end
    assert fake.outputs[0]["text/html"].count("<tr>") == 3


def test_a_resumed_fit_shows_its_epochs_from_where_it_resumed(tmp_path):
    import io

    from nanofit import Callback, CancelFitException, CheckpointCB

    class TTYStringIO(io.StringIO):
        def isatty(self):
            return True

    class StopAfterEpoch1(Callback):
        order = 2000

        def after_epoch(self, learn):
            if learn.epoch == 1 and not learn.training:
                raise CancelFitException()

    Learner(make_model(), make_dls(), F.cross_entropy,
            cbs=[CheckpointCB(tmp_path)]).fit(3, cbs=[StopAfterEpoch1()])
    out = TTYStringIO()
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[ProgressCB(file=out)])
    learn.fit(3, resume=str(tmp_path))
    bars = [line for line in out.getvalue().replace("\r", "\n").splitlines() if "epochs" in line]
    assert "3/3" in bars[-1] and not any("4/3" in b for b in bars)
