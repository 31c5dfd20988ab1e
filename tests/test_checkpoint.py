"""Checkpoints: bit-exact resume from any batch, atomic and safe files, Ctrl-C, SIGKILL."""
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from enum import IntEnum
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
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
    from nanofit import checkpoint, resume

    for module in (checkpoint, resume):  # a resume that forgets the RNG
        monkeypatch.setattr(module, "restore_rng", lambda state, dls: None)
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


# ---- a refused load changes nothing ----------------------------------------------------------
def _snapshot(learn):
    """Everything a load could change: weights and buffers, lr, the optimizer (which object,
    and its state) and the callbacks' states."""
    import copy

    return {"state": copy.deepcopy(learner_state(learn)), "lr": copy.deepcopy(learn.lr),
            "opt": learn.opt, "metrics": learn.metrics, "recorder": learn.recorder}


def _assert_unchanged(learn, before):
    after = _snapshot(learn)
    assert same_state(after["state"], before["state"])
    assert after["lr"] == before["lr"] and after["opt"] is before["opt"]
    assert after["metrics"] is before["metrics"] and after["recorder"] is before["recorder"]


def _wider_head():  # the first layer matches make_learner's model, the last does not
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5))


def _extra_layer():  # every layer of make_learner's model, and one more
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3),
                         nn.Linear(3, 3))


def _two_groups(model):
    return [list(model[0].parameters()), list(model[3].parameters())]


def _other_two_groups(model):  # 2 groups again, of 1 and 3 parameters
    return [[model[0].weight], [model[0].bias, *model[3].parameters()]]


SAVED_BY = {  # how the learner that saved the checkpoint differs from make_learner's
    "layers partly match": {"model": _wider_head},
    "extra layer": {"model": _extra_layer},
    "dtype": {"model": lambda: make_learner().model.double()},
    "Adam into SGD": {"opt_func": torch.optim.Adam},
    "param group count": {"splitter": _two_groups},
    "param group sizes": {"splitter": _two_groups, "target_splitter": _other_two_groups},
}


def _saved_checkpoint(tmp_path, kind):
    """A mid-epoch checkpoint of a 2-epoch fit by a learner changed as SAVED_BY[kind] says."""
    change, dls = SAVED_BY[kind], make_learner().dls
    model = change.get("model", lambda: make_learner().model)()
    if kind == "dtype":
        dls = DataLoaders(*(TensorLoader((dl.tensors[0].double(), dl.tensors[1]), 8)
                            for dl in (dls.train, dls.valid)))
    learn = Learner(model, dls, F.cross_entropy, splitter=change.get("splitter"),
                    opt_func=change.get("opt_func", partial(torch.optim.SGD, momentum=0.9)))
    learn.fit(2, cbs=[StopAt(epoch=0, iter=2)])
    return learn.save(str(tmp_path / f"{kind}.pt"))


@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
@pytest.mark.parametrize("kind", list(SAVED_BY))
def test_a_refused_load_or_resume_leaves_the_learner_as_it_was(tmp_path, kind, trained):
    path = _saved_checkpoint(tmp_path, kind)
    learn = make_learner()
    learn.splitter = SAVED_BY[kind].get("target_splitter")
    if trained:  # an optimizer with state, history in the callbacks
        learn.fit(1, lr=0.05)
    before = _snapshot(learn)
    with pytest.raises(ValueError, match=f"checkpoint '{path}'"):
        learn.load(path)
    _assert_unchanged(learn, before)
    with pytest.raises(ValueError, match=f"checkpoint '{path}'"):
        learn.fit(2, resume=path)
    _assert_unchanged(learn, before)


def test_refusals_say_what_does_not_fit(tmp_path):
    learn = make_learner()
    with pytest.raises(ValueError, match=r"differing \(file vs model\): 3.weight \(5, 16\) "
                                         r"float32 vs \(3, 16\) float32"):
        learn.load(_saved_checkpoint(tmp_path, "layers partly match"))
    with pytest.raises(ValueError, match=r"unexpected: 4.weight, 4.bias"):
        learn.load(_saved_checkpoint(tmp_path, "extra layer"))
    with pytest.raises(ValueError, match=r"0.weight \(16, 4\) float64 vs \(16, 4\) float32"):
        learn.load(_saved_checkpoint(tmp_path, "dtype"))
    with pytest.raises(ValueError, match="holds a Adam optimizer, the learner has SGD"):
        learn.load(_saved_checkpoint(tmp_path, "Adam into SGD"))
    with pytest.raises(ValueError, match=r"2 param groups of \[2, 2\] parameters, this "
                                         r"learner's has 1 of \[4\]"):
        learn.load(_saved_checkpoint(tmp_path, "param group count"))
    learn.splitter = _other_two_groups
    with pytest.raises(ValueError, match=r"\[2, 2\] parameters, this learner's has 2 of \[1, 3\]"):
        learn.load(_saved_checkpoint(tmp_path, "param group sizes"))
    learn.load(_saved_checkpoint(tmp_path, "Adam into SGD"), with_opt=False)  # weights only
    assert learn.opt is None


