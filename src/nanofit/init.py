"""Initialisation: Kaiming init, a general ReLU, and LSUV (layer-sequential unit variance)."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import Hook
from .torch_utils import eval_mode

__all__ = ["init_weights", "GeneralRelu", "lsuv_init"]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def init_weights(m: nn.Module, leaky: float = 0.0) -> None:
    """Kaiming normal init for conv and linear layers (`leaky`: the slope of a leaky ReLU),
    with their biases set to zero.

    Use with `model.apply(partial(init_weights, leaky=0.1))`. Unlike miniai's, which only
    re-initialises Conv1d/2d/3d weights, this also initialises `nn.Linear` layers and zeroes
    biases (the Kaiming recipe), so a model's init does not depend on PyTorch's defaults.
    """
    if isinstance(m, _WEIGHTED):
        nn.init.kaiming_normal_(m.weight, a=leaky)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class GeneralRelu(nn.Module):
    """ReLU, leaky if `leak` is set, then shifted down by `sub` and capped at `maxv`."""

    def __init__(self, leak: float | None = None, sub: float | None = None,
                 maxv: float | None = None) -> None:
        super().__init__()
        self.leak, self.sub, self.maxv = leak, sub, maxv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(x, self.leak) if self.leak is not None else F.relu(x)
        if self.sub is not None:
            x = x - self.sub
        if self.maxv is not None:
            x = x.clamp(max=self.maxv)
        return x

    def extra_repr(self) -> str:
        return f"leak={self.leak}, sub={self.sub}, maxv={self.maxv}"


@overload
def lsuv_init(model: nn.Module, m: nn.Module, m_in: nn.Module, xb: Any, /, *,
              max_iter: int = 10) -> list[tuple[float, float]]: ...


@overload
def lsuv_init(model: nn.Module, xb: Any, mods: Sequence[nn.Module | tuple[nn.Module, nn.Module]]
              | None = None, tol: float = 1e-3, max_iter: int = 10) -> list[tuple[float, float]]:
    ...


def lsuv_init(model: nn.Module, xb: Any, mods: Any = None, tol: Any = 1e-3,
              max_iter: int | None = None) -> list[tuple[float, float]]:
    """Layer-sequential unit-variance init: for each layer in turn (first to last), rescale
    its weights and shift its bias until its output on `xb` has mean ~0 and std ~1.

    `mods` defaults to every conv and linear layer. An entry may also be a pair `(at, layer)`:
    then `layer` is adjusted until the output of module `at` (e.g. the activation after it)
    has mean ~0 and std ~1. Runs without gradients and in eval mode (batchnorm statistics are
    left alone), at most `max_iter` passes per layer (default 10; 100 in the course's form,
    whose loop has no limit); a layer that does not reach `tol` warns. Returns each entry's
    final (mean, std).

    The course's form `lsuv_init(model, m, m_in, xb)` works too: it adjusts the layer `m_in`
    until the output of `m` (its activation) is normalised, i.e. `mods=[(m, m_in)]`; call it
    once per pair, as in `for ms in zip(relus, convs): lsuv_init(model, *ms, xb)` (with the
    course's tolerance, 1e-3).
    Different on purpose: by default nanofit normalises each layer's own output, not its
    activation's. That works for any activation and for the last layer, which has none; the
    course's target cannot be reached after a plain ReLU (its outputs have mean > 0), only
    after one shifted down like `GeneralRelu(sub=0.4)`.
    """
    if isinstance(xb, nn.Module):  # the course's lsuv_init(model, m, m_in, xb)
        if not isinstance(mods, nn.Module):
            raise TypeError(f"lsuv_init(model, m, m_in, xb) needs the layer m_in as a module, "
                            f"got {type(mods).__name__}; nanofit's form is lsuv_init(model, xb)")
        pairs = [(xb, mods)]
        xb, tol = tol, 1e-3
        max_iter = 100 if max_iter is None else max_iter
    else:
        mods = mods if mods is not None else [m for m in model.modules()
                                             if isinstance(m, _WEIGHTED)]
        pairs = [m if isinstance(m, tuple) else (m, m) for m in mods]
    max_iter = 10 if max_iter is None else max_iter
    results = []
    with eval_mode(model), torch.no_grad():
        for at, m in pairs:
            seen: dict[str, float] = {}

            def grab(hook: Hook, module: nn.Module, inp: tuple, outp: torch.Tensor,
                     seen: dict[str, float] = seen) -> None:
                seen["mean"], seen["std"] = outp.mean().item(), outp.std().item()

            with Hook(at, grab):
                for _ in range(max_iter):
                    model(xb)
                    if not seen:
                        raise ValueError(f"lsuv_init: {at} did not run in model(xb); pass "
                                         "mods= with layers the forward pass uses")
                    if abs(seen["mean"]) < tol and abs(seen["std"] - 1) < tol:
                        break
                    bias, weight = getattr(m, "bias", None), m.weight
                    assert isinstance(weight, torch.Tensor)
                    if isinstance(bias, torch.Tensor):
                        bias -= seen["mean"]
                    weight /= seen["std"]
                model(xb)
            if abs(seen["mean"]) >= tol or abs(seen["std"] - 1) >= tol:
                warnings.warn(f"lsuv_init: {at} has mean {seen['mean']:.4f} and std "
                              f"{seen['std']:.4f} after {max_iter} passes (tolerance {tol}); "
                              "raise max_iter, or normalise the layer's own output (nanofit's "
                              "default) when its activation cannot reach mean 0")
            results.append((seen["mean"], seen["std"]))
    return results
