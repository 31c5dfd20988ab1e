"""How much does the Learner cost over a hand-written loop on a GPU? (a benchmark, not a test)

Times, interleaved in one run, a raw PyTorch loop and a `Learner` with DeviceCB,
MetricsCB(accuracy) and ProgressCB (writing to a StringIO) on a small CNN (two stride-2 convs,
1x28x28 synthetic images, 10 classes, batch 64, SGD), over the same TensorLoaders (data on the
device by default). Both compute the same numbers (loss and accuracy of each phase, kept on the
device and read once per phase). A second pair runs mixed precision: MixedPrecision (fp16 +
GradScaler on CUDA, bf16 on CPU) vs torch.autocast (+ a GradScaler on CUDA) by hand.
Prints milliseconds per batch (medians over repeats, CUDA synchronised around each timing)
and the ratios nanofit / raw; the last lines are `RATIO <name> <value>` for scripts.

    python bench/overhead_gpu.py                       # cuda if available
    python bench/overhead_gpu.py --device cpu --repeats 1 --n-train 1280 --n-valid 256
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

from nanofit import (
    DataLoaders,
    DeviceCB,
    Learner,
    MetricsCB,
    MixedPrecision,
    ProgressCB,
    TensorLoader,
)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),   # 16 x 14 x 14
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # 32 x 7 x 7
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def make_loaders(n_train: int, n_valid: int, bs: int, data_device: torch.device) -> DataLoaders:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_valid, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n_train + n_valid,), generator=g)
    x, y = x.to(data_device), y.to(data_device)
    return DataLoaders(
        TensorLoader((x[:n_train], y[:n_train]), bs, shuffle=True,
                     generator=torch.Generator().manual_seed(1)),
        TensorLoader((x[n_train:], y[n_train:]), bs * 2))


def raw_fit(model, opt, dls, epochs, device, amp_dtype, scaler, out) -> None:
    """The loop a careful user writes: same metrics, accumulated on the device, read per phase."""
    non_blocking = device.type == "cuda"
    for epoch in range(epochs):
        for training, dl in ((True, dls.train), (False, dls.valid)):
            model.train(training)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            count = 0
            with torch.set_grad_enabled(training):
                for xb, yb in dl:
                    xb = xb.to(device, non_blocking=non_blocking)
                    yb = yb.to(device, non_blocking=non_blocking)
                    with torch.autocast(device.type, dtype=amp_dtype,
                                        enabled=amp_dtype is not None):
                        preds = model(xb)
                        loss = F.cross_entropy(preds, yb)
                    if training:
                        if scaler is not None:
                            scaler.scale(loss).backward()
                            scaler.step(opt)
                            scaler.update()
                        else:
                            loss.backward()
                            opt.step()
                        opt.zero_grad()
                    n = len(yb)
                    loss_sum += loss.detach().float() * n
                    correct += (preds.detach().argmax(1) == yb).sum()
                    count += n
            print(epoch, "train" if training else "eval", (loss_sum / count).item(),
                  (correct / count).item(), file=out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(title: str, times: dict[str, list[float]], base: str, other: str) -> float:
    print(title)
    med = {name: statistics.median(times[name]) for name in (base, other)}
    for name in (base, other):
        ts = times[name]
        print(f"  {name:>16}: median {med[name]:8.4f} ms/batch  "
              f"(min {min(ts):.4f}, max {max(ts):.4f})")
    pairwise = statistics.median(n / r for n, r in zip(times[other], times[base]))
    ratio = med[other] / med[base]
    print(f"  ratio {other} / {base}: {ratio:.3f} (median of per-repeat ratios {pairwise:.3f})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-on", choices=["device", "cpu"], default="device",
                        help="where the tensors live: on the device, or on the CPU (then moved "
                             "per batch: DeviceCB in nanofit, .to() in the raw loop)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=12_800)
    parser.add_argument("--n-valid", type=int, default=2_560)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--no-amp", action="store_true", help="skip the mixed-precision pair")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    data_device = device if args.data_on == "device" else torch.device("cpu")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    dls = make_loaders(args.n_train, args.n_valid, args.bs, data_device)
    n_batches = (len(dls.train) + len(dls.valid)) * args.epochs
    sink = io.StringIO()  # not a terminal: ProgressCB prints one line per epoch, as in CI logs

    def learner(amp: bool) -> Learner:
        cbs = [DeviceCB(device), MetricsCB(accuracy=MulticlassAccuracy(10, average="micro")),
               ProgressCB(file=sink)]
        if amp:
            cbs.append(MixedPrecision())
        return Learner(make_model(1), dls, F.cross_entropy, lr=0.05, cbs=cbs)

    def raw(amp: bool):
        model = make_model(1).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
        dtype = amp_dtype if amp else None
        return lambda: raw_fit(model, opt, dls, args.epochs, device, dtype, scaler, sink)

    learn32, learn_amp = learner(False), learner(True)
    runs = {"raw loop": raw(False), "nanofit": lambda: learn32.fit(args.epochs)}
    if not args.no_amp:
        runs.update({"raw amp loop": raw(True), "nanofit amp": lambda: learn_amp.fit(args.epochs)})
    for run in runs.values():  # warm-up: allocator, cuDNN and first-call costs
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():  # interleaved, so drifts in machine speed hit all
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[name].append((time.perf_counter() - start) / n_batches * 1e3)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__} on {where}; data on {data_device}; {args.repeats} repeats; "
          f"{n_batches} batches per run ({len(dls.train)} train + {len(dls.valid)} valid) x "
          f"{args.epochs} epoch(s), batch {args.bs}")
    title = "fp32 (DeviceCB, MetricsCB(accuracy), ProgressCB vs the same by hand):"
    ratios = {"fp32": report(title, times, "raw loop", "nanofit")}
    if not args.no_amp:
        what = "fp16 + GradScaler" if device.type == "cuda" else "bf16 autocast"
        ratios["amp"] = report(f"mixed precision ({what}: MixedPrecision vs autocast by hand):",
                               times, "raw amp loop", "nanofit amp")
    for name, ratio in ratios.items():
        print(f"RATIO {name} {ratio:.3f}")


if __name__ == "__main__":
    main()
