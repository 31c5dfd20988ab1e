"""Every callback's cleanup runs, every time; Ctrl-C handlers come back in the right order."""
import os
import signal

import pytest
import torch.nn.functional as F
from torch import nn

from nanofit import Callback, CheckpointCB, HooksCallback, Learner
from tests.helpers import make_dls, make_model


class FailsInCleanup(Callback):
    def __init__(self, order, message):
        self.order, self.message = order, message

    def cleanup_fit(self, learn):
        raise RuntimeError(self.message)


def n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture
def own_sigint():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, mine)
    yield mine
    signal.signal(signal.SIGINT, previous)


def test_a_failing_cleanup_does_not_skip_the_others(tmp_path, own_sigint):
    model = make_model()
    hooks = HooksCallback(lambda *a: None, nn.Linear)
    learn = Learner(model, make_dls(), F.cross_entropy,
                    cbs=[FailsInCleanup(-50, "first"), hooks, CheckpointCB(tmp_path),
                         FailsInCleanup(50, "second")])
    with pytest.raises(RuntimeError, match="first") as info:
        learn.fit(1)
    notes = info.value.__notes__
    assert "raised in FailsInCleanup.cleanup_fit (event 'cleanup_fit')" in notes
    assert any("then FailsInCleanup.cleanup_fit" in n and "second" in n for n in notes), notes
    assert n_hooks(model) == 0  # HooksCallback removed its hooks after the first failure
    assert signal.getsignal(signal.SIGINT) is own_sigint  # CheckpointCB put Ctrl-C back


def test_a_failing_cleanup_during_an_error_keeps_the_error_and_runs_the_rest(own_sigint):
    model = make_model()

    class Boom(Callback):
        def after_batch(self, learn):
            raise ValueError("boom")

    learn = Learner(model, make_dls(), F.cross_entropy,
                    cbs=[Boom(), FailsInCleanup(-50, "cleanup"),
                         HooksCallback(lambda *a: None, nn.Linear)])
    with pytest.raises(ValueError, match="boom") as info:
        learn.fit(1)
    assert any("while cleaning up (cleanup_fit)" in n for n in info.value.__notes__)
    assert n_hooks(model) == 0


def test_several_checkpoint_callbacks_give_ctrl_c_back(tmp_path, own_sigint):
    learn = Learner(make_model(), make_dls(), F.cross_entropy,
                    cbs=[CheckpointCB(tmp_path / "a"), CheckpointCB(tmp_path / "b")])
    learn.fit(1, cbs=[CheckpointCB(tmp_path / "c")])
    assert signal.getsignal(signal.SIGINT) is own_sigint
    learn.fit(1)
    assert signal.getsignal(signal.SIGINT) is own_sigint


def test_ctrl_c_with_two_checkpoint_callbacks_saves_both_and_stops(tmp_path, own_sigint):
    class PressCtrlC(Callback):
        def after_batch(self, learn):
            if learn.training and learn.iter == 1:
                os.kill(os.getpid(), signal.SIGINT)

    a, b = CheckpointCB(tmp_path / "a"), CheckpointCB(tmp_path / "b")
    learn = Learner(make_model(), make_dls(), F.cross_entropy, cbs=[a, b, PressCtrlC()])
    with pytest.raises(KeyboardInterrupt, match="checkpoint saved"):
        learn.fit(2)
    assert a.saved and b.saved  # each saved the batch that was running
    assert signal.getsignal(signal.SIGINT) is own_sigint
