"""Tiny synthetic data and models for the tests."""
import torch
from torch import nn

from nanofit import Callback, DataLoaders, TensorLoader


def make_dls(n_train=40, n_valid=20, bs=8, n_in=4, n_out=3, seed=0, shuffle=False):
    """A small classification problem as TensorLoaders."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, n_in, generator=g)
    y = torch.randint(0, n_out, (n_train + n_valid,), generator=g)
    train = TensorLoader((x[:n_train], y[:n_train]), bs, shuffle=shuffle, generator=g)
    valid = TensorLoader((x[n_train:], y[n_train:]), bs)
    return DataLoaders(train, valid)


def make_model(n_in=4, n_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 8), nn.ReLU(), nn.Linear(8, n_out))


class BatchCounter(Callback):
    """A user's callback with state (batches seen), saved and restored via state_dict."""

    def __init__(self, order=0):
        self.order, self.n = order, 0

    def after_batch(self, learn):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


class CourseBatchSchedCB(Callback):
    """miniai's BaseSchedCB/BatchSchedCB, unchanged: builds its scheduler on learn.opt at
    before_fit and steps it after every training batch."""

    def __init__(self, sched):
        self.sched = sched

    def before_fit(self, learn):
        self.schedo = self.sched(learn.opt)

    def after_batch(self, learn):
        if learn.training:
            self.schedo.step()
