"""Checkpoints: bit-exact resume from any batch, atomic and safe files, Ctrl-C, SIGKILL."""
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from nanofit import (
    Callback,
    CancelFitException,
    CheckpointCB,
    DataLoaders,
    Learner,
    MetricsCB,
    ProgressCB,
    Recorder,
    TensorLoader,
)
from nanofit.testing import assert_resumable, learner_state
from tests.helpers import BatchCounter


def make_learner(loader="tensor", extra=()):
    """Shuffling, dropout, momentum, metrics and a recorder: everything resume must get right.
    4 training batches an epoch."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    if loader == "tensor":
        train = TensorLoader((x[:32], y[:32]), 8, shuffle=True,
                             generator=torch.Generator().manual_seed(2))
        valid = TensorLoader((x[32:], y[32:]), 4)
    else:
        ds = TensorDataset(x[:32], y[:32])
        train = DataLoader(ds, batch_size=8, sampler=RandomSampler(ds))
        valid = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=4)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    return Learner(model, DataLoaders(train, valid), F.cross_entropy,
                   opt_func=partial(torch.optim.SGD, momentum=0.9),
                   cbs=[MetricsCB(acc=MulticlassAccuracy(3, average="micro")), Recorder(),
                        ProgressCB(file=io.StringIO()), *extra])


@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_resume_from_any_batch_is_bit_exact(loader):
    # first batch, a middle one, last of epoch 0, first of epoch 1, the very last
    make = lambda: make_learner(loader, extra=[BatchCounter(order=100)])  # runs late in each batch  # noqa: E731
    assert_resumable(make, 3, stop_at=[0, 2, 3, 4, 11], fit="fit_one_cycle", lr_max=0.1)


def test_assert_resumable_catches_a_broken_resume(monkeypatch):
    from nanofit import checkpoint

    monkeypatch.setattr(checkpoint, "restore_rng", lambda state, dls: None)  # forgets the RNG
    with pytest.raises(AssertionError, match="differs from the uninterrupted run in: state.model"):
        assert_resumable(make_learner, 2, stop_at=[1])


def reference_state(n_epochs=3):
    learn = make_learner()
    learn.fit_one_cycle(n_epochs, 0.1)
    return learner_state(learn)


def same_state(a, b):
    from nanofit.testing import _compare

    return _compare(a, b, "state") == []


def test_checkpoint_cb_every_n_batches_keep_and_resume_from_folder(tmp_path):
    class Crash(Callback):
        order = 100

        def after_batch(self, learn):
            if learn.training and learn.epoch == 1 and learn.iter == 2:
                raise RuntimeError("simulated crash")

    cb = CheckpointCB(tmp_path, every_n_batches=1, keep=2)
    learn = make_learner(extra=[cb, Crash()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        learn.fit_one_cycle(3, 0.1)
    files = sorted(p.name for p in tmp_path.glob("*.pt"))
    # the crash came in batch 2 of epoch 1, before its checkpoint (CheckpointCB runs last)
    assert files == ["ckpt_00001_0000001.pt", "ckpt_00001_0000002.pt"]
    resumed = make_learner(extra=[CheckpointCB(tmp_path, every_n_batches=1, keep=2)])
    resumed.fit_one_cycle(3, 0.1, resume=str(tmp_path))  # a folder: its newest checkpoint
    assert same_state(learner_state(resumed), reference_state())
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt_00002_0000004.pt",
                                                             "ckpt_00003_0000000.pt"]  # keep=2
    assert not list(tmp_path.glob(".*tmp"))


def test_resume_from_end_of_epoch_and_after_the_training_phase(tmp_path):
    class StopAfterTrainingPhase(Callback):
        order = 100

        def after_epoch(self, learn):
            if learn.training and learn.epoch == 1:
                learn.save(str(tmp_path / "train_done.pt"))
                raise CancelFitException()

    learn = make_learner(extra=[StopAfterTrainingPhase()])
    learn.fit_one_cycle(3, 0.1)
    for path in (tmp_path / "train_done.pt",):
        resumed = make_learner()
        resumed.fit_one_cycle(3, 0.1, resume=str(path))
        assert same_state(learner_state(resumed), reference_state())
    epoch_end = make_learner(extra=[CheckpointCB(tmp_path / "e", keep=None)])
    epoch_end.fit_one_cycle(3, 0.1, cbs=[StopAt(epoch=2, iter=0)])
    assert (tmp_path / "e" / "ckpt_00002_0000000.pt").exists()
    resumed = make_learner()
    resumed.fit_one_cycle(3, 0.1, resume=str(tmp_path / "e" / "ckpt_00002_0000000.pt"))
    assert same_state(learner_state(resumed), reference_state())


class StopAt(Callback):
    """Cancels the fit before the given training batch runs."""

    def __init__(self, epoch, iter):
        self.epoch, self.iter = epoch, iter

    def before_batch(self, learn):
        if learn.training and (learn.epoch, learn.iter) == (self.epoch, self.iter):
            raise CancelFitException()


def test_ctrl_c_finishes_the_batch_saves_cleans_up_and_reraises(tmp_path):
    cleaned = []

    class SendCtrlC(Callback):
        def after_loss(self, learn):
            if not learn.training and learn.epoch == 1:  # during validation
                os.kill(os.getpid(), signal.SIGINT)

        def cleanup_fit(self, learn):
            cleaned.append(True)

    handler = signal.getsignal(signal.SIGINT)
    learn = make_learner(extra=[CheckpointCB(tmp_path), SendCtrlC()])
    with pytest.raises(KeyboardInterrupt, match="checkpoint saved"):
        learn.fit_one_cycle(3, 0.1)
    assert cleaned == [True] and signal.getsignal(signal.SIGINT) is handler
    newest = sorted(tmp_path.glob("*.pt"))[-1]
    assert newest.name == "ckpt_00001_0000004_t.pt"  # epoch 1: training done, validation not
    resumed = make_learner()
    resumed.fit_one_cycle(3, 0.1, resume=str(newest))
    assert same_state(learner_state(resumed), reference_state())


def test_save_is_atomic(tmp_path, monkeypatch):
    learn = make_learner()
    learn.fit(1)
    path = tmp_path / "ckpt.pt"
    learn.save(str(path))
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("power cut between write and rename")

    learn.fit(1)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        learn.save(str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left
    Learner(make_learner().model, make_learner().dls).load(str(path))  # still loads


def test_truncated_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    learn = make_learner()
    learn.fit(1)
    good = Path(learn.save(str(tmp_path / "good.pt")))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError,
                       match=r"cannot read checkpoint .*truncated.pt.*truncated or corrupt"):
        learn.load(str(truncated))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="garbage.pt"):
        learn.load(str(garbage))
    foreign = tmp_path / "state_dict.pt"
    torch.save(learn.model.state_dict(), foreign)
    with pytest.raises(ValueError, match="is not a nanofit checkpoint"):
        learn.load(str(foreign))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        learn.load(str(_empty(tmp_path)))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_malicious_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "nanofit.checkpoint", "version": 1, "model": _Evil(str(marker))}, evil)
    assert not marker.exists()
    learn = make_learner()
    with pytest.raises(ValueError, match=r"refusing to load .*evil.pt.*never runs code"):
        learn.load(str(evil))
    with pytest.raises(ValueError, match="refusing to load"):
        learn.fit(2, resume=str(evil))
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file really runs code when loaded unsafely
    assert marker.exists()


def test_load_restores_weights_and_resume_past_the_end_is_refused(tmp_path):
    learn = make_learner()
    learn.fit(2)
    path = learn.save(str(tmp_path / "done.pt"))
    fresh = make_learner()
    fresh.load(path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(),
                                                 learn.model.state_dict().values()))
    assert fresh.opt is not None and fresh.opt.mom == 0.9
    with pytest.raises(ValueError, match="nothing left to do"):
        make_learner().fit(2, resume=path)
    longer = make_learner()
    with pytest.warns(UserWarning, match="resuming a 2-epoch run as a 3-epoch fit"):
        longer.fit(3, resume=path)  # extends a finished run
    assert len(longer.metrics.history) == 6


CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from tests.test_checkpoint import make_learner
    from nanofit import Callback, CheckpointCB

    class Slow(Callback):
        order = 200
        def after_batch(self, learn):
            if learn.training:
                print("batch", learn.epoch, learn.iter, flush=True)
                time.sleep({sleep})

    mode, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
    learn = make_learner(extra=[CheckpointCB(folder, every_n_batches=1, keep=2), Slow()])
    learn.fit_one_cycle(3, 0.1, resume=folder if mode == "resume" else None)
    torch.save(learn.model.state_dict(), out)
""")


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_weights(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=root, sleep=0.2))
    folder, out = tmp_path / "ckpts", tmp_path / "final.pt"
    child = subprocess.Popen([sys.executable, str(script), "fresh", str(folder), str(out)],
                             stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        for line in child.stdout:
            if line.startswith("batch 1 1") or time.monotonic() > deadline:
                break
        child.send_signal(signal.SIGKILL)  # mid-epoch, no chance to clean up
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL and not out.exists()
    fast = CHILD.format(root=root, sleep=0.0)
    script.write_text(fast)
    subprocess.run([sys.executable, str(script), "resume", str(folder), str(out)], check=True,
                   timeout=120, capture_output=True)
    resumed = torch.load(out, weights_only=True)
    reference = make_learner()
    reference.fit_one_cycle(3, 0.1)
    assert all(torch.equal(resumed[k], v) for k, v in reference.model.state_dict().items())


def test_ctrl_c_in_training_then_resume(tmp_path):
    class SendCtrlC(Callback):
        def after_step(self, learn):
            if learn.training and (learn.epoch, learn.iter) == (1, 1):
                os.kill(os.getpid(), signal.SIGINT)

    learn = make_learner(extra=[CheckpointCB(tmp_path), SendCtrlC()])
    with pytest.raises(KeyboardInterrupt):
        learn.fit_one_cycle(3, 0.1)
    assert [p.name for p in tmp_path.glob("*.pt")] == ["ckpt_00001_0000002.pt"]  # batch 1 finished
    resumed = make_learner()
    resumed.fit_one_cycle(3, 0.1, resume=str(tmp_path))
    assert same_state(learner_state(resumed), reference_state())


def test_save_and_resume_misuse_gets_clear_errors(tmp_path):
    class SaveTooEarly(Callback):
        def before_fit(self, learn):
            learn.save(str(tmp_path / "early.pt"))

    with pytest.raises(ValueError, match="learn.save inside a fit works from after_batch"):
        make_learner(extra=[SaveTooEarly()]).fit(1)
    from nanofit import SaveBestCB

    learn = make_learner(extra=[SaveBestCB("loss", tmp_path / "best.pt")])
    learn.fit(1)
    with pytest.raises(ValueError, match="holds weights only"):
        make_learner().fit(2, resume=str(tmp_path / "best.pt"))
    make_learner().load(str(tmp_path / "best.pt"))  # but it loads as weights
    path = learn.save(str(tmp_path / "sgd.pt"))
    adam = make_learner()
    adam.opt_func = torch.optim.Adam
    with pytest.raises(ValueError, match="holds a SGD optimizer, the learner has Adam"):
        adam.load(path)
    with pytest.raises(TypeError, match="give callbacks to the learner in make_learner"):
        assert_resumable(make_learner, 1, stop_at=[0], cbs=[BatchCounter()])
    with pytest.raises(AssertionError, match="stop_at=99: the fit has only 4 training batches"):
        assert_resumable(make_learner, 1, stop_at=[99])
