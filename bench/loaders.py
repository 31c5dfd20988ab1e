"""TensorLoader vs torch's DataLoader over a TensorDataset, per batch (a benchmark, not a test).

Two cases, both shuffled, batch 64: rows of 32 features (20,000 rows) and 1x28x28 images
(20,000 images). Interleaved repeats; prints median microseconds per batch and the speed-up.

    python bench/loaders.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from nanofit import TensorLoader


def time_pass(loader) -> float:
    start, n = time.perf_counter(), 0
    for _ in loader:
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    cases = {"32 features": (20_000, 32), "1x28x28 images": (20_000, 1, 28, 28)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 64, shuffled")
    for name, shape in cases.items():
        x = torch.randn(*shape, generator=gen)
        y = torch.randint(0, 10, (shape[0],), generator=gen)
        loaders = {"DataLoader": DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True),
                   "TensorLoader": TensorLoader((x, y), batch_size=64, shuffle=True)}
        times: dict[str, list[float]] = {k: [] for k in loaders}
        for _ in range(args.repeats):
            for k, dl in loaders.items():
                times[k].append(time_pass(dl))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name:>15}: DataLoader {med['DataLoader']:7.1f} us/batch, "
              f"TensorLoader {med['TensorLoader']:6.1f} us/batch, "
              f"TensorLoader is {med['DataLoader'] / med['TensorLoader']:.1f}x faster")


if __name__ == "__main__":
    main()
