"""Image folders: ImageFolder, from_folder splits, workers, statistics, grids, demo --data."""
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from nanofit import BatchTransformCB, DataLoaders, ImageFolder, Learner, Normalize, show_images

# the corrupt file, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:ImageFolder. skipping")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 PNGs of digits 0, 1 and 2 in train/<class> and valid/<class>, plus one corrupt file."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    count = {}
    for im, t in zip(digits.images, digits.target):
        if t > 2 or count.get(t, 0) >= 14:
            continue
        count[t] = count.get(t, 0) + 1
        split = "valid" if count[t] % 4 == 0 else "train"
        path = root / split / ["zero", "one", "two"][t]
        path.mkdir(parents=True, exist_ok=True)
        Image.fromarray((im * 16).clip(0, 255).astype(np.uint8)).save(path / f"{t}_{count[t]}.png")
    (root / "train" / "two" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_labels_vocab_and_values(folder):
    ds = ImageFolder(folder / "valid", size=12, mode="L")
    assert ds.vocab == ["one", "two", "zero"] and ds.o2i["zero"] == 2
    x, y = ds[0]
    assert x.shape == (1, 12, 12) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert ds.vocab[y] == ds.files[0].parent.name
    rgb, _ = ImageFolder(folder / "valid", size=(6, 10))[0]
    assert rgb.shape == (3, 6, 10)


def test_corrupt_file_is_named_or_skipped(folder):
    ds = ImageFolder(folder / "train", size=8)
    bad = [i for i, f in enumerate(ds.files) if f.name == "broken.png"][0]
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png.*skip_bad=True"):
        ds[bad]
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable file\(s\): .*broken.png"):
        ok = ImageFolder(folder / "train", size=8, skip_bad=True)
    assert len(ok) == len(ds) - 1
    for i in range(len(ok)):
        ok[i]


def _noise(path, seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, fmt)


def _short_idat(path):
    """Half of a PNG's compressed data in a chunk with a correct length and CRC."""
    data = path.read_bytes()
    at = data.index(b"IDAT") - 4
    n = struct.unpack(">I", data[at:at + 4])[0]
    cut = data[at + 8:at + 8 + n // 2]
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + cut))
    chunk = struct.pack(">I", len(cut)) + b"IDAT" + cut + crc
    path.write_bytes(data[:at] + chunk + data[at + 12 + n:])


def test_truncated_jpeg_and_png_are_named_or_skipped(tmp_path):
    for i, cls in enumerate(["cat", "dog", "cat", "dog", "cat", "dog"]):
        (tmp_path / cls).mkdir(exist_ok=True)
        _noise(tmp_path / cls / f"{i}.jpg", i)
        _noise(tmp_path / cls / f"{i}.png", i)
    for name in ("cat/0.jpg", "dog/1.png"):  # the header kept, the image data cut
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:len(data) * 3 // 4])
    _short_idat(tmp_path / "cat" / "2.png")  # chunks intact, the compressed data short
    bad = ["cat/0.jpg", "cat/2.png", "dog/1.png"]
    ds = ImageFolder(tmp_path, size=8)
    names = [f.relative_to(tmp_path).as_posix() for f in ds.files]
    for name in bad:
        with pytest.raises(ValueError, match=rf"cannot read image .*{name}.*skip_bad=True"):
            ds[names.index(name)]
    with pytest.warns(UserWarning, match=r"skipping 3 unreadable file\(s\)"):
        ok = ImageFolder(tmp_path, size=8, skip_bad=True)
    assert [f.relative_to(tmp_path).as_posix() for f in ok.files] == sorted(set(names) - set(bad))
    assert all(x.shape == (3, 8, 8) for x, _ in ok)
    with pytest.warns(UserWarning, match=r"skipping 3 unreadable"):
        dls = DataLoaders.from_folder(tmp_path, valid_pct=0.3, seed=0, size=8, bs=4,
                                      num_workers=0, skip_bad=True)
    assert sum(len(xb) for dl in (dls.train, dls.valid) for xb, _ in dl) == 12 - 3


def _symlink(link, target):
    try:
        link.symlink_to(target, target_is_directory=target.is_dir())
    except OSError as e:  # e.g. Windows without the privilege
        pytest.skip(f"cannot make symlinks here: {e}")


