"""Hyper-parameters by name over torch optimizers, param groups, freezing."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanofit import HPOptimizer, Learner, get_hyper, set_hyper
from tests.helpers import CourseBatchSchedCB, make_dls, make_model


def two_groups(model):
    return [list(model[0].parameters()), list(model[2].parameters())]


@pytest.mark.parametrize("opt_cls, keys", [
    (torch.optim.SGD, {"mom": ("momentum", None), "wd": ("weight_decay", None)}),
    (torch.optim.Adam, {"mom": ("betas", 0), "beta": ("betas", 1), "wd": ("weight_decay", None)}),
    (torch.optim.AdamW, {"mom": ("betas", 0), "beta": ("betas", 1)}),
    (torch.optim.RMSprop, {"mom": ("momentum", None), "beta": ("alpha", None)}),
])
def test_hyper_parameters_map_to_each_optimizer(opt_cls, keys):
    opt = HPOptimizer(opt_cls(make_model().parameters(), lr=0.01))
    opt.lr = 0.05
    assert opt.lr == 0.05 and opt.param_groups[0]["lr"] == 0.05
    for name, (key, index) in keys.items():
        setattr(opt, name, 0.5)
        raw = opt.param_groups[0][key]
        assert (raw if index is None else raw[index]) == 0.5
        assert getattr(opt, name) == 0.5


def test_per_group_values_and_reading_back():
    model = make_model()
    opt = HPOptimizer(torch.optim.SGD([{"params": g} for g in two_groups(model)], lr=0.1))
    opt.lr = [0.01, 0.1]
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1] and opt.lr == [0.01, 0.1]
    opt.lr = 0.3
    assert opt.lr == 0.3
    with pytest.raises(ValueError, match=r"got 3 values \[1, 2, 3\] for 2 param groups"):
        opt.lr = [1, 2, 3]


def test_unsupported_hyper_parameter_names_the_optimizer_and_what_it_has():
    opt = HPOptimizer(torch.optim.Adagrad(make_model().parameters(), lr=0.1))
    with pytest.raises(AttributeError,
                       match=r"Adagrad has no hyper-parameter 'mom'; it supports: lr, wd"):
        opt.mom = 0.9
    with pytest.raises(AttributeError, match="ASGD has no hyper-parameter 'beta'"):
        get_hyper(torch.optim.ASGD(make_model().parameters()), "beta")
    assert opt.hypers == ["lr", "wd"]


@pytest.mark.parametrize("kwargs", [{"foreach": True}, {"fused": True}])
def test_foreach_and_fused_optimizers_keep_working(kwargs):
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    opt_func=lambda p, lr: torch.optim.Adam(p, lr=lr, **kwargs), lr=0.01)
    learn.fit(1)
    learn.opt.lr, learn.opt.mom = 0.001, 0.8
    learn.fit(1)
    assert learn.opt.param_groups[0]["betas"][0] == 0.8


def test_wrapper_passes_through_state_and_a_raw_optimizer_gets_wrapped():
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1)
    learn.opt = torch.optim.SGD(learn.model.parameters(), lr=0.2, momentum=0.9)
    assert isinstance(learn.opt, HPOptimizer) and learn.opt.lr == 0.2
    learn.fit(1)
    state = learn.opt.state_dict()
    fresh = HPOptimizer(torch.optim.SGD(learn.model.parameters(), lr=1.0, momentum=0.0))
    fresh.load_state_dict(state)
    assert fresh.lr == 0.2 and fresh.mom == 0.9 and len(fresh.state) == len(learn.opt.state)
    set_hyper(learn.opt.opt, "lr", 0.4)  # the functions work on raw torch optimizers too
    assert learn.opt.lr == 0.4


def test_splitter_makes_groups_and_freezing_keeps_frozen_weights():
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=[0.01, 0.1], splitter=two_groups)
    learn.freeze()
    assert [p.requires_grad for p in learn.model.parameters()] == [False, False, True, True]
    body = learn.model[0].weight.detach().clone()
    learn.fit(1)
    assert learn.opt.lr == [0.01, 0.1]
    assert torch.equal(body, learn.model[0].weight)
    learn.unfreeze()
    learn.fit(1)
    assert not torch.equal(body, learn.model[0].weight)
    learn.freeze_to(1)
    assert [p.requires_grad for p in learn.model.parameters()] == [False, False, True, True]
    learn.freeze_to(0)
    assert all(p.requires_grad for p in learn.model.parameters())


def test_bad_splitter_is_reported():
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    splitter=lambda m: [[], list(m.parameters())])
    with pytest.raises(ValueError, match=r"splitter returned 2 groups with sizes \[0, 4\]"):
        learn.fit(1)


def test_fine_tune_trains_head_first_then_all_with_discriminative_rates():
    class Watch:
        order = 100

        def __init__(self):
            self.flags, self.lrs = [], []

        def before_fit(self, learn):
            self.flags.append([p.requires_grad for p in learn.model.parameters()])

        def after_batch(self, learn):
            if learn.training and learn.iter == 0:
                self.lrs.append([g["lr"] for g in learn.opt.param_groups])

    watch = Watch()
    learn = Learner(make_model(), make_dls(), F.cross_entropy, splitter=two_groups,
                    opt_func=torch.optim.Adam)
    body = learn.model[0].weight.detach().clone()
    learn.fine_tune(1, base_lr=1e-2, freeze_epochs=1, cbs=[watch])
    assert watch.flags == [[False, False, True, True], [True] * 4]
    assert watch.lrs[1][1] / watch.lrs[1][0] == pytest.approx(100)  # lr_mult spreads the rates
    assert not torch.equal(body, learn.model[0].weight)


def test_freeze_keeps_batchnorm_trainable_unless_asked():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    split = lambda m: [list(m[0].parameters()) + list(m[1].parameters()), list(m[2].parameters())]  # noqa: E731
    learn = Learner(model, make_dls(), F.cross_entropy, splitter=split)
    learn.freeze()
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad
    assert model[2].weight.requires_grad
    learn.freeze(train_bn=False)
    assert not model[1].weight.requires_grad and not model[1].bias.requires_grad


def test_learn_opt_is_a_real_torch_optimizer_that_torch_schedulers_drive():
    from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR

    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1)
    learn.create_opt()
    opt = learn.opt
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, torch.optim.SGD)
    assert type(opt).__name__ == "SGD" and opt.opt is opt  # learn.opt.opt still works
    sched = ExponentialLR(opt, gamma=0.5)  # the course's schedulers, on learn.opt itself
    opt.step()
    sched.step()
    assert opt.lr == pytest.approx(0.05)
    CosineAnnealingLR(opt, 100)

    learn = Learner(make_model(), make_dls(n_train=16), F.cross_entropy, lr=0.1,
                    cbs=[CourseBatchSchedCB(partial(ExponentialLR, gamma=0.5))])
    learn.fit(1)
    assert learn.opt.lr == pytest.approx(0.1 * 0.5**2)


class CourseSGD:
    """The course's hand-written SGD: no param_groups, no set_to_none."""

    def __init__(self, params, lr, wd=0.0):
        self.params, self.lr, self.wd, self.i = list(params), lr, wd, 0

    def step(self):
        with torch.no_grad():
            for p in self.params:
                if self.wd != 0:
                    p *= 1 - self.lr * self.wd
                p -= p.grad * self.lr
        self.i += 1

    def zero_grad(self):
        for p in self.params:
            p.grad.data.zero_()


