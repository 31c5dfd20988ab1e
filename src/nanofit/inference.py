"""Inference: predictions for a whole loader, for one item or batch, with test-time
augmentation, and shown as images. (Export for `load_learner`: export.py.)"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset, RandomSampler, default_collate

from .augment import random_flip
from .callback import Callback, Order, runs_in
from .callbacks.transforms import BatchTransformCB
from .data import DataLoaders, TensorLoader
from .images import show_images
from .plots import save_figure
from .registry import (
    exportable,
)
from .state import preserved_loop
from .torch_utils import eval_mode, logits_of, preserved_rng, to_device

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .learner import Learner

__all__ = ["get_preds", "capture_preds", "predict", "tta", "show_results", "item_ndim",
           "exportable"]  # exportable: at home in registry.py, importable here as before


class _Capture(Callback):
    """Collects inputs, predictions, targets (and per-item losses) of a validation pass."""

    order = Order.LAST

    def __init__(self, with_input: bool, with_loss: bool) -> None:
        self.with_input, self.with_loss = with_input, with_loss
        self.inputs: list = []
        self.preds: list = []
        self.targs: list = []
        self.losses: list = []

    def get_loss(self, learn: Learner) -> None:
        targets = _targets(learn)
        learn.loss = torch.zeros(())
        if self.with_loss and targets:
            if learn.loss_func is None:
                raise ValueError("get_preds(with_loss=True) needs a loss_func that takes "
                                 "reduction='none'; this learner's model computes its loss")
            try:
                losses = learn.loss_func(learn.preds, *targets, reduction="none")
                self.losses.append(losses.detach().cpu())
            except TypeError:
                raise TypeError("get_preds(with_loss=True) needs a loss_func that takes "
                                "reduction='none' (like torch's losses)") from None

    def after_batch(self, learn: Learner) -> None:
        self.preds.append(logits_of(learn.preds).detach().cpu())
        targets = _targets(learn)
        if targets:
            self.targs.append(targets[0].detach().cpu())
        if self.with_input:
            batch = learn.batch
            x = batch.get("input_ids") if isinstance(batch, dict) else batch[0]
            if isinstance(x, torch.Tensor):
                self.inputs.append(x.detach().cpu())


def _targets(learn: Learner) -> Any:
    """The batch's targets: the items after the inputs, or a dict batch's labels."""
    batch = learn.batch
    if isinstance(batch, dict):
        return (batch["labels"],) if "labels" in batch else ()
    return batch[learn.n_inp:]


def get_preds(learn: Learner, dl: Any = None, with_input: bool = False, with_loss: bool = False,
              act: Callable | None = None, extra_cbs: tuple = ()) -> tuple:
    """`learn.get_preds()`: (preds, targets) for every batch of `dl` (default `dls.valid`), in
    order, on the CPU, from a validation pass (eval mode, no gradients, the validation
    transforms). `with_input` prepends the inputs as the model saw them, `with_loss` appends
    per-item losses, `act` (e.g. softmax) is applied to the predictions. Callbacks with
    `main_fit_only` (metrics, progress, loggers, checkpoints...) sit it out."""
    dl = dl if dl is not None else learn.dls.valid
    cap = _Capture(with_input, with_loss)
    saved_dls = learn.dls
    learn.dls = DataLoaders(getattr(saved_dls, "train", None), dl)
    try:
        sitting_out = [cb for cb in learn.cbs if not runs_in(cb, "inference")]
        with preserved_loop(learn), learn.removed_cbs(sitting_out):
            learn.fit(1, train=False, cbs=[cap, *extra_cbs])
    finally:
        learn.dls = saved_dls
    preds = torch.cat(cap.preds)
    if act is not None:
        preds = act(preds)
    out: list[Any] = [preds, torch.cat(cap.targs) if cap.targs else None]
    if with_input:
        out.insert(0, torch.cat(cap.inputs))
    if with_loss:
        out.append(torch.cat(cap.losses) if cap.losses else None)
    return tuple(out)


def capture_preds(learn: Learner, cbs: Any = (), inps: bool = False) -> tuple:
    """`learn.capture_preds()`: the course's name for `get_preds` over `dls.valid`, in the
    course's order: (preds, targets), or (preds, targets, inputs) with `inps`; `cbs` join
    the pass. (`get_preds(with_input=True)` puts the inputs first, as fastai does.)"""
    out = get_preds(learn, with_input=inps, extra_cbs=tuple(cbs))
    return (*out[1:], out[0]) if inps else out


def item_ndim(learn: Learner) -> int | None:
    """How many dimensions one input item has (the data's, or the model's first layer's)."""
    train = getattr(learn.dls, "train", None) if learn.dls is not None else None
    if isinstance(train, TensorLoader):
        return train.tensors[0].ndim - 1
    dataset = getattr(train, "dataset", None)
    if dataset is not None and len(dataset):
        first = dataset[0]
        x = first[0] if isinstance(first, (tuple, list)) else first
        return x.ndim if isinstance(x, torch.Tensor) else None
    if learn.item_ndim is not None:
        return learn.item_ndim
    for m in learn.model.modules():  # no data: the first layer tells what one item looks like
        for kind, ndim in ((torch.nn.Linear, 1), (torch.nn.Conv1d, 2), (torch.nn.Conv2d, 3),
                           (torch.nn.Conv3d, 4)):
            if isinstance(m, kind):
                return ndim
    return None


def predict(learn: Learner, x: Any, act: Callable | None = None) -> torch.Tensor:
    """`learn.predict(x)`: the prediction for one item (no batch dimension: told from the
    data's or the model's item shape) or for a batch, through `get_preds`; `act` (e.g.
    softmax) is applied to it."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float32)
    ndim = item_ndim(learn)
    single = ndim is not None and x.ndim == ndim
    xb = x.unsqueeze(0) if single else x
    preds, _ = get_preds(learn, TensorLoader((xb,), batch_size=max(len(xb), 1)), act=act)
    return preds[0] if single else preds


def tta(learn: Learner, n: int = 4, tfm: Callable | None = None, dl: Any = None,
        act: Callable | None = None) -> tuple:
    """`learn.tta()`: (preds, targets) averaged over the plain data and `n` copies augmented
    by `tfm` (default: random left-right flips); `dl` must keep its order."""
    loader = dl if dl is not None else learn.dls.valid
    shuffled = isinstance(getattr(loader, "sampler", None), RandomSampler)
    if getattr(loader, "shuffle", False) or shuffled:
        raise ValueError("tta averages several passes item by item: give it a loader that keeps "
                         "its order (shuffle=False)")
    tfm = tfm if tfm is not None else random_flip()
    preds, targs = get_preds(learn, dl, act=act)
    runs = [preds]
    augment = BatchTransformCB(tfm, on_val=True, whole_batch=False)  # tfm takes the inputs
    for _ in range(n):
        aug, _ = get_preds(learn, dl, act=act, extra_cbs=(augment,))
        runs.append(aug)
    return torch.stack(runs).mean(0), targs


def show_results(learn: Learner, n: int = 9, ncols: int | None = None,
                 path: str | Path | None = None) -> Figure:
    """`learn.show_results()`: `n` validation images spread evenly over the validation set
    (so a folder sorted by class shows every class), titled 'prediction / target' (class
    names when the data has a vocab), wrong predictions in red. They are predicted in eval
    mode with the learner's validation batch transforms, and no RNG moves (training goes on
    as if this never ran). Returns the Figure and saves it to `path` if given."""
    with preserved_rng(learn.dls):  # items or transforms that draw random numbers
        xb, yb = _spread_sample(learn.dls.valid, n)
        param = next(learn.model.parameters(), None)
        batch = to_device((xb, yb), param.device) if param is not None else (xb, yb)
        for cb in sorted(learn.cbs, key=lambda c: c.order):
            if isinstance(cb, BatchTransformCB) and cb.on_val:
                batch = cb.transform(batch)
        with eval_mode(learn.model), torch.no_grad():
            preds = learn.model(batch[0]).argmax(1).cpu()
    vocab = getattr(learn.dls, "vocab", None)
    name = (lambda i: vocab[int(i)]) if vocab else (lambda i: str(int(i)))
    titles = [f"{name(p)} / {name(t)}" for p, t in zip(preds, yb)]
    fig = show_images(xb, titles, ncols)
    if isinstance(yb, torch.Tensor) and yb.shape == preds.shape:  # class indices: mark misses
        axes = [ax for ax in fig.axes if ax.images]
        for ax, wrong in zip(axes, (preds != yb.cpu()).tolist()):
            if wrong:
                ax.title.set_color("red")
    return save_figure(fig, path)


def _spread_sample(dl: Any, n: int) -> tuple[Any, Any]:
    """Inputs and targets of `n` items at evenly spaced positions of `dl`'s data (all of it
    when it holds fewer), collated as `dl` would; a loader with no indexable data gives the
    first `n` of its first batch."""
    dataset = getattr(dl, "dataset", None)
    if isinstance(dl, TensorLoader):
        idx = _spread(dl.n, n)
        return dl.tensors[0][idx], dl.tensors[1][idx]
    if (dataset is not None and not isinstance(dataset, IterableDataset)
            and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        collate = getattr(dl, "collate_fn", None) or default_collate
        batch = collate([dataset[i] for i in _spread(len(dataset), n).tolist()])
        return batch[0], batch[1]
    xb, yb = next(iter(dl))[:2]
    return xb[:n], yb[:n]


def _spread(total: int, n: int) -> torch.Tensor:
    """`n` distinct positions out of `total`, evenly spaced and centred (all when n >= total)."""
    if n >= total:
        return torch.arange(total)
    return (torch.arange(n) * 2 + 1) * total // (2 * n)
