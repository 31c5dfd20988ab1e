"""Checks that turn bad input into errors that say what was wrong and how to fix it."""
from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .callback import check_callback
from .optim import check_lr
from .torch_utils import length, loss_of

if TYPE_CHECKING:
    from .learner import Learner

ESCAPED_CANCEL = ("{} escaped fit: it was raised outside its stage (e.g. CancelBatchException "
                  "in before_epoch); raise the exception of the stage you are in, or "
                  "CancelFitException")

__all__ = ["ESCAPED_CANCEL", "check_fit_args", "check_first_batch", "loss_hint", "describe",
           "note_loss_error", "note_predict_error",
           "say_once", "hint_silent_fit"]


def check_fit_args(learn: Learner, n_epochs: int, train: bool, valid: bool, lr: Any,
                   extra_cbs: Sequence[Any] = ()) -> None:
    """Refuse, before any training work, a fit that cannot work, saying why and what to do."""
    for cb in extra_cbs:
        check_callback(cb)
        if any(cb is c for c in learn.cbs):
            raise ValueError(f"fit(cbs=...): {type(cb).__name__} is already among the "
                             "learner's callbacks; pass it only once")
    if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or n_epochs < 1:
        raise ValueError(f"fit: n_epochs must be an int >= 1, got {n_epochs!r}")
    if train:  # a fit with no training phase makes and needs no optimizer
        check_lr(learn.lr if lr is None else lr, "fit")
    if learn.dls is None:
        raise ValueError("fit: the learner has no data; pass dls=DataLoaders(train_dl, valid_dl)")
    for phase, wanted in (("train", train), ("valid", valid)):
        if not wanted:
            continue
        dl = getattr(learn.dls, phase, None)
        if dl is None:
            raise ValueError(f"fit: dls has no `{phase}` loader ({type(learn.dls).__name__}); "
                             f"pass nanofit.DataLoaders(train_dl, valid_dl) or fit({phase}=False)")
        if length(dl) == 0:
            raise ValueError(f"fit: dls.{phase} yields no batches (len 0); check the dataset "
                             "size and batch_size/drop_last")
    if train and not any(p.requires_grad for p in learn.model.parameters()):
        raise ValueError("fit: the model has no trainable parameters (none requires grad); "
                         "unfreeze some or call fit(train=False)")


_END = object()


def check_first_batch(batches: Iterator[Any], phase: str) -> Iterator[Any]:
    """Fail early and clearly on an empty loader or a batch of the wrong kind; the batches
    pass on unchanged (the first one is put back in front)."""
    first = next(batches, _END)
    if first is _END:
        raise ValueError(f"dls.{phase} yielded no batches; check the dataset size and "
                         "batch_size/drop_last")
    if not isinstance(first, (tuple, list, dict, torch.Tensor)):
        raise TypeError(f"dls.{phase} yielded a {type(first).__name__}; a batch must be a tensor "
                        "or a tuple/list/dict of them (e.g. (inputs, targets))")
    return itertools.chain((first,), batches)


_ELEMENTWISE = {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
                "binary_cross_entropy_with_logits", "MSELoss", "L1Loss", "SmoothL1Loss",
                "HuberLoss", "BCELoss", "BCEWithLogitsLoss"}


def _loss_name(loss_func: Any) -> str:
    return getattr(loss_func, "__name__", type(loss_func).__name__)


def _elementwise(loss_func: Any) -> bool:
    """An element-wise loss (MSE, L1, BCE...): preds and targets must have one shape."""
    return _loss_name(loss_func) in _ELEMENTWISE


