"""HooksCallback and ActivationStats."""
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanofit import (
    ActivationStats,
    Callback,
    CancelFitException,
    DataLoaders,
    HooksCallback,
    Learner,
    SingleBatchCB,
    TensorLoader,
    append_stats,
)
from nanofit.plots import new_figure
from tests.helpers import make_dls


def model_with_probe():
    torch.manual_seed(0)
    return nn.Sequential(nn.Identity(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def no_hooks_left(model):
    return all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("ending", ["normal", "cancel", "error"])
def test_hooks_never_outlive_the_fit(ending):
    class End(Callback):
        def after_batch(self, learn):
            if ending == "cancel":
                raise CancelFitException()
            if ending == "error":
                raise RuntimeError("boom")

    model = model_with_probe()
    calls = []
    hooks = HooksCallback(lambda h, m, i, o: calls.append(m), mod_filter=nn.Linear)
    cbs = [hooks] + ([End()] if ending != "normal" else [])
    learn = Learner(model, make_dls(), F.cross_entropy, cbs=cbs)
    if ending == "error":
        with pytest.raises(RuntimeError):
            learn.fit(1)
    else:
        learn.fit(1)
    assert calls and no_hooks_left(model)


def test_hooks_run_in_the_chosen_phases():
    model = model_with_probe()
    phases = []
    for on_train, on_valid in ((True, False), (False, True)):
        phases.clear()
        learn = Learner(model, make_dls(n_train=16, n_valid=8, bs=8), F.cross_entropy,
                        cbs=[HooksCallback(lambda h, m, i, o: phases.append(m.training),
                                           mods=[model[1]], on_train=on_train, on_valid=on_valid)])
        learn.fit(1)
        assert phases == ([True, True] if on_train else [False])


def test_missing_modules_are_reported():
    learn = Learner(model_with_probe(), make_dls(), F.cross_entropy,
                    cbs=[HooksCallback(lambda *a: None, mod_filter=nn.Conv2d)])
    with pytest.raises(ValueError, match="no module of the model passes mod_filter"):
        learn.fit(1)


def test_activation_stats_match_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g) * 3
    y = torch.randint(0, 3, (24,), generator=g)
    dls = DataLoaders(TensorLoader((x, y), 8), TensorLoader((x, y), 8))
    model = model_with_probe()
    stats = ActivationStats(mods=[model[0]], every=1, bins=5, hist_range=(0.0, 5.0))
    Learner(model, dls, F.cross_entropy, cbs=[stats]).fit(2)
    recorded = stats.stats[0]
    assert recorded.shape == (6, 7)  # 3 training batches x 2 epochs; mean, std, 5 bins
    for k in range(6):
        xb = x[(k % 3) * 8:(k % 3) * 8 + 8]  # the Identity's output is the batch itself
        assert recorded[k, 0] == pytest.approx(xb.mean().item(), abs=1e-6)
        assert recorded[k, 1] == pytest.approx(xb.std().item(), abs=1e-5)
        expected = torch.histc(xb.abs().clamp(max=5.0), 5, 0.0, 5.0)
        assert torch.equal(recorded[k, 2:], expected)
        assert recorded[k, 2:].sum() == xb.numel()  # nothing dropped beyond the range
    assert stats.dead_fraction()[0][0] == pytest.approx(recorded[0, 2].item() / 32)
    assert stats.names == ["0 (Identity)"]


def test_every_n_batches_and_one_row_per_layer():
    stats = ActivationStats(nn.ReLU, every=3)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    Learner(model, make_dls(n_train=80, bs=8), F.cross_entropy, cbs=[stats]).fit(2)
    assert [s.shape[0] for s in stats.stats] == [6, 6]  # 20 training batches: the 3rd ... 18th


def test_host_copies_are_batched(monkeypatch):
    copies = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        copies.append(self.shape)
        return real_cpu(self, *args, **kwargs)

    stats = ActivationStats(nn.ReLU, sync_every=16)
    learn = Learner(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                  nn.Linear(8, 3)), make_dls(n_train=400, bs=8), F.cross_entropy,
                    cbs=[stats])
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    learn.fit(1, valid=False)
    monkeypatch.undo()
    assert [s.shape[0] for s in stats.stats] == [50, 50]
    assert len(copies) <= 4  # 50 batches x 2 hooks in a few copies, not 100


def _tensor_bytes():
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def test_long_fit_keeps_only_the_statistics():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16_000, 4, generator=g), torch.randint(0, 3, (16_000,), generator=g)
    dls = DataLoaders(TensorLoader((x, y), 8), TensorLoader((x[:16], y[:16]), 8))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    stats = ActivationStats(nn.ReLU, bins=10)
    learn = Learner(model, dls, F.cross_entropy, cbs=[stats])
    learn.fit(1, cbs=[SingleBatchCB()])  # warm-up: optimizer, learner attributes, 1 record
    before = _tensor_bytes()
    learn.fit(1)  # 2,000 training batches
    grown = _tensor_bytes() - before
    recorded = stats.stats
    assert [s.shape[0] for s in recorded] == [2000, 2000]
    assert all(not s.requires_grad and s.grad_fn is None for s in recorded)
    gc.collect()  # and nothing anywhere still holds a piece of an autograd graph
    graphs = [o for o in gc.get_objects()
              if issubclass(type(o), torch.Tensor) and not o.is_meta and o.grad_fn is not None]
    assert graphs == []
    stats_bytes = sum(s.numel() * s.element_size() for s in recorded)  # 2 x 2000 x 12 floats
    assert abs(grown - stats_bytes) < 32 * 1024, (grown, stats_bytes)


