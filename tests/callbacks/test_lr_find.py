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
from nanofit.callbacks.lr_find import (
    descent_problem,
    suggest_minimum,
    suggest_steep,
    suggest_valley,
)
from tests.helpers import BatchCounter

# Most learners here train on random labels, whose curves have no clear descent: that warning
# is tested on its own below.
pytestmark = pytest.mark.filterwarnings("ignore:lr_find. no clear descent:UserWarning")


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
    head_end = finder.lrs[math.ceil(0.05 * len(finder.lrs))]  # the first 5% are never suggested
    for lr in s:
        assert head_end <= lr <= finder.lrs[-1]
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


# ---- suggestions you can trust: never the head of the sweep, a warning without a descent -------
SWEEP = [10 ** (-7 + 8 * i / 99) for i in range(100)]  # 1e-7 .. 10, as lr_find's default
HEAD_END = SWEEP[5]  # the first 5% (5 of 100 points) are never suggested


def curve(level, noise=0.0, rise_from=-0.5):
    """`level(log10 lr)` plus deterministic noise, rising steeply past 10**rise_from."""
    out = []
    for i, lr in enumerate(SWEEP):
        x = math.log10(lr)
        out.append(level(x) + noise * math.sin(7.3 * i) + max(0.0, x - rise_from) * 3)
    return out


def suggestions(losses):
    return {f.__name__: f(SWEEP, losses) for f in (suggest_valley, suggest_minimum, suggest_steep)}


def suggest_through_the_finder(losses, **kw):
    from nanofit import LRFinderCB

    finder = LRFinderCB()
    finder.lrs, finder.losses = list(SWEEP), list(losses)
    return finder.suggest(("valley", "minimum", "steep"))


def descent(x):  # flat at 2.0 until 1e-4, down to 0.8 at 1e-1 (smoothly, on the log axis)
    if x < -4:
        return 2.0
    return 2.0 - 1.2 * (1 - math.cos(math.pi * min(x + 4, 3) / 3)) / 2


@pytest.mark.parametrize("name,losses", [
    ("flat", curve(lambda x: 2.0)),
    ("noisy plateau", curve(lambda x: 0.12, noise=0.01)),
    # a trained model's curve: a lucky first batch makes the start the lowest loss of all
    ("noisy plateau, lucky start", [0.05, 0.07, 0.09] + curve(lambda x: 0.12, noise=0.01)[3:]),
    ("only rising", [1.0 + 0.02 * i for i in range(100)]),
])
def test_no_clear_descent_warns_and_never_suggests_the_start(name, losses):
    assert descent_problem(SWEEP, losses) is not None
    for rule, lr in suggestions(losses).items():
        assert HEAD_END <= lr <= SWEEP[-1], (name, rule, lr)
    with pytest.warns(UserWarning, match="no clear descent.*more iterations.*smaller start_lr"
                                         ".*check the data and the loss"):
        res = suggest_through_the_finder(losses)
    if name == "only rising":
        assert "lowest at the start of the sweep" in descent_problem(SWEEP, losses)
        assert res.valley < 1e-5  # low, but past the head: the warning says to start lower
    else:  # flat up to 10**-0.5, then rising: a tenth of where it starts to rise
        assert 10**-2 <= res.valley <= 10**-1.2, (name, res.valley)
        assert 10**-2 <= suggest_valley(SWEEP, losses) <= 10**-1.2, name
    for lr in res:
        assert HEAD_END <= lr <= SWEEP[-1], (name, res)


def test_the_old_rule_suggested_the_start_on_a_noisy_plateau():
    """What the fix is for: the lowest smoothed loss was the first batch's, so `valley` was
    start_lr and `minimum` a tenth of it, below the sweep; fit_one_cycle then trained nothing."""
    losses = [0.05, 0.07, 0.09] + curve(lambda x: 0.12, noise=0.01)[3:]
    assert min(range(100), key=losses.__getitem__) == 0  # the old rules' anchor
    s = suggestions(losses)
    assert s["suggest_valley"] > 1e-3 and s["suggest_minimum"] >= HEAD_END


def linear_descent(x):  # flat at 2.0 until 1e-4, then down 0.3 a decade, never turning up
    return 2.0 if x < -4 else 2.0 - 0.3 * (x + 4)


