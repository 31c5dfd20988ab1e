"""Images from folders: ImageFolder, the folder split for DataLoaders.from_folder, and grids of
images (show_images; show_image, subplots and get_grid are in plots.py).
PIL is imported when the first image is read."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .plots import as_image_array, get_grid, grid_shape, save_figure, show_image

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "image_files", "folder_loaders", "show_images",
           "default_workers"]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(path: str | Path) -> list[Path]:
    """Every image file under `path`, recursively and through symlinks, in a stable (sorted)
    order. A symlink back to a folder on its own path (a loop) is not followed."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {str(path)!r} does not exist or is not a folder")
    # the real folders on the way down to each folder: a link to one of them is a loop
    ancestors = {str(path): {os.path.realpath(path)}}
    files: list[Path] = []
    for folder, subfolders, names in os.walk(path, followlinks=True):
        above = ancestors.pop(folder)
        keep = []
        for name in subfolders:
            real = os.path.realpath(os.path.join(folder, name))
            if real not in above:
                keep.append(name)
                ancestors[os.path.join(folder, name)] = above | {real}
        subfolders[:] = keep
        files += [Path(folder, n) for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(f for f in files if f.is_file())


class ImageFolder(Dataset):
    """Images found under `path` (or the given `files`), labelled by their parent folder name.

    Items are `(image, label)`: a float tensor in [0, 1], channels first, converted to `mode`
    ('RGB', 'L', ...) and resized to `size` (an int for squares, or (height, width)); the label
    is an index into `vocab`, the sorted class names (`o2i` maps back). A file that cannot be
    read raises an error naming it; `skip_bad=True` checks every file up front and leaves out
    the unreadable ones with a warning.
    """

    def __init__(self, path: str | Path, size: int | tuple[int, int] | None = None,
                 mode: str = "RGB", files: Sequence[str | Path] | None = None,
                 skip_bad: bool = False, vocab: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.files = [Path(f) for f in files] if files is not None else image_files(self.path)
        self.size = (size, size) if isinstance(size, int) else size
        self.mode = mode
        if skip_bad:  # each file read in full by load: PIL's verify() misses truncated data
            bad = [f for f in self.files if not self._loads(f)]
            if bad:
                warnings.warn(f"ImageFolder: skipping {len(bad)} unreadable file(s): "
                              f"{', '.join(str(f) for f in bad[:5])}"
                              f"{' ...' if len(bad) > 5 else ''}")
                skipped = set(bad)
                self.files = [f for f in self.files if f not in skipped]
        if not self.files:
            raise ValueError(f"ImageFolder found no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                             f"under {str(self.path)!r}")
        found = sorted({f.parent.name for f in self.files})
        self.vocab = list(vocab) if vocab is not None else found
        self.o2i = {name: i for i, name in enumerate(self.vocab)}
        unknown = sorted({f.parent.name for f in self.files} - set(self.o2i))
        if unknown:
            raise ValueError(f"ImageFolder: classes {unknown} are not in the vocab {self.vocab}")
        self.labels = [self.o2i[f.parent.name] for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, file: Path) -> torch.Tensor:
        """One image file as a (channels, height, width) float tensor in [0, 1]."""
        from PIL import Image

        try:
            with Image.open(file) as opened:
                im = opened.convert(self.mode)
                if self.size is not None:
                    im = im.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:
            raise ValueError(f"cannot read image {str(file)!r}: {type(e).__name__}: {e}; remove "
                             "the file or pass skip_bad=True") from None
        t = torch.from_numpy(arr.copy())
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        return t.float().div_(255)

    def _loads(self, file: Path) -> bool:
        try:
            self.load(file)
            return True
        except Exception:  # whatever load (or a subclass's) fails on
            return False

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load(self.files[i]), self.labels[i]

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.path)!r}, {len(self)} images, {len(self.vocab)} classes)"


