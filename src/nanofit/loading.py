"""Putting a checkpoint into a learner, all or nothing: the weights' keys, shapes and dtypes,
the optimizer's class, param groups and state, and the callbacks' states are checked before
anything changes (see checkpoint.py for the files themselves)."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from .distributed import unwrap_model
from .optim import make_optimizer
from .sharded import distribute_full, is_sharded, load_shards

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["check_weights", "check_loadable", "load_checkpoint", "load_cb_states", "cb_keys",
           "opt_class", "damaged"]

HYPER_KEYS = ("lr", "momentum", "betas", "weight_decay", "alpha")  # what nanofit reads by name


def damaged(path: str, problem: str) -> ValueError:
    return ValueError(f"checkpoint {path!r} is damaged or was not written by nanofit: "
                      f"{problem}; use an earlier checkpoint")


def cb_keys(cbs: list[Any]) -> list[tuple[str, Any]]:
    """Stable names for the callbacks that have state: class name, '#2' for a second one."""
    seen: dict[str, int] = {}
    out = []
    for cb in cbs:
        if not callable(getattr(cb, "state_dict", None)):
            continue
        name = type(cb).__name__
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", cb))
    return out


def check_weights(model: torch.nn.Module, weights: dict[str, Any], source: str,
                  dtypes: bool = True) -> None:
    """Refuse `weights` (from `source`, e.g. "checkpoint 'x.pt'") unless they have exactly
    `model`'s state-dict keys and shapes (and, with `dtypes`, dtypes). torch's
    load_state_dict would copy the matching tensors before raising about the others."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in weights]
    unexpected = [k for k in weights if k not in mine]
    differ = [f"{k} {_describe(weights[k])} vs {_describe(v)}" for k, v in mine.items()
              if isinstance(v, torch.Tensor) and k in weights
              and not _same_kind(weights[k], v, dtypes)]
    problems = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("differing (file vs model)", differ)) if keys]
    if problems:
        raise ValueError(f"{source} does not fit this model ({type(model).__name__}): "
                         f"{'; '.join(problems)}. Build the model as in the run that saved it")


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
    return type(t).__name__


def _same_kind(saved: Any, mine: torch.Tensor, dtypes: bool) -> bool:
    return (isinstance(saved, torch.Tensor) and saved.shape == mine.shape
            and (not dtypes or saved.dtype == mine.dtype))


def check_loadable(learn: Learner, ckpt: dict[str, Any], with_opt: bool = True) -> None:
    """Refuse, before anything changes, a checkpoint that `load_checkpoint` would refuse."""
    _checked_opt(learn, ckpt, with_opt)


def load_checkpoint(learn: Learner, ckpt: dict[str, Any], with_opt: bool = True) -> None:
    """Put the checkpoint's model weights (and optimizer) into the learner, all or nothing:
    the weights' keys, shapes and dtypes, the optimizer's class and param groups, and its
    state (loaded into a new optimizer, or by torch after its own checks) are checked before
    the learner changes."""
    if ckpt.get("sharded"):  # a DCP folder: checked, then its tensors read in this layout
        _checked_opt(learn, ckpt, with_opt)
        ckpt = load_shards(learn.model, ckpt, with_opt)
    elif is_sharded(learn.model):  # a file into a sharded model: each rank takes its shards
        ckpt = distribute_full(learn.model, learn.opt, ckpt)
    opt = _checked_opt(learn, ckpt, with_opt)
    if opt is not None and opt is learn.opt:
        _load_opt_state(opt, ckpt)  # torch checks it all before it changes the optimizer
    unwrap_model(learn.model).load_state_dict(ckpt["model"])
    if opt is not None and opt is not learn.opt:  # made for the checkpoint: the learner's now
        learn.lr, learn.opt = _saved_lr(learn, ckpt), opt


