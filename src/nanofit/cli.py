"""`nanofit demo` and friends: thin wrappers that use the library as a user would."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .augment import Normalize
from .callbacks import (
    DDPCB,
    ActivationStats,
    BatchTransformCB,
    DeviceCB,
    MetricsCB,
    ProgressCB,
    Recorder,
)
from .data import DataLoaders
from .distributed import is_rank0, torchrun_env
from .learner import Learner
from .lm_demo import STEPS, VALID_EVERY, run_lm_demo
from .models import simple_cnn

__all__ = ["main", "digits_dls", "demo_model"]


def digits_dls(batch_size: int = 64, seed: int = 0, valid_pct: float = 0.2):
    """scikit-learn's bundled 8x8 digits as normalised image DataLoaders (no download)."""
    from sklearn.datasets import load_digits  # heavy: only when the demo runs

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_valid = int(len(x) * valid_pct)
    valid_idx, train_idx = perm[:n_valid], perm[n_valid:]
    mean, std = x[train_idx].mean(), x[train_idx].std()  # statistics of the training split only
    x = (x - mean) / std
    return DataLoaders.from_tensors((x[train_idx], y[train_idx]), (x[valid_idx], y[valid_idx]),
                                    batch_size=batch_size, generator=gen)


def demo_model():
    """A small CNN for 1x8x8 images and 10 classes."""
    def block(ni: int, nf: int, stride: int) -> list:
        return [nn.Conv2d(ni, nf, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(nf),
                nn.ReLU()]

    return nn.Sequential(*block(1, 16, 1), *block(16, 32, 2), *block(32, 64, 2),  # 8 -> 4 -> 2
                         nn.Flatten(), nn.Linear(64 * 2 * 2, 10))


def folder_dls(data: Path, bs: int, seed: int, size: int):
    """An image folder as DataLoaders: split by its train/valid folders if it has them,
    else 20% at random."""
    by_folder = (data / "train").is_dir() and (data / "valid").is_dir()
    return DataLoaders.from_folder(data, valid_pct=None if by_folder else 0.2, bs=bs, size=size,
                                   seed=seed)


def run_demo(epochs: int, lr: float | None, bs: int, seed: int, out: Path,
             diagnose: bool = False, data: Path | None = None, size: int = 32) -> float:
    """Train the demo CNN on digits (or an image folder `data`, resized to `size`): lr_find
    (unless `lr` is given), then fit_one_cycle.

    Prints the epochs, saves loss.png, lr_find.png and schedule.png into `out`, and returns
    the final validation accuracy. `diagnose` also records activation statistics of every
    ReLU and saves stats.png, color_dim.png and dead_chart.png.
    """
    say = print if is_rank0() else (lambda *a, **k: None)  # under torchrun, rank 0 talks
    torch.manual_seed(seed)
    cbs: list[Any] = [DDPCB()] if torchrun_env() else []
    cbs.append(DeviceCB())
    if data is None:
        dls, n_classes, model = digits_dls(bs, seed), 10, demo_model()
        say(f"nanofit demo: a small CNN on scikit-learn's 8x8 digits "
              f"({len(dls.train.tensors[0])} train, {len(dls.valid.tensors[0])} valid images)")
    else:
        dls = folder_dls(data, bs, seed, size)
        n_classes = len(dls.vocab)
        model = simple_cnn(3, n_classes, nfs=(16, 32, 64, 128))
        cbs.append(BatchTransformCB(Normalize(*dls.stats(n_batches=4))))
        say(f"nanofit demo: a small CNN on {str(data)!r} ({len(dls.train.dataset)} train, "
              f"{len(dls.valid.dataset)} valid images, {n_classes} classes, {size}x{size})")
    recorder = Recorder()
    metrics = MetricsCB(accuracy=MulticlassAccuracy(num_classes=n_classes, average="micro"))
    learn = Learner(model, dls, F.cross_entropy, opt_func=partial(torch.optim.SGD, momentum=0.9),
                    cbs=[*cbs, metrics, recorder, ProgressCB()])
    if lr is None:
        suggestion = learn.lr_find(plot=is_rank0(), plot_path=str(out / "lr_find.png"))
        lr = suggestion.valley
        say(f"lr_find suggests {lr:.2e} (valley); curve: {out / 'lr_find.png'}")
    stats = [ActivationStats(nn.ReLU)] if diagnose else []
    start = time.monotonic()
    learn.fit_one_cycle(epochs, lr, cbs=stats)
    seconds = time.monotonic() - start
    if is_rank0():
        recorder.plot_loss(path=out / "loss.png")
        recorder.plot_sched(path=out / "schedule.png")
    accuracy = metrics.history[-1]["accuracy"]
    say(f"validation accuracy {accuracy:.4f} after {epochs} epochs of fit_one_cycle "
          f"(lr_max {lr:.2e}) in {seconds:.1f}s")
    say(f"plots: {out / 'loss.png'}, {out / 'schedule.png'}")
    if diagnose and is_rank0():
        stats[0].plot_stats(path=out / "stats.png")
        stats[0].color_dim(path=out / "color_dim.png")
        stats[0].dead_chart(path=out / "dead_chart.png")
        say(f"activation plots: {out / 'stats.png'}, {out / 'color_dim.png'}, "
              f"{out / 'dead_chart.png'}")
    return accuracy


def _launch(nproc: int, argv: Sequence[str]) -> int:
    """Run this same command on `nproc` local processes with torchrun (gloo on CPU)."""
    rest, skip = [], False
    for a in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "nanofit", *rest]
    return subprocess.call(cmd)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value gives one line on stderr, not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number ({kind.__name__}), "
                                             f"got {text!r}") from None
        if not 0 < value < float("inf"):  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {text!r}")
    return value