def default_workers() -> int:
    """Worker processes for image loading: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _split(files: list[Path], root: Path, train: str, valid: str, valid_pct: float | None,
           seed: int | None) -> tuple[list[Path], list[Path]]:
    if valid_pct is None:  # by grand-parent: root/train/<class>/x.png, root/valid/<class>/y.png
        top = {f: f.relative_to(root).parts[0] for f in files}
        tr = [f for f in files if top[f] == train]
        va = [f for f in files if top[f] == valid]
        if not tr or not va:
            found = sorted(set(top.values()))
            raise ValueError(f"from_folder: expected images under {str(root / train)!r} and "
                             f"{str(root / valid)!r} (label = parent folder); the top folders are "
                             f"{found}. Name them with train=/valid=, or split at random with "
                             "valid_pct=0.2")
        return tr, va
    if not 0 < valid_pct < 1:
        raise ValueError(f"from_folder: valid_pct must be between 0 and 1, got {valid_pct}")
    gen = torch.Generator().manual_seed(seed if seed is not None else 0)
    perm = torch.randperm(len(files), generator=gen).tolist()
    n_valid = max(1, int(round(len(files) * valid_pct)))
    valid_set = set(perm[:n_valid])
    return ([f for i, f in enumerate(files) if i not in valid_set],
            [f for i, f in enumerate(files) if i in valid_set])


def _collate_same_size(batch: list) -> Any:
    """torch's default collate, with the fix named when images differ in size."""
    try:
        return default_collate(batch)
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" in str(e):
            raise ValueError(f"the images of a batch differ in size ({e}); pass size= to "
                             "from_folder to resize them all") from None
        raise


def folder_loaders(path: str | Path, train: str = "train", valid: str = "valid",
                   valid_pct: float | None = None, bs: int = 64,
                   size: int | tuple[int, int] | None = None, num_workers: int | None = None,
                   seed: int | None = None, mode: str = "RGB", skip_bad: bool = False,
                   **kwargs: Any) -> tuple[DataLoader, DataLoader]:
    """The train and valid DataLoaders of `DataLoaders.from_folder` (see there)."""
    root = Path(path)
    everything = ImageFolder(root, size, mode, skip_bad=skip_bad)
    tr, va = _split(everything.files, root, train, valid, valid_pct, seed)
    vocab = sorted({f.parent.name for f in tr + va})
    train_ds = ImageFolder(root, size, mode, files=tr, vocab=vocab)
    valid_ds = ImageFolder(root, size, mode, files=va, vocab=vocab)
    workers = default_workers() if num_workers is None else num_workers
    opts = {"num_workers": workers, "pin_memory": torch.cuda.is_available(),
            "persistent_workers": workers > 0, **kwargs}
    opts.setdefault("collate_fn", _collate_same_size)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return (DataLoader(train_ds, batch_size=bs, shuffle=True, generator=gen, **opts),
            DataLoader(valid_ds, batch_size=bs, shuffle=False, **opts))


def show_images(ims: Sequence[Any] | torch.Tensor, titles: Sequence[Any] | None = None,
                ncols: int | None = None, path: str | Path | None = None,
                size: float | None = None, *, nrows: int | None = None,
                imsize: float | None = None, **kwargs: Any):
    """A grid of images (CHW or HW tensors, numpy arrays, PIL images) with optional titles;
    returns the Figure, saves it to `path` if given, and in a notebook shows it when the cell
    ends. Float images are shown as values in [0, 1] (clamped), one channel in gray.

    `imsize` (the course's name) or `size` is each image's side in inches (default 1.6);
    `nrows`/`ncols` shape the grid as in `get_grid` and `kwargs` go there too (`title`,
    `suptitle`, `figsize`, ...). The course's positional order,
    `show_images(ims, nrows, ncols, titles)`, works too: an int second argument is `nrows`.
    Example: `show_images(xb[:16], imsize=1.5, titles=[vocab[y] for y in yb[:16]])`
    """
    if isinstance(titles, int) and not isinstance(titles, bool):  # the course's positions
        nrows, titles = titles, None
        if isinstance(path, (list, tuple)):
            titles, path = path, None
    if imsize is not None and size is not None and imsize != size:
        raise ValueError(f"show_images: give imsize= or size= (the same thing), got {imsize} "
                         f"and {size}")
    side = imsize if imsize is not None else size if size is not None else 1.6
    ims = list(ims)
    n = len(ims)
    if titles is not None and len(titles) < n:
        raise ValueError(f"show_images got {n} images but {len(titles)} titles")
    if n == 0:
        raise ValueError("show_images got no images")
    nrows, ncols = grid_shape(n, nrows, ncols)
    if "figsize" not in kwargs:  # with room for the titles, small at this image size
        kwargs["figsize"] = (side * ncols, side * nrows + (0.3 * nrows if titles else 0))
    fig, axs = get_grid(n, nrows, ncols, **kwargs)
    for i, (im, ax) in enumerate(zip(ims, axs.flat)):
        arr = as_image_array(im)
        opts: dict[str, Any] = {"cmap": "gray"} if arr.ndim == 2 else {}
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.clip(0, 1)
            opts.update(vmin=0, vmax=1)
        elif arr.ndim == 2 and arr.dtype == np.uint8:
            opts.update(vmin=0, vmax=255)
        show_image(arr, ax=ax, **opts)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)
