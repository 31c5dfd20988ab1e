"""The Learner's loop, events, control flow, callback management and optimizer handling."""
import copy
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanofit import (
    EVENTS,
    STEPS,
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    DataLoaders,
    DeviceCB,
    Learner,
    MetricsCB,
    MomentumLearner,
    ProgressCB,
    Recorder,
    SingleBatchCB,
    TensorLoader,
    TrainCB,
    TrainLearner,
)
from tests.helpers import make_dls, make_model


class Record(Callback):
    """Records every event (and step) it sees as (name, training)."""

    def __init__(self, order=0):
        self.order = order
        self.seen = []

    def __getattr__(self, name):  # only for event names: records them
        if name in EVENTS:
            return lambda learn: self.seen.append(name)
        raise AttributeError(name)


def recorded_fit(n_epochs=1, n_train=16, n_valid=8, bs=8, extra=(), **fit_kw):
    rec = Record()
    learn = Learner(make_model(), make_dls(n_train, n_valid, bs), F.cross_entropy,
                    cbs=[rec, *extra])
    learn.fit(n_epochs, **fit_kw)
    return rec.seen, learn


def batch_events(training):
    ev = ["before_batch", "after_predict", "after_loss"]
    if training:
        ev += ["after_backward", "after_step"]
    return ev + ["after_batch", "cleanup_batch"]


def test_event_sequence_of_a_small_fit():
    seen, _ = recorded_fit(n_epochs=1, n_train=16, n_valid=8, bs=8)
    train_phase = ["before_epoch"] + batch_events(True) * 2 + ["after_epoch", "cleanup_epoch"]
    valid_phase = ["before_epoch"] + batch_events(False) + ["after_epoch", "cleanup_epoch"]
    assert seen == ["before_fit"] + train_phase + valid_phase + ["after_fit", "cleanup_fit"]


def test_fit_without_validation_or_training():
    seen, _ = recorded_fit(n_epochs=2, n_train=8, n_valid=8, bs=8, valid=False)
    assert seen.count("before_epoch") == 2 and "after_backward" in seen
    seen, _ = recorded_fit(n_epochs=1, n_train=8, n_valid=8, bs=8, train=False)
    assert seen.count("before_epoch") == 1 and "after_backward" not in seen


def test_bare_learner_trains_and_phases_are_reported():
    class Phases(Callback):
        def __init__(self):
            self.log = []

        def before_epoch(self, learn):
            self.log.append((learn.epoch, learn.training, torch.is_grad_enabled()))

    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.5)
    before = copy.deepcopy(learn.model.state_dict())
    phases = Phases()
    learn.fit(2, cbs=[phases])
    assert phases.log == [(0, True, True), (0, False, False), (1, True, True), (1, False, False)]
    assert not torch.equal(before["0.weight"], learn.model.state_dict()["0.weight"])
    for name in ("model", "dls", "loss_func", "lr", "opt", "cbs", "n_epochs", "epoch", "dl",
                 "iter", "batch", "preds", "loss"):
        assert hasattr(learn, name), name
    assert learn.n_epochs == 2 and learn.epoch == 1 and learn.dl is learn.dls.valid


def test_validation_does_not_change_weights():
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.5)
    before = copy.deepcopy(learn.model.state_dict())
    learn.fit(1, train=False)
    after = learn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("where", ["before_batch", "after_predict", "after_loss",
                                   "after_backward", "after_step"])
def test_cancel_batch(where):
    class Cancel(Callback):
        def __init__(self):
            setattr(self, where, self.cancel)

        def cancel(self, learn):
            if learn.training and learn.iter == 0:
                raise CancelBatchException()

    seen, _ = recorded_fit(n_train=16, n_valid=8, bs=8, extra=[Cancel()])
    i = EVENTS.index(where)
    first = seen[seen.index("before_batch"):]
    expected_first = [e for e in batch_events(True)
                      if EVENTS.index(e) <= i and e != "cleanup_batch"]
    cancel_tail = ["after_cancel_batch", "cleanup_batch"]
    assert first[: len(expected_first) + 2] == expected_first + cancel_tail
    assert seen.count("after_batch") == 2  # the cancelled batch's after_batch did not run
    assert seen.count("cleanup_batch") == 3


