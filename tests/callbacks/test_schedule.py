"""ParamScheduler, fit_one_cycle / fit_flat_cos, and torch lr schedulers as callbacks."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from nanofit import (
    BatchSchedCB,
    Callback,
    EpochSchedCB,
    Learner,
    ParamScheduler,
    Recorder,
    sched_lin,
)
from tests.helpers import CourseBatchSchedCB, make_dls, make_model


class GroupLRs(Callback):
    """Every param group's lr and momentum, read after each batch (and whether training)."""

    order = 100

    def __init__(self):
        self.rows = []

    def after_batch(self, learn):
        groups = learn.opt.param_groups
        self.rows.append((learn.training, [g["lr"] for g in groups], groups[0]["momentum"]))


def one_cycle_lr(pos, lr_max, div=25.0, div_final=1e5, pct=0.25):
    """The 1cycle formula, written out independently of nanofit.schedule."""
    if pos < pct:
        lo, hi, p = lr_max / div, lr_max, pos / pct
    else:
        lo, hi, p = lr_max, lr_max / div_final, (pos - pct) / (1 - pct)
    return lo + (hi - lo) * (1 - math.cos(math.pi * p)) / 2


def one_cycle_mom(pos, moms=(0.95, 0.85, 0.95), pct=0.25):
    if pos < pct:
        a, b, p = moms[0], moms[1], pos / pct
    else:
        a, b, p = moms[1], moms[2], (pos - pct) / (1 - pct)
    return a + (b - a) * (1 - math.cos(math.pi * p)) / 2


def test_one_cycle_lr_and_momentum_follow_the_formulas():
    dls = make_dls(n_train=80, n_valid=16, bs=8)  # 10 training batches an epoch
    rec, watch = Recorder("lr", "mom"), GroupLRs()
    learn = Learner(make_model(), dls, F.cross_entropy, cbs=[rec, watch],
                    opt_func=partial(torch.optim.SGD, momentum=0.9))
    learn.fit_one_cycle(2, lr_max=0.4)
    positions = [(epoch + i / 10) / 2 for epoch in range(2) for i in range(10)]
    assert rec.lrs == pytest.approx([one_cycle_lr(p, 0.4) for p in positions])
    assert rec.hps["mom"] == pytest.approx([one_cycle_mom(p) for p in positions])
    assert rec.lrs[0] == pytest.approx(0.4 / 25)  # start
    assert rec.lrs[5] == pytest.approx(0.4) and rec.hps["mom"][5] == pytest.approx(0.85)  # peak
    assert rec.lrs[-1] < rec.lrs[-2] < rec.lrs[6]  # annealing after the peak
    # validation batches leave the schedule where it was
    valid_rows = [r for r in watch.rows if not r[0]]
    assert len(valid_rows) == 2 * 2 and valid_rows[-1][1] == [pytest.approx(rec.lrs[-1])]


def test_one_cycle_per_param_group_and_weight_decay():
    split = lambda m: [list(m[0].parameters()), list(m[2].parameters())]  # noqa: E731
    watch = GroupLRs()
    learn = Learner(make_model(), make_dls(n_train=32), F.cross_entropy, splitter=split,
                    cbs=[watch])
    learn.fit_one_cycle(1, lr_max=[0.01, 0.1], wd=0.05)
    first, peak = watch.rows[0][1], watch.rows[1][1]  # pos 0 and 0.25 (4 batches)
    assert first == pytest.approx([0.01 / 25, 0.1 / 25])
    assert peak == pytest.approx([0.01, 0.1])
    assert learn.opt.wd == 0.05


def test_one_cycle_leaves_optimizers_without_momentum_alone_and_fit_flat_cos():
    for opt_func in (torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop):
        learn = Learner(make_model(), make_dls(n_train=80), F.cross_entropy, opt_func=opt_func)
        learn.fit(1)  # optimizer state exists already (RMSprop made no momentum buffers)
        learn.fit_one_cycle(1, lr_max=0.1)
        if opt_func is not torch.optim.Adagrad:
            assert learn.opt.mom == 0  # not switched on behind the user's back
    rec = Recorder("lr")
    learn = Learner(make_model(), make_dls(n_train=80, bs=8), F.cross_entropy, cbs=[rec])
    learn.fit_flat_cos(1, lr=0.2, pct_start=0.5)
    assert rec.lrs[:5] == pytest.approx([0.2] * 5)
    assert rec.lrs[5] == pytest.approx(0.2) and rec.lrs[-1] < 0.02


def test_param_scheduler_validates_its_schedules():
    with pytest.raises(TypeError, match="must be a function of training progress"):
        ParamScheduler(lr=0.1)
    learn = Learner(make_model(), make_dls(), F.cross_entropy)
    with pytest.raises(ValueError, match="2 schedules for 'lr' but the optimizer has 1"):
        learn.fit(1, cbs=[ParamScheduler(lr=[sched_lin(0.1, 0.0)] * 2)])
    with pytest.raises(AttributeError, match="SGD has no hyper-parameter 'beta'"):
        learn.fit(1, cbs=[ParamScheduler(beta=sched_lin(0.9, 0.99))])