def test_activation_plots_render(tmp_path):
    stats = ActivationStats(nn.ReLU)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    Learner(model, make_dls(), F.cross_entropy, cbs=[stats]).fit(2)
    for name in ("plot_stats", "color_dim", "dead_chart"):
        fig = getattr(stats, name)(path=tmp_path / f"{name}.png")
        assert fig.axes and (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_activation_stats_on_tuple_outputs_and_shared_modules():
    class TwoOut(nn.Module):
        def forward(self, x):
            return x * 2, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.pair, self.head = nn.Linear(4, 4), TwoOut(), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.pair(self.shared(self.shared(x)))[0])

    net = Net()
    stats = ActivationStats(mods=[net.shared, net.pair])
    Learner(net, make_dls(n_train=32, bs=8), F.cross_entropy, cbs=[stats]).fit(1)
    assert [s.shape[0] for s in stats.stats] == [4, 4]  # one row per batch, even called twice



def relu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_hooks_callback_is_a_list_of_hooks_kept_after_the_fit():
    model = relu_net()
    cb = HooksCallback(append_stats, nn.ReLU)
    assert len(cb) == 0 and list(cb) == [] and cb  # before a fit: no hooks, still a callback
    Learner(model, make_dls(n_train=32, bs=8), F.cross_entropy, cbs=[cb]).fit(2)
    assert no_hooks_left(model)  # removed at cleanup_fit ...
    assert len(cb) == 2 and [h.module for h in cb] == [model[1], model[3]]
    for h in cb:  # ... and readable after it, as in the course
        assert len(h.stats[0]) == 8  # 4 training batches x 2 epochs
    assert cb[1] is list(cb)[1]


def test_activation_stats_hooks_in_the_course_shape():
    astats = ActivationStats(nn.ReLU)
    model = relu_net()
    Learner(model, make_dls(n_train=48, bs=8), F.cross_entropy, cbs=[astats]).fit(2)
    assert no_hooks_left(model) and len(astats) == 2 and astats[0].module is model[1]
    for i, h in enumerate(astats):
        means, stds, hists = h.stats
        assert len(means) == len(stds) == len(hists) == 12  # 6 batches x 2 epochs
        assert means[0].shape == () and hists[0].shape == (40,)
        assert torch.equal(torch.stack(means), astats.means()[i])
        assert torch.equal(torch.stack(stds), astats.stds()[i])
        hist = torch.stack(h.stats[2]).t().float()  # the course's get_hist / get_min
        assert torch.equal(hist, astats.hists()[i])
        assert torch.allclose(hist[0] / hist.sum(0), astats.dead_fraction()[i])
        assert h.stats is h.stats  # built once, not per read
        fig = new_figure()
        fig.add_subplot().plot(h.stats[0])  # the course's plot_stats loop
    Learner(model, make_dls(n_train=16, bs=8), F.cross_entropy, cbs=[astats]).fit(1)
    assert [len(h.stats[0]) for h in astats] == [2, 2]  # a new fit, new records


def test_reading_course_stats_adds_no_copy_per_batch(monkeypatch):
    copies = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        copies.append(self.shape)
        return real_cpu(self, *args, **kwargs)

    astats = ActivationStats(nn.ReLU, sync_every=16)
    learn = Learner(relu_net(), make_dls(n_train=400, bs=8), F.cross_entropy, cbs=[astats])
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    learn.fit(1, valid=False)
    stats = [h.stats for h in astats]
    monkeypatch.undo()
    assert [len(s[0]) for s in stats] == [50, 50]
    assert len(copies) <= 4


def test_activation_plots_take_the_course_figsize(tmp_path):
    astats = ActivationStats(nn.ReLU)
    Learner(relu_net(), make_dls(), F.cross_entropy, cbs=[astats]).fit(1)
    assert tuple(astats.color_dim(figsize=(11, 5)).get_size_inches()) == (11, 5)
    assert tuple(astats.dead_chart(figsize=(11, 5)).get_size_inches()) == (11, 5)
    assert tuple(astats.plot_stats(figsize=(10, 4)).get_size_inches()) == (10, 4)
    assert tuple(astats.color_dim((6, 3)).get_size_inches()) == (6, 3)
    fig = astats.dead_chart(figsize=(8, 3), path=tmp_path / "dead.png")
    assert fig.axes and (tmp_path / "dead.png").exists()
    with pytest.raises(TypeError, match="path="):
        astats.color_dim(str(tmp_path / "x.png"))