# ---- damaged files: one clear error naming the file, whatever the damage ----------------------
def damaged_variants(good, structure, seed, n_flips, n_cuts=0, anywhere=True):
    """Byte strings made from the valid file `good`: the classic bad files and truncations at
    `n_cuts` offsets (when n_cuts), and `n_flips` single bytes changed in `structure` (the
    pickle: keys, types, numbers) or, every other one with `anywhere`, in the whole file."""
    import random

    rng = random.Random(seed)
    if n_cuts:
        yield "one byte", b"\x80"
        yield "empty", b""
        yield "text", b"these are not the weights you are looking for\n" * 3
        yield "protocol-2 pickle start", b"\x80\x02}q\x00(X"
        yield "random bytes", bytes(rng.randrange(256) for _ in range(512))
    for cut in range(1, len(good), len(good) // n_cuts + 1) if n_cuts else ():
        yield f"truncated at {cut}", good[:cut]
    for i in range(n_flips):
        data = bytearray(good)
        at = rng.choice(range(len(good)) if anywhere and i % 2 else structure)
        data[at] ^= rng.randrange(1, 256)
        yield f"byte {at} changed", bytes(data)


def pickle_span(data):
    """Where data.pkl (the structure, not the tensor bytes) lies inside a torch.save zip."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    at = info.header_offset
    start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") \
        + int.from_bytes(data[at + 28:at + 30], "little")
    return range(start, start + info.compress_size)


def assert_only_clear_errors(variants, folder, load, name="bad.pt"):
    """`load(path)` on each variant either works or raises a ValueError naming the file."""
    path = folder / name
    for what, data in variants:
        path.write_bytes(data)
        try:
            load(str(path))
        except ValueError as e:
            assert str(path) in str(e), f"{what}: the error does not name the file: {e}"
        except Exception as e:
            raise AssertionError(f"{what}: {type(e).__name__} escaped: {e}") from e


def test_every_damaged_checkpoint_gives_a_clear_error_naming_the_file(tmp_path):
    import warnings

    saver = make_learner(extra=[CheckpointCB(tmp_path / "ckpts", every_n_batches=1)])
    saver.fit(2, cbs=[StopAt(epoch=1, iter=2)])  # mid-epoch: epoch RNG, metric states...
    good = saver.cbs[-1].saved[-1].read_bytes()
    structure = pickle_span(good)
    learn = make_learner()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about odd pickle protocols, nanofit about
        # changed epoch counts: what the damage turned into is not the point here
        assert_only_clear_errors(damaged_variants(good, structure, 0, 160, n_cuts=50), tmp_path,
                                 learn.load)
        assert_only_clear_errors(damaged_variants(good, structure, 1, 30, anywhere=False),
                                 tmp_path, lambda p: make_learner().fit(2, resume=p))
    assert time.perf_counter() - start < 10  # about 3 s
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        learn.load(str(tmp_path / "missing.pt"))


def _plain_checkpoint(**entries):
    learn = make_learner()
    learn.fit(1)
    base = {"format": "nanofit.checkpoint", "version": 1, "model": learn.model.state_dict(),
            "opt": learn.opt.state_dict(), "lr": 0.1, "n_epochs": 1, "n_batches": 4,
            "position": {"epoch": 1, "batches_done": 0, "train_done": False},
            "callbacks": {}}
    return {**base, **entries}


@pytest.mark.parametrize("entries, problem", [
    ({"version": "1"}, "format version is '1'"),
    ({"model": None}, "'model' is not a dict of tensors"),
    ({"model": {"0.weight": [[1.0] * 4] * 16}}, "'model' is not a dict of tensors"),
    ({"opt": {"state": {}, "param_groups": 3}}, "'opt' is not an optimizer state dict"),
    ({"position": 5}, "'position' is not"),
    ({"position": {"epoch": "1"}}, "'position' is not"),
    ({"lr": "fast"}, "'lr' is not a number"),
    ({"callbacks": ["MetricsCB"]}, "'callbacks' is not a dict"),
])
def test_a_checkpoint_with_the_wrong_structure_is_refused_naming_the_file(tmp_path, entries,
                                                                         problem):
    path = tmp_path / "odd.pt"
    torch.save(_plain_checkpoint(**entries), path)
    pattern = f"checkpoint '{path}' is damaged or was not written by nanofit: .*{problem}"
    with pytest.raises(ValueError, match=pattern):
        make_learner().load(str(path))
    with pytest.raises(ValueError, match=pattern):
        make_learner().fit(3, resume=str(path))


def test_a_checkpoint_whose_parts_do_not_restore_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "odd.pt"
    rng = {"torch": torch.zeros(3, dtype=torch.uint8)}  # not an RNG state
    torch.save(_plain_checkpoint(rng=rng), path)
    with pytest.raises(ValueError, match=f"'{path}' is damaged .* RNG state 'rng'"):
        make_learner().fit(3, resume=str(path))
    good = make_learner()
    good.fit(1)
    state = _plain_checkpoint(callbacks={"MetricsCB": {"hist": []}})
    state["rng"] = torch.load(good.save(str(tmp_path / "good.pt")), weights_only=True)["rng"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"checkpoint '{path}': the state saved for callback "
                                         "MetricsCB does not load into it"):
        make_learner().fit(3, resume=str(path))


# ---- what a checkpoint holds: plain values, always loadable ------------------------------------
class NumpyAccuracy:
    """A hand-written metric that computes with NumPy: compute() gives a NumPy scalar (or a
    0-d array), its state holds NumPy integers."""

    def __init__(self, zero_d=False):
        self.zero_d = zero_d
        self.reset()

    def reset(self):
        self.correct, self.n = np.int64(0), np.int64(0)

    def update(self, preds, targ):
        self.correct += np.int64((preds.argmax(1) == targ).sum().item())
        self.n += np.int64(len(targ))

    def compute(self):
        value = np.float32(self.correct / max(self.n, 1))
        return np.array(value) if self.zero_d else value

    def state_dict(self):
        return {"correct": self.correct, "n": self.n}

    def load_state_dict(self, state):
        self.correct, self.n = np.int64(state["correct"]), np.int64(state["n"])


def numpy_learner():
    """NumPy learning rates (one per param group), NumPy metrics, a torch scheduler with a
    NumPy factor, a recorder and a tracker: every kind of value a checkpoint holds."""
    from nanofit import BatchSchedCB, EarlyStoppingCB

    lrs = np.logspace(-3, -1, 3)
    learn = make_learner(extra=[
        MetricsCB(acc=NumpyAccuracy(), acc0d=NumpyAccuracy(zero_d=True)),
        BatchSchedCB(partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=np.float64(0.5))),
        EarlyStoppingCB("acc", patience=5)])
    learn.cbs[:] = [cb for cb in learn.cbs if not isinstance(cb, ProgressCB)]
    learn.lr, learn.splitter = [lrs[1], lrs[2]], _two_groups
    return learn


def test_numpy_values_in_the_state_are_saved_as_plain_values_and_resume_bit_exact():
    assert_resumable(numpy_learner, 2, stop_at=[0, 5])
    learn = numpy_learner()
    learn.lr, learn.splitter = np.logspace(-3, -1, 3)[1], None  # one NumPy float
    learn.fit(1)
    record = learn.metrics.history[-1]
    assert type(record["acc"]) is float and type(record["acc0d"]) is float


class Pair(NamedTuple):
    n: int
    where: Path


class Kind(IntEnum):
    BIG = 2


class OddValues(Callback):
    """A user's callback whose state holds NumPy values, paths, tuples, sets, enums."""

    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"int": np.int64(3), "float": np.float32(0.5), "0d": np.array(2.5),
                "array": np.arange(3), "tuple": (np.int8(1), "a"), "pair": Pair(1, Path("r/1")),
                "path": Path("runs") / "a", "set": {np.int16(4)}, "kind": Kind.BIG,
                "str": np.str_("b"), "counts": defaultdict(int, a=1), np.str_("key"): 1,
                "tensor": torch.ones(2), "nested": [{"x": np.float64(1.5)}]}

    def load_state_dict(self, state):
        self.loaded = state