def test_torch_scheduler_per_batch_and_per_epoch():
    watch = GroupLRs()
    learn = Learner(make_model(), make_dls(n_train=32, bs=8), F.cross_entropy, lr=1.0, cbs=[watch])
    step_lr = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    learn.fit(2, cbs=[BatchSchedCB(step_lr)])
    train_lrs = [r[1][0] for r in watch.rows if r[0]]
    assert train_lrs == pytest.approx([0.5 ** (k + 1) for k in range(8)])  # read after stepping
    rec = Recorder("lr")
    learn = Learner(make_model(), make_dls(n_train=32, bs=8), F.cross_entropy, lr=1.0, cbs=[rec])
    learn.fit(1, cbs=[BatchSchedCB(step_lr)])
    assert rec.lrs == pytest.approx([1.0, 0.5, 0.25, 0.125])  # the rate each step used

    for make_sched in ("factory", "instance"):
        watch = GroupLRs()
        learn = Learner(make_model(), make_dls(n_train=32, bs=8), F.cross_entropy, lr=1.0,
                        cbs=[watch])
        if make_sched == "factory":
            cb = EpochSchedCB(partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1))
        else:  # built by the user on the learner's torch optimizer
            learn.create_opt()
            cb = EpochSchedCB(torch.optim.lr_scheduler.StepLR(learn.opt.opt, 1, gamma=0.1))
        learn.fit(3, cbs=[cb])
        per_epoch = [r[1][0] for r in watch.rows if r[0]][::4]
        assert per_epoch == pytest.approx([1.0, 0.1, 0.01]), make_sched
    with pytest.raises(TypeError, match="pass a torch lr scheduler, or a function making one"):
        BatchSchedCB(torch.optim.lr_scheduler.StepLR)


def test_plot_sched_renders_png(tmp_path):
    rec = Recorder()
    learn = Learner(make_model(), make_dls(n_train=80), F.cross_entropy, cbs=[rec],
                    opt_func=partial(torch.optim.SGD, momentum=0.9))
    learn.fit_one_cycle(1, 0.1)
    assert set(rec.hps) == {"lr", "mom", "wd"}
    fig = rec.plot_sched(path=tmp_path / "sched.png")
    assert len(fig.axes) == 2  # lr and mom: wd never changes, so it is named, not drawn
    assert "wd" in fig._suptitle.get_text()
    assert (tmp_path / "sched.png").read_bytes()[:4] == b"\x89PNG"


def test_reduce_lr_on_plateau_steps_on_the_validation_metric():
    from nanofit import MetricsCB

    class Worse:
        """A metric that gets worse every epoch, so the plateau scheduler must cut the lr."""

        def __init__(self):
            self.calls = 0

        def reset(self):
            pass

        def update(self, preds, targ):
            pass

        def compute(self):
            self.calls += 1
            return float(self.calls)

    watch = GroupLRs()
    learn = Learner(make_model(), make_dls(n_train=16, bs=8), F.cross_entropy, lr=1.0,
                    cbs=[watch, MetricsCB(worse=Worse())])
    plateau = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min", patience=0,
                      factor=0.5)
    learn.fit(3, cbs=[EpochSchedCB(plateau, monitor="worse")])
    per_epoch = [r[1][0] for r in watch.rows if r[0]][::2]
    assert per_epoch == pytest.approx([1.0, 1.0, 0.5])  # epoch 0 sets the best, epoch 1 is worse
    learn2 = Learner(make_model(), make_dls(), F.cross_entropy)
    with pytest.raises(ValueError, match="add a MetricsCB"):
        learn2.fit(1, cbs=[EpochSchedCB(plateau)])


def test_reused_schedule_callbacks_sit_out_a_validation_only_fit():
    from torch.optim.lr_scheduler import OneCycleLR

    from nanofit import sched_cos

    # The course passes the same callbacks to every fit; a validation-only fit comes first.
    cbs = [BatchSchedCB(partial(OneCycleLR, max_lr=0.5, total_steps=5)),
           ParamScheduler(mom=sched_cos(0.9, 0.8))]
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1, cbs=cbs,
                    opt_func=partial(torch.optim.SGD, momentum=0.9))
    learn.fit(1, train=False)  # before any training: nothing scheduled, the rate stays
    assert learn.opt.lr == 0.1 and learn.opt.mom == 0.9
    learn.fit(1, train=False)
    assert learn.opt.lr == 0.1 and learn.opt.mom == 0.9
    learn.fit(1)  # training builds the scheduler and follows it
    assert learn.opt.lr != 0.1 and learn.opt.mom != 0.9


def test_the_course_schedule_callback_in_a_first_validation_only_fit():
    from torch.optim.lr_scheduler import ExponentialLR

    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1,
                    cbs=[CourseBatchSchedCB(partial(ExponentialLR, gamma=0.5))])
    learn.fit(1, train=False)  # the course makes an optimizer in every fit: so does nanofit
    assert learn.opt.lr == 0.1