def test_cancelled_batch_skips_the_step():
    learn = Learner(make_model(), make_dls(n_train=8, bs=8), F.cross_entropy, lr=0.5)
    before = copy.deepcopy(learn.model.state_dict())

    class CancelAfterLoss(Callback):
        def after_loss(self, learn):
            raise CancelBatchException()

    learn.fit(1, cbs=[CancelAfterLoss()])
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())


@pytest.mark.parametrize("where", ["before_epoch", "after_batch"])
def test_cancel_epoch_goes_on_with_next_phase(where):
    class Cancel(Callback):
        def __init__(self):
            setattr(self, where, self.cancel)

        def cancel(self, learn):
            if learn.training:
                raise CancelEpochException()

    seen, _ = recorded_fit(n_epochs=2, n_train=16, n_valid=8, bs=8, extra=[Cancel()])
    assert seen.count("after_cancel_epoch") == 2
    assert seen.count("cleanup_epoch") == 4
    assert seen.count("after_epoch") == 2  # only the validation phases completed
    assert seen.count("after_backward") == (0 if where == "before_epoch" else 2)
    assert seen[-2:] == ["after_fit", "cleanup_fit"]


@pytest.mark.parametrize("where", ["before_fit", "before_epoch", "after_step", "after_epoch"])
def test_cancel_fit(where):
    class Cancel(Callback):
        def __init__(self):
            setattr(self, where, self.cancel)

        def cancel(self, learn):
            raise CancelFitException()

    seen, _ = recorded_fit(n_epochs=3, extra=[Cancel()])
    assert "after_fit" not in seen
    assert seen[-2:] == ["after_cancel_fit", "cleanup_fit"]
    assert seen.count("before_epoch") == (0 if where == "before_fit" else 1)
    assert seen.count("cleanup_epoch") == seen.count("before_epoch")


def test_error_runs_every_cleanup_and_names_its_origin():
    class Boom(Callback):
        def after_loss(self, learn):
            raise RuntimeError("boom")

    rec = Record()
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[rec, Boom()])
    with pytest.raises(RuntimeError, match="boom") as info:
        learn.fit(1)
    assert rec.seen[-3:] == ["cleanup_batch", "cleanup_epoch", "cleanup_fit"]
    assert "after_batch" not in rec.seen and "after_cancel_batch" not in rec.seen
    assert info.value.__notes__ == ["raised in Boom.after_loss (event 'after_loss')"]


def test_error_in_default_step_is_noted_with_shapes():
    dls = DataLoaders(TensorLoader((torch.randn(8, 4), torch.zeros(8, 1).long()), 8), None)
    learn = Learner(nn.Linear(4, 3), dls, F.cross_entropy)
    with pytest.raises(RuntimeError) as info:
        learn.fit(1, valid=False)
    notes = "\n".join(info.value.__notes__)
    assert "loss_func got a tensor of shape (8, 3) and dtype torch.float32" in notes
    assert "a tensor of shape (8, 1) and dtype torch.int64" in notes
    assert "raised in Learner.get_loss" in notes


def test_temporary_callbacks_are_removed_even_after_an_error():
    class Boom(Callback):
        def before_fit(self, learn):
            raise ValueError("no")

    keep = Record()
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[keep])
    temp = Record()
    with pytest.raises(ValueError):
        learn.fit(1, cbs=[temp, Boom()])
    assert learn.cbs == [keep]
    learn.fit(1)
    assert temp.seen == ["before_fit", "cleanup_fit"] and "after_fit" in keep.seen


def test_callbacks_run_sorted_by_order_stable_for_ties():
    log = []

    class Named(Callback):
        def __init__(self, name, order):
            self.name, self.order = name, order

        def before_fit(self, learn):
            log.append(self.name)

    cbs = [Named("a", 5), Named("b", 0), Named("c", 5), Named("d", -1), Named("e", 0)]
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=cbs)
    learn.fit(1)
    assert log == ["d", "b", "e", "a", "c"]


def test_duck_typed_callback_add_cb_and_rm_cb():
    class Duck:  # not a Callback subclass: an `order` attribute is enough
        order = 3

        def __init__(self):
            self.n = 0

        def after_batch(self, learn):
            self.n += 1

    duck = Duck()
    learn = Learner(make_model(), make_dls(n_train=16, n_valid=8), F.cross_entropy)
    learn.add_cb(duck).fit(1)
    assert duck.n == 3
    learn.rm_cb(duck).fit(1)
    assert duck.n == 3
    with pytest.raises(ValueError, match="not among"):
        learn.rm_cb(duck)