def _checked_opt(learn: Learner, ckpt: dict[str, Any], with_opt: bool) -> Any:
    """Check the weights and the optimizer against the learner; return the optimizer the
    checkpoint's state goes into: learn.opt, or a new one that holds it already."""
    # With the optimizer (a resume) the dtypes must match too: the run continues exactly.
    # Weights alone are cast, as torch does (an fp32 checkpoint into a bf16 model).
    check_weights(unwrap_model(learn.model), ckpt["model"], f"checkpoint {ckpt['path']!r}",
                  dtypes=with_opt)
    opt = _target_opt(learn, ckpt) if with_opt else None
    if opt is not None:
        _check_opt_fits(opt, ckpt)
        if opt is not learn.opt:
            _load_opt_state(opt, ckpt)  # not the learner's yet: a failure changes nothing
    return opt


def opt_class(opt: Any) -> str:
    """The optimizer's class name (`opt.opt`: the torch optimizer, where it is wrapped)."""
    return type(getattr(opt, "opt", opt)).__name__


def _saved_lr(learn: Learner, ckpt: dict[str, Any]) -> Any:
    return learn.lr if ckpt.get("lr") is None else ckpt["lr"]


def _target_opt(learn: Learner, ckpt: dict[str, Any]) -> Any:
    """learn.opt, or a new optimizer made as `learn.create_opt` would (at the checkpoint's lr);
    None when there is no optimizer state to load or nothing to load it into."""
    if ckpt.get("opt") is None:
        return None
    if learn.opt is not None:
        return learn.opt
    if learn.opt_func is None:
        return None
    return make_optimizer(learn.opt_func, learn.model, learn.splitter, _saved_lr(learn, ckpt))


def _check_opt_fits(opt: Any, ckpt: dict[str, Any]) -> None:
    path, saved, mine = ckpt["path"], ckpt.get("opt_type"), opt_class(opt)
    torch_like = hasattr(opt, "param_groups") and callable(getattr(opt, "load_state_dict", None))
    if (saved is not None and saved != mine) or not torch_like:
        raise ValueError(f"checkpoint {path!r} holds a {saved} optimizer, the learner "
                         f"has {mine}{'' if torch_like else ' (not a torch optimizer)'}: use "
                         "the same opt_func, or load(path, with_opt=False)")
    theirs = [len(g["params"]) for g in ckpt["opt"]["param_groups"]]
    ours = [len(g["params"]) for g in opt.param_groups]
    if theirs != ours:
        raise ValueError(f"checkpoint {path!r}: its optimizer has {len(theirs)} param groups "
                         f"of {theirs} parameters, this learner's has {len(ours)} of {ours}; "
                         "the param groups come from Learner(splitter=...), which must match "
                         "the run that saved it (or load(path, with_opt=False))")
    for group in ckpt["opt"]["param_groups"]:
        absent = [k for k in HYPER_KEYS if k in opt.param_groups[0] and k not in group]
        if absent:
            raise damaged(path, f"its optimizer's param groups lack {absent}")


def _load_opt_state(opt: Any, ckpt: dict[str, Any]) -> None:
    try:
        opt.load_state_dict(ckpt["opt"])
    except Exception as e:
        raise ValueError(f"checkpoint {ckpt['path']!r}: its optimizer state does not load into "
                         f"this learner's {opt_class(opt)} ({type(e).__name__}: {e}); "
                         "use the same opt_func and splitter as the run that saved it, or "
                         "load(path, with_opt=False)") from e


def load_cb_states(learn: Learner, states: dict[str, Any]) -> None:
    mine = dict(cb_keys(learn.cbs))
    missing = sorted(set(states) - set(mine))
    if missing:
        warnings.warn(f"the checkpoint has state for callbacks {missing} that this fit does not "
                      "have; their state is ignored")
    path = getattr(states, "path", "?")
    for key, cb in mine.items():
        if key in states:
            try:
                cb.load_state_dict(states[key])
            except Exception as e:
                raise ValueError(f"checkpoint {path!r}: the state saved for callback {key} does "
                                 f"not load into it ({type(e).__name__}: {e}); resume with the "
                                 "callbacks of the run that saved it, or use an earlier "
                                 "checkpoint") from e
