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

from nanofit import (
    Callback,
    DataLoaders,
    Learner,
    MetricsCB,
    ParamScheduler,
    ProgressCB,
    Recorder,
    TensorLoader,
    sched_no,
)
from nanofit.callbacks.lr_find import suggest_minimum, suggest_steep, suggest_valley
from tests.helpers import BatchCounter


def bn_dropout_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, 3))


def shuffled_dls(seed=0, n=64, bs=8):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    shuffle_gen = torch.Generator().manual_seed(1)
    return DataLoaders(TensorLoader((x, y), bs, shuffle=True, generator=shuffle_gen),
                       TensorLoader((x[:16], y[:16]), bs))


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
        "history": [dict(r) for r in learn.metrics.history] if learn.metrics is not None else None,
        "rec_losses": list(learn.recorder.losses) if learn.recorder is not None else None,
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
    finder = learn.lr_finder
    assert s.minimum == pytest.approx(finder.lrs[finder.losses.index(min(finder.losses))] / 10)
    assert finder.lrs[0] <= s.valley <= finder.lrs[-1]
    assert finder.lrs[0] <= s.steep <= finder.lrs[-1]
    assert path.read_bytes()[:4] == b"\x89PNG"
    only = learn.lr_find(num_it=10, plot=False)  # only what was asked, as plain floats
    assert only._fields == ("valley",) and not hasattr(only, "minimum")
    (valley,) = only
    assert type(valley) is float
    two = learn.lr_find(num_it=10, plot=False, suggest=("steep", "valley"))
    assert two._fields == ("steep", "valley") and all(type(float(v)) is float for v in two)
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


class WithBuffer(nn.Module):
    """BatchNorm, dropout and a non-persistent buffer that counts forwards."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 3)
        self.register_buffer("forwards", torch.zeros(()), persistent=False)

    def forward(self, x):
        self.forwards += 1
        return self.head(self.body(x))


class ToDouble(Callback):
    """Changes the model's dtype at before_fit (as a device or precision callback might)."""

    def before_fit(self, learn):
        learn.model.double()

    def before_batch(self, learn):
        learn.batch = tuple(t.double() if t.is_floating_point() else t for t in learn.batch)


def torch_dataloader_learner(workers=0, seed=0):
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    ds = TensorDataset(x, y)
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(2))
    train = DataLoader(ds, batch_size=8, sampler=sampler,
                       num_workers=workers, persistent_workers=workers > 0)
    torch.manual_seed(seed)
    return Learner(WithBuffer(), DataLoaders(train, DataLoader(ds, batch_size=16)), F.cross_entropy,
                   lr=[1e-3, 1e-2], opt_func=torch.optim.Adam,
                   splitter=lambda m: [list(m.body.parameters()), list(m.head.parameters())])


def test_no_trace_with_adam_state_sampler_splitter_buffers_and_dtype(tmp_path):
    learn = torch_dataloader_learner()
    learn.fit(1)  # Adam state exists
    learn.freeze()
    sampler_gen = learn.dls.train.sampler.generator
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    forwards = learn.model.forwards.clone()
    dtypes = {p.dtype for p in learn.model.parameters()}
    opt_state = {i: {k: v.clone() for k, v in s.items()}
                 for i, s in learn.opt.state_dict()["state"].items()}
    flags = [p.requires_grad for p in learn.model.parameters()]
    gen_state, rng = sampler_gen.get_state(), torch.random.get_rng_state()
    learn.lr_find(num_it=12, plot=False, suggest=("valley",))
    learn.lr_find(num_it=12, plot=False, suggest=("valley",))  # twice
    after = learn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {p.dtype for p in learn.model.parameters()} == dtypes
    assert torch.equal(forwards, learn.model.forwards)  # a non-persistent buffer
    new_state = learn.opt.state_dict()["state"]
    assert all(torch.equal(opt_state[i][k], new_state[i][k])
               for i in opt_state for k in opt_state[i])
    assert learn.opt.lr == [1e-3, 1e-2]
    assert [p.requires_grad for p in learn.model.parameters()] == flags
    assert torch.equal(gen_state, sampler_gen.get_state())
    assert torch.equal(rng, torch.random.get_rng_state())


def test_no_trace_when_a_callback_changes_the_dtype():
    learn = Learner(WithBuffer(), shuffled_dls(), F.cross_entropy, cbs=[ToDouble()])
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.lr_find(num_it=10, plot=False)
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    assert learn.opt is None


def test_lr_find_then_fit_equals_fit_alone_with_persistent_workers():
    plain = torch_dataloader_learner(workers=1)
    plain.fit(2)
    found = torch_dataloader_learner(workers=1)
    found.lr_find(num_it=10, plot=False)
    found.fit(2)
    a, b = plain.model.state_dict(), found.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_suggest_ignores_nan_and_the_curve_after_divergence():
    from nanofit import LRFinderCB

    finder = LRFinderCB(num_it=10)
    finder.lrs = [10.0 ** e for e in range(-6, 4)]
    finder.losses = [2.0, 2.0, 1.8, 1.2, 0.8, 0.5, 9.0, 0.1, float("nan"), float("inf")]
    s = finder.suggest(("minimum", "valley", "steep"))
    assert s.minimum == pytest.approx(1e-1 / 10)  # 0.1 at lr 1e1 lies past the 4x blow-up at 1e0
    assert 1e-5 <= s.valley <= 1e-1 and 1e-5 <= s.steep <= 1e-1
    finder.losses = [float("nan")] * 10
    with pytest.raises(ValueError, match="too few to suggest"):
        finder.suggest()


def test_the_course_lr_find_signature():
    learn = make_learner()
    res = learn.lr_find(gamma=1.3, max_mult=3, start_lr=1e-5, max_epochs=2, plot=False)
    lrs = learn.lr_finder.lrs
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] == pytest.approx(1.3e-5)  # x gamma a batch
    assert len(lrs) <= 2 * len(learn.dls.train)  # at most max_epochs epochs
    assert lrs[0] <= res.valley <= lrs[-1]
    with pytest.raises(ValueError, match="gamma > 1 .* or end_lr, not both"):
        learn.lr_find(gamma=1.3, end_lr=1.0, plot=False)
    with pytest.raises(ValueError, match="max_mult"):
        learn.lr_find(max_mult=1, plot=False)
