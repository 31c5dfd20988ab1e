"""Course code (fast.ai 2022 part 2, miniai) that runs unchanged on nanofit: BatchTransformCB
handing over the whole batch, collate_dict(ds), set_seed, clean_mem and the image helpers
(show_image, subplots, get_grid, show_images), each called the way the course calls it."""
import gc
import pickle
import random
import sys
import weakref
from collections import namedtuple
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import nanofit
from nanofit import (
    BatchTransformCB,
    Callback,
    DataLoaders,
    Learner,
    Normalize,
    TensorLoader,
    clean_mem,
    collate_dict,
    compose,
    get_grid,
    random_crop,
    random_erase,
    random_flip,
    set_seed,
    show_image,
    show_images,
    subplots,
)
from nanofit import figures as plots_module  # how figures are made and shown


# ---- BatchTransformCB: the whole batch, as in the course ----
class SeenInputs(Callback):
    """Records the inputs the model gets, per phase (after the transforms)."""

    order = 100

    def __init__(self):
        self.seen = {True: [], False: []}

    def before_batch(self, learn):
        self.seen[learn.training].append(learn.batch[0].clone())


def image_dls(n=24, bs=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 6, 6, generator=g) * 3 + 1, torch.randint(0, 3, (n,), generator=g)
    return x, y, DataLoaders(TensorLoader((x[:16], y[:16]), bs), TensorLoader((x[16:], y[16:]), bs))


def model():
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 3))


def test_course_norm_function_gets_the_whole_batch():
    x, y, dls = image_dls()
    xmean, xstd = x[:8].mean(), x[:8].std()

    def _norm(b): return (b[0] - xmean) / xstd, b[1]  # notebook 10, as written there

    norm, seen = BatchTransformCB(_norm), SeenInputs()
    Learner(model(), dls, F.cross_entropy, cbs=[norm, seen]).fit(1)
    assert torch.allclose(seen.seen[True][0], (x[:8] - xmean) / xstd)
    assert torch.allclose(seen.seen[False][0], (x[16:24] - xmean) / xstd)


def test_course_tfm_batch_with_on_val_false_augments_training_only():
    x, y, dls = image_dls()

    class Flip(nn.Module):  # stands in for torchvision's transforms in an nn.Sequential
        def forward(self, x): return x.flip(-1)

    tfms = nn.Sequential(Flip())

    def tfm_batch(b, tfm_x=lambda o: o, tfm_y=lambda o: o): return tfm_x(b[0]), tfm_y(b[1])

    augcb, seen = BatchTransformCB(partial(tfm_batch, tfm_x=tfms), on_val=False), SeenInputs()
    assert augcb.on_train and not augcb.on_val
    Learner(model(), dls, F.cross_entropy, cbs=[augcb, seen]).fit(1)
    assert torch.equal(seen.seen[True][0], x[:8].flip(-1))
    assert torch.equal(seen.seen[False][0], x[16:24])  # validation untouched
    seen = SeenInputs()  # on_train=False: validation only (the course's TTA)
    Learner(model(), dls, F.cross_entropy,
            cbs=[BatchTransformCB(partial(tfm_batch, tfm_x=tfms), on_train=False), seen]).fit(1)
    assert torch.equal(seen.seen[True][0], x[:8])
    assert torch.equal(seen.seen[False][0], x[16:24].flip(-1))


def test_nanofit_transforms_keep_working_in_batch_transform_cb():
    x, y, dls = image_dls()
    seen = SeenInputs()
    norm = Normalize([2.5], [0.9])
    Learner(model(), dls, F.cross_entropy, cbs=[BatchTransformCB(norm), seen]).fit(1)
    assert torch.allclose(seen.seen[True][0], (x[:8] - 2.5) / 0.9)
    seen = SeenInputs()
    aug = compose(random_crop(1), random_flip(), random_erase())
    learn = Learner(model(), dls, F.cross_entropy, cbs=[BatchTransformCB(aug, on_val=False), seen])
    torch.manual_seed(3)
    learn.fit(1)
    torch.manual_seed(3)  # the same draws, made on the tensor alone
    assert torch.equal(seen.seen[True][0], aug(x[:8]))
    assert torch.equal(seen.seen[False][0], x[16:24])