def test_saved_state_comes_back_as_plain_python(tmp_path):
    learn = make_learner(extra=[OddValues(), CheckpointCB(tmp_path, every_n_batches=1)])
    learn.fit(1, cbs=[StopAt(epoch=0, iter=2)])
    resumed = make_learner(extra=[OddValues()])
    resumed.fit(1, resume=str(tmp_path))
    got = resumed.cbs[-1].loaded
    expected = {"int": 3, "float": 0.5, "0d": 2.5, "array": [0, 1, 2], "tuple": (1, "a"),
                "pair": (1, str(Path("r/1"))), "path": str(Path("runs/a")), "set": {4},
                "kind": 2, "str": "b", "counts": {"a": 1}, "key": 1, "nested": [{"x": 1.5}]}
    assert torch.equal(got.pop("tensor"), torch.ones(2)) and got == expected

    def types(x):
        if isinstance(x, dict):
            return {type(k): None for k in x} | {t: None for v in x.values() for t in types(v)}
        if isinstance(x, (list, tuple, set)):
            return {type(x): None} | {t: None for v in x for t in types(v)}
        return {type(x): None}

    assert set(types(got)) <= {dict, list, tuple, set, int, float, str}


def test_state_that_no_checkpoint_can_hold_is_refused_when_saving(tmp_path):
    class Holder(Callback):
        def state_dict(self):
            return {"fn": lambda: 1}

        def load_state_dict(self, state):
            pass

    learn = make_learner(extra=[Holder()])
    learn.fit(1)
    with pytest.raises(TypeError, match=r"cannot save checkpoint\['callbacks'\]\['Holder'\]"
                                        r"\['fn'\]: it is a builtins.function"):
        learn.save(str(tmp_path / "x.pt"))
    assert list(tmp_path.iterdir()) == []


