"""What an exported learner may name to rebuild its model: the constructors `@exportable`
registers by name, or, for an nn.Sequential of torch.nn layers, the layers of `LAYERS`.

`load_learner` looks a file's constructor name up here, as a plain string, among the names
registered so far and the ones the caller passes in `allowed=`, and a described layer's name
in `LAYERS`. It never imports a module, reads an attribute or calls anything else that the
file names.
"""
from __future__ import annotations

import inspect
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["exportable", "reference", "resolve", "registered", "LAYERS", "describe_layers",
           "build_layers", "unsupported_layer"]

_REGISTRY: dict[str, Callable[..., Any]] = {}


def reference(obj: Callable[..., Any]) -> str:
    """The name an export file stores for a constructor: 'module:qualified.name'."""
    return f"{obj.__module__}:{obj.__qualname__}"


def exportable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a model class or builder as one `load_learner` may call, by registering its name.

    A builder also records each model's arguments, so `learn.export(path)` needs no model_fn.
    Example: `@nanofit.exportable def my_cnn(n_out=10): return nn.Sequential(...)`
    """
    if isinstance(fn, type):
        _REGISTRY[reference(fn)] = fn
        return fn
    ref = reference(fn)

    def build(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = fn(*args, **kwargs)
        model.nanofit_constructor = (ref, list(args), dict(kwargs))
        return model
    build.__wrapped__ = fn  # type: ignore[attr-defined]
    build.__name__, build.__qualname__, build.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    build.__module__ = fn.__module__
    _REGISTRY[ref] = build
    return build


def registered() -> list[str]:
    """The names registered with `@exportable` so far."""
    return sorted(_REGISTRY)


def resolve(ref: Any, allowed: Sequence[Callable[..., Any]] = ()) -> Callable[..., Any]:
    """The constructor registered as `ref`, or the one of `allowed` with that exact name.

    `ref` is compared as a string with names made from registered or allowed objects: a
    file cannot make this import a module, walk attributes or reach anything else.
    """
    if not isinstance(ref, str):
        raise ValueError(f"load_learner: the file's model constructor must be a name, got a "
                         f"{type(ref).__name__}")
    for obj in allowed:
        if reference(obj) == ref:
            return obj
    if ref in _REGISTRY:
        return _REGISTRY[ref]
    raise ValueError(f"load_learner: {ref!r} is not marked @nanofit.exportable nor passed in "
                     "allowed=(...); refusing to call it. Loading never imports a module or "
                     "looks up a name that the file chooses: if it is your model, import the "
                     "module that defines it first (@exportable registers it) or pass it in "
                     "allowed=")


# ---- models without code: an nn.Sequential of torch.nn layers, described as plain data --------
# A description is {"layer": "Linear", "args": {"in_features": 4, ...}} or {"layer":
# "Sequential", "children": [["0", description], ...]}. Loading looks the layer's name up, as a
# plain string, in this table, built here in code; the arguments are checked against the names
# and kinds listed for the class, so a file can neither name anything else nor pass a device,
# dtype or object.
_Check = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_num(v: Any) -> bool:
    return type(v) in (int, float)


def _is_bool(v: Any) -> bool:
    return type(v) is bool


def _optional(check: _Check) -> _Check:
    return lambda v: v is None or check(v)


def _ints_of(check: _Check) -> _Check:
    """One value or a short tuple/list of them (kernel sizes, strides, output sizes)."""
    return lambda v: check(v) or (type(v) in (tuple, list) and 1 <= len(v) <= 8
                                  and all(check(x) for x in v))


def _one_of(*choices: str) -> _Check:
    return lambda v: type(v) is str and v in choices


def _either(*checks: _Check) -> _Check:
    return lambda v: any(check(v) for check in checks)


_ints = _ints_of(_is_int)
_PADDING_MODES = _one_of("zeros", "reflect", "replicate", "circular")
_CONV: dict[str, _Check] = {
    "in_channels": _is_int, "out_channels": _is_int, "kernel_size": _ints, "stride": _ints,
    "padding": _either(_ints, _one_of("same", "valid")), "dilation": _ints, "groups": _is_int,
    "bias": _is_bool, "padding_mode": _PADDING_MODES}
_CONV_T: dict[str, _Check] = {**_CONV, "padding": _ints, "output_padding": _ints}
_NORM: dict[str, _Check] = {
    "num_features": _is_int, "eps": _is_num, "momentum": _optional(_is_num), "affine": _is_bool,
    "track_running_stats": _is_bool, "bias": _is_bool}
_MAX_POOL: dict[str, _Check] = {
    "kernel_size": _ints, "stride": _optional(_ints), "padding": _ints, "dilation": _ints,
    "return_indices": _is_bool, "ceil_mode": _is_bool}
_AVG_POOL: dict[str, _Check] = {
    "kernel_size": _ints, "stride": _optional(_ints), "padding": _ints, "ceil_mode": _is_bool,
    "count_include_pad": _is_bool}
_OUT_SIZE: dict[str, _Check] = {"output_size": _ints_of(_optional(_is_int))}
_DROPOUT: dict[str, _Check] = {"p": _is_num, "inplace": _is_bool}
_INPLACE: dict[str, _Check] = {"inplace": _is_bool}
_DIM: dict[str, _Check] = {"dim": _optional(_is_int)}
nn = torch.nn


def _accepted(cls: type, spec: dict[str, _Check]) -> dict[str, tuple[_Check, Any]]:
    """The arguments of `spec` that this torch's `cls` takes, with their defaults (`_REQUIRED`
    for none): a norm layer's `bias` flag, for one, is newer than torch 2.2."""
    params = inspect.signature(cls).parameters
    return {arg: (check, params[arg].default) for arg, check in spec.items() if arg in params}