def test_nanofit_transforms_take_a_tensor_or_a_batch_and_keep_the_rest():
    x, y = torch.rand(4, 3, 5, 5), torch.arange(4)
    norm = Normalize([0.5] * 3, [0.2] * 3)
    assert torch.allclose(norm(x), (x - 0.5) / 0.2)
    out = norm((x, y))
    assert isinstance(out, tuple) and torch.allclose(out[0], (x - 0.5) / 0.2) and out[1] is y
    out = norm([x, y, "extra"])
    assert isinstance(out, list) and out[1] is y and out[2] == "extra"
    Batch = namedtuple("Batch", "x y")
    out = random_flip(p=1.0)(Batch(x, y))
    assert isinstance(out, Batch) and torch.equal(out.x, x.flip(-1)) and out.y is y
    for tfm in (random_crop(2), random_erase(p=1.0), compose(random_flip(1.0), norm),
                compose(lambda t: t * 2)):  # compose also adapts a plain tensor function
        torch.manual_seed(0)
        on_tensor = tfm(x)
        torch.manual_seed(0)
        on_batch = tfm((x, y))
        assert isinstance(on_tensor, torch.Tensor)
        assert torch.equal(on_batch[0], on_tensor) and on_batch[1] is y
    with pytest.raises(TypeError, match="random_flip takes the inputs tensor or a batch"):
        random_flip()({"x": x})


def test_whole_batch_false_hands_over_the_inputs_and_a_tensor_function_is_told_so():
    x, y, dls = image_dls()
    seen = SeenInputs()
    Learner(model(), dls, F.cross_entropy,
            cbs=[BatchTransformCB(lambda t: t * 2, whole_batch=False), seen]).fit(1)
    assert torch.equal(seen.seen[True][0], x[:8] * 2)
    assert BatchTransformCB(lambda b: b).whole_batch  # the default: the whole batch
    learn = Learner(model(), dls, F.cross_entropy,
                    cbs=[BatchTransformCB(lambda t: t.flip(-1))])
    with pytest.raises(AttributeError) as info:
        learn.fit(1)
    assert "pass whole_batch=False" in "\n".join(info.value.__notes__)


def test_transform_applies_a_callbacks_batch_transform_by_hand():
    x, y = torch.rand(4, 1, 2, 2), torch.arange(4)
    cb = BatchTransformCB(Normalize([0.5], [0.25]))
    xb, yb = cb.transform((x, y))
    assert torch.allclose(xb, (x - 0.5) / 0.25) and yb is y
    xb, yb = BatchTransformCB(lambda t: t + 1, whole_batch=False).transform((x, y))
    assert torch.equal(xb, x + 1) and yb is y


# ---- collate_dict(ds): the course's form on a real Hugging Face Dataset ----
@pytest.fixture
def hf_ds():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [[[float(i)] * 3] * 2 for i in range(10)],
                                     "label": list(range(10))})
    return ds.with_format("torch")


def test_collate_dict_of_a_dataset_is_the_loaders_collate_function(hf_ds):
    dl = DataLoader(hf_ds, batch_size=4, collate_fn=collate_dict(hf_ds))  # as in notebook 05
    xb, yb = next(iter(dl))
    assert xb.shape == (4, 2, 3) and torch.equal(yb, torch.arange(4))
    assert torch.equal(xb[:, 0, 0], torch.arange(4).float())
    assert [len(b[1]) for b in dl] == [4, 4, 2]
    # picklable, so worker processes started with spawn get it too
    again = pickle.loads(pickle.dumps(collate_dict(hf_ds)))
    assert torch.equal(again([hf_ds[0], hf_ds[1]])[1], torch.tensor([0, 1]))


