"""Images per second of DataLoaders.from_folder loading (a benchmark, not a test).

Writes N PNG images (scikit-learn's digits, upscaled to 28x28, 10 classes) into a temporary
folder, then times full passes over the training loader with 0 workers and with the default
number, resizing to 28x28 RGB. The second and later passes reuse the persistent workers.

    python bench/images.py [--n 3000] [--passes 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from nanofit import DataLoaders
from nanofit.images import default_workers


def write_folder(root: Path, n: int) -> None:
    digits = load_digits()
    for i in range(n):
        im, t = digits.images[i % len(digits.images)], digits.target[i % len(digits.images)]
        split = "valid" if i % 5 == 0 else "train"
        folder = root / split / str(t)
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((im * 16).clip(0, 255).astype(np.uint8)).resize((28, 28))
        img.save(folder / f"{i}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), args.n)
        print(f"{args.n} PNGs, batch 64, size 28, RGB; default workers here: {default_workers()}")
        for workers in (0, default_workers()):
            dls = DataLoaders.from_folder(tmp, bs=64, size=28, num_workers=workers, seed=0)
            n_images = len(dls.train.dataset)
            rates = []
            for _ in range(args.passes):
                start = time.perf_counter()
                for _batch in dls.train:
                    pass
                rates.append(n_images / (time.perf_counter() - start))
            print(f"num_workers={workers}: first pass {rates[0]:7.0f} images/s, "
                  f"median of later passes {statistics.median(rates[1:] or rates):7.0f} images/s")


if __name__ == "__main__":
    main()
