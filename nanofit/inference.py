"""Inference: predictions for a whole loader, for one item or batch, with test-time
augmentation; export and load_learner (no pickles: a constructor reference and weights)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch

from .data import DataLoaders, TensorLoader
from .learner import Callback

__all__ = ["get_preds", "predict", "tta", "export", "load_learner", "exportable"]


class _Capture(Callback):
    """Collects inputs, predictions, targets (and per-item losses) of a validation pass."""

    order = 10_000  # last: sees the predictions after every other callback

    def __init__(self, with_input: bool, with_loss: bool) -> None:
        self.with_input, self.with_loss = with_input, with_loss
        self.inputs: list = []
        self.preds: list = []
        self.targs: list = []
        self.losses: list = []

    def get_loss(self, learn: Any) -> None:
        targets = learn.batch[learn.n_inp:]
        learn.loss = torch.zeros(())
        if self.with_loss and targets:
            try:
                self.losses.append(learn.loss_func(learn.preds, *targets, reduction="none").detach().cpu())
            except TypeError:
                raise TypeError("get_preds(with_loss=True) needs a loss_func that takes "
                                "reduction='none' (like torch's losses)") from None

    def after_batch(self, learn: Any) -> None:
        self.preds.append(learn.preds.detach().cpu())
        targets = learn.batch[learn.n_inp:]
        if targets:
            self.targs.append(targets[0].detach().cpu())
        if self.with_input:
            self.inputs.append(learn.batch[0].detach().cpu())


def get_preds(learn: Any, dl: Any = None, with_input: bool = False, with_loss: bool = False,
              act: Callable | None = None, extra_cbs: tuple = ()) -> tuple:
    """`learn.get_preds`: see there."""
    dl = dl if dl is not None else learn.dls.valid
    cap = _Capture(with_input, with_loss)
    saved_dls, saved_cbs = learn.dls, list(learn.cbs)
    learn.dls = DataLoaders(getattr(saved_dls, "train", None), dl)
    learn.cbs[:] = [cb for cb in saved_cbs if getattr(cb, "run_in_inference", True)]
    try:
        learn.fit(1, train=False, cbs=[cap, *extra_cbs])
    finally:
        learn.dls = saved_dls
        learn.cbs[:] = saved_cbs
        learn._build_handlers()
    preds = torch.cat(cap.preds)
    if act is not None:
        preds = act(preds)
    out: list[Any] = [preds, torch.cat(cap.targs) if cap.targs else None]
    if with_input:
        out.insert(0, torch.cat(cap.inputs))
    if with_loss:
        out.append(torch.cat(cap.losses) if cap.losses else None)
    return tuple(out)


def _item_ndim(learn: Any) -> int | None:
    train = getattr(learn.dls, "train", None) if learn.dls is not None else None
    if isinstance(train, TensorLoader):
        return train.tensors[0].ndim - 1
    dataset = getattr(train, "dataset", None)
    if dataset is not None and len(dataset):
        first = dataset[0]
        x = first[0] if isinstance(first, (tuple, list)) else first
        return x.ndim if isinstance(x, torch.Tensor) else None
    if getattr(learn, "item_ndim", None) is not None:
        return learn.item_ndim
    for m in learn.model.modules():  # no data: the first layer tells what one item looks like
        for kind, ndim in ((torch.nn.Linear, 1), (torch.nn.Conv1d, 2), (torch.nn.Conv2d, 3),
                           (torch.nn.Conv3d, 4)):
            if isinstance(m, kind):
                return ndim
    return None


def predict(learn: Any, x: Any, act: Callable | None = None) -> torch.Tensor:
    """`learn.predict`: see there."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float32)
    item_ndim = _item_ndim(learn)
    single = item_ndim is not None and x.ndim == item_ndim
    xb = x.unsqueeze(0) if single else x
    preds, _ = get_preds(learn, TensorLoader((xb,), batch_size=max(len(xb), 1)), act=act)
    return preds[0] if single else preds


def tta(learn: Any, n: int = 4, tfm: Callable | None = None, dl: Any = None,
        act: Callable | None = None) -> tuple:
    """`learn.tta`: see there."""
    from torch.utils.data import RandomSampler

    from .augment import random_flip
    from .callbacks.transforms import BatchTransformCB

    loader = dl if dl is not None else learn.dls.valid
    if getattr(loader, "shuffle", False) or isinstance(getattr(loader, "sampler", None), RandomSampler):
        raise ValueError("tta averages several passes item by item: give it a loader that keeps "
                         "its order (shuffle=False)")
    tfm = tfm if tfm is not None else random_flip()
    preds, targs = get_preds(learn, dl, act=act)
    runs = [preds]
    for _ in range(n):
        aug, _ = get_preds(learn, dl, act=act, extra_cbs=(BatchTransformCB(tfm, on_val=True),))
        runs.append(aug)
    return torch.stack(runs).mean(0), targs


