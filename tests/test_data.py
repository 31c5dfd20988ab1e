"""TensorLoader and DataLoaders."""
import pytest
import torch

from nanofit import DataLoaders, TensorLoader


def test_tensor_loader_covers_everything_in_order_without_shuffle():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    dl = TensorLoader((x, y), batch_size=4)
    batches = list(dl)
    assert len(dl) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert torch.equal(torch.cat([b[0] for b in batches]), x)


def test_tensor_loader_shuffles_every_pass_and_keeps_pairs():
    x, y = torch.arange(100).float()[:, None] * 2, torch.arange(100)
    dl = TensorLoader((x, y), batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(0))
    orders = []
    for _ in range(2):
        xs, ys = zip(*dl)
        xs, ys = torch.cat(xs), torch.cat(ys)
        assert torch.equal(xs[:, 0], ys.float() * 2)  # rows stay with their targets
        assert torch.equal(ys.sort().values, y)  # each sample exactly once
        orders.append(ys)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], y)
    assert torch.equal(dl.perm, orders[1])


def test_tensor_loader_generator_makes_order_reproducible():
    x = torch.arange(50)
    a = TensorLoader(x, 8, shuffle=True, generator=torch.Generator().manual_seed(3))
    b = TensorLoader(x, 8, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


def test_tensor_loader_drop_last():
    x = torch.arange(10)
    for shuffle in (False, True):
        dl = TensorLoader(x, 4, shuffle=shuffle, drop_last=True)
        batches = list(dl)
        assert len(dl) == 2 and [len(b[0]) for b in batches] == [4, 4]
    assert len(TensorLoader(x, 5, drop_last=True)) == 2


def test_tensor_loader_rejects_bad_input():
    with pytest.raises(ValueError, match=r"same length.*\(10,\), \(9,\)"):
        TensorLoader((torch.zeros(10), torch.zeros(9)), 4)
    with pytest.raises(TypeError, match="tensor or a tuple of tensors"):
        TensorLoader(([1, 2, 3],), 4)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        TensorLoader(torch.zeros(4), 0)


def test_from_tensors_builds_shuffled_train_and_ordered_valid():
    x, y = torch.randn(30, 3), torch.arange(30)
    dls = DataLoaders.from_tensors((x[:20], y[:20]), (x[20:], y[20:]), batch_size=8,
                                   generator=torch.Generator().manual_seed(0))
    assert dls.train.shuffle and not dls.valid.shuffle
    assert torch.equal(torch.cat([b[1] for b in dls.valid]), y[20:])
    train, valid = dls
    assert train is dls.train and valid is dls.valid


def test_from_dd_on_an_in_memory_hugging_face_dataset():
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"x": [[float(i), 0.0] for i in range(10)],
                                             "label": list(range(10))}),
        "test": datasets.Dataset.from_dict({"x": [[1.0, 2.0]] * 4, "label": [1, 2, 3, 4]}),
    }).with_format("torch")
    dls = DataLoaders.from_dd(dd, batch_size=4)
    xb, yb = next(iter(dls.valid))
    assert xb.shape == (4, 2) and torch.equal(yb, torch.tensor([1, 2, 3, 4]))
    labels = torch.cat([b[1] for b in dls.train])
    assert sorted(labels.tolist()) == list(range(10))
    as_dicts = DataLoaders.from_dd(dd, batch_size=4, as_tuple=False)
    assert set(next(iter(as_dicts.valid))) == {"x", "label"}
    with pytest.raises(ValueError, match="needs a 'train' and a 'validation'"):
        DataLoaders.from_dd(datasets.DatasetDict({"train": dd["train"]}), batch_size=4)
    with pytest.raises(ValueError, match="needs a 'train' and a 'validation'"):
        DataLoaders.from_dd(datasets.DatasetDict({"validation": dd["test"]}), batch_size=4)


def test_collate_dict_names_the_fix_for_rows_that_are_not_dicts():
    from torch.utils.data import DataLoader

    from nanofit import collate_dict

    ds = pytest.importorskip("datasets").Dataset.from_dict({"x": [1.0, 2.0], "y": [0, 1]})
    collate = collate_dict(ds)
    assert repr(collate) == "collate_dict(columns=['x', 'y'])"
    rows = [(torch.zeros(2), 0), (torch.ones(2), 1)]
    with pytest.raises(TypeError, match="rows that are dicts.*got rows of type tuple"):
        next(iter(DataLoader(rows, batch_size=2, collate_fn=collate)))


def test_from_dd_reads_an_unformatted_hugging_face_dataset_as_tensors():
    datasets = pytest.importorskip("datasets")
    rows = {"x": [[float(i), float(i + 1)] for i in range(12)], "y": [i % 3 for i in range(12)]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                               "test": datasets.Dataset.from_dict(rows)})
    xb, yb = next(iter(DataLoaders.from_dd(dd, batch_size=4, shuffle=False).train))
    assert xb.shape == (4, 2) and xb.dtype == torch.float32 and yb.tolist() == [0, 1, 2, 0]
