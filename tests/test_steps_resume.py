"""Exact resume of step fits: mid-pass and mid-round, on index-skippable loaders, on loaders
that keep their own position (torchdata's StatefulDataLoader), and on streams with none."""
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from nanofit import Callback, CheckpointCB, DataLoaders, Learner, MetricsCB, Recorder
from nanofit.testing import assert_resumable

from .helpers import BatchCounter, make_dls


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def _data(n=44):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _torch_dls(loader=DataLoader):
    x, y = _data()
    train = loader(TensorDataset(x[:36], y[:36]), batch_size=8, shuffle=True)  # 5 batches
    valid = DataLoader(TensorDataset(x[36:], y[36:]), batch_size=4)
    return DataLoaders(train, valid)


def _learner(dls_fn):
    torch.manual_seed(0)
    return Learner(_model(), dls_fn(), F.cross_entropy, opt_func=torch.optim.Adam,
                   cbs=[MetricsCB(), Recorder(), BatchCounter()])


# Stops mid-round in the first pass, mid-round across a pass boundary, at a round's last
# batch, and in the last (short) round. 17 steps of 5-batch passes, rounds of 6.
STOPS = [2, 7, 11, 15]


@pytest.mark.parametrize("dls_fn", [_torch_dls, functools.partial(make_dls, n_train=36,
                                                                    shuffle=True)],
                         ids=["DataLoader", "TensorLoader"])
def test_a_one_cycle_step_fit_resumes_bit_exactly_mid_pass_and_mid_round(dls_fn):
    assert_resumable(lambda: _learner(dls_fn), None, STOPS, fit="fit_one_cycle", steps=17,
                     valid_every=6, lr_max=1e-2)


def test_a_loader_with_its_own_state_is_checkpointed_through_it_and_resumes_exactly(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    dls_fn = functools.partial(_torch_dls, loader=StatefulDataLoader)
    assert_resumable(lambda: _learner(dls_fn), None, [3, 8, 12], steps=14, valid_every=4)
    learn = _learner(dls_fn)
    learn.fit(steps=7, cbs=[saver := CheckpointCB(tmp_path, every_n_batches=7)])
    ckpt = torch.load(saver.saved[-1], weights_only=True)
    assert ckpt["loader"] is not None  # its own position, not a replay by index
    assert ckpt["position"]["step"] == 7 and ckpt["position"]["passes"] == 2


def test_an_epoch_fit_on_a_stateful_loader_resumes_exactly_too():
    from torchdata.stateful_dataloader import StatefulDataLoader

    dls_fn = functools.partial(_torch_dls, loader=StatefulDataLoader)
    assert_resumable(lambda: _learner(dls_fn), 3, [2, 4, 8])


class Stream(IterableDataset):
    """A stream with no saved position."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(4, generator=g), torch.randint(0, 3, (), generator=g)


def test_a_stream_without_state_resumes_from_a_new_stream_with_a_warning(tmp_path):
    def dls():
        x, y = _data()
        return DataLoaders(DataLoader(Stream(), batch_size=8),
                           DataLoader(TensorDataset(x, y), batch_size=8))

    first = _learner(dls)
    first.fit(steps=6, cbs=[saver := CheckpointCB(tmp_path, every_n_batches=3)])
    resumed = _learner(dls)
    with pytest.warns(UserWarning, match="cannot be repositioned.*new stream"):
        resumed.fit(steps=8, resume=str(saver.saved[-1]))
    assert resumed.step == 8


def test_resuming_with_another_kind_of_fit_is_refused(tmp_path):
    learn = _learner(_torch_dls)
    learn.fit(steps=4, cbs=[CheckpointCB(tmp_path, every_n_batches=2)])
    again = _learner(_torch_dls)
    with pytest.raises(ValueError, match=r"comes from a fit\(steps=4, valid_every=4\) run"):
        again.fit(2, resume=str(tmp_path))
    with pytest.raises(ValueError, match=r"at step 4, so fit\(steps=4, resume=...\) has nothing"):
        again.fit(steps=4, resume=str(learn_ckpt := sorted(tmp_path.glob("*.pt"))[-1]))
    complete = _learner(_torch_dls)
    complete.fit(steps=4, resume=str(tmp_path))  # a restart of a finished run: loads, returns
    assert complete.step == 4 and complete.metrics.history == learn.metrics.history
    assert all(torch.equal(a, b) for a, b in zip(complete.model.state_dict().values(),
                                                 learn.model.state_dict().values()))
    assert learn_ckpt.exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.fit(steps=6, resume=str(tmp_path))
    assert any("rounds and schedules" in str(w.message) for w in caught)
    assert again.step == 6


def test_lr_find_leaves_a_stateful_loader_where_it_was():
    from torchdata.stateful_dataloader import StatefulDataLoader

    dls_fn = functools.partial(_torch_dls, loader=StatefulDataLoader)
    alone = _learner(dls_fn)
    alone.fit(steps=7)
    after = _learner(dls_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after.lr_find(num_it=8, plot=False)
    after.fit(steps=7)
    assert all(torch.equal(a, b) for a, b in zip(alone.model.state_dict().values(),
                                                 after.model.state_dict().values()))


def test_a_checkpoint_of_the_last_round_resumes_its_validation(tmp_path):
    class CrashInFinalValidation(Callback):
        def after_batch(self, learn):
            if not learn.training and learn.epoch == learn.n_epochs - 1:
                raise RuntimeError("crash")

    first = _learner(_torch_dls)
    with pytest.raises(RuntimeError, match="crash"):
        first.fit(steps=10, valid_every=5, cbs=[CheckpointCB(tmp_path, every_n_batches=5),
                                                CrashInFinalValidation()])
    resumed = _learner(_torch_dls)
    resumed.fit(steps=10, valid_every=5, resume=str(tmp_path))
    assert [r["train"] for r in resumed.metrics.history][-2:] == ["train", "eval"]
    assert resumed.metrics.history[-1]["step"] == 10


def test_a_checkpoint_saved_after_a_step_fit_continues_its_stream_with_more_steps(tmp_path):
    whole = _learner(_torch_dls)
    whole.fit(steps=12, valid_every=4)
    first = _learner(_torch_dls)
    first.fit(steps=8, valid_every=4)
    first.save(tmp_path / "after.pt")
    more = _learner(_torch_dls)
    more.fit(steps=12, valid_every=4, resume=str(tmp_path / "after.pt"))
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(),
                                                 more.model.state_dict().values()))
