"""Step fits: fit(steps=N, valid_every=K), streams without a length, schedules by steps,
stopping validation early, and every(n) callback methods."""
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from nanofit import (
    Callback,
    CancelEpochException,
    DataLoaders,
    Learner,
    MetricsCB,
    Recorder,
    every,
)

from .helpers import make_dls, make_model


class Phases(Callback):
    """Records every phase: (epoch, training, n_iter, batches run, step at its end)."""

    def __init__(self):
        self.phases, self.modes = [], set()

    def before_epoch(self, learn):
        self.n = 0

    def after_batch(self, learn):
        self.n += 1
        self.modes.add((learn.training, learn.model.training))

    def after_epoch(self, learn):
        self.phases.append((learn.epoch, learn.training, learn.n_iter, self.n, learn.step))


def test_a_step_fit_runs_exactly_n_batches_in_rounds_with_a_validation_after_each():
    dls = make_dls(n_train=52, n_valid=20, bs=8)  # 7 training batches, 3 validation batches
    rec = Phases()
    learn = Learner(make_model(), dls, F.cross_entropy, cbs=[rec, MetricsCB()])
    learn.fit(steps=17, valid_every=5)
    train = [p for p in rec.phases if p[1]]
    valid = [p for p in rec.phases if not p[1]]
    assert [(e, n_iter, n) for e, _, n_iter, n, _ in train] == \
        [(0, 5, 5), (1, 5, 5), (2, 5, 5), (3, 2, 2)]  # the last round is shorter
    assert [(e, n, step) for e, _, _, n, step in valid] == [(0, 3, 5), (1, 3, 10), (2, 3, 15),
                                                           (3, 3, 17)]
    assert rec.modes == {(True, True), (False, False)}  # validation batches are eval batches
    assert (learn.step, learn.total_steps, learn.n_epochs) == (17, 17, 4)
    assert [(r["step"], r["train"]) for r in learn.metrics.history] == [
        (5, "train"), (5, "eval"), (10, "train"), (10, "eval"), (15, "train"), (15, "eval"),
        (17, "train"), (17, "eval")]


def test_a_step_fit_without_valid_every_validates_once_at_the_end_and_epochs_count_steps():
    dls = make_dls(n_train=40, bs=8)  # 5 batches
    rec = Phases()
    learn = Learner(make_model(), dls, F.cross_entropy, cbs=[rec])
    learn.fit(steps=12)
    assert [(t, n) for _, t, _, n, _ in rec.phases] == [(True, 12), (False, 3)]
    rec.phases.clear()
    learn.fit(2, valid_every=4)  # 2 epochs = 10 steps, validated every 4
    assert [(t, n) for _, t, _, n, _ in rec.phases if t] == [(True, 4), (True, 4), (True, 2)]
    assert (learn.step, learn.total_steps, learn.by_steps) == (10, 10, True)
    learn.fit(2)  # an epoch fit counts steps too
    assert (learn.step, learn.total_steps, learn.by_steps) == (10, 10, False)


class RecordingSampler(DistributedSampler):
    def __init__(self, ds):
        super().__init__(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)
        super().set_epoch(epoch)


def test_each_pass_over_the_training_data_reshuffles_and_calls_set_epoch():
    ds = TensorDataset(torch.arange(12.0)[:, None], torch.zeros(12, dtype=torch.long))
    sampler = RecordingSampler(ds)
    dls = DataLoaders(DataLoader(ds, batch_size=4, sampler=sampler),
                      DataLoader(ds, batch_size=12))
    seen = []

    class Seen(Callback):
        def after_batch(self, learn):
            if learn.training:
                seen.extend(learn.batch[0][:, 0].int().tolist())

    learn = Learner(torch.nn.Linear(1, 2), dls, F.cross_entropy, cbs=[Seen()])
    learn.fit(steps=8, valid_every=5)  # 3 batches a pass: passes 0, 1, and 2/3 of pass 2
    assert sampler.epochs == [0, 1, 2]
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(iter(sampler)))
    assert seen == orders[0] + orders[1] + orders[2][:8]
    assert orders[0] != orders[1]


