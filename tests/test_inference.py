"""get_preds, predict, tta, export and load_learner."""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanofit import (
    BatchTransformCB,
    DataLoaders,
    Learner,
    MetricsCB,
    Normalize,
    ProgressCB,
    TensorLoader,
    load_learner,
    simple_cnn,
)
from tests.helpers import make_dls, make_model


def image_learner():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
    dls = DataLoaders(TensorLoader((x[:24], y[:24]), 8, shuffle=True),
                      TensorLoader((x[24:], y[24:]), 5))
    torch.manual_seed(0)
    learn = Learner(simple_cnn(1, 3, nfs=(4, 8)), dls, F.cross_entropy, lr=0.1,
                    cbs=[BatchTransformCB(Normalize([0.5], [0.3])), MetricsCB(), ProgressCB()])
    learn.fit(1)
    return learn, x[24:], y[24:]


def manual(learn, x):
    learn.model.eval()
    with torch.no_grad():
        return learn.model((x - 0.5) / 0.3)


def test_get_preds_order_shapes_and_options():
    learn, xv, yv = image_learner()
    history = list(learn.metrics.history)
    preds, targs = learn.get_preds()
    assert preds.shape == (16, 3) and torch.equal(targs, yv)
    assert torch.allclose(preds, manual(learn, xv), atol=1e-6)
    inputs, probs, targs2, losses = learn.get_preds(with_input=True, with_loss=True,
                                                    act=lambda p: p.softmax(1))
    assert torch.allclose(inputs, (xv - 0.5) / 0.3)  # as the model saw them (normalised)
    assert torch.allclose(probs.sum(1), torch.ones(16))
    assert torch.allclose(losses, F.cross_entropy(preds, yv, reduction="none"), atol=1e-6)
    assert learn.metrics.history == history  # inference left no record


def test_predict_one_item_or_a_batch_and_tta():
    learn, xv, _ = image_learner()
    expected = manual(learn, xv)
    assert torch.allclose(learn.predict(xv[0]), expected[0], atol=1e-6)  # one item
    assert torch.allclose(learn.predict(xv[:3]), expected[:3], atol=1e-6)  # a batch
    avg, targs = learn.tta(n=2, tfm=lambda x: x)  # identity augmentation: the plain preds
    assert torch.allclose(avg, expected, atol=1e-6)
    flipped, _ = learn.tta(n=3, tfm=lambda x: x.flip(-1))
    with pytest.raises(ValueError, match="keeps its order"):
        learn.tta(dl=learn.dls.train)
    assert torch.allclose(flipped, (expected + 3 * manual(learn, xv.flip(-1))) / 4, atol=1e-5)


def test_export_load_learner_predicts_the_same(tmp_path):
    learn, xv, _ = image_learner()
    path = learn.export(str(tmp_path / "model.pt"))
    loaded = load_learner(path)
    assert torch.allclose(loaded.predict(xv), learn.predict(xv), atol=1e-6)
    assert torch.allclose(loaded.predict(xv[0]), learn.predict(xv[0]), atol=1e-6)


