"""Export for `load_learner`, with no pickles: the weights and either a constructor name
(an @exportable builder, or `model_fn=` with plain-data arguments) or, for an nn.Sequential
of torch.nn layers, the layers described as plain data (see registry.LAYERS).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .augment import Normalize
from .callbacks.transforms import BatchTransformCB
from .checkpoint import check_weights, is_weights
from .distributed import unwrap_model
from .files import atomic_save, load_file, plain_state
from .inference import item_ndim
from .registry import build_layers, describe_layers, reference, resolve, unsupported_layer

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ["export", "read_export", "EXPORT_FORMAT", "EXPORT_VERSION"]

EXPORT_FORMAT = "nanofit.export"
EXPORT_VERSION = 2  # 2: a model described as torch.nn layers; builder exports stay 1


def _plain(value: Any) -> bool:
    if isinstance(value, (int, float, str, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _plain_args(args: list, kwargs: dict) -> tuple[list, dict]:
    """The constructor's arguments as plain data (NumPy numbers become int/float), or refused."""
    try:
        args, kwargs = plain_state([list(args), dict(kwargs)], "export args")
    except TypeError:
        pass  # refused below, with the values
    if not _plain([args, kwargs]):
        raise ValueError("export: the model's arguments must be plain data (numbers, strings, "
                         f"lists, dicts), got args={args!r} kwargs={kwargs!r}")
    return args, kwargs


def export(learn: Learner, path: str | Path, model_fn: Callable | None = None,
           args: tuple = (), kwargs: dict | None = None) -> str:
    """`learn.export(path)`: save what `nanofit.load_learner` needs to rebuild the learner for
    inference: the weights, how to rebuild the model, the validation Normalize and the vocab.
    Nothing is pickled. The model is rebuilt by `model_fn` (a class or builder, with
    `args`/`kwargs`) or the @exportable builder that made it, called with plain-data
    arguments; without either, an nn.Sequential (nested ones too) of torch.nn layers (those
    of `nanofit.registry.LAYERS`: Linear, Conv2d, BatchNorm2d, ReLU, Flatten, ...) is saved
    as a description of its layers. Export checks that the model it will rebuild has the same
    weight names and shapes. Returns the path."""
    model = unwrap_model(learn.model)
    norm = next((cb.tfm for cb in learn.cbs if isinstance(cb, BatchTransformCB)
                 and isinstance(cb.tfm, Normalize) and cb.on_val), None)
    vocab = getattr(learn.dls, "vocab", None) if learn.dls is not None else None
    how = _how_to_rebuild(model, model_fn, args, kwargs)
    saved = {"format": EXPORT_FORMAT, "version": 1 if how["layers"] is None else 2, **how,
             "model": model.state_dict(), "n_inp": learn.n_inp, "item_ndim": item_ndim(learn),
             "vocab": vocab,
             "normalize": None if norm is None else {"mean": norm.mean, "std": norm.std}}
    return str(atomic_save(plain_state(saved, "export"), path))


def _how_to_rebuild(model: torch.nn.Module, model_fn: Callable | None, args: tuple,
                    kwargs: dict | None) -> dict[str, Any]:
    """The export's constructor, args, kwargs and layers entries for `model`."""
    recorded: Any = getattr(model, "nanofit_constructor", None)  # set by @exportable builders
    if model_fn is not None or recorded is not None:
        if model_fn is not None:
            ref, arg_list, kwargs = reference(model_fn), list(args), dict(kwargs or {})
        else:
            ref, arg_list, kwargs = recorded
        arg_list, kwargs = _plain_args(arg_list, kwargs)
        rebuilt = resolve(ref, (model_fn,) if model_fn is not None else ())(*arg_list, **kwargs)
        differ = _differ(model, rebuilt)
        if not differ:
            return {"constructor": ref, "args": arg_list, "kwargs": kwargs, "layers": None}
        if model_fn is not None or unsupported_layer(model) is not None:
            raise ValueError(f"export: {ref}(*{arg_list}, **{kwargs}) builds a model whose "
                             f"weights do not match this one (differing: {differ[:5]}); check "
                             "the arguments")
        # else: changed since its builder made it (a new head...), but plain layers still
    found = unsupported_layer(model)
    if found is not None:
        where, sub = found
        kind = f"{type(sub).__module__}.{type(sub).__qualname__}"
        what = (f"its submodule {where!r} (a {kind}) is not" if where else
                f"it is a {kind}, not")
        raise ValueError(
            f"export needs to know how to rebuild the {type(model).__name__}, and {what} an "
            "nn.Sequential or a torch.nn layer it can describe without code (those in "
            "nanofit.registry.LAYERS). Build the model with a builder marked "
            "@nanofit.exportable (simple_cnn, resnet are), or pass model_fn= (its class or "
            "builder) with args=/kwargs=; then load_learner(path, allowed=(...)) rebuilds it")
    layers = plain_state(describe_layers(model), "export layers")
    try:
        with torch.device("meta"):
            differ = _differ(model, build_layers(layers))
    except ValueError as e:  # an odd child name or argument: what load_learner would refuse
        raise ValueError(f"export: this {type(model).__name__} cannot be saved as a description "
                         f"of its layers ({e}); pass model_fn= or build it with an "
                         "@nanofit.exportable builder") from None
    if differ:
        raise ValueError(f"export: this {type(model).__name__}'s layers, rebuilt, hold other "
                         f"weights (differing: {differ[:5]}): parametrizations or extra "
                         "parameters/buffers are not part of a layer's description; pass "
                         "model_fn= or build it with an @nanofit.exportable builder")
    return {"constructor": None, "args": [], "kwargs": {}, "layers": layers}