class Stream(IterableDataset):
    """A stream of batches without a length (a generator underneath)."""

    def __init__(self, n_batches=None):
        self.n_batches = n_batches

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        i = 0
        while self.n_batches is None or i < self.n_batches:
            i += 1
            yield torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)


def _stream_dls(n_batches=None):
    valid = DataLoader(TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4)
    return DataLoaders(DataLoader(Stream(n_batches), batch_size=None), valid)


def test_a_stream_without_length_is_drawn_from_until_the_steps_are_done(capsys):
    rec = Phases()
    learn = Learner(torch.nn.Linear(3, 2), _stream_dls(), F.cross_entropy, cbs=[rec])
    learn.fit(steps=10, valid_every=4)
    assert [n for _, t, _, n, _ in rec.phases if t] == [4, 4, 2]
    assert learn.step == 10


def test_a_stream_that_runs_dry_ends_the_fit_after_that_rounds_validation_with_a_notice(capsys):
    rec = Phases()
    learn = Learner(torch.nn.Linear(3, 2), _stream_dls(n_batches=6), F.cross_entropy, cbs=[rec])
    learn.fit(steps=10, valid_every=4)
    assert [(t, n) for _, t, _, n, _ in rec.phases] == [(True, 4), (False, 2), (True, 2),
                                                         (False, 2)]
    err = capsys.readouterr().err
    assert "ran dry after 6 of 10 steps" in err


def test_fit_arguments_that_cannot_work_are_refused_clearly():
    learn = Learner(make_model(), make_dls(), F.cross_entropy)
    with pytest.raises(ValueError, match="n_epochs .*or steps .*not both"):
        learn.fit(2, steps=10)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        learn.fit(steps=0)
    with pytest.raises(ValueError, match="valid_every must be an int >= 1"):
        learn.fit(steps=5, valid_every=0)
    stream = Learner(torch.nn.Linear(3, 2), _stream_dls(), F.cross_entropy)
    with pytest.raises(ValueError, match=r"has none: use fit\(steps=N, valid_every=3\)"):
        stream.fit(2, valid_every=3)


def test_one_cycle_by_steps_spans_exactly_the_steps_and_needs_them_on_a_stream():
    learn = Learner(make_model(), make_dls(n_train=40, bs=8), F.cross_entropy,
                    opt_func=torch.optim.Adam, cbs=[Recorder("lr")])
    learn.fit_one_cycle(steps=20, lr_max=0.01, valid_every=6)  # 5 batches a pass
    lrs = learn.recorder.lrs
    assert len(lrs) == 20
    assert lrs[0] == pytest.approx(0.01 / 25)
    assert max(range(20), key=lrs.__getitem__) == 5  # the peak at pct_start=0.25 of 20 steps
    assert lrs[-1] < lrs[10] / 20  # annealed towards lr_max / div_final
    stream = Learner(torch.nn.Linear(3, 2), _stream_dls(), F.cross_entropy,
                     opt_func=torch.optim.Adam)
    with pytest.raises(ValueError, match=r"has no length: pass fit\(steps=N\)"):
        stream.fit_one_cycle(1, lr_max=0.01)
    stream.fit_one_cycle(steps=6, lr_max=0.01)
    assert stream.step == 6


@pytest.mark.filterwarnings("ignore:lr_find. no clear descent")
def test_lr_find_runs_its_batches_across_passes_and_on_a_stream():
    learn = Learner(make_model(), make_dls(n_train=40, bs=8), F.cross_entropy)
    learn.lr_find(num_it=12, stop_div=False, plot=False)
    assert len(learn.lr_finder.lrs) == 12  # 5 batches a pass: more than two passes
    stream = Learner(torch.nn.Linear(3, 2), _stream_dls(), F.cross_entropy)
    stream.lr_find(num_it=15, stop_div=False, plot=False)
    assert len(stream.lr_finder.lrs) == 15


class StopValidation(Callback):
    """Ends each validation phase after `n` batches."""

    def __init__(self, n):
        self.n = n

    def before_batch(self, learn):
        if not learn.training and learn.iter == self.n:
            raise CancelEpochException()