def _version() -> str:
    try:
        return version("nanofit")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nanofit", description="nanofit: a small, fast training loop for PyTorch")
    parser.add_argument("--version", action="version", version=f"nanofit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn's bundled digits "
                          "(or, `demo lm`, a character-level transformer on Python's docs)",
                          description="Train a small CNN on scikit-learn's bundled 8x8 digits; "
                          "`nanofit demo lm` trains a character-level transformer instead (see "
                          "`nanofit demo lm --help`).")
    demo.add_argument("--epochs", type=_positive(int), default=8)
    demo.add_argument("--lr", type=_positive(float), default=None,
                      help="peak learning rate of the one-cycle schedule (default: lr_find's)")
    demo.add_argument("--bs", type=_positive(int), default=64, help="batch size")
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--out", type=Path, default=Path("nanofit_demo"),
                      help="folder for the plots (created if needed)")
    demo.add_argument("--data", type=Path, default=None,
                      help="train on an image folder instead (label = parent folder; split by "
                           "its train/ and valid/ folders, else 20%% at random)")
    demo.add_argument("--size", type=_positive(int), default=32,
                      help="image size for --data (default 32)")
    demo.add_argument("--nproc", type=_positive(int), default=1,
                      help="train data-parallel on this many local processes (torchrun, gloo on "
                           "CPU); --bs is per process")
    demo.add_argument("--diagnose", action="store_true",
                      help="also record activation statistics and plot them")
    tasks = demo.add_subparsers(dest="task", title="other demos", metavar="{lm}",
                                parser_class=_Parser)
    lm = tasks.add_parser(
        "lm", help="train a small character-level causal transformer by steps on the English "
        "text of Python's help topics (pydoc_data.topics, no download); under a minute on 2 "
        "CPU cores; its flags: nanofit demo lm --help",
        description="Train a small character-level causal transformer on the English text of "
        "Python's help topics (pydoc_data.topics, no download) with fit_one_cycle(steps=..., "
        "valid_every=...), a streaming training loader and checkpoints in --out. Prints per "
        "round the validation loss in nats per character next to the unigram baseline (the "
        "entropy of the character frequencies), then a generated sample. Ctrl-C saves a "
        "checkpoint; --resume continues from it.")
    lm.add_argument("--steps", type=_positive(int), default=STEPS,
                    help=f"training batches (default {STEPS})")
    lm.add_argument("--valid-every", type=_positive(int), default=VALID_EVERY,
                    help=f"validate after every this many training batches (default "
                         f"{VALID_EVERY})")
    lm.add_argument("--seed", type=_seed, default=0)
    lm.add_argument("--out", type=Path, default=Path("nanofit_lm"),
                    help="checkpoint folder (default nanofit_lm/)")
    lm.add_argument("--resume", action="store_true",
                    help="continue the interrupted run in --out from its newest checkpoint "
                         "(give the same --steps, --valid-every and --seed)")
    return parser


def _made_out(out: Path, who: str) -> bool:
    """Create the --out folder, or say in one line why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        return True
    except OSError as e:
        print(f"{who}: error: cannot create --out folder {str(out)!r}: {e.strerror}",
              file=sys.stderr)
        return False


def _lm_demo(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> int:
    """`nanofit demo lm`: its flags come after `lm`; the digits demo's flags do not apply."""
    if argv[argv.index("demo") + 1] != "lm":
        parser.error("`nanofit demo lm` takes its flags after `lm` (the digits demo's flags "
                     f"do not apply to it): nanofit demo lm --steps {STEPS}")
    if not _made_out(args.out, "nanofit demo lm"):
        return 2
    try:
        run_lm_demo(args.steps, args.valid_every, args.seed, args.out, args.resume)
    except ValueError as e:
        if not args.resume:
            raise
        # e.g. the run in --out is complete, or comes from other settings: say so in one line
        print(f"nanofit demo lm: error: cannot --resume from {str(args.out)!r}: {e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        why = str(e) or "stopped at once (the newest checkpoint in --out is kept)"
        print(f"nanofit demo lm: {why}; continue with: nanofit demo lm --resume "
              f"--out {args.out} (and the same --steps, --valid-every, --seed)", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nanofit` command."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "demo" and args.task == "lm":
        return _lm_demo(parser, argv, args)
    if args.command == "demo" and args.nproc > 1:
        if not torchrun_env():
            return _launch(args.nproc, argv)
    if args.command == "demo":
        if not _made_out(args.out, "nanofit demo"):
            return 2
        if args.data is not None and not args.data.is_dir():
            print(f"nanofit demo: error: --data {str(args.data)!r} is not a folder",
                  file=sys.stderr)
            return 2
        run_demo(args.epochs, args.lr, args.bs, args.seed, args.out, args.diagnose, args.data,
                 args.size)
    return 0