def test_collate_dict_follows_the_features_order_and_adapts_to_transforms(hf_ds):
    swapped = hf_ds.select_columns(["label", "image"])  # features order: label, image
    yb, xb = collate_dict(swapped)([swapped[i] for i in range(3)])
    assert torch.equal(yb, torch.arange(3)) and xb.shape == (3, 2, 3)
    only_x = hf_ds.with_format("torch", columns=["image"])  # rows lack 'label': their keys
    (xb,) = collate_dict(only_x)([only_x[i] for i in range(3)])
    assert xb.shape == (3, 2, 3)

    def renamed(b): return {"pixels": [torch.tensor(o) for o in b["image"]], "y": b["label"]}

    tfmd = hf_ds.with_format(None).with_transform(renamed)
    xb, yb = next(iter(DataLoader(tfmd, batch_size=5, collate_fn=collate_dict(tfmd))))
    assert xb.shape == (5, 2, 3) and torch.equal(yb, torch.arange(5))


def test_collate_dict_old_form_and_from_dd_keep_working(hf_ds):
    datasets = pytest.importorskip("datasets")
    rows = [hf_ds[i] for i in range(3)]
    xb, yb = collate_dict(rows)  # a list of rows: collated at once, as before
    assert xb.shape == (3, 2, 3) and torch.equal(yb, torch.arange(3))
    dl = DataLoader(hf_ds, batch_size=4, collate_fn=collate_dict)
    assert torch.equal(next(iter(dl))[1], torch.arange(4))
    dls = DataLoaders.from_dd(datasets.DatasetDict({"train": hf_ds, "test": hf_ds}), 4)
    xb, yb = next(iter(dls.valid))
    assert xb.shape == (4, 2, 3) and torch.equal(yb, torch.arange(4))
    with pytest.raises(TypeError, match="Hugging Face Dataset"):
        collate_dict(torch.utils.data.TensorDataset(torch.zeros(3)))


# ---- set_seed and clean_mem ----
def test_set_seed_repeats_python_numpy_and_torch_draws():
    def draws():
        return random.random(), np.random.rand(), torch.rand(2).tolist(), torch.randn(1).item()

    set_seed(42)
    first = draws()
    set_seed(42)
    assert draws() == first
    set_seed(43)
    assert draws() != first