@pytest.mark.parametrize("name,losses,valley,steep", [
    ("descent", curve(descent), (-3.6, -1.4), (-3.0, -2.0)),
    ("noisy descent", curve(descent, noise=0.02), (-3.6, -1.4), (-3.3, -1.7)),
    # within the first 5%: a dip deeper than the real minimum (one lucky batch), ignored
    ("early dip", [0.3, 0.5, 0.7, 0.9] + curve(descent)[4:], (-3.6, -1.4), (-3.0, -2.0)),
    # the sweep ended before the loss turned up: a descent all the way to end_lr
    ("monotone descent", curve(linear_descent, rise_from=2), (-2.0, -0.5), (-4.1, 0.0)),
])
def test_a_clear_descent_gives_a_valley_inside_it_and_no_warning(name, losses, valley, steep):
    import warnings

    assert descent_problem(SWEEP, losses) is None, name
    s = suggestions(losses)
    assert valley[0] < math.log10(s["suggest_valley"]) < valley[1], (name, s)
    assert steep[0] < math.log10(s["suggest_steep"]) < steep[1], (name, s)
    assert HEAD_END <= s["suggest_minimum"] <= SWEEP[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = suggest_through_the_finder(losses)
    assert res.valley == pytest.approx(s["suggest_valley"])  # nothing cut as "divergent"


def test_a_descent_within_the_batch_noise_is_no_descent():
    """A trained model's curve: the loss wanders 20-25% on its own (losses near zero, heavy
    tailed); the batch-to-batch noise of the raw losses tells it from a descent."""
    losses = curve(lambda x: 0.0021 - 0.0006 * math.exp(-(((x + 5.5) / 0.5) ** 2)))
    assert descent_problem(SWEEP, losses) is None  # 28% below the plateau: a descent by size
    assert math.log10(suggest_valley(SWEEP, losses)) < -5  # ...that would suggest ~1e-6
    with pytest.warns(UserWarning, match="no more than the loss's batch-to-batch noise"):
        from nanofit import LRFinderCB

        finder = LRFinderCB()
        finder.lrs, finder.losses = list(SWEEP), list(losses)
        finder.raw_losses = [0.002 + 0.001 * math.sin(2.1 * i) for i in range(100)]
        res = finder.suggest(("valley",))
    assert res.valley > 1e-2
    assert descent_problem(SWEEP, curve(descent), noise=0.1) is None  # a real one stays one


def test_minimum_is_never_below_the_sweep():
    # the lowest loss just past the head: a tenth of its lr would lie below start_lr
    losses = [2.0] * 5 + [1.0] + [1.5 + 0.01 * i for i in range(94)]
    short = SWEEP[:1] + [lr * 1e5 for lr in SWEEP[:99]]  # any sweep: the clamp is to its head
    assert suggest_minimum(SWEEP, losses) == pytest.approx(max(SWEEP[5] / 10, SWEEP[5]))
    assert suggest_minimum(short, losses) >= short[5]


def test_lr_find_warns_when_the_model_cannot_learn(tmp_path):
    """Random labels: nothing to learn, so no descent; lr_find says so and what to try."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 8, generator=g), torch.randint(0, 4, (1024,), generator=g)
    dls = DataLoaders(TensorLoader((x, y), 32, shuffle=True, generator=g),
                      TensorLoader((x[:64], y[:64]), 64))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    learn = Learner(model, dls, F.cross_entropy, opt_func=partial(torch.optim.SGD, momentum=0.9))
    with pytest.warns(UserWarning, match="no clear descent.*check the data and the loss"):
        s = learn.lr_find(plot=False)
    lrs = learn.lr_finder.lrs
    assert lrs[math.ceil(0.05 * len(lrs))] <= s.valley <= lrs[-1]


def test_lr_find_on_real_data_does_not_warn():
    import warnings

    from nanofit.cli import demo_model, digits_dls

    torch.manual_seed(0)
    learn = Learner(demo_model(), digits_dls(64, 0), F.cross_entropy,
                    opt_func=partial(torch.optim.SGD, momentum=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = learn.lr_find(plot=False)
    assert 1e-2 <= s.valley <= 1e-1  # where fit_one_cycle trains the demo to ~97%
