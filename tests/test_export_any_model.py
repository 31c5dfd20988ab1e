"""learn.export of a plain nn.Sequential of torch.nn layers: no builder, no model_fn, no pickle;
and files that try to make load_learner build anything else."""
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanofit import (
    BatchTransformCB,
    DataLoaders,
    GeneralRelu,
    Learner,
    Normalize,
    TensorLoader,
    load_learner,
    simple_cnn,
)


def image_dls(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoaders(TensorLoader((x[:24], y[:24]), 8, shuffle=True, generator=g),
                       TensorLoader((x[24:], y[24:]), 8)), x[24:]


def a_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None), nn.LeakyReLU(0.2),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8, eps=1e-3),
                      nn.GELU(approximate="tanh"), nn.Dropout2d(0.1)),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        nn.Linear(8, 6), nn.LayerNorm(6), nn.SiLU(), nn.Dropout(0.25), nn.Linear(6, 3),
        nn.LogSoftmax(dim=1))


def test_a_plain_sequential_exports_and_loads_with_the_same_predictions(tmp_path):
    dls, xv = image_dls()
    learn = Learner(a_cnn(), dls, F.nll_loss, lr=0.1,
                    cbs=[BatchTransformCB(Normalize([0.5], [0.3]))])
    learn.fit(2)  # BatchNorm running statistics move: they must travel too
    path = learn.export(tmp_path / "cnn.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["version"] == 2 and saved["constructor"] is None
    assert saved["layers"]["layer"] == "Sequential"
    loaded = load_learner(path)
    assert type(loaded.model) is nn.Sequential
    assert str(loaded.model) == str(learn.model)  # every layer's arguments recovered
    assert torch.allclose(loaded.predict(xv), learn.predict(xv), atol=1e-6)
    assert torch.allclose(loaded.predict(xv[0]), learn.predict(xv[0]), atol=1e-6)


def test_named_layers_embeddings_and_changed_attributes_travel(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([
        ("embed", nn.Embedding(10, 4, padding_idx=0)), ("flat", nn.Flatten()),
        ("head", nn.Sequential(nn.Linear(12, 5), nn.BatchNorm1d(5, affine=False),
                               nn.Dropout(0.5), nn.Linear(5, 3, bias=False))),
    ]))
    model.head[2].p = 0.1  # an attribute changed after construction is what is saved
    x = torch.randint(0, 10, (30, 3))
    y = torch.randint(0, 3, (30,))
    learn = Learner(model, DataLoaders(TensorLoader((x[:20], y[:20]), 5),
                                       TensorLoader((x[20:], y[20:]), 5)), F.cross_entropy)
    learn.fit(1)
    loaded = load_learner(learn.export(tmp_path / "emb.pt"))
    assert [k for k, _ in loaded.model.named_children()] == ["embed", "flat", "head"]
    assert loaded.model.head[2].p == 0.1 and loaded.model.embed.padding_idx == 0
    assert torch.equal(loaded.predict(x[20:]), learn.predict(x[20:]))


def test_builder_exports_stay_as_they_were_and_a_changed_builder_model_falls_back(tmp_path):
    dls, xv = image_dls()
    learn = Learner(simple_cnn(1, 3, nfs=(4, 8)), dls, F.cross_entropy)
    saved = torch.load(learn.export(tmp_path / "cnn.pt"), weights_only=True)
    assert saved["version"] == 1 and saved["constructor"] == "nanofit.models:simple_cnn"
    assert saved["layers"] is None
    learn.model[-1] = nn.Linear(8, 5)  # a new head: simple_cnn(1, 3) no longer builds it
    path = learn.export(tmp_path / "new_head.pt")
    assert torch.load(path, weights_only=True)["constructor"] is None
    assert torch.allclose(load_learner(path).predict(xv), learn.predict(xv), atol=1e-6)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + x


class MyLinear(nn.Linear):  # a subclass may compute something else: not a Linear
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("model, where", [
    (nn.Sequential(nn.Linear(4, 4), nn.Sequential(Block(), nn.ReLU())), "submodule '1.0' (a "
     "tests.test_export_any_model.Block)"),
    (nn.Sequential(MyLinear(4, 4)), "submodule '0' (a tests.test_export_any_model.MyLinear)"),
    (nn.Sequential(nn.Linear(4, 4), GeneralRelu(0.1)), "submodule '1' (a "
     "nanofit.init.GeneralRelu)"),
    (Block(), "it is a tests.test_export_any_model.Block, not an nn.Sequential"),
    (nn.ModuleList([nn.Linear(4, 4)]), "it is a torch.nn.modules.container.ModuleList"),
])
def test_a_model_no_safe_format_carries_names_the_submodule_and_the_fixes(tmp_path, model,
                                                                          where):
    x = torch.randn(8, 4)
    learn = Learner(model, DataLoaders(TensorLoader((x, x), 4)), F.mse_loss)
    with pytest.raises(ValueError) as info:
        learn.export(tmp_path / "m.pt")
    message = str(info.value)
    assert where in message, message
    assert "@nanofit.exportable" in message and "pass model_fn=" in message
    assert not (tmp_path / "m.pt").exists()


def test_weights_the_layers_do_not_make_are_refused_at_export(tmp_path):
    lin = nn.Linear(4, 2)
    lin.register_buffer("scale", torch.ones(2))  # state a rebuilt Linear would not have
    x = torch.randn(8, 4)
    learn = Learner(nn.Sequential(lin), DataLoaders(TensorLoader((x, x[:, :2]), 4)), F.mse_loss)
    with pytest.raises(ValueError, match=r"layers, rebuilt, hold other weights .*0\.scale"):
        learn.export(tmp_path / "m.pt")
    learn.model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="submodule '0' .*ParametrizedLinear"):
        learn.export(tmp_path / "m.pt")


