"""How much does the Learner cost over a hand-written loop? (a benchmark, not a test)

Times, in one run and interleaved, a raw PyTorch loop and a `Learner` with DeviceCB,
MetricsCB(accuracy) and ProgressCB on a tiny MLP (32->64->10, 20,000 training and 5,000
validation samples, batch 64, SGD) over the same in-memory batches. Both compute the same
numbers (loss and accuracy of each phase, accumulated on the device, read once per phase), so
only the framework differs. Prints microseconds per batch, medians over repeats, and the ratio.
Then the same Learner as a step fit (`fit(steps=...)`, the same batches), and that step fit
with one more callback whose `after_batch` is `@every(1000)`: what step mode and a thinned
callback cost per batch.

    python bench/overhead.py [--repeats 9] [--epochs 1]
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from nanofit import Callback, DataLoaders, DeviceCB, Learner, MetricsCB, ProgressCB, every


class Rare(Callback):
    """A callback that runs on every 1000th training batch only."""

    def __init__(self) -> None:
        self.calls = 0

    @every(1000)
    def after_batch(self, learn: Learner) -> None:
        self.calls += 1


def make_batches(n: int, bs: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(n, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return [(x[i: i + bs], y[i: i + bs]) for i in range(0, n, bs)]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def raw_fit(model, opt, train, valid, epochs: int, out: io.StringIO) -> None:
    """The hand-written loop a careful user would write: same metrics, same device accumulation."""
    for epoch in range(epochs):
        for training, batches in ((True, train), (False, valid)):
            model.train(training)
            loss_sum, correct, count = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
            with torch.set_grad_enabled(training):
                for xb, yb in batches:
                    preds = model(xb)
                    loss = F.cross_entropy(preds, yb)
                    if training:
                        loss.backward()
                        opt.step()
                        opt.zero_grad()
                    n = len(yb)
                    loss_sum += loss.detach() * n
                    correct += (preds.detach().argmax(1) == yb).sum()
                    count += n
            print(epoch, "train" if training else "eval", (loss_sum / count).item(),
                  (correct / count).item(), file=out)


def raw_fit_bare(model, opt, train, valid, epochs: int) -> None:
    """The same loop with no metrics at all: isolates the cost of the event dispatch."""
    for _ in range(epochs):
        for training, batches in ((True, train), (False, valid)):
            model.train(training)
            with torch.set_grad_enabled(training):
                for xb, yb in batches:
                    loss = F.cross_entropy(model(xb), yb)
                    if training:
                        loss.backward()
                        opt.step()
                        opt.zero_grad()


def report(title: str, times: dict[str, list[float]], base: str, other: str) -> None:
    print(title)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name in (base, other):
        ts = times[name]
        print(f"  {name:>15}: median {med[name]:7.1f} us/batch  "
              f"(min {min(ts):.1f}, max {max(ts):.1f})")
    pairwise = statistics.median(n / r for n, r in zip(times[other], times[base]))
    print(f"  ratio {other} / {base}: {med[other] / med[base]:.3f} "
          f"(median of per-repeat ratios {pairwise:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    train, valid = make_batches(20_000, 64, gen), make_batches(5_000, 64, gen)
    n_batches = (len(train) + len(valid)) * args.epochs

    raw_model = make_model(1)
    raw_opt = torch.optim.SGD(raw_model.parameters(), lr=0.1)
    sink = io.StringIO()  # not a terminal: ProgressCB prints one line per epoch, as in CI logs
    learn = Learner(make_model(1), DataLoaders(train, valid), F.cross_entropy, lr=0.1,
                    cbs=[DeviceCB("cpu"),
                         MetricsCB(accuracy=MulticlassAccuracy(10, average="micro")),
                         ProgressCB(file=sink)])

    def metric_cbs() -> list:
        return [DeviceCB("cpu"), MetricsCB(accuracy=MulticlassAccuracy(10, average="micro")),
                ProgressCB(file=sink)]

    steps = Learner(make_model(1), DataLoaders(train, valid), F.cross_entropy, lr=0.1,
                    cbs=metric_cbs())
    rare = Learner(make_model(1), DataLoaders(train, valid), F.cross_entropy, lr=0.1,
                   cbs=[*metric_cbs(), Rare()])
    n_steps = len(train) * args.epochs
    bare_model = make_model(1)
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.1)
    bare = Learner(make_model(1), DataLoaders(train, valid), F.cross_entropy, lr=0.1)
    runs = {
        "raw loop": lambda: raw_fit(raw_model, raw_opt, train, valid, args.epochs, sink),
        "nanofit": lambda: learn.fit(args.epochs),
        "bare raw loop": lambda: raw_fit_bare(bare_model, bare_opt, train, valid, args.epochs),
        "bare Learner": lambda: bare.fit(args.epochs),
        "nanofit steps": lambda: steps.fit(steps=n_steps, valid_every=len(train)),
        "+ every(1000)": lambda: rare.fit(steps=n_steps, valid_every=len(train)),
    }
    for run in runs.values():  # warm-up: allocator, first-call costs
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():  # interleaved, so drifts in machine speed hit all
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / n_batches * 1e6)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats, "
          f"{n_batches} batches per run (train + valid)")
    report("with metrics (DeviceCB, MetricsCB(accuracy), ProgressCB vs the same numbers by hand):",
           times, "raw loop", "nanofit")
    report("bare (no callbacks vs no metrics): the cost of the loop and its dispatch alone:",
           times, "bare raw loop", "bare Learner")
    report("step mode: fit(steps=len(train) * epochs) vs fit(epochs), the same batches:",
           times, "nanofit", "nanofit steps")
    report("the step fit with one more callback, its after_batch @every(1000):",
           times, "nanofit steps", "+ every(1000)")
    report("step mode against the raw loop:", times, "raw loop", "nanofit steps")

if __name__ == "__main__":
    main()
