"""Hyper-parameters by name (lr, mom, wd, beta) over any torch optimizer.

The names map to each torch optimizer's own keys: `lr` -> 'lr'; `wd` -> 'weight_decay'; `mom` ->
'momentum' (SGD, RMSprop) or betas[0] (Adam family); `beta` -> betas[1] (Adam family) or 'alpha'
(RMSprop). Whether weight decay is true (decoupled) weight decay or an L2 penalty is the
optimizer class's choice: `torch.optim.AdamW` decouples it, `torch.optim.Adam` adds it to the
gradient (L2); SGD's `weight_decay` is L2, which for plain SGD is the same thing.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["ScalerSteps", "with_hypers", "groups", "lr_problem", "check_lr", "freeze_groups",
           "create_opt", "splits", "freeze", "unfreeze", "freeze_to", "param_groups",
           "make_optimizer", "HYPERS", "HPOptimizer", "get_hyper", "set_hyper", "supported_hypers",
           "hyper_access"]

HYPERS = ("lr", "mom", "wd", "beta")

Getter = Callable[[dict], Any]
Setter = Callable[[dict, float], None]


def _key(key: str) -> tuple[Getter, Setter]:
    def get(group: dict) -> Any:
        return group[key]

    def put(group: dict, value: float) -> None:
        if isinstance(group[key], torch.Tensor):  # tensor hyper-parameters (capturable, fused)
            group[key].fill_(value)
        else:
            group[key] = value
    return get, put


def _beta(i: int) -> tuple[Getter, Setter]:
    def get(group: dict) -> Any:
        return group["betas"][i]

    def put(group: dict, value: float) -> None:
        betas = list(group["betas"])
        betas[i] = value
        group["betas"] = tuple(betas)
    return get, put


def groups(opt: Any) -> list[dict]:
    """The dicts holding an optimizer's hyper-parameters: a torch optimizer's param groups, or
    the attributes of a hand-written one (the course's SGD keeps `self.lr`, `self.wd`)."""
    return opt.param_groups if hasattr(opt, "param_groups") else [vars(opt)]


def _accessor(opt: Any, name: str) -> tuple[Getter, Setter] | None:
    """How to read and write hyper-parameter `name` in this optimizer's param groups."""
    group = groups(opt)[0]
    if name == "lr":
        return _key("lr") if "lr" in group else None
    if name == "wd":
        key = next((k for k in ("weight_decay", "wd") if k in group), None)
        return _key(key) if key else None
    if name == "mom":
        if "momentum" in group or "mom" in group:
            return _key("momentum" if "momentum" in group else "mom")
        return _beta(0) if "betas" in group else None
    if name == "beta":
        if "betas" in group:
            return _beta(1)
        if "sqr_mom" in group:  # the course's RMSProp and Adam
            return _key("sqr_mom")
        # RMSprop's alpha is its squared-gradient average, as Adam's betas[1]; ASGD's alpha is not.
        return _key("alpha") if isinstance(opt, torch.optim.RMSprop) else None
    raise ValueError(f"unknown hyper-parameter {name!r}; nanofit names: {', '.join(HYPERS)}")


def supported_hypers(opt: Any) -> list[str]:
    """The hyper-parameter names (among lr, mom, wd, beta) that `opt` has."""
    return [name for name in HYPERS if _accessor(opt, name) is not None]


def hyper_access(opt: Any, name: str) -> tuple[Getter, Setter]:
    """(get, put) functions for `name` on one param group; raises if `opt` lacks it."""
    acc = _accessor(opt, name)
    if acc is None:
        raise AttributeError(f"{type(opt).__name__} has no hyper-parameter {name!r}; "
                             f"it supports: {', '.join(supported_hypers(opt))}")
    return acc


def get_hyper(opt: Any, name: str) -> float | list[float]:
    """Read `name` from every param group: one float if all agree, else a list per group."""
    get, _ = hyper_access(opt, name)
    values = [get(g) for g in groups(opt)]
    values = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
    return values[0] if all(v == values[0] for v in values) else values


def set_hyper(opt: Any, name: str, value: float | Sequence[float]) -> None:
    """Write `name` to every param group, or one value per group from a list/tuple."""
    _, put = hyper_access(opt, name)
    dicts = groups(opt)
    if isinstance(value, (list, tuple)):
        if len(value) != len(dicts):
            raise ValueError(f"{name}: got {len(value)} values {list(value)} for "
                             f"{len(dicts)} param groups; give one value per group, or one number")
        for group, v in zip(dicts, value):
            put(group, float(v))
    else:
        one = float(value)  # type: ignore[arg-type]  # a number: lists were handled above
        for group in dicts:
            put(group, one)


class HPOptimizer(torch.optim.Optimizer):
    """`lr`, `mom`, `wd` and `beta` by name on a torch optimizer that stays itself.

    `learn.opt` is the optimizer `opt_func` made, its class extended with these names (the
    class keeps its name, and `isinstance(learn.opt, torch.optim.SGD)` still holds), so torch's
    lr schedulers, GradScaler and accelerate take it as it is. `opt.lr = 1e-3` sets every param
    group; `opt.lr = [1e-5, 1e-3]` one per group. `HPOptimizer(opt)` extends an optimizer you
    made and returns it. An optimizer that is not a torch one (the course's hand-written SGD)
    is used as it is; `get_hyper`/`set_hyper` then read and write its attributes.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is HPOptimizer:  # HPOptimizer(opt): extend that optimizer and return it
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.optim.Optimizer):
                raise TypeError("HPOptimizer(opt) takes one torch optimizer to give "
                                "lr/mom/wd/beta by name")
            return with_hypers(args[0])
        return super().__new__(cls)  # an extended class built directly, copied or loaded

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args and args[0] is self:  # HPOptimizer(opt) gave back opt itself: nothing to do
            return
        super().__init__(*args, **kwargs)

    @property
    def opt(self) -> HPOptimizer:
        """The optimizer itself (`learn.opt.opt` used to name the wrapped one)."""
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickled as the optimizer class it extends (the extended class is made at run time).
        base = next(c for c in type(self).__mro__[1:] if c is not HPOptimizer)
        return _rebuild_optimizer, (base, self.__getstate__())

    @property
    def hypers(self) -> list[str]:
        """The hyper-parameter names this optimizer supports."""
        return supported_hypers(self)

    lr = property(lambda self: get_hyper(self, "lr"), lambda self, v: set_hyper(self, "lr", v),
                  doc="Learning rate ('lr').")
    mom = property(lambda self: get_hyper(self, "mom"), lambda self, v: set_hyper(self, "mom", v),
                   doc="Momentum ('momentum', or betas[0] for the Adam family).")
    wd = property(lambda self: get_hyper(self, "wd"), lambda self, v: set_hyper(self, "wd", v),
                  doc="Weight decay ('weight_decay'; decoupled or L2 as the optimizer does it).")
    beta = property(lambda self: get_hyper(self, "beta"),
                    lambda self, v: set_hyper(self, "beta", v),
                    doc="Second moment average (betas[1] for the Adam family, RMSprop's alpha).")


_EXTENDED: dict[type, type] = {}


def _rebuild_optimizer(cls: Any, state: dict[str, Any]) -> Any:
    """Unpickle an optimizer pickled by HPOptimizer.__reduce_ex__."""
    opt = cls.__new__(cls)
    opt.__setstate__(state)
    return with_hypers(opt)


def with_hypers(opt: Any) -> Any:
    """`opt`, with lr/mom/wd/beta by name when it is a torch optimizer (its class extended by
    HPOptimizer, once per optimizer class); any other optimizer object as it is."""
    if isinstance(opt, HPOptimizer) or not isinstance(opt, torch.optim.Optimizer):
        return opt
    cls = type(opt)
    if cls not in _EXTENDED:
        _EXTENDED[cls] = type(cls.__name__, (HPOptimizer, cls),
                              {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                               "__doc__": cls.__doc__})
    opt.__class__ = _EXTENDED[cls]
    return opt


class ScalerSteps:
    """Optimizer steps through a GradScaler (fp16) that tell whether the step was taken.

    A skipped step (inf/NaN gradients) is seen without a host sync beyond the scaler's own:
    a step post-hook counts the steps the optimizer really takes. Optimizers that apply the
    scaler themselves (`fused=True`) always run their step, so for them the scale is compared
    instead (one more sync per step). `unscale()` before clipping; `end()` closes a step that
    was unscaled and then abandoned (a cancelled batch), or the next unscale would fail.
    """

    def __init__(self, scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> None:
        self.scaler, self.opt = scaler, opt
        self.taken = 0
        self.unscaled = False
        self._fused = bool(getattr(opt, "_step_supports_amp_scaling", False))
        self._handle = opt.register_step_post_hook(self._count)

    def _count(self, opt: Any, args: Any, kwargs: Any) -> None:
        self.taken += 1

    def unscale(self) -> None:
        """True gradients (for clipping and inspection); once per step."""
        self.scaler.unscale_(self.opt)
        self.unscaled = True

    def step(self) -> bool:
        """Step and update the scale; False when the scaler skipped the step."""
        before = self.scaler.get_scale() if self._fused else self.taken
        self.scaler.step(self.opt)
        self.scaler.update()
        self.unscaled = False
        if self._fused:
            return self.scaler.get_scale() >= before  # a skipped step lowers the scale
        return self.taken > before

    def end(self) -> None:
        """Close a step that was unscaled but not taken."""
        if self.unscaled:
            self.scaler.update()
            self.unscaled = False

    def remove(self) -> None:
        """Stop counting (the end of the fit)."""
        self._handle.remove()


def lr_problem(lr: Any) -> str | None:
    """What is wrong with a learning rate, or None: it must be a finite number >= 0 (0 freezes
    training, as torch allows), or a list of them, one per param group."""
    values = list(lr) if isinstance(lr, (list, tuple)) else [lr]
    if not values or not all(not isinstance(v, bool) and isinstance(v, numbers.Real)
                             and math.isfinite(v) and float(v) >= 0 for v in values):
        return (f"lr must be a finite number >= 0 (or a list of them, one per param group), "
                f"got {lr!r}")
    return None


def check_lr(lr: Any, where_: str) -> None:
    """Raise a ValueError saying what is wrong with `lr` (see lr_problem)."""
    problem = lr_problem(lr)
    if problem is not None:
        raise ValueError(f"{where_}: {problem}")


def freeze_groups(model: nn.Module, groups: list[list[nn.Parameter]], n: int,
                  train_bn: bool = True) -> None:
    """Make the parameter groups before group `n` untrainable and the rest trainable;
    with `train_bn`, batchnorm layers stay trainable everywhere."""
    trainable = set(range(len(groups))[n:])
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i in trainable)
    if train_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.requires_grad_(True)


def param_groups(model: nn.Module, splitter: Callable | None) -> list[list[nn.Parameter]]:
    """`splitter(model)` as lists of parameters, or one list of all of them."""
    if splitter is None:
        return [list(model.parameters())]
    groups = [list(g) for g in splitter(model)]
    if not groups or not all(groups):
        raise ValueError(f"splitter returned {len(groups)} groups with sizes "
                         f"{[len(g) for g in groups]}; it must return non-empty lists of "
                         "parameters, e.g. [list(m.body.parameters()), list(m.head.parameters())]")
    return groups


def make_optimizer(opt_func: Callable, model: nn.Module, splitter: Callable | None,
                   lr: float | Sequence[float]) -> Any:
    """`opt_func(params, lr=...)` with lr/mom/wd/beta by name (`with_hypers`); with a
    splitter, one param group per split, and `lr` may be a list with one rate per group."""
    lrs = list(lr) if isinstance(lr, (list, tuple)) else None
    first = lrs[-1] if lrs else lr
    if splitter is None:
        opt = with_hypers(opt_func(model.parameters(), lr=first))
    else:
        split = [{"params": g} for g in param_groups(model, splitter)]
        opt = with_hypers(opt_func(split, lr=first))
    if lrs:
        set_hyper(opt, "lr", lrs)
    return opt


# ---- the learner's optimizer conveniences (Learner.create_opt, splits, freeze...) ----------------
def create_opt(learn: Learner) -> None:
    """`learn.create_opt()`: make `learn.opt` as `opt_func(params, lr=learn.lr)`, one param
    group per split of `learn.splitter`; nothing when `opt_func` is None. The first training
    fit calls it; `learn.opt = None` makes the next one build a new optimizer."""
    if learn.opt_func is not None:
        learn.opt = make_optimizer(learn.opt_func, learn.model, learn.splitter, learn.lr)


def splits(learn: Learner) -> list[list[nn.Parameter]]:
    """`learn.splits()`: the parameter groups, `splitter(model)` or one group of them all."""
    return param_groups(learn.model, learn.splitter)


def freeze_to(learn: Learner, n: int, train_bn: bool = True) -> None:
    """`learn.freeze_to(n)`: freeze the parameter groups before group `n` (negative counts
    from the end); with `train_bn` (fastai's default) batchnorm layers stay trainable."""
    freeze_groups(learn.model, learn.splits(), n, train_bn)


def freeze(learn: Learner, train_bn: bool = True) -> None:
    """`learn.freeze()`: freeze every parameter group but the last (the head), as fastai."""
    learn.freeze_to(-1, train_bn)


def unfreeze(learn: Learner) -> None:
    """`learn.unfreeze()`: make every parameter group trainable."""
    learn.freeze_to(0, train_bn=True)
