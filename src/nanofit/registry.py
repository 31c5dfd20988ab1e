"""The model constructors an exported learner may name: `@exportable` registers them by name.

`load_learner` looks a file's constructor name up here, as a plain string, among the names
registered so far and the ones the caller passes in `allowed=`. It never imports a module,
reads an attribute or calls anything else that the file names.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["exportable", "reference", "resolve", "registered"]

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
