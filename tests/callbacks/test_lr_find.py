"""The LR finder: its curve, stopping, suggestions, plot, and the no-trace guarantee."""
import io
import math
import random
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanofit import (Callback, DataLoaders, Learner, MetricsCB, ParamScheduler, ProgressCB,
                     Recorder, TensorLoader, sched_no)
from nanofit.callbacks.lr_find import suggest_minimum, suggest_steep, suggest_valley


def bn_dropout_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, 3))


def shuffled_dls(seed=0, n=64, bs=8):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoaders(TensorLoader((x, y), bs, shuffle=True, generator=torch.Generator().manual_seed(1)),
                       TensorLoader((x[:16], y[:16]), bs))


class BatchCounter(Callback):
    """A user callback with state: lr_find runs it, and must put its state back."""

    def __init__(self):
        self.n = 0

    def after_batch(self, learn):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def make_learner(seed=0):
    return Learner(bn_dropout_model(seed), shuffled_dls(), F.cross_entropy, lr=0.05,
                   opt_func=partial(torch.optim.SGD, momentum=0.9, weight_decay=1e-4),
                   cbs=[MetricsCB(), Recorder(), ProgressCB(file=io.StringIO()), BatchCounter()])


def everything(learn):
    """Every piece of state lr_find must leave alone, as comparable Python/tensor values."""
    opt_state = learn.opt.state_dict() if learn.opt is not None else None
    return {
        "weights": {k: v.clone() for k, v in learn.model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in learn.model.parameters()],
        "training": [m.training for m in learn.model.modules()],
        "opt_groups": None if opt_state is None else
        [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]],
        "opt_state": None if opt_state is None else
        {i: {k: v.clone() for k, v in s.items()} for i, s in opt_state["state"].items()},
        "cbs": list(learn.cbs),
        "history": [dict(r) for r in learn.metrics.history] if hasattr(learn, "metrics") else None,
        "rec_losses": list(learn.recorder.losses) if hasattr(learn, "recorder") else None,
        "counted": learn.cbs[-1].n,
        "torch_rng": torch.random.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "loader_rng": learn.dls.train.generator.get_state(),
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), key
        elif isinstance(x, dict) and x and isinstance(next(iter(x.values())), torch.Tensor):
            assert all(torch.equal(x[k], y[k]) for k in x), key
        elif key == "opt_state" and x is not None:
            assert x.keys() == y.keys() and all(
                torch.equal(x[i][k], y[i][k]) for i in x for k in x[i]), key
        elif key == "cbs":
            assert len(x) == len(y) and all(p is q for p, q in zip(x, y)), key
        else:
            assert x == y, key


@pytest.mark.parametrize("trained_first", [False, True])
def test_lr_find_leaves_no_trace(tmp_path, trained_first):
    learn = make_learner()
    if trained_first:  # optimizer with momentum state, history and recorder filled
        learn.fit(1)
        learn.model[0].weight.requires_grad_(False)  # a frozen layer must stay frozen
    before = everything(learn)
    learn.lr_find(num_it=20, plot_path=str(tmp_path / "lr.png"))
    assert_same(before, everything(learn))
    if not trained_first:
        assert learn.opt is None


def test_lr_find_then_fit_equals_fit_alone(tmp_path):
    plain = make_learner()
    plain.fit_one_cycle(2, 0.05)
    found = make_learner()
    found.lr_find(num_it=30, plot_path=str(tmp_path / "lr.png"))
    found.fit_one_cycle(2, 0.05)
    a, b = plain.model.state_dict(), found.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain.metrics.history == found.metrics.history


def test_lr_find_records_a_growing_lr_across_short_epochs(tmp_path):
    learn = make_learner()  # 8 batches an epoch: 30 iterations need 4 epochs
    sched = ParamScheduler(lr=sched_no(0.123, 0.123))
    learn.add_cb(sched)  # a schedule must not fight the finder: it sits out
    learn.lr_find(start_lr=1e-5, end_lr=1e-1, num_it=30, stop_div=False,
                  plot_path=str(tmp_path / "lr.png"))
    finder = learn.lr_finder
    assert len(finder.lrs) == 30 and len(finder.losses) == 30
    assert finder.lrs[0] == pytest.approx(1e-5) and finder.lrs[-1] == pytest.approx(1e-1)
    ratios = [b / a for a, b in zip(finder.lrs, finder.lrs[1:])]
    assert ratios == pytest.approx([ratios[0]] * 29)
    assert sched in learn.cbs


def test_lr_find_stops_when_the_loss_diverges(tmp_path):
    learn = make_learner()
    learn.lr_find(start_lr=1e-3, end_lr=1e6, num_it=200, plot_path=str(tmp_path / "lr.png"))
    finder = learn.lr_finder
    assert len(finder.losses) < 200
    last = finder.losses[-1]
    assert not math.isfinite(last) or last > 4 * min(x for x in finder.losses if math.isfinite(x))


def test_lr_find_returns_suggestions_and_saves_the_plot(tmp_path):
    learn = make_learner()
    path = tmp_path / "lr_find.png"
    s = learn.lr_find(num_it=40, suggest=("valley", "minimum", "steep"), plot_path=str(path))
    assert all(1e-8 <= v <= 10 for v in (s.valley, s.minimum, s.steep))  # minimum: lr / 10
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert learn.lr_find(num_it=10, plot=False).minimum is None
    with pytest.raises(ValueError, match="unknown lr_find suggestion"):
        learn.lr_find(num_it=10, suggest=("best",), plot=False)


def test_suggestions_on_a_synthetic_curve():
    lrs = [10 ** (-6 + 7 * i / 99) for i in range(100)]  # 1e-6 .. 10
    # flat until 1e-4, falling until 1e-1 (steepest near 1e-2.5), rising after
    def loss(lr):
        x = math.log10(lr)
        if x < -4:
            return 2.0
        if x < -1:
            return 2.0 - 1.5 * (1 - math.cos(math.pi * (x + 4) / 3)) / 2
        return 0.5 + (x + 1) ** 2
    losses = [loss(lr) for lr in lrs]
    low = min(range(100), key=losses.__getitem__)
    assert suggest_minimum(lrs, losses) == pytest.approx(lrs[low] / 10)
    assert math.log10(lrs[low]) == pytest.approx(-1, abs=0.05)
    assert math.log10(suggest_steep(lrs, losses)) == pytest.approx(-2.5, abs=0.1)
    valley = math.log10(suggest_valley(lrs, losses))
    assert -3.5 < valley < -1.5  # inside the descent, away from the flat start and the bottom
    # Real curves are rougher: a spike from the first batches, noise on the plateau, a wiggle
    # just before the minimum. The valley must not follow them.
    rough = [v + 0.02 * math.sin(7 * i) for i, v in enumerate(losses)]
    rough[0] += 0.5
    rough[1] += 0.3
    rough[low - 2] -= 0.05
    assert -3.5 < math.log10(suggest_valley(lrs, rough)) < -1.5