def test_set_seed_deterministic_switches_torchs_deterministic_mode():
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    try:
        set_seed(1, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        set_seed(1)  # as the course's: the flag says the mode either way
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic = before[1]


class Big:
    """Stands in for a large tensor kept alive by a failed call's frames."""


def fail_holding(big):
    inner = big  # noqa: F841  (a local of the failing frame: what a traceback keeps)
    raise RuntimeError("CUDA out of memory (pretend)")


def test_clean_mem_frees_what_the_last_traceback_keeps():
    big = Big()
    ref = weakref.ref(big)
    try:
        fail_holding(big)
    except RuntimeError:
        sys.last_type, sys.last_value, sys.last_traceback = sys.exc_info()  # as an uncaught one
    del big
    gc.collect()
    assert ref() is not None  # the traceback's frame still holds it
    clean_mem()
    assert ref() is None
    assert not hasattr(sys, "last_traceback") and not hasattr(sys, "last_value")
    clean_mem()  # nothing to clean: fine too


@pytest.fixture
def ipython_shell(tmp_path, monkeypatch):
    """A real IPython shell (not a kernel), its files in tmp_path; removed after the test."""
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    shell = InteractiveShell.instance()
    shell.history_manager.enabled = False
    try:
        yield shell
    finally:
        InteractiveShell.clear_instance()
        for name in ("last_type", "last_value", "last_traceback"):
            if hasattr(sys, name):
                delattr(sys, name)


def test_clean_mem_in_ipython_frees_the_failed_cells_frames_and_output_cache(ipython_shell):
    shell = ipython_shell
    shell.run_cell("import weakref\nfrom tests.test_course_helpers import Big, fail_holding\n"
                   "kept = Big(); shown = Big()\n"
                   "refs = [weakref.ref(kept), weakref.ref(shown)]", store_history=True)
    shell.run_cell("fail_holding(kept); 1", store_history=True)  # an error in a cell
    shell.run_cell("shown", store_history=True)  # a cell's value: kept in Out and `_`
    shell.run_cell("del kept, shown", store_history=True)
    refs = shell.user_ns["refs"]
    gc.collect()
    assert refs[0]() is not None and refs[1]() is not None
    shell.run_cell("from nanofit import clean_mem; clean_mem()", store_history=True)
    assert refs[0]() is None and refs[1]() is None


# ---- show_image, subplots, get_grid, show_images ----
def test_show_image_shows_a_tensor_array_or_pil_image_and_returns_its_axes():
    ax = show_image(torch.rand(3, 8, 6), title="rgb", figsize=(2, 2))
    assert ax.images[0].get_array().shape == (8, 6, 3) and ax.get_title() == "rgb"
    assert not ax.axison and tuple(ax.figure.get_size_inches()) == (2, 2)
    ax = show_image(torch.rand(1, 8, 8), noframe=False, cmap="gray")  # one channel: HW
    assert ax.images[0].get_array().shape == (8, 8) and ax.axison
    assert ax.images[0].get_cmap().name == "gray" and list(ax.get_xticks()) == []
    fig, axs = subplots(1, 2)
    assert show_image(np.zeros((4, 4, 3)), ax=axs[1]) is axs[1]
    pil = pytest.importorskip("PIL.Image")
    assert show_image(pil.new("L", (5, 4)), ax=axs[0]).images[0].get_array().shape == (4, 5)


def test_subplots_and_get_grid_follow_the_course():
    fig, axs = subplots(2, 3, imsize=2, suptitle="grid")
    assert axs.shape == (2, 3) and tuple(fig.get_size_inches()) == (6, 4)
    assert fig._suptitle.get_text() == "grid"
    fig, axs = subplots()  # one axes: an array of one, so `axs.flat` and `axs[0]` work
    assert axs.shape == (1,) and tuple(fig.get_size_inches()) == (3, 3)
    fig, axs = subplots(2, 2, figsize=(5, 4), sharex=True, dpi=50)
    assert tuple(fig.get_size_inches()) == (5, 4) and fig.dpi == 50
    fig, axs = get_grid(5, title="five", size=10)
    assert axs.shape == (2, 3) and [ax.axison for ax in axs.flat] == [True] * 5 + [False]
    assert fig._suptitle.get_text() == "five" and fig._suptitle.get_weight() == "bold"
    assert get_grid(16)[1].shape == (4, 4) and get_grid(8)[1].shape == (2, 4)
    assert get_grid(8, nrows=4)[1].shape == (4, 2) and get_grid(7, ncols=2)[1].shape == (4, 2)
    with pytest.raises(ValueError, match="fewer than the 6 images"):
        get_grid(6, nrows=2, ncols=2)
    assert "matplotlib.pyplot" not in sys.modules or not __import__(
        "matplotlib.pyplot").pyplot.get_fignums()  # no pyplot figures were made


def test_show_images_course_forms(tmp_path):
    ims = torch.rand(6, 1, 5, 5)
    fig = show_images(ims)  # the course calls it for its effect; nanofit returns the Figure
    assert [bool(ax.images) for ax in fig.axes] == [True] * 6
    fig = show_images(ims, imsize=1.5, titles=list("abcdef"))
    assert tuple(fig.get_size_inches()) == pytest.approx((4.5, 3.6))  # + room for titles
    assert [ax.get_title() for ax in fig.axes[:6]] == list("abcdef")
    fig = show_images(ims, nrows=3)
    assert len(fig.axes) == 6 and fig.axes[0].get_subplotspec().get_geometry()[:2] == (3, 2)
    fig = show_images(ims, 1, None, list("uvwxyz"))  # the course's positional order
    assert fig.axes[0].get_subplotspec().get_geometry()[:2] == (1, 6)
    assert fig.axes[5].get_title() == "z"
    fig = show_images(ims[:5], ncols=3, suptitle="five")
    assert [bool(ax.images) for ax in fig.axes] == [True] * 5 + [False]


def test_show_images_nanofit_forms_still_work(tmp_path):
    ims = torch.rand(4, 3, 6, 6) * 2 - 0.5  # float values outside [0, 1] are clamped
    fig = show_images(ims, ["a", "b", "c", "d"], 2, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert fig.axes[0].get_subplotspec().get_geometry()[:2] == (2, 2)
    shown = fig.axes[0].images[0].get_array()
    assert shown.min() >= 0 and shown.max() <= 1
    gray = show_images(torch.rand(2, 1, 4, 4), size=1.0)
    assert gray.axes[0].images[0].get_cmap().name == "gray"
    assert gray.axes[0].images[0].get_clim() == (0, 1)
    with pytest.raises(ValueError, match="imsize= or size="):
        show_images(ims, imsize=1, size=2)
    with pytest.raises(ValueError, match="4 images but 2 titles"):
        show_images(ims, ["a", "b"])


def test_helpers_are_exported_where_users_look():
    from nanofit import vision

    for name in ("show_image", "subplots", "get_grid", "show_images"):
        assert getattr(vision, name) is getattr(nanofit, name)
    for name in ("set_seed", "clean_mem", "show_image", "subplots", "get_grid"):
        assert name in nanofit.__all__


def test_course_helpers_show_their_figures_in_a_notebook_when_the_cell_ends(ipython_shell,
                                                                            monkeypatch):
    shell = ipython_shell
    published = []
    monkeypatch.setattr(shell.display_pub, "publish",
                        lambda data, *a, **k: published.append(data))
    monkeypatch.setattr(plots_module, "in_notebook", lambda: True)  # as in a Jupyter kernel
    shell.run_cell("import torch\nfrom nanofit import get_grid, show_image, show_images")
    shell.run_cell("ax = show_image(torch.rand(3, 8, 8))\nax.set_title('drawn after')")
    assert len(published) == 1 and "image/png" in published[0]
    published.clear()
    shell.run_cell("fig, axs = get_grid(4)\n"
                   "for ax in axs.flat: show_image(torch.rand(8, 8), ax=ax)")
    assert len(published) == 1  # one figure, shown once, with all four images
    published.clear()
    shell.run_cell("x = 1")
    assert published == []  # nothing left over from earlier cells
    plots_module.show_when_cell_ends(plots_module.new_figure())  # one cell, one figure twice
    plots_module.show_when_cell_ends(plots_module._pending[0])
    assert len(plots_module._pending) == 1
    plots_module._pending.clear()


def test_the_course_progress_bar_may_wrap_learn_epochs():
    import torch.nn.functional as F

    from nanofit import Callback, Learner
    from tests.helpers import make_dls, make_model

    seen = []

    class Bar:  # what fastprogress's master_bar does: iterate, not index
        def __init__(self, it):
            self.it = it

        def __iter__(self):
            for x in self.it:
                seen.append(x)
                yield x

    class CourseProgressCB(Callback):
        def before_fit(self, learn):
            learn.epochs = self.mbar = Bar(learn.epochs)

    Learner(make_model(), make_dls(), F.cross_entropy, cbs=[CourseProgressCB()]).fit(2)
    assert seen == [0, 1]


def test_run_cbs_and_the_course_hook_helpers():
    from torch import nn

    from nanofit import Hooks, append_stats, get_hist, get_min, run_cbs

    calls = []

    class A:
        order = 1

        def before_fit(self, learn):
            calls.append(("A", learn))

    class B:
        order = 0

        def before_fit(self, learn):
            calls.append(("B", learn))

    run_cbs([A(), B()], "before_fit", "learner")
    assert calls == [("B", "learner"), ("A", "learner")]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with Hooks(model, append_stats) as hooks:
        for _ in range(3):
            model(torch.randn(16, 4))
        means, stds, hists = hooks[1].stats
        assert len(means) == 3 and hists[0].shape == (40,)
        assert get_hist(hooks[1]).shape == (40, 3) and get_min(hooks[1]).shape == (3,)