def test_callback_added_during_fit_runs_from_then_on():
    class Late(Callback):
        def __init__(self):
            self.n = 0

        def after_batch(self, learn):
            self.n += 1

    late = Late()

    class Adder(Callback):
        def after_epoch(self, learn):
            if learn.training and late not in learn.cbs:
                learn.add_cb(late)

    learn = Learner(make_model(), make_dls(n_train=16, n_valid=8), F.cross_entropy, cbs=[Adder()])
    learn.fit(1)
    assert late.n == 1  # the single validation batch


def test_bad_callbacks_are_rejected_clearly():
    with pytest.raises(TypeError, match=r"class Record.*pass Record\(\) instead"):
        Learner(make_model(), make_dls(), cbs=[Record])
    with pytest.raises(TypeError, match="no `order` attribute"):
        Learner(make_model(), make_dls(), cbs=[print])
    learn = Learner(make_model(), make_dls())
    with pytest.raises(TypeError, match="pass Record"):
        learn.fit(1, cbs=[Record])


def test_typo_in_event_name_warns():
    class Typo(Callback):
        def befor_batch(self, learn):
            pass

        def after_bach(self, learn):
            pass

        def helper(self):
            pass

    with pytest.warns(UserWarning) as caught:
        Learner(make_model(), make_dls(), cbs=[Typo()])
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "Typo.after_bach" in messages[0] and "'after_batch'" in messages[0]
    assert "Typo.befor_batch" in messages[1] and "'before_batch'" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shipped = [TrainCB(), DeviceCB("cpu"), SingleBatchCB(), MetricsCB(), Recorder(),
                   ProgressCB()]
        Learner(make_model(), make_dls(), cbs=[Record(), *shipped])  # no false alarms


def test_show_training_loop_lists_callbacks_in_dispatch_order(capsys):
    class A(Callback):
        order = 2

        def before_batch(self, learn):
            pass

        def predict(self, learn):
            learn.preds = learn.model(learn.batch[0])

    class B(Callback):
        def before_batch(self, learn):
            pass

    learn = Learner(make_model(), make_dls(), cbs=[A(), B()])
    learn.show_training_loop()
    out = capsys.readouterr().out
    assert "before_batch: B.before_batch, A.before_batch" in out
    assert "predict: A.predict" in out
    assert "get_loss: Learner.get_loss" in out
    orders, loop = out.split("\nbefore_fit", 1)
    assert orders.splitlines()[1:] == ["       0  DEFAULT               B",
                                       "       2                        A"]  # run order
    printed = [line.strip().split(":")[0] for line in ("before_fit" + loop).splitlines()]
    assert set(EVENTS) | set(STEPS) == set(printed)
    # The printed order is the order a real training batch runs its events in.
    seen, _ = recorded_fit(n_train=8, n_valid=8, bs=8)
    one_batch = seen[seen.index("before_batch"): seen.index("cleanup_batch") + 1]
    assert [e for e in printed if e in one_batch] == one_batch


def test_callback_step_replaces_default_and_subclass_override():
    calls = []

    class MyPredict(Callback):
        def predict(self, learn):
            calls.append("cb")
            learn.preds = learn.model(learn.batch[0])

    learn = Learner(make_model(), make_dls(n_train=8, n_valid=8), F.cross_entropy,
                    cbs=[MyPredict()])
    learn.fit(1)
    assert calls == ["cb", "cb"]

    class MyLearner(Learner):
        def get_loss(self):
            calls.append("subclass")
            self.loss = F.cross_entropy(self.preds, self.batch[1])

    MyLearner(make_model(), make_dls(n_train=8, n_valid=8)).fit(1)
    assert calls[2:] == ["subclass", "subclass"]


def test_traincb_and_trainlearner_match_the_default_loop():
    def final_weights(learner_cls=Learner, cbs=()):
        learn = learner_cls(make_model(), make_dls(), F.cross_entropy, lr=0.3, cbs=list(cbs))
        learn.fit(2)
        return learn.model.state_dict()

    ref = final_weights()
    for other in (final_weights(cbs=[TrainCB()]), final_weights(TrainLearner)):
        assert all(torch.equal(ref[k], other[k]) for k in ref)