def test_symlinked_class_folders_and_files_are_followed(tmp_path):
    stored = tmp_path / "stored"
    (stored / "cats").mkdir(parents=True)
    for i in range(2):
        _noise(stored / "cats" / f"{i}.png", i)
    _noise(stored / "extra_dog.png", 5)
    root = tmp_path / "data"
    (root / "dog").mkdir(parents=True)
    _noise(root / "dog" / "0.png", 9)
    _symlink(root / "cat", stored / "cats")
    _symlink(root / "dog" / "1.png", stored / "extra_dog.png")
    ds = ImageFolder(root, size=4)
    assert ds.vocab == ["cat", "dog"]
    assert [f.relative_to(root).as_posix() for f in ds.files] == [
        "cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert ds.labels == [0, 0, 1, 1]
    assert torch.equal(ds[1][0], ImageFolder(stored, size=4)[1][0])  # cats/1.png itself


def test_symlink_loops_end_and_each_image_appears_once(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    _noise(root / "a" / "0.png", 0)
    _symlink(root / "a" / "up", root)  # to an ancestor
    _symlink(root / "a" / "again", root / "a")  # to itself
    outside = tmp_path / "outside"
    outside.mkdir()
    _noise(outside / "1.png", 1)
    _symlink(root / "b", outside)
    _symlink(outside / "back", root)  # a loop through a linked folder
    ds = ImageFolder(root)
    assert ds.vocab == ["a", "b"]
    assert [f.relative_to(root).as_posix() for f in ds.files] == ["a/0.png", "b/1.png"]


def test_split_by_folder_and_by_percentage(folder):
    dls = DataLoaders.from_folder(folder, size=8, num_workers=0, skip_bad=True)
    train, valid = dls.train.dataset.files, dls.valid.dataset.files
    assert all(f.relative_to(folder).parts[0] == "train" for f in train)
    assert all(f.relative_to(folder).parts[0] == "valid" for f in valid)
    assert dls.vocab == ["one", "two", "zero"] and dls.valid.dataset.vocab == dls.vocab
    opts = dict(valid_pct=0.25, size=8, num_workers=0, skip_bad=True)
    a = DataLoaders.from_folder(folder, seed=3, **opts)
    b = DataLoaders.from_folder(folder, seed=3, **opts)
    c = DataLoaders.from_folder(folder, seed=4, **opts)
    ta, va = set(a.train.dataset.files), set(a.valid.dataset.files)
    assert not ta & va and len(ta | va) == len(train) + len(valid)  # disjoint, complete
    assert len(va) == round(len(ta | va) * 0.25)
    assert va == set(b.valid.dataset.files) and va != set(c.valid.dataset.files)
    with pytest.raises(ValueError, match="expected images under"):
        DataLoaders.from_folder(folder, train="training", num_workers=0)


def test_two_workers_give_the_same_items_as_none(folder):
    kw = dict(size=8, skip_bad=True, seed=0, bs=8)
    serial = DataLoaders.from_folder(folder, num_workers=0, **kw)
    parallel = DataLoaders.from_folder(folder, num_workers=2, **kw)
    assert parallel.train.num_workers == 2 and parallel.train.persistent_workers
    for a, b in zip(serial.valid, parallel.valid):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ordered = lambda dl: sorted((y.item(), x.sum().item()) for xb, yb in dl for x, y in zip(xb, yb))  # noqa: E731
    assert ordered(serial.train) == ordered(parallel.train)


def test_normalisation_statistics_and_transform(folder):
    dls = DataLoaders.from_folder(folder, size=8, num_workers=0, skip_bad=True, bs=64)
    mean, std = dls.stats()
    xb = next(iter(dls.train))[0]
    assert mean.shape == (3,)
    assert torch.allclose(mean, xb.permute(1, 0, 2, 3).reshape(3, -1).mean(1))
    assert torch.allclose(std, xb.permute(1, 0, 2, 3).reshape(3, -1).std(1))
    norm = Normalize.from_batch(xb)
    out = norm(xb)
    assert out.mean((0, 2, 3)).abs().max() < 1e-5 and (out.std((0, 2, 3)) - 1).abs().max() < 1e-4
    assert torch.allclose(norm.decode(out), xb, atol=1e-6)
    with pytest.raises(ValueError, match="3 channel statistics but the batch has shape"):
        norm(torch.zeros(2, 1, 4, 4))


def test_show_batch_and_results_write_pngs(folder, tmp_path):
    import torch.nn.functional as F

    from nanofit import simple_cnn

    dls = DataLoaders.from_folder(folder, size=8, num_workers=0, skip_bad=True)
    fig = dls.show_batch(n=6, path=tmp_path / "batch.png")
    assert len([a for a in fig.axes if a.images]) == 6
    assert (tmp_path / "batch.png").read_bytes()[:4] == b"\x89PNG"
    assert fig.axes[0].get_title() in dls.vocab
    learn = Learner(simple_cnn(3, 3, nfs=(4, 8)), dls, F.cross_entropy,
                    cbs=[BatchTransformCB(Normalize(*dls.stats()))])
    fig = learn.show_results(n=4, path=tmp_path / "results.png")
    assert " / " in fig.axes[0].get_title()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    show_images(torch.rand(3, 1, 5, 5), path=tmp_path / "gray.png")


@pytest.mark.slow
def test_demo_trains_on_an_image_folder(folder, tmp_path):
    import shutil

    clean = tmp_path / "clean"
    shutil.copytree(folder, clean)
    (clean / "train" / "two" / "broken.png").unlink()
    result = subprocess.run([sys.executable, "-m", "nanofit", "demo", "--data", str(clean),
                             "--epochs", "2", "--size", "12", "--lr", "0.01", "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "3 classes" in result.stdout and "validation accuracy" in result.stdout
    assert (tmp_path / "out" / "loss.png").exists()


@pytest.mark.parametrize("norm_cb", ["nanofit", "course"])
def test_show_results_predicts_through_the_validation_batch_transforms(norm_cb):
    from torch import nn

    from nanofit import TensorLoader

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 4, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():  # class 0 when the inputs sum above 0, so only normalised ones vary
        model[1].weight.copy_(torch.stack([torch.ones(16), -torch.ones(16)]))
        model[1].bias.zero_()
    if norm_cb == "nanofit":
        cb = BatchTransformCB(Normalize([0.5], [0.1]))
    else:
        def _norm(b): return (b[0] - 0.5) / 0.1, b[1]
        cb = BatchTransformCB(_norm)
    dls = DataLoaders(TensorLoader((x, y), 8), TensorLoader((x, y), 8))
    learn = Learner(model, dls, cbs=[cb])
    fig = learn.show_results(n=8)
    expected = [f"{int(p)} / {int(t)}" for p, t in zip(model((x - 0.5) / 0.1).argmax(1), y)]
    assert [ax.get_title() for ax in fig.axes[:8]] == expected
    assert len({t.split(" / ")[0] for t in expected}) == 2  # the normalisation changed them