_REQUIRED = inspect.Parameter.empty
_SPECS: list[tuple[type, dict[str, _Check]]] = [
    (nn.Linear, {"in_features": _is_int, "out_features": _is_int, "bias": _is_bool}),
    (nn.Conv1d, _CONV), (nn.Conv2d, _CONV), (nn.Conv3d, _CONV),
    (nn.ConvTranspose1d, _CONV_T), (nn.ConvTranspose2d, _CONV_T),
    (nn.ConvTranspose3d, _CONV_T),
    (nn.BatchNorm1d, _NORM), (nn.BatchNorm2d, _NORM), (nn.BatchNorm3d, _NORM),
    (nn.InstanceNorm1d, _NORM), (nn.InstanceNorm2d, _NORM), (nn.InstanceNorm3d, _NORM),
    (nn.LayerNorm, {"normalized_shape": _ints, "eps": _is_num,
                    "elementwise_affine": _is_bool, "bias": _is_bool}),
    (nn.GroupNorm, {"num_groups": _is_int, "num_channels": _is_int, "eps": _is_num,
                    "affine": _is_bool, "bias": _is_bool}),
    (nn.Embedding, {"num_embeddings": _is_int, "embedding_dim": _is_int,
                    "padding_idx": _optional(_is_int), "max_norm": _optional(_is_num),
                    "norm_type": _is_num, "scale_grad_by_freq": _is_bool,
                    "sparse": _is_bool}),
    (nn.Dropout, _DROPOUT), (nn.Dropout1d, _DROPOUT), (nn.Dropout2d, _DROPOUT),
    (nn.Dropout3d, _DROPOUT), (nn.AlphaDropout, _DROPOUT),
    (nn.ReLU, _INPLACE), (nn.ReLU6, _INPLACE), (nn.SiLU, _INPLACE), (nn.Mish, _INPLACE),
    (nn.Hardswish, _INPLACE), (nn.Hardsigmoid, _INPLACE),
    (nn.LeakyReLU, {"negative_slope": _is_num, "inplace": _is_bool}),
    (nn.ELU, {"alpha": _is_num, "inplace": _is_bool}),
    (nn.GELU, {"approximate": _one_of("none", "tanh")}),
    (nn.Softplus, {"beta": _is_num, "threshold": _is_num}),
    (nn.PReLU, {"num_parameters": _is_int}),
    (nn.Sigmoid, {}), (nn.Tanh, {}), (nn.Identity, {}),
    (nn.Softmax, _DIM), (nn.LogSoftmax, _DIM),
    (nn.Flatten, {"start_dim": _is_int, "end_dim": _is_int}),
    (nn.Unflatten, {"dim": _is_int, "unflattened_size": _ints}),
    (nn.MaxPool1d, _MAX_POOL), (nn.MaxPool2d, _MAX_POOL), (nn.MaxPool3d, _MAX_POOL),
    (nn.AvgPool1d, _AVG_POOL),
    (nn.AvgPool2d, {**_AVG_POOL, "divisor_override": _optional(_is_int)}),
    (nn.AdaptiveAvgPool1d, _OUT_SIZE), (nn.AdaptiveAvgPool2d, _OUT_SIZE),
    (nn.AdaptiveAvgPool3d, _OUT_SIZE),
    (nn.AdaptiveMaxPool1d, {**_OUT_SIZE, "return_indices": _is_bool}),
    (nn.AdaptiveMaxPool2d, {**_OUT_SIZE, "return_indices": _is_bool}),
    (nn.Upsample, {"size": _optional(_ints), "scale_factor": _optional(_ints_of(_is_num)),
                   "mode": _one_of("nearest", "linear", "bilinear", "bicubic", "trilinear"),
                   "align_corners": _optional(_is_bool),
                   "recompute_scale_factor": _optional(_is_bool)}),
]
del nn
LAYERS: dict[str, tuple[type, dict[str, tuple[_Check, Any]]]] = {
    cls.__name__: (cls, _accepted(cls, spec)) for cls, spec in _SPECS}
