"""Data: DataLoaders (a train/valid pair), TensorLoader for in-memory tensors, collate helpers."""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from .images import folder_loaders, show_images

__all__ = ["DataLoaders", "TensorLoader", "collate_dict", "DictCollate", "rebuild_loader"]

# What a torch DataLoader was built with, besides its dataset and its order.
_LOADER_SETTINGS = ("batch_size", "drop_last", "num_workers", "collate_fn", "pin_memory",
                    "timeout", "worker_init_fn", "multiprocessing_context", "generator",
                    "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


def rebuild_loader(dl: DataLoader, **changes: Any) -> DataLoader:
    """A torch DataLoader over the same dataset with the same settings as `dl`, except
    `changes` (e.g. `sampler=` to shard it, `batch_sampler=` to skip batches).

    Example: `rebuild_loader(dl, sampler=DistributedSampler(dl.dataset), drop_last=True)`
    """
    kw = {k: getattr(dl, k) for k in _LOADER_SETTINGS if hasattr(dl, k)}
    if "batch_sampler" in changes:  # it decides the batches: no batch_size/drop_last with it
        kw.pop("batch_size", None)
        kw.pop("drop_last", None)
    elif "sampler" not in changes:
        if dl.batch_size is None:
            kw["batch_sampler"] = dl.batch_sampler
            kw.pop("batch_size", None)
            kw.pop("drop_last", None)
        else:
            kw["sampler"] = dl.sampler
    kw.update(changes)
    if kw.get("num_workers", 0) == 0:  # torch refuses these without worker processes
        kw.pop("prefetch_factor", None)
        kw.pop("persistent_workers", None)
    return DataLoader(dl.dataset, **kw)


class TensorLoader:
    """Batches in-memory tensors by indexing them whole, with no per-item `__getitem__`/collate.

    `tensors` is one tensor or a tuple of tensors with the same first dimension; each batch is
    a tuple with one slice of each. With `shuffle=True` every pass draws a new order from
    `generator` (or torch's global RNG) and gathers each batch with one `index_select` per
    tensor; without shuffling, batches are views into the tensors: do not modify them in place.
    The tensors may live on the GPU; batches are then made there.

    Example: `TensorLoader((x, y), batch_size=64, shuffle=True)`
    """

    def __init__(self, tensors: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 64,
                 shuffle: bool = False, drop_last: bool = False,
                 generator: torch.Generator | None = None) -> None:
        if isinstance(tensors, torch.Tensor):
            tensors = (tensors,)
        tensors = tuple(tensors)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("TensorLoader needs a tensor or a tuple of tensors, got "
                            f"{[type(t).__name__ for t in tensors]}")
        lengths = [len(t) for t in tensors]
        if len(set(lengths)) != 1:
            raise ValueError(f"TensorLoader: tensors must have the same length (first dimension), "
                             f"got shapes {[tuple(t.shape) for t in tensors]}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TensorLoader: batch_size must be an int >= 1, got {batch_size!r}")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator
        self.n = lengths[0]
        self.perm: torch.Tensor | None = None  # the order of the current pass, when shuffling

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """A pass that begins at batch `start`: the order is drawn as for a whole pass (now,
        not at the first batch), and the skipped batches are never gathered."""
        if not self.shuffle:
            return self._batches(None, start)
        self.perm = torch.randperm(self.n, generator=self.generator)
        return self._batches(self.perm.to(self.tensors[0].device), start)

    def _batches(self, perm: torch.Tensor | None, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        bs, ts = self.batch_size, self.tensors
        for i in range(start * bs, len(self) * bs, bs):
            if perm is None:
                yield tuple(t[i: i + bs] for t in ts)
            else:
                idx = perm[i: i + bs]
                yield tuple(t.index_select(0, idx) for t in ts)

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        return (f"TensorLoader(({shapes}), batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, drop_last={self.drop_last})")


class DictCollate:
    """A collate function: a list of dict rows -> a tuple with one collated entry per column,
    in the order of `columns` (or of the rows' keys when `columns` is None or the rows lack
    some of them, e.g. after a transform that renames columns). Made by `collate_dict`."""

    def __init__(self, columns: Sequence[str] | None = None) -> None:
        self.columns = None if columns is None else tuple(columns)

    def __call__(self, rows: list[Mapping[str, Any]]) -> tuple[Any, ...]:
        if rows and not isinstance(rows[0], Mapping):
            raise TypeError(f"collate_dict collates rows that are dicts (Hugging Face rows), got "
                            f"rows of type {type(rows[0]).__name__}; use torch's default_collate "
                            "for tuples")
        batch = default_collate(rows)
        if self.columns is not None and all(c in batch for c in self.columns):
            return tuple(batch[c] for c in self.columns)
        return tuple(batch.values())

    def __repr__(self) -> str:
        return f"collate_dict(columns={list(self.columns) if self.columns else None})"


def collate_dict(ds: Any) -> Any:
    """A collate function for `ds`, a dataset of dict rows such as a Hugging Face `Dataset`:
    it turns a list of rows into a tuple with one collated entry per column, in the order of
    `ds.features`, as the course's does (a dataset of one column gives a 1-tuple).

    Example: `DataLoader(ds, batch_size=64, collate_fn=collate_dict(ds))`
    The older form, `collate_fn=collate_dict`, still works: given a list of rows, it collates
    them at once (columns in the rows' key order).
    """
    if isinstance(ds, list) and (not ds or isinstance(ds[0], Mapping)):  # rows: the old form
        return DictCollate()(ds)
    if not (hasattr(ds, "features") or hasattr(ds, "column_names")):
        raise TypeError(f"collate_dict(ds) takes a dataset of dict rows with `features` (a "
                        f"Hugging Face Dataset) and returns its collate function; got a "
                        f"{type(ds).__name__}")
    columns = getattr(ds, "features", None) or getattr(ds, "column_names", None)
    return DictCollate(list(columns) if columns else None)


class DataLoaders:
    """A training and a validation loader: `dls.train`, `dls.valid`."""

    def __init__(self, train: Any, valid: Any = None) -> None:
        self.train = train
        self.valid = valid

    def __iter__(self) -> Iterator[Any]:
        return iter((self.train, self.valid))

    def __repr__(self) -> str:
        return f"DataLoaders(train={self.train!r}, valid={self.valid!r})"

    @classmethod
    def from_tensors(cls, train: Sequence[torch.Tensor],
                     valid: Sequence[torch.Tensor] | None = None,
                     batch_size: int = 64, shuffle: bool = True, drop_last: bool = False,
                     generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> DataLoaders:
        """TensorLoaders over `(x, y)` tuples of tensors: training shuffled, validation in order.

        `device` moves the tensors there once, so batches need no copy each step.
        Example: `DataLoaders.from_tensors((x_train, y_train), (x_valid, y_valid), batch_size=64)`
        """
        def prepare(ts: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, ...]:
            ts = (ts,) if isinstance(ts, torch.Tensor) else tuple(ts)
            return tuple(t.to(device) for t in ts) if device is not None else ts

        train_dl = TensorLoader(prepare(train), batch_size, shuffle=shuffle, drop_last=drop_last,
                                generator=generator)
        valid_dl = None
        if valid is not None:
            valid_dl = TensorLoader(prepare(valid), batch_size * 2, shuffle=False)
        return cls(train_dl, valid_dl)

    @classmethod
    def from_dd(cls, dataset_dict: Any, batch_size: int, shuffle: bool = True,
                as_tuple: bool = True, **kwargs: Any) -> DataLoaders:
        """torch DataLoaders over a Hugging Face `DatasetDict`: its 'train' split (shuffled) and
        its 'validation', 'valid' or 'test' split (in order).

        Rows are collated into tuples in column order by `collate_dict(split)` (`as_tuple=False`
        keeps dicts). A split with no format is read as torch tensors (`with_format('torch')`);
        one with a transform or another format is used as it is. `kwargs` go to
        `torch.utils.data.DataLoader` (e.g. `num_workers`, or `collate_fn` to collate your way).
        Example: `DataLoaders.from_dd(dd.with_format('torch'), batch_size=64)`
        """
        names = list(dataset_dict.keys())
        train_name = "train" if "train" in names else None
        valid_name = next((n for n in ("validation", "valid", "test") if n in names), None)
        if train_name is None or valid_name is None:
            raise ValueError(f"from_dd needs a 'train' and a 'validation' (or 'valid'/'test') "
                             f"split, got splits {names}")
        def loader(ds: Any, shuffle: bool) -> DataLoader:
            if getattr(ds, "format", {}).get("type") is None and hasattr(ds, "with_format"):
                ds = ds.with_format("torch")  # rows of Python lists would collate wrongly
            opts = dict(kwargs)
            if "collate_fn" not in opts:
                opts["collate_fn"] = collate_dict(ds) if as_tuple else default_collate
            return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, **opts)

        return cls(loader(dataset_dict[train_name], shuffle),
                   loader(dataset_dict[valid_name], False))

    @classmethod
    def from_folder(cls, path: str | Path, train: str = "train", valid: str = "valid",
                    valid_pct: float | None = None, bs: int = 64, size: Any = None,
                    num_workers: int | None = None, seed: int | None = None, mode: str = "RGB",
                    skip_bad: bool = False, **kwargs: Any) -> DataLoaders:
        """Image DataLoaders from a folder: label = parent folder name; split by grand-parent
        folder (`path/train/...`, `path/valid/...`) or, with `valid_pct`, at random (seeded).

        Images are converted to `mode` and resized to `size`; loading runs in `num_workers`
        processes (default: the cores available, at most 8) that persist across epochs, with
        pinned memory when CUDA is there. `seed` fixes the split and the shuffling; `kwargs`
        go to torch's DataLoader. Example: `DataLoaders.from_folder("mnist_png", size=28)`
        """
        return cls(*folder_loaders(path, train, valid, valid_pct, bs, size, num_workers, seed,
                                   mode, skip_bad, **kwargs))

    @property
    def vocab(self) -> list[str] | None:
        """The class names of the training data, when it has them (e.g. from_folder)."""
        return getattr(getattr(self.train, "dataset", None), "vocab", None)

    def stats(self, n_batches: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the inputs of the first `n_batches` training batches."""
        xs = []
        for i, batch in enumerate(self.train):
            if i >= n_batches:
                break
            xs.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
        x = torch.cat(xs)
        dims = [d for d in range(x.ndim) if d != 1]
        return x.mean(dims), x.std(dims)

    def show_batch(self, n: int = 16, ncols: int | None = None, path: str | Path | None = None):
        """A grid of the first `n` training images with their labels; returns the Figure,
        saved to `path` if given. In a notebook it shows once, inline."""
        xb, yb = next(iter(self.train))[:2]
        vocab = self.vocab
        titles = [vocab[int(y)] if vocab else str(int(y)) for y in yb[:n]]
        return show_images(xb[:n], titles, ncols, path)