def test_cancel_epoch_in_a_validation_batch_ends_validation_with_the_metrics_of_the_batches_seen():
    dls = make_dls(n_train=40, n_valid=40, bs=8)  # 5 validation batches
    rec = Phases()
    learn = Learner(make_model(), dls, F.cross_entropy, cbs=[rec, MetricsCB(), StopValidation(2)])
    learn.fit(steps=6, valid_every=3)
    assert [(t, n) for _, t, _, n, _ in rec.phases] == [(True, 3), (False, 2), (True, 3),
                                                         (False, 2)]  # training went on
    x, y = dls.valid.tensors
    with torch.no_grad():
        expected = F.cross_entropy(learn.model.eval()(x[:16]), y[:16]).item()
    assert learn.metrics.history[-1]["train"] == "eval"
    assert learn.metrics.history[-1]["loss"] == pytest.approx(expected, rel=1e-5)


class Thinned(Callback):
    def __init__(self):
        self.train_steps, self.valid_iters, self.named = [], [], []
        self.every_n = 4

    @every(3)
    def after_batch(self, learn):
        (self.train_steps if learn.training else self.valid_iters).append(
            learn.step if learn.training else learn.iter)

    @every("every_n", valid=True)
    def before_batch(self, learn):
        self.named.append((learn.training, learn.step if learn.training else learn.iter))


def test_every_n_runs_on_every_nth_training_batch_of_the_fit_and_on_validation_only_if_asked():
    learn = Learner(make_model(), make_dls(n_train=40, n_valid=40, bs=8), F.cross_entropy,
                    cbs=[cb := Thinned()])
    learn.fit(steps=11, valid_every=4)  # rounds of 4, 4, 3 training batches; 5 valid batches
    assert cb.train_steps == [2, 5, 8]  # the 3rd, 6th and 9th training batches, across rounds
    assert cb.valid_iters == []
    assert cb.named == [(True, 3), (False, 3), (True, 7), (False, 3), (False, 3)]
    cb.every_n = None  # an attribute that says never
    learn.fit(steps=4)
    assert cb.named == [(True, 3), (False, 3), (True, 7), (False, 3), (False, 3)]


def test_show_training_loop_says_which_methods_run_every_n_batches(capsys):
    Learner(make_model(), make_dls(), F.cross_entropy, cbs=[Thinned()]).show_training_loop()
    out = capsys.readouterr().out
    assert "after_batch: Thinned.after_batch (every 3)" in out
    assert "before_batch: Thinned.before_batch (every 4, valid too)" in out


def test_every_rejects_what_cannot_work():
    with pytest.raises(ValueError, match="every"):
        every(0)
    with pytest.raises(TypeError, match="batch event method"):
        every(2)(lambda self, learn: None)  # not named after a batch event

    class Bad(Callback):
        every_n = 1.5

        @every("every_n")
        def after_batch(self, learn):
            pass

    with pytest.raises(ValueError, match="Bad.every_n = 1.5"):
        Learner(make_model(), make_dls(), F.cross_entropy, cbs=[Bad()])


class Rare(Callback):
    def __init__(self):
        self.n = 0

    @every(1000)
    def after_batch(self, learn):
        self.n += 1


def _python_calls(cbs, steps):
    """How many Python function calls a step fit makes."""
    learn = Learner(make_model(), make_dls(n_train=40, bs=8), F.cross_entropy, cbs=cbs)
    calls = [0]

    def count(frame, event, arg):
        if event == "call":
            calls[0] += 1

    sys.setprofile(count)
    try:
        learn.fit(steps=steps)
    finally:
        sys.setprofile(None)
    return calls[0]


def test_an_every_method_that_is_not_due_costs_no_python_call_per_batch():
    _python_calls([Rare()], 2)  # first fits import lazily
    _python_calls([], 2)
    extra = [_python_calls([Rare()], n) - _python_calls([], n) for n in (10, 30)]
    assert extra[0] == extra[1]  # what every(1000) costs does not grow with the batches


def test_the_progress_table_and_the_csv_log_of_a_step_fit_count_steps(tmp_path):
    import io

    from nanofit import CSVLogger, ProgressCB

    out = io.StringIO()
    learn = Learner(make_model(), make_dls(n_train=40, bs=8), F.cross_entropy,
                    cbs=[MetricsCB(), ProgressCB(file=out), CSVLogger(tmp_path / "log.csv")])
    learn.fit(steps=7, valid_every=3)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["step", "train_loss", "valid_loss", "time"]
    assert [line.split()[0] for line in lines[1:]] == ["3", "6", "7"]
    csv_rows = (tmp_path / "log.csv").read_text().splitlines()
    assert csv_rows[0].startswith("epoch,step,train_loss")
    assert [r.split(",")[1] for r in csv_rows[1:]] == ["3", "6", "7"]