"""The torch.nn layers an export may describe, by class name: the class, and its arguments'
kinds (checks) and defaults."""

_MAX_DEPTH = 64  # nested Sequentials; deeper is no model anyone writes, and would overflow
_CHILD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,99}")
_RESERVED = frozenset(dir(torch.nn.Sequential()))  # names add_module would refuse or shadow


def unsupported_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The first submodule (its path, '' for the model) that `describe_layers` cannot
    describe, or None: every module must be an nn.Sequential or a layer of `LAYERS`, of that
    exact class (a subclass may change `forward`)."""
    todo: list[tuple[str, Any]] = [("", model)]
    while todo:
        where, module = todo.pop(0)
        if type(module) is torch.nn.Sequential:
            todo[:0] = [(f"{where}.{k}" if where else k, m) for k, m in module._modules.items()]
        elif type(module) not in _LAYER_CLASSES or list(module.children()):
            return where, module
    return None


def describe_layers(model: torch.nn.Module) -> dict[str, Any]:
    """`model` (an nn.Sequential of torch.nn layers, see `unsupported_layer`) as plain data
    that `build_layers` turns back into the same architecture; weights are not included."""
    if type(model) is torch.nn.Sequential:
        return {"layer": "Sequential",
                "children": [[name, describe_layers(m)] for name, m in model._modules.items()]}
    cls_name = type(model).__name__
    if LAYERS.get(cls_name, (None,))[0] is not type(model):
        raise ValueError(f"{type(model).__name__} is not one of the torch.nn layers export "
                         "describes")
    args = {}
    for arg, (_, default) in LAYERS[cls_name][1].items():
        value = _layer_arg(model, arg, default)
        if default is _REQUIRED or not _same(value, default):  # defaults left out: the file
            args[arg] = value                                    # loads on other torch versions
    return {"layer": cls_name, "args": args}


def _layer_arg(module: torch.nn.Module, arg: str, default: Any) -> Any:
    if arg == "bias":  # the constructor's flag; the module holds the tensor or None
        if not getattr(module, "affine", True) or not getattr(module, "elementwise_affine", True):
            return default  # no affine parameters: the flag means nothing
        return getattr(module, "bias", None) is not None
    return getattr(module, arg)


def _same(value: Any, default: Any) -> bool:
    return type(value) is type(default) and value == default


def build_layers(description: Any) -> torch.nn.Module:
    """The model a `describe_layers` description stands for, with fresh weights.

    The whole description is checked before any layer is made: each layer's name must be a
    key of `LAYERS` (compared as a string: nothing is imported or looked up by a name from
    the file) and its arguments the listed names, of the listed kinds. Anything else is a
    ValueError naming the layer's position. Build under `torch.device("meta")` first to
    check sizes without allocating."""
    plan = _parse(description, "", 0)
    return _make(plan)


def _parse(node: Any, where: str, depth: int) -> Any:
    at = f"layer {where!r}" if where else "the model"
    if depth > _MAX_DEPTH:
        raise ValueError(f"{at}: Sequentials nested deeper than {_MAX_DEPTH}")
    if type(node) is not dict or type(node.get("layer")) is not str:
        raise ValueError(f"{at}: not a layer description ({{'layer': name, ...}}), got "
                         f"{_show(node)}")
    name = node["layer"]
    if name == "Sequential":
        children = node.get("children")
        if set(node) != {"layer", "children"} or not isinstance(children, (list, tuple)):
            raise ValueError(f"{at}: a Sequential needs only a list of [name, layer] children")
        plan: list[tuple[str, Any]] = []
        seen: set[str] = set()
        for child in children:
            if type(child) not in (list, tuple) or len(child) != 2:
                raise ValueError(f"{at}: a child must be [name, layer], got {_show(child)}")
            key = child[0]
            if (type(key) is not str or not _CHILD_NAME.fullmatch(key) or key in _RESERVED
                    or key in seen):
                raise ValueError(f"{at}: child name {_show(key)} is not a plain, unique layer "
                                 "name (letters, digits, '_', '-')")
            seen.add(key)
            plan.append((key, _parse(child[1], f"{where}.{key}" if where else key, depth + 1)))
        return plan
    entry = LAYERS.get(name)
    if entry is None:
        raise ValueError(f"{at}: {_show(name)} is not one of the torch.nn layers nanofit "
                         "rebuilds (nn.Sequential and the classes in nanofit.registry.LAYERS); "
                         "refusing to build it")
    cls, spec = entry
    args = node.get("args", {})
    if set(node) - {"layer", "args"} or type(args) is not dict:
        raise ValueError(f"{at}: a {name} needs only a dict of arguments, got {_show(node)}")
    for arg, value in args.items():
        if arg not in spec:
            raise ValueError(f"{at}: {name} takes no argument {_show(arg)} here (it may take "
                             f"{', '.join(spec) or 'none'})")
        if not spec[arg][0](value):
            raise ValueError(f"{at}: {name}'s {arg}={_show(value)} is not of the kind it takes")
    return cls, dict(args), at


def _show(value: Any, width: int = 80) -> str:
    """A file's value for an error message: plain data as its repr (cut to `width`), anything
    else (a tensor) by its type only, so that reporting it runs nothing of torch's repr."""
    if _small_plain(value, 3):
        text = repr(value)
        return text if len(text) <= width else text[:width - 3] + "..."
    return f"a {type(value).__name__}"


def _small_plain(value: Any, depth: int) -> bool:
    if type(value) in (type(None), bool, int, float, str, bytes):
        return True
    if depth == 0 or type(value) not in (list, tuple, dict) or len(value) > 16:
        return False
    parts = [*value.keys(), *value.values()] if type(value) is dict else value
    return all(_small_plain(v, depth - 1) for v in parts)


def _make(plan: Any) -> torch.nn.Module:
    if isinstance(plan, list):
        return torch.nn.Sequential(OrderedDict((key, _make(sub)) for key, sub in plan))
    cls, args, at = plan
    try:
        return cls(**args)
    except Exception as e:  # sizes torch refuses (negative, zero groups...)
        raise ValueError(f"{at}: {cls.__name__}(**{args!r:.120}) failed ({type(e).__name__}: "
                         f"{e})") from None


_LAYER_CLASSES = frozenset(cls for cls, _ in LAYERS.values())