class TwoIn(nn.Module):
    """A model with two inputs (n_inp=2)."""

    def __init__(self, n_out=1):
        super().__init__()
        self.a, self.b = nn.Linear(3, n_out), nn.Linear(2, n_out)

    def forward(self, xa, xb):
        return self.a(xa) + self.b(xb)


def test_traincb_n_inp_two_inputs():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(32, 3, generator=g), torch.randn(32, 2, generator=g)
    y = xa.sum(1, keepdim=True) - xb.sum(1, keepdim=True)
    dls = DataLoaders(TensorLoader((xa, xb, y), 8), TensorLoader((xa, xb, y), 16))
    learn = Learner(TwoIn(), dls, F.mse_loss, lr=0.1, cbs=[TrainCB(n_inp=2)])
    learn.fit(20)
    assert learn.loss.item() < 0.05
    default = Learner(TwoIn(), dls, F.mse_loss, lr=0.1, n_inp=2)
    default.fit(20)
    assert default.loss.item() < 0.05


def test_optimizer_kept_across_fits_lr_and_reset():
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1,
                    opt_func=partial(torch.optim.SGD, momentum=0.9))
    learn.fit(1)
    opt = learn.opt
    assert len(opt.state) > 0  # momentum buffers exist
    learn.fit(1, lr=0.01)
    assert learn.opt is opt and opt.param_groups[0]["lr"] == 0.01 and learn.lr == 0.01
    learn.opt = None
    learn.fit(1)
    assert learn.opt is not opt and learn.opt.param_groups[0]["lr"] == 0.01


def test_momentum_learner_equals_torch_sgd_momentum():
    dls = make_dls(shuffle=False)
    ours = MomentumLearner(make_model(), dls, F.cross_entropy, lr=0.1, mom=0.85)
    ours.fit(2)
    ref = Learner(make_model(), dls, F.cross_entropy, lr=0.1,
                  opt_func=partial(torch.optim.SGD, momentum=0.85))
    ref.fit(2)
    a, b = ours.model.state_dict(), ref.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_training_property_follows_the_model():
    learn = Learner(make_model(), make_dls())
    learn.model.train()
    assert learn.training
    learn.model.eval()
    assert not learn.training


@pytest.mark.parametrize("kwargs, match", [
    ({"n_epochs": 0}, "n_epochs must be an int >= 1"),
    ({"n_epochs": 1.5}, "n_epochs must be an int >= 1"),
    ({"lr": -0.1}, r"lr must be a finite number >= 0 .*got -0.1"),
    ({"lr": float("nan")}, r"lr must be a finite number >= 0 .*got nan"),
    ({"lr": [0.1, -1.0]}, r"got \[0.1, -1.0\]"),
])
def test_bad_fit_arguments(kwargs, match):
    learn = Learner(make_model(), make_dls())
    with pytest.raises(ValueError, match=match):
        learn.fit(**{"n_epochs": 1, **kwargs})


def test_lr_zero_is_frozen_training_and_validation_needs_no_lr():
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0)
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1)  # torch allows lr=0: the weights do not move
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
    learn.fit_one_cycle(1, lr_max=0.0)
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=float("nan"))
    learn.fit(1, train=False)  # no training phase: no optimizer, no lr to check
    assert learn.opt is None
    np = pytest.importorskip("numpy")
    Learner(make_model(), make_dls(), F.cross_entropy, lr=np.float32(0.1)).fit(1)


def test_bad_data_and_frozen_model_are_reported_before_training():
    with pytest.raises(ValueError, match="has no data"):
        Learner(make_model()).fit(1)
    with pytest.raises(ValueError, match="no `valid` loader"):
        Learner(make_model(), DataLoaders(make_dls().train)).fit(1)
    empty = DataLoaders(TensorLoader((torch.randn(3, 4), torch.zeros(3).long()), 8, drop_last=True),
                        None)
    with pytest.raises(ValueError, match=r"dls.train yields no batches"):
        Learner(make_model(), empty).fit(1, valid=False)
    frozen = make_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Learner(frozen, make_dls()).fit(1)
    Learner(frozen, make_dls(), F.cross_entropy).fit(1, train=False)  # validation alone is fine


def test_traincb_n_inp_reaches_metrics():
    from nanofit import MetricsCB

    xa, xb, y = torch.randn(16, 3), torch.randn(16, 2), torch.randint(0, 3, (16,))
    dls = DataLoaders(TensorLoader((xa, xb, y), 8), TensorLoader((xa, xb, y), 8))
    metrics = MetricsCB()
    Learner(TwoIn(n_out=3), dls, F.cross_entropy, cbs=[TrainCB(n_inp=2), metrics]).fit(1)
    assert len(metrics.history) == 2