def loss_hint(preds: Any, targets: Sequence[Any], loss_func: Any = None) -> str:
    """The usual fix for a loss function that failed on these shapes and dtypes, if we know it."""
    if not (targets and isinstance(preds, torch.Tensor) and isinstance(targets[0], torch.Tensor)):
        return ""
    targ = targets[0]
    is_mse = _loss_name(loss_func) in ("mse_loss", "MSELoss")
    if is_mse and preds.ndim == targ.ndim + 1 and not targ.is_floating_point():
        return ("; the loss is MSE (the Learner's default) and the targets look like class "
                "indices: for classification pass loss_func=F.cross_entropy")
    if preds.shape[:1] != targ.shape[:1]:
        n_preds, n_targ = preds.shape[0] if preds.ndim else 0, targ.shape[0] if targ.ndim else 0
        return (f"; preds and targets hold different numbers of items ({n_preds} vs {n_targ}): "
                "check that the model keeps the batch dimension")
    if preds.ndim == 2 and targ.ndim == 2 and targ.shape[1] == 1 and not targ.is_floating_point():
        return ("; class-index targets must have shape (N,): squeeze them (y.squeeze(1)) or use "
                "y.view(-1) in the dataset")
    if preds.ndim == 2 and targ.ndim == 1 and targ.dtype != torch.int64 \
            and not _elementwise(loss_func):
        return "; cross-entropy wants class indices as int64 targets: use y.long()"
    if preds.ndim != targ.ndim:
        return (f"; preds have shape {tuple(preds.shape)} and targets {tuple(targ.shape)}: for an "
                "element-wise loss (MSE, BCE) make them the same shape, e.g. y.view_as(preds)")
    if preds.is_floating_point() and not targ.is_floating_point():
        return "; an element-wise loss (MSE, BCE) wants float targets: use y.float()"
    return ""


def describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def model_loss(preds: Any) -> Any:
    """The loss the model computed (`loss_func=None`): `preds.loss`, or a clear error."""
    loss = loss_of(preds)
    if loss is None:
        raise ValueError(f"loss_func is None, so the loss must come from the model's output "
                         f"(`.loss`, as a Hugging Face model returns when the batch has "
                         f"'labels'), but the model returned {describe(preds)}; pass a "
                         "loss_func, or give the batch labels")
    return loss


def note_loss_error(e: BaseException, learn: Learner) -> None:
    """Add to an error raised by `loss_func` what it got and the usual fix."""
    if learn.loss_func is None:
        return  # model_loss says it all
    if isinstance(learn.batch, dict):
        hint = ""
        if loss_of(learn.preds) is not None:
            hint = ("; the model computed its own loss (preds.loss): pass Learner(..., "
                    "loss_func=None) to train on it")
        elif "labels" not in learn.batch:
            hint = f"; a dict batch's targets are batch['labels'], and it has {list(learn.batch)}"
        else:
            labels = learn.batch["labels"]
            hint = f" and batch['labels'], {describe(labels)}" + \
                loss_hint(learn.preds, (labels,), learn.loss_func)
        e.add_note(f"loss_func got {describe(learn.preds)} for a dict batch (epoch "
                   f"{learn.epoch}, batch {learn.iter}){hint}")
        return
    targets = learn.batch[learn.n_inp:]
    got = ", ".join(describe(t) for t in (learn.preds, *targets))
    e.add_note(f"loss_func got {got} (epoch {learn.epoch}, batch {learn.iter})"
               + loss_hint(learn.preds, targets, learn.loss_func))


def note_predict_error(e: BaseException, learn: Learner) -> None:
    """Add the usual fix to an error raised by the model: data on another device, or of
    another dtype, than the model's parameters."""
    param = next(learn.model.parameters(), None)
    inputs = [x for x in learn.batch[:learn.n_inp] if isinstance(x, torch.Tensor)] \
        if isinstance(learn.batch, (tuple, list)) else []
    if param is None or not inputs:
        return
    x, text = inputs[0], str(e)
    if x.device != param.device and "device" in text:
        e.add_note(f"the model is on {param.device} and the batch on {x.device}: add DeviceCB() "
                   "to cbs (it moves the model and every batch), or move the data yourself")
    elif x.dtype != param.dtype and ("dtype" in text or "scalar type" in text):
        e.add_note(f"the model's weights are {param.dtype} and the inputs {x.dtype}: cast the "
                   f"inputs (x.to({param.dtype}) in the dataset, or a BatchTransformCB)")


_SAID: set[str] = set()


def say_once(key: str, message: str) -> None:
    """Print a hint on stderr, once per process."""
    if key not in _SAID:
        _SAID.add(key)
        print(f"nanofit: {message}", file=sys.stderr, flush=True)


def hint_silent_fit(learn: Learner) -> None:
    """A bare learner's fit shows nothing: say once how to see progress."""
    if not learn.cbs:
        say_once("silent fit", "this fit has no callbacks, so it shows nothing; add "
                 "cbs=[ProgressCB()] to see the losses per epoch (and MetricsCB(...) for "
                 "metrics)")
