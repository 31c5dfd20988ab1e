"""Initialisation: Kaiming init, a general ReLU, and LSUV (layer-sequential unit variance)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import Hook
from .torch_utils import eval_mode

__all__ = ["init_weights", "GeneralRelu", "lsuv_init"]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def init_weights(m: nn.Module, leaky: float = 0.0) -> None:
    """Kaiming normal init for conv and linear layers (`leaky`: the slope of a leaky ReLU).

    Use with `model.apply(partial(init_weights, leaky=0.1))`.
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


def lsuv_init(model: nn.Module, xb: Any, mods: list[nn.Module] | None = None,
              tol: float = 1e-3, max_iter: int = 10) -> list[tuple[float, float]]:
    """Layer-sequential unit-variance init: for each layer in turn (first to last), rescale
    its weights and shift its bias until its output on `xb` has mean ~0 and std ~1.

    `mods` defaults to every conv and linear layer. Runs without gradients and in eval mode
    (batchnorm statistics are left alone). Returns each layer's final (mean, std).
    """
    mods = mods if mods is not None else [m for m in model.modules() if isinstance(m, _WEIGHTED)]
    results = []
    with eval_mode(model), torch.no_grad():
        for m in mods:
            seen: dict[str, float] = {}

            def grab(hook: Hook, module: nn.Module, inp: tuple, outp: torch.Tensor,
                     seen: dict[str, float] = seen) -> None:
                seen["mean"], seen["std"] = outp.mean().item(), outp.std().item()

            with Hook(m, grab):
                for _ in range(max_iter):
                    model(xb)
                    if not seen:
                        raise ValueError(f"lsuv_init: {m} did not run in model(xb); pass "
                                         "mods= with layers the forward pass uses")
                    if abs(seen["mean"]) < tol and abs(seen["std"] - 1) < tol:
                        break
                    bias, weight = getattr(m, "bias", None), m.weight
                    assert isinstance(weight, torch.Tensor)
                    if isinstance(bias, torch.Tensor):
                        bias -= seen["mean"]
                    weight /= seen["std"]
                model(xb)
            results.append((seen["mean"], seen["std"]))
    return results
