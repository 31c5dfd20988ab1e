"""Can you train at what lr_find suggests? (a benchmark, not a test)

For many seeds and three setups on scikit-learn's bundled 8x8 digits (the demo's data and CNN):

- fresh:     a new model, SGD with momentum 0.9 (as `nanofit demo`);
- after_fit: the same after `fit_one_cycle(1, 0.1)` (~90-97% accuracy: a flat, noisy curve);
- adam:      a new model, Adam.

it runs `lr_find`, then `fit_one_cycle(2, suggestion)` from the state lr_find started from, for
the suggestions of today's rules and of the old ones (the lowest smoothed loss anywhere, no
warning), computed from the same curve. A suggestion *trains well* when that fit reaches
>= 90% validation accuracy and lowers the validation loss by at least 20% (after a fit the
model is at ~95% already, so accuracy alone cannot tell a rate that trains nothing).

    python bench/lr_find_seeds.py [--seeds 20] [--threads 1]

Takes about 30 s on 2 CPU cores (one thread: 2 threads on 2 busy cores is slower).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from nanofit import Learner, MetricsCB
from nanofit.callbacks.lr_find import HEAD
from nanofit.cli import demo_model, digits_dls

SETUPS = ("fresh", "after_fit", "adam")
RULES = ("valley", "minimum")


# ---- the rules before this change, verbatim (on the curve cut where the old finder stopped) ----
def old_usable(lrs: Sequence[float], losses: Sequence[float], max_mult: float = 4.0):
    out_lrs, out_losses, lowest = [], [], math.inf
    for lr, loss in zip(lrs, losses):
        if not math.isfinite(loss) or loss > max_mult * lowest:
            break
        out_lrs.append(lr)
        out_losses.append(loss)
        lowest = min(lowest, loss)
    return out_lrs, out_losses


def old_minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    i = min(range(len(losses)), key=losses.__getitem__)
    return lrs[i] / 10


def old_valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    low = min(range(len(losses)), key=losses.__getitem__)
    before = sorted(losses[: low + 1])
    plateau = before[int(0.9 * (len(before) - 1))]
    drop = plateau - losses[low]
    if drop <= 0:
        return lrs[low]
    start = max(i for i in range(low + 1) if losses[i] >= losses[low] + 0.9 * drop)
    return math.sqrt(lrs[start] * lrs[low])


# ---- one seed of one setup ---------------------------------------------------------------------
def make_learner(setup: str, seed: int) -> tuple[Learner, MetricsCB]:
    torch.manual_seed(seed)
    opt = torch.optim.Adam if setup == "adam" else partial(torch.optim.SGD, momentum=0.9)
    metrics = MetricsCB(accuracy=MulticlassAccuracy(10, average="micro"))
    learn = Learner(demo_model(), digits_dls(64, seed), F.cross_entropy, opt_func=opt,
                    cbs=[metrics])
    return learn, metrics


def valid_loss_now(learn: Learner, metrics: MetricsCB) -> float:
    learn.fit(1, train=False)
    return metrics.history[-1]["loss"]


def run_one(setup: str, seed: int, epochs: int) -> dict:
    learn, metrics = make_learner(setup, seed)
    if setup == "after_fit":
        learn.fit_one_cycle(1, 0.1)
    start_loss = valid_loss_now(learn, metrics)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = learn.lr_find(plot=False, suggest=RULES)
    finder = learn.lr_finder
    old_lrs, old_losses = old_usable(finder.lrs, finder.losses)
    found = {("new", "valley"): new.valley, ("new", "minimum"): new.minimum,
             ("old", "valley"): old_valley(old_lrs, old_losses),
             ("old", "minimum"): old_minimum(old_lrs, old_losses)}
    # Each suggestion trains from the same state: weights, optimizer, RNGs, loader order.
    saved = (copy.deepcopy(learn.model.state_dict()),
             None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()),
             torch.get_rng_state(), learn.dls.train.generator.get_state())
    trained: dict[float, tuple[float, float]] = {}
    for lr in sorted(set(found.values())):
        weights, opt_state, rng, loader_rng = saved
        learn.model.load_state_dict(weights)
        if opt_state is None:
            learn.opt = None
        else:
            learn.opt.load_state_dict(opt_state)
        torch.set_rng_state(rng)
        learn.dls.train.generator.set_state(loader_rng)
        learn.fit_one_cycle(epochs, lr)
        trained[lr] = (metrics.history[-1]["accuracy"], metrics.history[-1]["loss"])
    lrs = finder.lrs
    head_end = lrs[math.ceil(HEAD * len(lrs))]  # the first 5% of the sweep
    return {"warned": any("no clear descent" in str(w.message) for w in caught),
            "results": {key: {"lr": lr, "acc": trained[lr][0],
                              "good": trained[lr][0] >= 0.9 and trained[lr][1] <= 0.8 * start_loss,
                              "in_head": lr < head_end, "outside": not lrs[0] <= lr <= lrs[-1]}
                        for key, lr in found.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2, help="fit_one_cycle epochs to judge by")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    print(f"lr_find on digits, {args.seeds} seeds per setup; 'trains well': fit_one_cycle("
          f"{args.epochs}, lr) reaches >= 90% validation accuracy and lowers the validation "
          "loss by >= 20%")
    print(f"{'setup':10} {'rule':12} {'median lr':>9} {'lr range':>19} {'head/out':>8} "
          f"{'trains well':>11} {'median acc':>10} {'warned':>7}")
    for setup in SETUPS:
        runs = [run_one(setup, seed, args.epochs) for seed in range(args.seeds)]
        warned = sum(r["warned"] for r in runs)
        for version in ("old", "new"):
            for rule in RULES:
                res = [r["results"][(version, rule)] for r in runs]
                lrs = sorted(x["lr"] for x in res)
                bad_place = sum(x["in_head"] or x["outside"] for x in res)
                good = sum(x["good"] for x in res)
                print(f"{setup:10} {version + ' ' + rule:12} {statistics.median(lrs):9.1e} "
                      f"{lrs[0]:9.1e}..{lrs[-1]:8.1e} {bad_place:>8} {good:>5}/{len(res):<5} "
                      f"{statistics.median(x['acc'] for x in res):10.3f} "
                      f"{(str(warned) if version == 'new' else '-'):>7}")
    print(f"({time.monotonic() - started:.0f}s; 'head/out': suggestions in the first "
          f"{HEAD:.0%} of the sweep or outside it; 'warned': lr_find warned of no clear descent)")


if __name__ == "__main__":
    main()