class Custom(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.lin(x)


def test_export_of_a_custom_module_and_unsafe_files(tmp_path):
    x = torch.randn(10, 4)
    learn = Learner(Custom(4, 2), DataLoaders(TensorLoader((x, x[:, :2]), 5)), F.mse_loss)
    with pytest.raises(ValueError, match="pass model_fn="):
        learn.export(str(tmp_path / "m.pt"))
    path = learn.export(str(tmp_path / "m.pt"), model_fn=Custom, args=(4, 2))
    with pytest.raises(ValueError, match="not marked @nanofit.exportable nor passed in allowed"):
        load_learner(path)
    loaded = load_learner(path, allowed=(Custom,))
    assert torch.allclose(loaded.predict(x), learn.predict(x))
    assert loaded.predict(x[0]).shape == (2,)  # one item: the Linear says items are 1-d
    with pytest.raises(ValueError, match="do not match this one"):
        learn.export(str(tmp_path / "bad.pt"), model_fn=Custom, args=(4, 3))
    evil = tmp_path / "evil.pt"
    before = set(sys.modules)
    torch.save({"format": "nanofit.export", "version": 1, "constructor": "os:system",
                "args": ["touch pwned"], "kwargs": {}, "model": {}}, evil)
    with pytest.raises(ValueError, match="refusing to call it"):
        load_learner(evil)
    torch.save({"format": "nanofit.export", "version": 1, "constructor": "torch.nn:Linear",
                "args": [100000, 100000], "kwargs": {}, "model": {}}, evil)
    with pytest.raises(ValueError, match="refusing to call it"):  # no huge allocation either
        load_learner(evil)
    torch.save({"format": "nanofit.export", "version": 1, "constructor": "antigravity:x",
                "args": [], "kwargs": {}, "model": {}}, evil)
    with pytest.raises(ValueError, match="refusing to call it"):
        load_learner(evil)
    assert "antigravity" not in sys.modules
    # names that merely start like registered ones, or walk attributes, match nothing
    for name in ("nanofit.models:simple_cnn.__globals__", "unittest.mock:call",
                 "ctypes:cdll.LoadLibrary", "torch:_dynamo.config"):
        torch.save({"format": "nanofit.export", "version": 1, "constructor": name,
                    "args": [], "kwargs": {}, "model": {}}, evil)
        with pytest.raises(ValueError, match="refusing to call it"):
            load_learner(evil)
    assert "torch._dynamo" not in sys.modules or "torch._dynamo" in before


def test_export_holds_plain_values_numpy_ones_included(tmp_path):
    learn, xv, _ = image_learner()
    learn.model = simple_cnn(1, np.int64(3), nfs=(4, 8))  # a NumPy argument, recorded
    learn.model.load_state_dict(image_learner()[0].model.state_dict())
    learn.dls = SimpleNamespace(train=learn.dls.train, valid=learn.dls.valid,
                                vocab=np.array(["cat", "dog", "emu"]))  # NumPy strings
    loaded = load_learner(learn.export(str(tmp_path / "model.pt")))
    assert loaded.vocab == ["cat", "dog", "emu"] and type(loaded.vocab[0]) is str
    assert torch.allclose(loaded.predict(xv), learn.predict(xv), atol=1e-6)


def test_export_files_get_the_umask_mode_and_write_failures_name_the_file(tmp_path):
    learn, _, _ = image_learner()
    old = os.umask(0o022)
    try:
        path = learn.export(str(tmp_path / "model.pt"))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    (tmp_path / "afile").write_text("a file, not a folder")
    with pytest.raises(OSError, match=f"cannot write '{tmp_path / 'afile' / 'm.pt'}'"):
        learn.export(str(tmp_path / "afile" / "m.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "model.pt"]


def test_every_damaged_export_gives_a_clear_error_naming_the_file(tmp_path):
    import warnings

    from tests.test_checkpoint import assert_only_clear_errors, damaged_variants, pickle_span

    learn, _, _ = image_learner()
    good = Path(learn.export(str(tmp_path / "model.pt"))).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about odd pickle protocols
        assert_only_clear_errors(damaged_variants(good, pickle_span(good), 0, 150, n_cuts=40),
                                 tmp_path, load_learner)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_learner(tmp_path / "missing.pt")


@pytest.mark.parametrize("entries, problem", [
    ({"version": 3}, "'version' is not a format version"),
    ({"model": {"w": [1.0]}}, "'model' is not a dict of tensors"),
    ({"kwargs": {1: 2}}, "'kwargs' is not a dict of keyword arguments"),
    ({"normalize": {"mean": [0.5], "std": [0.0]}}, "'normalize' is not"),
    ({"normalize": {"mean": [0.5]}}, "'normalize' is not"),
    ({"n_inp": 0}, "'n_inp' is not"),
    ({"args": [1, 3], "kwargs": {"nfs": [4, 9]}}, r"does not fit this model .*differing"),
    ({"args": [1, 3], "kwargs": {"nfs": "wide"}}, r"its constructor .*simple_cnn.* failed"),
])
def test_an_export_with_the_wrong_structure_is_refused_naming_the_file(tmp_path, entries,
                                                                      problem):
    learn, _, _ = image_learner()
    good = torch.load(learn.export(str(tmp_path / "model.pt")), weights_only=True)
    path = tmp_path / "odd.pt"
    torch.save({**good, **entries}, path)
    with pytest.raises(ValueError, match=f"exported learner '{path}'.*{problem}"):
        load_learner(path)


def test_capture_preds_in_the_course_order():
    learn = Learner(make_model(), make_dls(), F.cross_entropy)
    preds, targs, inps = learn.capture_preds(inps=True)  # the course's order
    inputs, preds2, targs2 = learn.get_preds(with_input=True)  # fastai's order
    assert torch.equal(preds, preds2) and torch.equal(targs, targs2) and torch.equal(inps, inputs)
    assert inps.shape == (20, 4) and preds.shape == (20, 3) and targs.shape == (20,)
    preds3, targs3 = learn.capture_preds()
    assert torch.equal(preds3, preds)


# ---- show_results -------------------------------------------------------------------------------
def sorted_by_class_learner(loader="tensor"):
    """30 validation items sorted by class (10 of each, as a class-sorted folder gives) and a
    model that always says class 0."""
    x = torch.rand(30, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(30) // 10
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    if loader == "tensor":
        valid = TensorLoader((x, y), 8)
    else:
        class Noisy(torch.utils.data.Dataset):  # draws random numbers per item, as augment would
            def __len__(self):
                return 30

            def __getitem__(self, i):
                return x[i] + 0 * torch.rand(()), y[i]
        valid = torch.utils.data.DataLoader(Noisy(), batch_size=8)
    return Learner(model, DataLoaders(TensorLoader((x, y), 8, shuffle=True), valid))


@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_show_results_samples_across_the_validation_set_and_marks_wrong_predictions(loader,
                                                                                  tmp_path):
    from matplotlib.colors import to_rgba

    learn = sorted_by_class_learner(loader)
    rng = torch.get_rng_state()
    fig = learn.show_results(n=6, ncols=3, path=tmp_path / "results.png")
    assert torch.equal(torch.get_rng_state(), rng)  # training goes on as if it never ran
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    axes = [ax for ax in fig.axes if ax.images]
    titles = [ax.get_title() for ax in axes]
    assert len(axes) == 6 and len({ax.get_position().x0 for ax in axes}) == 3  # ncols kept
    assert [t.split(" / ")[1] for t in titles] == ["0", "0", "1", "1", "2", "2"]  # every class
    red = [to_rgba(ax.title.get_color()) == to_rgba("red") for ax in axes]
    wrong = [t.split(" / ")[0] != t.split(" / ")[1] for t in titles]
    assert red == wrong == [False] * 2 + [True] * 4
    again = learn.show_results(n=6, ncols=3)  # the same sample every time
    assert [ax.get_title() for ax in again.axes if ax.images] == titles
    everything = learn.show_results(n=50)  # more than there is: all of it, in order
    assert [ax.get_title().split(" / ")[1] for ax in everything.axes if ax.images] == \
        [str(int(c)) for c in torch.arange(30) // 10]