class CourseMomentum(CourseSGD):
    def __init__(self, params, lr, wd=0.0, mom=0.9):
        super().__init__(params, lr=lr, wd=wd)
        self.mom = mom

    def step(self):
        with torch.no_grad():
            for p in self.params:
                if not hasattr(p, "grad_avg"):
                    p.grad_avg = torch.zeros_like(p.grad)
                p.grad_avg = p.grad_avg * self.mom + p.grad * (1 - self.mom)
                p -= self.lr * p.grad_avg
        self.i += 1


@pytest.mark.parametrize("opt_func", [CourseSGD, CourseMomentum])
def test_hand_written_course_optimizers_train_and_show(opt_func):
    from nanofit import MetricsCB, Recorder, sched_lin
    from nanofit.callbacks import ParamScheduler

    rec, sched = Recorder(), ParamScheduler(lr=sched_lin(0.1, 0.01))
    learn = Learner(make_model(), make_dls(), F.cross_entropy, lr=0.1, opt_func=opt_func,
                    cbs=[MetricsCB(), rec, sched])
    learn.fit(2)
    assert learn.opt.i == 10 and repr(learn.opt)  # it stepped; showing it works
    assert rec.lrs[0] == pytest.approx(0.1) and rec.lrs[-1] < 0.1  # scheduled by name
    losses = [r["loss"] for r in learn.metrics.history if r["train"] == "train"]
    assert losses[-1] < losses[0]
    learn.rm_cb(sched)
    learn.fit(1, lr=0.05)  # fit(lr=) sets its attribute
    assert learn.opt.lr == 0.05 and get_hyper(learn.opt, "lr") == 0.05
    if opt_func is CourseMomentum:
        assert learn.opt.mom == 0.9 and get_hyper(learn.opt, "mom") == 0.9