def test_temporary_callback_may_remove_itself_and_duplicates_are_refused():
    class Leaver(Callback):
        def after_epoch(self, learn):
            learn.rm_cb(self)

    keep = Record()
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[keep])
    learn.fit(1, cbs=[Leaver(), Record()])
    assert learn.cbs == [keep]
    with pytest.raises(ValueError, match="already among the learner's callbacks"):
        learn.fit(1, cbs=[keep])
    assert learn.cbs == [keep]


def test_single_callback_instead_of_a_list():
    rec = Record()
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=rec)
    assert learn.cbs == [rec]
    other = Record()
    learn.fit(1, cbs=other)
    assert "after_fit" in other.seen


def test_batch_cancelled_after_backward_leaks_no_gradient():
    class SkipFirst(Callback):
        def after_backward(self, learn):
            if learn.iter == 0:
                raise CancelBatchException()

    def weights(cbs, n_train):
        dls = make_dls(n_train=n_train, n_valid=8, bs=8)
        if n_train == 8:  # the same data as the second batch of the 16-sample loader
            full = make_dls(n_train=16, n_valid=8, bs=8).train.tensors
            dls.train.tensors = tuple(t[8:] for t in full)
        learn = Learner(make_model(), dls, F.cross_entropy, lr=0.5, cbs=cbs)
        learn.fit(1, valid=False)
        return learn.model.state_dict()

    skipped = weights([SkipFirst()], 16)  # batch 0 skipped after its backward
    only_second = weights([], 8)  # batch 1 alone
    assert all(torch.equal(skipped[k], only_second[k]) for k in skipped)


def test_error_in_cleanup_does_not_hide_the_first_error():
    class Fails(Callback):
        def after_batch(self, learn):
            raise KeyError("first")

        def cleanup_fit(self, learn):
            raise RuntimeError("second")

    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[Fails()])
    with pytest.raises(KeyError, match="first") as info:
        learn.fit(1)
    assert any("while cleaning up (cleanup_fit), RuntimeError: second" in n
               for n in info.value.__notes__)


def test_cancel_raised_outside_its_stage_says_so():
    class Wrong(Callback):
        def before_epoch(self, learn):
            raise CancelBatchException()

    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[Wrong()])
    with pytest.raises(CancelBatchException) as info:
        learn.fit(1)
    assert "raised outside its stage" in info.value.__notes__[-1]


def test_loaders_yielding_nothing_or_the_wrong_thing_fail_clearly():
    class Gen:  # an iterable with no len()
        def __init__(self, items):
            self.items = items

        def __iter__(self):
            return iter(self.items)

    with pytest.raises(ValueError, match="dls.train yielded no batches"):
        Learner(make_model(), DataLoaders(Gen([]), None), F.cross_entropy).fit(1, valid=False)
    with pytest.raises(TypeError, match="dls.train yielded a str; a batch must be a tensor"):
        Learner(make_model(), DataLoaders(Gen(["abc"]), None), F.cross_entropy).fit(1, valid=False)
    empty_valid = DataLoaders(make_dls().train, Gen([]))
    with pytest.raises(ValueError, match="dls.valid yielded no batches"):
        Learner(make_model(), empty_valid, F.cross_entropy).fit(1)


@pytest.mark.parametrize("targets, loss, hint", [
    (torch.zeros(8, 1).long(), F.cross_entropy, r"squeeze them \(y.squeeze\(1\)\)"),
    (torch.zeros(8), F.cross_entropy, r"int64 targets: use y.long\(\)"),
    (torch.zeros(5).long(), F.cross_entropy, r"different numbers of items \(8 vs 5\)"),
    (torch.zeros(8, dtype=torch.int32), F.cross_entropy, r"int64 targets: use y.long\(\)"),
])
def test_loss_errors_name_shapes_batch_and_fix(targets, loss, hint):
    x = torch.randn(8, 4)
    dls = DataLoaders([(x, targets)], None)
    learn = Learner(nn.Linear(4, 3), dls, loss)
    with pytest.raises(Exception) as info:
        learn.fit(1, valid=False)
    notes = "\n".join(info.value.__notes__)
    assert "loss_func got a tensor of shape (8, 3)" in notes and "(epoch 0, batch 0)" in notes
    assert __import__("re").search(hint, notes), notes