# ---- how files are written: umask, failures ----------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["022", "077", "002"])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    from nanofit import SaveBestCB

    old = os.umask(umask)
    try:
        learn = make_learner(extra=[SaveBestCB("loss", tmp_path / "best.pt")])
        learn.fit(1, cbs=[CheckpointCB(tmp_path / "ckpts")])
        files = [Path(learn.save(str(tmp_path / "ckpt.pt"))), tmp_path / "best.pt",
                 *(tmp_path / "ckpts").glob("*.pt")]
    finally:
        os.umask(old)
    assert len(files) == 3 and all(f.stat().st_mode & 0o777 == mode for f in files)


def _no_temp_files(folder):
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")] == []


def test_write_failures_name_the_file_and_leave_no_temporary_file(tmp_path, monkeypatch):
    learn = make_learner()
    learn.fit(1)
    (tmp_path / "afile").write_text("a file, not a folder")
    path = tmp_path / "afile" / "ckpt.pt"
    with pytest.raises(OSError, match=f"cannot write '{path}'") as info:
        learn.save(str(path))
    assert isinstance(info.value.__cause__, OSError)
    good = Path(learn.save(str(tmp_path / "ckpt.pt")))
    before = good.read_bytes()

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=f"cannot write '{good}' \\(No space left on device\\)") \
            as info:
        learn.save(str(good))
    assert info.value.errno == 28 and info.value.__cause__.strerror == "No space left on device"
    assert good.read_bytes() == before and _no_temp_files(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_a_read_only_folder_gives_a_permission_error_naming_the_file(tmp_path):
    learn = make_learner()
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=f"cannot write '{folder / 'c.pt'}'"):
            learn.save(str(folder / "c.pt"))
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_weights_alone_load_into_a_model_of_another_dtype(tmp_path):
    learn = make_learner()
    learn.fit(1)
    path = learn.save(str(tmp_path / "fp32.pt"))
    half = make_learner()
    half.model.to(torch.bfloat16)
    half.load(path, with_opt=False)  # cast, as torch's load_state_dict does
    for a, b in zip(half.model.parameters(), learn.model.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16))
    with pytest.raises(ValueError, match="float32"):
        half.load(path)  # with the optimizer (a resume) the dtypes must match


def test_a_file_naming_a_blocked_module_is_refused_as_unsafe_not_as_corrupt(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "nanofit.checkpoint", "model": Evil()}, path)
    with pytest.raises(ValueError, match="refusing to load .* names posix.system|names nt.system"):
        make_learner().load(str(path))


def test_resume_from_a_folder_with_no_checkpoint_yet_starts_from_scratch(tmp_path, capsys):
    # one command for the first start and every restart (torchrun --max-restarts)
    for folder in (tmp_path / "empty", tmp_path / "not_made_yet"):
        if folder.name == "empty":
            folder.mkdir()
        learn = make_learner()
        learn.fit(1, cbs=[CheckpointCB(folder)], resume=str(folder))
        assert "starting from scratch" in capsys.readouterr().err
        assert list(folder.glob("*.pt"))  # and the next start resumes from this run
        make_learner().fit(2, resume=str(folder))
        assert "starting from scratch" not in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="missing.pt"):  # a file is never optional
        make_learner().fit(1, resume=str(tmp_path / "missing.pt"))