def test_every_keeps_its_count_across_a_get_preds_run_inside_the_fit():
    class PredsMidFit(Callback):
        def after_batch(self, learn):
            if learn.training and learn.step == 4:
                learn.get_preds()  # a fit inside the fit

    learn = Learner(make_model(), make_dls(n_train=40, bs=8), F.cross_entropy,
                    cbs=[cb := Thinned(), PredsMidFit()])
    learn.fit(steps=12, valid=False)
    assert cb.train_steps == [2, 5, 8, 11]


def test_a_stream_that_ends_at_a_round_boundary_ends_the_fit_without_an_empty_round(capsys):
    learn = Learner(torch.nn.Linear(3, 2), _stream_dls(n_batches=8), F.cross_entropy,
                    cbs=[MetricsCB()])
    learn.fit(steps=20, valid_every=4)
    assert [(r["epoch"], r["step"], r["train"]) for r in learn.metrics.history] == [
        (0, 4, "train"), (0, 4, "eval"), (1, 8, "train"), (1, 8, "eval")]
    assert "ran dry after 8 of 20 steps: ending the fit now" in capsys.readouterr().err


def test_adding_a_callback_in_a_batch_where_an_every_method_is_due_keeps_it_running():
    class Twice(Callback):
        def __init__(self):
            self.at = []

        @every(2)
        def after_batch(self, learn):
            self.at.append(learn.step)

    class Adder(Callback):
        def before_batch(self, learn):
            if learn.step == 3:
                learn.add_cb(Callback())

    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[cb := Twice(), Adder()])
    learn.fit(steps=8, valid=False)
    assert cb.at == [1, 3, 5, 7]


def test_an_epoch_cut_short_does_not_hold_an_epoch_fits_schedule_back():
    class ShortEpoch(Callback):
        def before_batch(self, learn):
            if learn.training and learn.iter == 2:
                raise CancelEpochException()

    learn = Learner(make_model(), make_dls(n_train=64, bs=8), F.cross_entropy,
                    cbs=[Recorder("lr"), ShortEpoch()])
    learn.fit_one_cycle(4, lr_max=0.1, moms=None)
    assert learn.recorder.lrs[-1] < 0.02  # annealed, as in the last quarter of one-cycle


def test_every_naming_a_missing_attribute_is_an_error_not_silence():
    class Typo(Callback):
        log_every = 10

        @every("log_evrey")
        def after_batch(self, learn):
            pass

    with pytest.raises(AttributeError, match="has no attribute 'log_evrey'"):
        Learner(make_model(), make_dls(), F.cross_entropy, cbs=[Typo()])


def test_lr_find_on_a_short_stream_says_the_sweep_ended_early():
    stream = Learner(torch.nn.Linear(3, 2), _stream_dls(n_batches=10), F.cross_entropy)
    with pytest.warns(UserWarning, match="ran out after 10 of num_it=60 batches"):
        stream.lr_find(num_it=60, plot=False)


def test_a_learning_rate_given_as_the_number_of_epochs_is_explained():
    learn = Learner(make_model(), make_dls(), F.cross_entropy)
    with pytest.raises(ValueError, match="n_epochs=0.0003 looks like a learning rate"):
        learn.fit_one_cycle(3e-4, steps=100)


def test_early_stopping_in_a_step_fit_speaks_of_rounds_and_steps(capsys):
    from nanofit import EarlyStoppingCB

    learn = Learner(make_model(), make_dls(n_train=40, bs=8), F.cross_entropy, lr=0.0,
                    cbs=[MetricsCB(), EarlyStoppingCB(patience=1)])
    learn.fit(steps=20, valid_every=4)  # lr 0: no improvement after the first round
    out = capsys.readouterr().out
    assert "in 1 rounds; stopping after step 8" in out
    assert learn.step == 8