def test_a_loader_error_says_which_batch_of_which_loader_it_was_fetching():
    from torch.utils.data import DataLoader, Dataset

    class Broken(Dataset):
        def __init__(self, bad):
            self.bad = bad

        def __len__(self):
            return 16

        def __getitem__(self, i):
            if i == self.bad:
                raise OSError(f"cannot read item {i}")
            return torch.randn(4), 0

    for bad, note in ((9, "batch 2 of dls.train (epoch 0)"), (0, "batch 0 of dls.train")):
        dl = DataLoader(Broken(bad), batch_size=4)
        learn = Learner(make_model(n_out=2), DataLoaders(dl, dl), F.cross_entropy)
        with pytest.raises(OSError) as info:
            learn.fit(1)
        assert any(note in n for n in info.value.__notes__), info.value.__notes__
    good = DataLoader(Broken(-1), batch_size=4)
    learn = Learner(make_model(n_out=2), DataLoaders(good, DataLoader(Broken(5), batch_size=4)),
                    F.cross_entropy)
    with pytest.raises(OSError) as info:
        learn.fit(2)
    assert "raised while fetching batch 1 of dls.valid (epoch 0)" in info.value.__notes__


def test_learn_epochs_is_the_range_the_course_reads():
    seen = []

    class CourseProgress(Callback):  # the course's ProgressCB reads learn.epochs
        def before_fit(self, learn):
            seen.append(list(learn.epochs))

    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[CourseProgress()])
    learn.fit(3)
    assert seen == [[0, 1, 2]] and learn.epochs == range(3)


def test_mistakes_a_newcomer_makes_get_the_fix_at_the_first_batch():
    from torch.utils.data import DataLoader, TensorDataset

    # the default loss is MSE: class-index targets get "pass F.cross_entropy"
    with pytest.raises(Exception, match="different to the input size") as info:
        Learner(make_model(), make_dls()).fit(1)
    assert any("pass loss_func=F.cross_entropy" in n for n in info.value.__notes__)
    # an element-wise loss broadcasting (8, 1) against (8,) is an error, not a torch warning
    x, y = torch.randn(16, 4), torch.randn(16)
    dls = DataLoaders(TensorLoader((x, y), 8), TensorLoader((x, y), 8))
    with pytest.raises(UserWarning) as info:
        Learner(nn.Linear(4, 1), dls).fit(1)
    assert any("make them the same shape, e.g. y.view_as(preds)" in n
               for n in info.value.__notes__)
    assert info.value.__notes__[0].endswith("(epoch 0, batch 0); preds have shape (8, 1) and "
                                            "targets (8,): for an element-wise loss (MSE, BCE) "
                                            "make them the same shape, e.g. y.view_as(preds)")
    # inputs of another dtype than the weights
    xd = torch.randn(16, 4, dtype=torch.float64)
    dl = DataLoader(TensorDataset(xd, y[:, None]), batch_size=8)
    with pytest.raises(RuntimeError) as info:
        Learner(nn.Linear(4, 1), DataLoaders(dl, dl)).fit(1)
    assert any("cast the inputs (x.to(torch.float32)" in n for n in info.value.__notes__)


def test_one_cycle_says_when_it_skips_the_momentum_schedule():
    learn = Learner(make_model(), make_dls(), F.cross_entropy)  # plain SGD: no momentum
    with pytest.warns(UserWarning, match="momentum schedule .* is skipped"):
        learn.fit_one_cycle(1, 0.1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learn.fit_one_cycle(1, 0.1, moms=None)  # said on purpose: no warning


def test_a_bare_fit_says_once_how_to_see_progress(capsys):
    from nanofit import checks

    checks._SAID.discard("silent fit")
    Learner(make_model(), make_dls(), F.cross_entropy).fit(1)
    Learner(make_model(), make_dls(), F.cross_entropy).fit(1)
    err = capsys.readouterr().err
    assert err.count("add cbs=[ProgressCB()] to see the losses") == 1  # once per process
    checks._SAID.discard("silent fit")
    Learner(make_model(), make_dls(), F.cross_entropy, cbs=[Callback()]).fit(1)
    assert "ProgressCB()" not in capsys.readouterr().err  # a fit with callbacks: no hint