# ---- export -----------------------------------------------------------------------------------
def exportable(fn: Callable) -> Callable:
    """Mark a model class or builder as one load_learner may call; a builder also records
    each model's arguments, so `learn.export(path)` needs no model_fn."""
    if isinstance(fn, type):
        fn.nanofit_exportable = True
        return fn

    def build(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = fn(*args, **kwargs)
        model.nanofit_constructor = (f"{fn.__module__}:{fn.__qualname__}", list(args), dict(kwargs))
        return model
    build.__wrapped__ = fn
    build.__name__, build.__qualname__, build.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    build.__module__ = fn.__module__
    build.nanofit_exportable = True
    return build


def _reference(obj: Callable) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _resolve(ref: str, allowed: tuple = ()) -> Callable:
    """The class or builder named `ref`, from a module that is already imported, and marked
    @exportable or passed in `allowed`: a file cannot make load_learner import anything, nor
    call anything else."""
    module_name, _, qualname = ref.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        raise ValueError(f"load_learner: the model constructor {ref!r} lives in module "
                         f"{module_name!r}, which is not imported; import it first (loading "
                         "never imports modules named by the file)")
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    ok = getattr(obj, "nanofit_exportable", False) or any(obj is a for a in allowed)
    if not ok:
        raise ValueError(f"load_learner: {ref!r} is not marked @nanofit.exportable nor passed in "
                         "allowed=(...); refusing to call it")
    return obj


def _plain(value: Any) -> bool:
    if isinstance(value, (int, float, str, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def export(learn: Any, path: str | Path, model_fn: Callable | None = None,
           args: tuple = (), kwargs: dict | None = None) -> Path:
    """`learn.export`: see there."""
    from .callbacks.transforms import BatchTransformCB, Normalize
    from .checkpoint import atomic_save
    from .distributed import unwrap_model

    model = unwrap_model(learn.model)
    if model_fn is not None:
        ref, args, kwargs = _reference(model_fn), list(args), dict(kwargs or {})
    elif hasattr(model, "nanofit_constructor"):
        ref, args, kwargs = model.nanofit_constructor
    else:
        raise ValueError(f"export needs to know how to rebuild the {type(model).__name__}: pass "
                         "model_fn= (its class or builder) with args=/kwargs=, or build it with "
                         "a builder marked @nanofit.exportable (simple_cnn, resnet are)")
    if not _plain([args, kwargs]):
        raise ValueError("export: the model's arguments must be plain data (numbers, strings, "
                         f"lists, dicts), got args={args!r} kwargs={kwargs!r}")
    rebuilt = _resolve(ref, (model_fn,) if model_fn is not None else ())(*args, **kwargs)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    mine, theirs = shapes(model), shapes(rebuilt)
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"export: {ref}(*{args}, **{kwargs}) builds a model whose weights do not "
                         f"match this one (differing: {differ[:5]}); check the arguments")
    norm = next((cb.tfm for cb in learn.cbs if isinstance(cb, BatchTransformCB)
                 and isinstance(cb.tfm, Normalize) and cb.on_val), None)
    vocab = getattr(learn.dls, "vocab", None) if learn.dls is not None else None
    return atomic_save({"format": "nanofit.export", "version": 1, "constructor": ref,
                        "args": args, "kwargs": kwargs, "model": model.state_dict(),
                        "n_inp": learn.n_inp, "item_ndim": _item_ndim(learn),
                        "normalize": None if norm is None else {"mean": norm.mean, "std": norm.std},
                        "vocab": vocab}, path)


def load_learner(path: str | Path, cpu: bool = True, allowed: tuple = ()) -> Any:
    """A Learner for inference from `learn.export(path)`: the model rebuilt from its
    constructor and weights, normalisation and vocab restored. Runs no code from the file:
    the constructor must be marked @nanofit.exportable, or be one of `allowed`."""
    from .callbacks.transforms import BatchTransformCB, Normalize
    from .learner import Learner

    try:
        obj = torch.load(path, map_location="cpu" if cpu else None, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read exported learner {str(path)!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(obj, dict) or obj.get("format") != "nanofit.export":
        raise ValueError(f"{str(path)!r} is not a nanofit export (from learn.export); "
                         "checkpoints load with learn.load")
    model = _resolve(obj["constructor"], tuple(allowed))(*obj["args"], **obj["kwargs"])
    model.load_state_dict(obj["model"])
    model.eval()
    cbs = []
    if obj.get("normalize"):
        cbs.append(BatchTransformCB(Normalize(obj["normalize"]["mean"], obj["normalize"]["std"])))
    learn = Learner(model, None, cbs=cbs, n_inp=obj.get("n_inp", 1))
    learn.item_ndim = obj.get("item_ndim")
    learn.vocab = obj.get("vocab")
    return learn