def _differ(model: torch.nn.Module, rebuilt: torch.nn.Module) -> list[str]:
    """The state-dict keys whose shapes differ (or that only one of the models has)."""
    mine, theirs = _shapes(model), _shapes(rebuilt)
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_export(path: str | Path, cpu: bool = True,
                allowed: tuple = ()) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model rebuilt from an export file and the file's other entries (`load_learner`).
    Runs no code from the file: the constructor is looked up by name among the @exportable
    ones and `allowed`, a described layer's name among `registry.LAYERS` (see registry.py).
    Every problem with the file is a ValueError naming it (FileNotFoundError if missing)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"exported learner {str(path)!r} does not exist")
    obj = load_file(path, "exported learner", "export the learner again",
                    map_location="cpu" if cpu else None)
    if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a nanofit export (from learn.export); "
                         "checkpoints load with learn.load")
    problems = _export_problems(obj)
    if problems:
        raise ValueError(f"exported learner {str(path)!r} is damaged or was not written by "
                         f"nanofit: {'; '.join(problems)}; export the learner again")
    source = f"exported learner {str(path)!r}"
    if obj.get("layers") is not None:
        model = _rebuild_layers(obj["layers"], obj["model"], source)
    else:
        try:
            ctor = resolve(obj["constructor"], tuple(allowed))
        except ValueError as e:
            raise ValueError(f"{e} (in {str(path)!r})") from None
        model = _rebuild(ctor, obj, source)
    model.load_state_dict(obj["model"])
    model.eval()
    return model, obj


def _export_problems(obj: dict[str, Any]) -> list[str]:
    """What in an export's entries is not what `export` writes (load_learner reads them all)."""
    checks = [
        ("version", lambda v: isinstance(v, int) and 1 <= v <= EXPORT_VERSION,
         f"a format version this nanofit reads (1 to {EXPORT_VERSION})"),
        ("constructor", lambda v: isinstance(v, str) or (v is None and obj.get("layers")),
         "a constructor name"),
        ("layers", lambda v: v is None or (isinstance(v, dict) and obj.get("constructor") is None),
         "a layer description (in a file without a constructor)"),
        ("args", lambda v: isinstance(v, (list, tuple)), "a list of arguments"),
        ("kwargs", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
         "a dict of keyword arguments"),
        ("model", is_weights, "a dict of tensors"),
        ("n_inp", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
         "a number of inputs >= 1"),
        ("item_ndim", lambda v: v is None or (isinstance(v, int) and v >= 0),
         "a number of dimensions"),
        ("vocab", lambda v: v is None or isinstance(v, (list, tuple)), "a list"),
        ("normalize", _is_normalize, "{'mean': ..., 'std': ...} for Normalize"),
    ]
    values = {"n_inp": 1, **obj}  # load_learner's default for files without it
    return [f"{key!r} is not {kind} (got {values.get(key)!r:.80})"
            for key, ok, kind in checks if not ok(values.get(key))]


def _is_normalize(value: Any) -> bool:
    if value is None:
        return True
    try:
        Normalize(value["mean"], value["std"])  # what load_learner will do with it
    except Exception:
        return False
    return True


def _rebuild_layers(layers: Any, weights: dict[str, Any], source: str) -> torch.nn.Module:
    """The nn.Sequential a description stands for, checked against the saved weights' keys
    and shapes on the meta device first, so damaged sizes cannot allocate a huge model."""
    try:
        with torch.device("meta"):
            probe = build_layers(layers)
        check_weights(probe, weights, source, dtypes=False)
        return build_layers(layers)
    except ValueError as e:
        raise ValueError(e.args[0] if str(e).startswith(source) else f"{source}: {e}") from None


def _rebuild(ctor: Callable, obj: dict[str, Any], source: str) -> torch.nn.Module:
    """`ctor(*args, **kwargs)`, checked against the saved weights' keys and shapes: first on
    the meta device (no memory, so damaged arguments cannot allocate a huge model), then
    for real."""
    args, kwargs = obj["args"], obj["kwargs"]
    try:
        with torch.device("meta"):
            probe = ctor(*args, **kwargs)
    except Exception:
        probe = None  # a constructor that cannot run on the meta device: checked once built
    if isinstance(probe, torch.nn.Module):
        check_weights(probe, obj["model"], source, dtypes=False)
    try:
        model = ctor(*args, **kwargs)
    except Exception as e:
        raise ValueError(f"{source}: its constructor {obj['constructor']}(*{args!r:.80}, "
                         f"**{kwargs!r:.80}) failed ({type(e).__name__}: {e})") from e
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{source}: its constructor {obj['constructor']} returned a "
                         f"{type(model).__name__}, not a torch.nn.Module")
    check_weights(model, obj["model"], source, dtypes=False)
    return model