# ---- crafted files ----------------------------------------------------------------------------
def crafted(tmp_path, layers, weights=None):
    path = tmp_path / "crafted.pt"
    torch.save({"format": "nanofit.export", "version": 2, "constructor": None, "args": [],
                "kwargs": {}, "layers": layers, "model": weights or {}, "n_inp": 1,
                "item_ndim": None, "vocab": None, "normalize": None}, path)
    return path


def warm_up(tmp_path):
    """Load one good file, so that torch's own lazy imports are done before counting."""
    x = torch.randn(8, 4)
    learn = Learner(nn.Sequential(nn.Linear(4, 2)), DataLoaders(TensorLoader((x, x[:, :2]), 4)),
                    F.mse_loss)
    load_learner(learn.export(tmp_path / "good.pt"))


def seq(*layers):
    return {"layer": "Sequential", "children": [[str(i), lay] for i, lay in enumerate(layers)]}


LINEAR = {"layer": "Linear", "args": {"in_features": 4, "out_features": 2}}


@pytest.mark.parametrize("layers, problem", [
    ({"layer": "os.system", "args": {}}, "'os.system' is not one of the torch.nn layers"),
    (seq(LINEAR, {"layer": "Module"}), r"layer '1': 'Module' is not one of"),
    (seq({"layer": "torch.nn.modules.module.Module"}), "refusing to build it"),
    (seq({"layer": "__import__", "args": {"name": "antigravity"}}), "refusing to build it"),
    (seq({"layer": "builtins:eval", "args": {}}), "refusing to build it"),
    (seq({"layer": "Linear.__init__.__globals__"}), "refusing to build it"),
    (seq({"layer": "__class__"}), "refusing to build it"),
    (seq({"layer": "LazyLinear", "args": {"out_features": 2}}), "refusing to build it"),
    ({"layer": "Sequential", "children": [["__class__", LINEAR]]}, "child name '__class__'"),
    ({"layer": "Sequential", "children": [["_modules", LINEAR]]}, "child name '_modules'"),
    ({"layer": "Sequential", "children": [["forward", LINEAR]]}, "child name 'forward'"),
    ({"layer": "Sequential", "children": [["a.b", LINEAR]]}, "child name 'a.b'"),
    ({"layer": "Sequential", "children": [["0", LINEAR], ["0", LINEAR]]}, "unique"),
    ({"layer": "Sequential", "children": "0"}, "a list of \\[name, layer\\] children"),
    ({"layer": "Sequential", "children": [], "extra": 1}, "a list of \\[name, layer\\]"),
    (seq({"layer": "Linear", "args": {"in_features": 4, "out_features": 2,
                                      "device": "cuda"}}), "takes no argument 'device'"),
    (seq({"layer": "Embedding", "args": {"num_embeddings": 4, "embedding_dim": 2,
                                         "_weight": torch.zeros(4, 2)}}), "no argument '_weight'"),
    (seq({"layer": "Linear", "args": {"in_features": "4", "out_features": 2}}),
     "in_features='4' is not of the kind"),
    (seq({"layer": "Linear", "args": {"in_features": torch.tensor(4), "out_features": 2}}),
     "in_features=a Tensor"),
    (seq({"layer": "Linear", "args": {"in_features": True, "out_features": 2}}), "not of the kind"),
    (seq({"layer": "Conv2d", "args": {"in_channels": 1, "out_channels": 1, "kernel_size": 3,
                                      "padding_mode": "os.system"}}), "padding_mode="),
    (seq({"layer": "Linear", "args": [4, 2]}), "needs only a dict of arguments"),
    (seq(["Linear", 4, 2]), "not a layer description"),
    (seq({"layer": "Linear", "args": {"in_features": -4, "out_features": 2}}), "failed"),
])
def test_a_crafted_description_is_refused_and_imports_nothing(tmp_path, layers, problem):
    warm_up(tmp_path)
    path = crafted(tmp_path, layers)
    before = set(sys.modules)
    with pytest.raises(ValueError, match=f"exported learner '{path}'.*{problem}"):
        load_learner(path)
    assert set(sys.modules) - before == set()


def test_huge_sizes_are_checked_on_the_meta_device_before_anything_is_allocated(tmp_path):
    # 10**7 x 10**7 floats are 400 TB: made for real, they would fail to allocate (or swap);
    # on the meta device they cost nothing and are refused against the file's weights
    for layers in (seq({"layer": "Linear", "args": {"in_features": 10**7,
                                                    "out_features": 10**7}}),
                   seq({"layer": "Embedding", "args": {"num_embeddings": 10**12,
                                                       "embedding_dim": 10**3}})):
        path = crafted(tmp_path, layers, {"0.weight": torch.zeros(2, 4)})
        with pytest.raises(ValueError, match=f"exported learner '{path}' does not fit this "
                                             r"model .*0.weight \(2, 4\) float32 vs \(1000"):
            load_learner(path)


def test_nesting_too_deep_and_mixed_entries_are_refused(tmp_path):
    deep = LINEAR
    for _ in range(100):
        deep = seq(deep)
    path = crafted(tmp_path, deep)
    with pytest.raises(ValueError, match="nested deeper than 64"):
        load_learner(path)
    both = tmp_path / "both.pt"  # a constructor and layers: which would run? neither
    torch.save({**torch.load(crafted(tmp_path, seq(LINEAR)), weights_only=True),
                "constructor": "os:system"}, both)
    with pytest.raises(ValueError, match="'layers' is not a layer description"):
        load_learner(both)
