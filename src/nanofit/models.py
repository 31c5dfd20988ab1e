"""Model building blocks for small images: conv layers, residual blocks, two builders."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

from torch import nn

from .registry import exportable

__all__ = ["conv", "ResBlock", "simple_cnn", "resnet"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# A layer factory, or None / False for "no such layer" (the course writes act=None and
# norm=False alike).
Act = Callable[[], nn.Module] | None | Literal[False]
Norm = Callable[[int], nn.Module] | None | Literal[False]


def _is_batchnorm(norm: Norm) -> bool:
    while isinstance(norm, partial):  # partial(nn.BatchNorm2d, momentum=0.2) is one too
        norm = norm.func
    return isinstance(norm, type) and issubclass(norm, _NORMS)


def conv(ni: int, nf: int, ks: int = 3, stride: int = 2, act: Act = nn.ReLU, norm: Norm = None,
         bias: bool | None = None) -> nn.Sequential:
    """Conv2d (padding ks//2), then `norm(nf)` and `act()` if given.

    `act` and `norm` are layer factories (`nn.ReLU`, `partial(GeneralRelu, leak=0.1)`,
    `nn.BatchNorm2d`); None or False leaves the layer out, as in the course.
    `bias` defaults to False before a batchnorm (which has its own), True otherwise (the
    course meant the same, but its check never matched, so its convs always have a bias).
    """
    if bias is None:
        bias = not _is_batchnorm(norm)
    layers: list[nn.Module] = [nn.Conv2d(ni, nf, ks, stride=stride, padding=ks // 2, bias=bias)]
    if norm:
        layers.append(norm(nf))
    if act:
        layers.append(act())
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Two convs with a shortcut: act(convs(x) + idconv(pool(x))).

    The shortcut is the identity when shapes allow; else a 1x1 conv (channels) after an
    average pool (stride), as in the course's ResNet. `act`/`norm` as in `conv` (None or
    False: none). Different on purpose: the default `act` is `nn.ReLU`, as for `conv` and the
    builders, where the course's default is its notebook's `act_gr`; pass
    `act=partial(GeneralRelu, leak=0.1, sub=0.4)` for the course's block.
    """

    def __init__(self, ni: int, nf: int, stride: int = 1, ks: int = 3, act: Act = nn.ReLU,
                 norm: Norm = None) -> None:
        super().__init__()
        self.convs = nn.Sequential(conv(ni, nf, ks, stride=1, act=act, norm=norm),
                                   conv(nf, nf, ks, stride=stride, act=None, norm=norm))
        self.idconv = nn.Identity() if ni == nf else conv(ni, nf, ks=1, stride=1, act=None)
        self.pool = nn.Identity() if stride == 1 else nn.AvgPool2d(2, ceil_mode=True)
        self.act = act() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.convs(x) + self.idconv(self.pool(x)))


def _head(nf: int, n_out: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(nf, n_out)]


@exportable
def simple_cnn(n_in: int = 1, n_out: int = 10, nfs: Sequence[int] = (8, 16, 32, 64),
               act: Act = nn.ReLU, norm: Norm = nn.BatchNorm2d) -> nn.Sequential:
    """Stride-2 convs (a 5x5 stem, then 3x3), average pooling and a linear head; `act`
    and `norm` as in `conv` (None or False: none)."""
    layers = [conv(n_in, nfs[0], ks=5, stride=2, act=act, norm=norm)]
    layers += [conv(a, b, stride=2, act=act, norm=norm) for a, b in zip(nfs, nfs[1:])]
    return nn.Sequential(*layers, *_head(nfs[-1], n_out))


@exportable
def resnet(n_in: int = 1, n_out: int = 10, nfs: Sequence[int] = (16, 32, 64, 128),
           act: Act = nn.ReLU, norm: Norm = nn.BatchNorm2d) -> nn.Sequential:
    """A small ResNet: a stride-1 ResBlock stem, stride-2 ResBlocks, pooling, linear head;
    `act` and `norm` as in `conv` (None or False: none)."""
    layers = [ResBlock(n_in, nfs[0], stride=1, act=act, norm=norm)]
    layers += [ResBlock(a, b, stride=2, act=act, norm=norm) for a, b in zip(nfs, nfs[1:])]
    return nn.Sequential(*layers, *_head(nfs[-1], n_out))
