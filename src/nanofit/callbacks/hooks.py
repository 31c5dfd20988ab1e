"""Hooks during training: HooksCallback, and ActivationStats with its three plots."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..callback import Callback, Order, every
from ..hooks import Hook, HookFunc, Hooks, first_tensor, select_modules
from ..plots import new_figure, save_figure

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ["HooksCallback", "ActivationStats", "ActivationHook"]


class HooksCallback(Callback):
    """Registers `hookfunc(hook, module, inp, outp)` on chosen modules for the length of a fit.

    Modules: `mods`, or every module passing `mod_filter` (a type, tuple of types or predicate;
    default: every leaf module). The function runs in training batches if `on_train`, in
    validation batches if `on_valid`. Hooks go in at `before_fit` and are removed from the
    model in `cleanup_fit`, whether the fit ends normally, is cancelled, or fails.

    As in the course, the callback is a list of its hooks: `for h in cb`, `cb[0]`, `len(cb)`.
    The hooks of the last fit (and what `hookfunc` stored on them, e.g. the course's
    `append_stats` keeps `hook.stats`) stay readable after it; the next fit makes new ones.
    Example: `cb = HooksCallback(append_stats, nn.ReLU); learn.fit(1, cbs=[cb])`, then
    `[h.stats for h in cb]`.
    """

    main_fit_only = True

    def __init__(self, hookfunc: Callable, mod_filter: Any = None, on_train: bool = True,
                 on_valid: bool = False, mods: list[nn.Module] | None = None) -> None:
        self.hookfunc = hookfunc
        self.mod_filter = mod_filter
        self.on_train, self.on_valid = on_train, on_valid
        self.mods = mods
        self.hooks: Hooks | None = None
        self._active = False

    def before_fit(self, learn: Learner) -> None:
        mods = self.mods if self.mods is not None else select_modules(learn.model, self.mod_filter)
        if not mods:
            raise ValueError(f"{type(self).__name__}: no module of the model passes mod_filter="
                             f"{self.mod_filter!r}; pass a layer type the model has, or mods=[...]")
        self.hooks = self._make_hooks(mods)

    def _make_hooks(self, mods: list[nn.Module]) -> Hooks:
        return Hooks(mods, self._call)

    def before_batch(self, learn: Learner) -> None:
        self._active = self.on_train if learn.training else self.on_valid

    def _call(self, hook: Hook, module: nn.Module, inp: tuple, outp: Any) -> None:
        if self._active:
            self.hookfunc(hook, module, inp, outp)

    def cleanup_fit(self, learn: Learner) -> None:
        if self.hooks is not None:
            self.hooks.remove()  # off the model; the Hook objects (and their state) stay
        self._active = False

    # ---- a list of the hooks, as the course's HooksCallback ---------------------------------
    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks if self.hooks is not None else [])

    def __len__(self) -> int:
        return len(self.hooks) if self.hooks is not None else 0

    def __getitem__(self, i: int) -> Hook:
        if self.hooks is None:
            raise IndexError(f"{type(self).__name__} has no hooks before its first fit")
        return self.hooks[i]

    def __bool__(self) -> bool:  # a callback is truthy even when it holds no hooks yet
        return True


class ActivationHook(Hook):
    """A hook of `ActivationStats`: `hook.stats` is its records in the course's shape, the
    tuple `([means], [stds], [hists])` of per-record lists (0-d tensors, 0-d tensors, 1-D
    tensors of `bins` counts), as miniai's `append_stats` keeps them. Built when read, from
    the statistics the callback copied off the device in chunks; reading it during a fit
    copies the pending records first (one host sync per read, none per batch)."""

    def __init__(self, module: nn.Module, fn: HookFunc, owner: ActivationStats) -> None:
        super().__init__(module, fn)
        self.owner = owner

    @property
    def stats(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        return self.owner.hook_stats(self.owner.index_of(self))


class ActivationStats(HooksCallback):
    """Per hooked module and training batch: mean, std and a histogram of |activations|.

    Statistics are computed on the device inside the hook and copied to the CPU in one
    transfer every `sync_every` recorded batches, so hooks add no host sync per batch.
    `every=n` records the n-th, 2n-th, ... training batch of the fit (`every(n)`).
    Example: `ActivationStats(nn.ReLU)`,
    `ActivationStats(lambda m: isinstance(m, GeneralRelu))` or `ActivationStats(mods=[...])`.

    Results, in two shapes:
    - nanofit's: `astats.stats[i]` is a `(n_records, 2 + bins)` CPU tensor for hooked module i
      (mean, std, histogram counts over `hist_range`); `means()`, `stds()`, `hists()`,
      `dead_fraction()` slice it; `names[i]` names the module.
    - the course's: the callback is a list of its hooks (`for h in astats`, `astats[0]`,
      `len(astats)`), and each hook's `h.stats` is miniai's `([means], [stds], [hists])`:
      lists with one entry per record (0-d tensors, 0-d tensors, 1-D tensors of `bins`
      counts), so `torch.stack(h.stats[2]).t()` is the `(bins, n_records)` histogram image.
      Both stay readable after the fit; the hooks are off the model from `cleanup_fit` on.
    `plot_stats()`, `color_dim()` and `dead_chart()` draw them and return Figures.

    Differences from miniai's `append_stats`, on purpose: one record per module per batch
    (a module called twice in a forward is recorded once); activations beyond `hist_range`
    are counted in the last bin instead of dropped, so each histogram sums to the number of
    activations; and `every=n` thins long runs.
    """

    order = Order.ACTIVATIONS

    def __init__(self, mod_filter: Any = None, every: int = 1, bins: int = 40,
                 hist_range: tuple[float, float] = (0.0, 10.0), sync_every: int = 64,
                 mods: list[nn.Module] | None = None) -> None:
        if every < 1 or bins < 2:
            raise ValueError(f"ActivationStats needs every >= 1 and bins >= 2, got {every}, {bins}")
        super().__init__(self._record, mod_filter, on_train=True, on_valid=False, mods=mods)
        self.every, self.bins, self.hist_range = every, bins, hist_range
        self.sync_every = sync_every
        self.names: list[str] = []
        self._chunks: list[list[torch.Tensor]] = []
        self._pending: list[torch.Tensor] = []
        self._pending_mod: list[int] = []
        self._index: dict[int, int] = {}
        self._course: dict[int, tuple[list[torch.Tensor], list[torch.Tensor],
                                      list[torch.Tensor]]] = {}

    def _make_hooks(self, mods: list[nn.Module]) -> Hooks:
        return Hooks(mods, self._call, hook_type=partial(ActivationHook, owner=self))

    def before_fit(self, learn: Learner) -> None:
        super().before_fit(learn)
        assert self.hooks is not None  # made by HooksCallback.before_fit
        names = {m: name for name, m in learn.model.named_modules()}
        self.names = [f"{names.get(h.module, '?')} ({type(h.module).__name__})" for h in self.hooks]
        self._index = {id(h.module): i for i, h in enumerate(self.hooks)}
        self._chunks = [[] for _ in self.hooks]
        self._pending, self._pending_mod, self._active = [], [], False
        self._course = {}

    @every("every")  # the every-th training batches only: the others do not call it
    def before_batch(self, learn: Learner) -> None:
        self._seen: set[int] = set()
        self._active = True

    def _record(self, hook: Hook, module: nn.Module, inp: tuple, outp: Any) -> None:
        i = self._index[id(module)]
        t = first_tensor(outp)
        if t is None or i in self._seen:  # one row per module per batch (a module may run twice)
            return
        self._seen.add(i)
        with torch.no_grad():
            x = t.detach().float()
            lo, hi = self.hist_range
            hist = torch.histc(x.abs().clamp_(max=hi), self.bins, lo, hi)
            row = torch.cat([torch.stack([x.mean(), x.std()]), hist])
        self._pending.append(row)
        self._pending_mod.append(i)

    @every("every")
    def cleanup_batch(self, learn: Learner) -> None:
        self._active = False  # also after a cancelled batch
        if len(self._pending) >= self.sync_every * len(self._chunks):
            self._sync()

    def _sync(self) -> None:
        """Move the pending rows to the CPU in one copy and file them per module."""
        if not self._pending:
            return
        rows = torch.stack(self._pending).cpu()
        owner = torch.tensor(self._pending_mod)
        for i, chunks in enumerate(self._chunks):
            chunks.append(rows[owner == i])
        self._pending, self._pending_mod = [], []
        self._course = {}  # the course-shaped lists are rebuilt with the new records

    def cleanup_epoch(self, learn: Learner) -> None:
        self._sync()

    def cleanup_fit(self, learn: Learner) -> None:
        self._sync()
        super().cleanup_fit(learn)

    @property
    def stats(self) -> list[torch.Tensor]:
        """Per hooked module, a (records, 2 + bins) CPU tensor: mean, std, histogram."""
        self._sync()
        return [torch.cat(c) if c else torch.zeros(0, 2 + self.bins) for c in self._chunks]

    def index_of(self, hook: Hook) -> int:
        """The position of `hook` (one of this callback's) in `stats`, `names`, the hooks."""
        return self._index[id(hook.module)]

    def hook_stats(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                          list[torch.Tensor]]:
        """Module i's records in the course's shape (what `self[i].stats` gives): the lists
        `([means], [stds], [hists])`, views of `stats[i]`, built on first read."""
        self._sync()
        if i not in self._course:
            s = torch.cat(self._chunks[i]) if self._chunks[i] else torch.zeros(0, 2 + self.bins)
            self._course[i] = (list(s[:, 0].unbind(0)), list(s[:, 1].unbind(0)),
                               list(s[:, 2:].unbind(0)))
        return self._course[i]

    def means(self) -> list[torch.Tensor]:
        """Per module, a (records,) tensor of activation means."""
        return [s[:, 0] for s in self.stats]

    def stds(self) -> list[torch.Tensor]:
        """Per module, a (records,) tensor of activation standard deviations."""
        return [s[:, 1] for s in self.stats]

    def hists(self) -> list[torch.Tensor]:
        """Per module, a (bins, records) tensor of counts: the picture `color_dim` draws."""
        return [s[:, 2:].T for s in self.stats]

    def dead_fraction(self) -> list[torch.Tensor]:
        """Per module and record, the fraction of activations in the lowest bin (near zero)."""
        return [h[0] / h.sum(0).clamp(min=1) for h in self.hists()]

    # ---- plots --------------------------------------------------------------------------
    def plot_stats(self, figsize: tuple[float, float] = (10, 4),
                   path: str | Path | None = None):
        """Means and standard deviations of each hooked module over training; a Figure
        (`figsize` in inches, as the course's; `path=` also saves it as an image)."""
        fig = new_figure(figsize=_figsize(figsize))
        ax_mean, ax_std = fig.subplots(1, 2)
        for name, mean, std in zip(self.names, self.means(), self.stds()):
            ax_mean.plot(mean.numpy(), label=name)
            ax_std.plot(std.numpy(), label=name)
        ax_mean.set_title("activation means")
        ax_std.set_title("activation stds")
        ax_mean.set_ylabel("mean")
        ax_std.set_ylabel("standard deviation")
        for ax in (ax_mean, ax_std):
            ax.set_xlabel(f"recorded training batches (every {self.every})")
        ax_std.legend(fontsize="small")
        return save_figure(fig, path)

    def _grid(self, title: str, figsize: tuple[float, float] | None,
              path: str | Path | None):
        n = max(len(self.names), 1)
        cols = min(n, 4)
        rows = math.ceil(n / cols)
        fig = new_figure(figsize=_figsize(figsize) or (3.2 * cols, 2.6 * rows))
        axes = fig.subplots(rows, cols, squeeze=False).flatten()
        for ax in axes[len(self.names):]:
            ax.set_axis_off()
        fig.suptitle(title)
        return fig, axes

    def color_dim(self, figsize: tuple[float, float] | None = None,
                  path: str | Path | None = None):
        """The 'colorful dimension' plot: each module's activation histogram over training
        (log scale), bins on the vertical axis, time on the horizontal; a Figure. `figsize`
        as the course's `color_dim(figsize=(11, 5))`; by default sized to the number of
        modules (4 per row). `path=` also saves it as an image."""
        fig, axes = self._grid("histograms of |activations| over training", figsize, path)
        for ax, name, hist in zip(axes, self.names, self.hists()):
            ax.imshow(hist.log1p().numpy(), origin="lower", aspect="auto", cmap="viridis",
                      extent=(0, hist.shape[1], *self.hist_range))
            ax.set_title(name, fontsize="small")
        fig.supxlabel(f"recorded training batches (every {self.every})")
        fig.supylabel("|activation| (colour: log of the count)")
        fig.tight_layout()
        return save_figure(fig, path)

    def dead_chart(self, figsize: tuple[float, float] | None = None,
                   path: str | Path | None = None):
        """Fraction of each module's activations in the lowest bin over training; a Figure.
        `figsize` and `path=` as in `color_dim`."""
        fig, axes = self._grid("fraction of activations near zero", figsize, path)
        for ax, name, frac in zip(axes, self.names, self.dead_fraction()):
            ax.plot(frac.numpy())
            ax.set_ylim(0, 1)
            ax.set_title(name, fontsize="small")
        fig.supxlabel(f"recorded training batches (every {self.every})")
        fig.supylabel("fraction near zero (lowest bin)")
        fig.tight_layout()
        return save_figure(fig, path)


def _figsize(figsize: tuple[float, float] | None) -> tuple[float, float] | None:
    """`figsize`, checked: a path passed first (nanofit's old positional form) is named."""
    if isinstance(figsize, (str, Path)):
        raise TypeError(f"the first argument of the activation plots is figsize, got the path "
                        f"{str(figsize)!r}; save with path={str(figsize)!r}")
    return figsize
