"""Figures and progress in a real Jupyter kernel: what a notebook user sees.

One fresh `python3` kernel (the Python running the tests) runs a notebook built here, in a
temporary folder, with a user's environment (no MPLBACKEND=Agg from CI) and no magic command
until the cell that turns `%matplotlib inline` on (its formatter is what could show a returned
figure twice). Then each cell's outputs are checked as a user would see them.
"""
import os

import pytest

pytestmark = pytest.mark.slow  # starts a Jupyter kernel

SETUP = """\
import torch, torch.nn.functional as F
from torch import nn
from nanofit import (ActivationStats, DataLoaders, Learner, MetricsCB, ProgressCB, Recorder,
                     TensorLoader, show_images)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(60, 4, generator=g), torch.randint(0, 3, (60,), generator=g)
dls = DataLoaders(TensorLoader((x[:40], y[:40]), 8), TensorLoader((x[40:], y[40:]), 8))
images = DataLoaders.from_tensors((torch.rand(8, 1, 6, 6), y[:8]), (torch.rand(4, 1, 6, 6), y[:4]),
                                  batch_size=4)
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
astats = ActivationStats(nn.ReLU)"""

# (name, source): one name per cell, so a failure names the cell
CELLS = [
    ("setup", SETUP),
    ("fit", "learn = Learner(model(), dls, F.cross_entropy,\n"
            "                cbs=[Recorder(), ProgressCB(), astats])  # no MetricsCB\n"
            "learn.fit(3)"),
    ("lr_find", "learn.lr_find(num_it=20)"),
    ("plot_loss value", "learn.recorder.plot_loss()"),
    ("plot_sched assigned", "fig = learn.recorder.plot_sched()"),
    ("plot_stats", "astats.plot_stats()"),
    ("color_dim", "astats.color_dim()"),
    ("dead_chart with ;", "astats.dead_chart();"),
    ("show_images", "show_images(torch.rand(4, 1, 8, 8))"),
    ("show_batch", "images.show_batch(n=4)\nprint('after')"),
    ("nothing", "n = 1"),
    ("inline on", "%matplotlib inline"),
    ("inline plot_loss value", "learn.recorder.plot_loss()"),
    ("inline plot_loss changed", "fig = learn.recorder.plot_loss()\nfig.axes[0].set_title('x')"),
    ("inline display", "from IPython.display import display\ndisplay(astats.color_dim())"),
    ("live plot fit", "learn = Learner(model(), dls, F.cross_entropy,\n"
                      "                cbs=[MetricsCB(), Recorder(), ProgressCB(plot=True)])\n"
                      "learn.fit(3)"),
]
PLOTS = ["lr_find", "plot_loss value", "plot_sched assigned", "plot_stats", "color_dim",
         "dead_chart with ;", "show_images", "show_batch", "inline plot_loss value",
         "inline plot_loss changed", "inline display"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{cell name: its outputs} and the folder it ran in, from one kernel."""
    pytest.importorskip("ipykernel")
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    folder = tmp_path_factory.mktemp("notebook")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for _, src in CELLS])
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # as a user's Jupyter
    client = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": str(folder)}})
    client.execute(env=env)  # an error in a cell raises here, with its traceback
    return {name: cell.outputs for (name, _), cell in zip(CELLS, nb.cells)}, folder


def pngs(outs):
    return [o for o in outs if "image/png" in o.get("data", {})]


def texts(outs):
    return [o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outs]


@pytest.mark.parametrize("name", PLOTS)
def test_each_plotting_cell_shows_its_figure_once_as_a_png(outputs, name):
    outs = outputs[0][name]
    assert len(pngs(outs)) == 1, [sorted(o.get("data", {})) for o in outs]
    figure_text = [t for t in texts(outs) if "<Figure size" in t]
    assert not figure_text  # never the text a figure shows without an image formatter
    for o in outs:  # and an output that names a figure carries its image
        if "Figure size" in o.get("data", {}).get("text/plain", ""):
            assert "image/png" in o["data"]


def test_lr_find_in_a_notebook_writes_no_file(outputs):
    outs, folder = outputs
    assert not (folder / "lr_find.png").exists()
    assert not [o for o in outs["lr_find"] if "saved" in o.get("text", "")]


def test_no_figure_is_left_over_for_a_later_cell(outputs):
    assert outputs[0]["nothing"] == []
    assert [o.output_type for o in outputs[0]["show_batch"]] == ["stream", "display_data"]


@pytest.mark.parametrize("name", ["fit", "live plot fit"])
def test_a_fit_is_a_few_outputs_updated_in_place_with_a_table_of_losses(outputs, name):
    outs = outputs[0][name]
    assert len(outs) <= 5, [(o.output_type, sorted(o.get("data", {}))) for o in outs]
    assert not [o for o in outs if o.output_type == "stream"]  # no tqdm text, no warnings
    tables = [o["data"]["text/html"] for o in outs if "text/html" in o.get("data", {})]
    assert len(tables) == 1
    table = tables[0]
    assert "<table" in table and "train_loss" in table and "valid_loss" in table
    assert table.count("<tr>") == 3  # one row per epoch
    assert "epochs 3/3" in table
    if name == "live plot fit":
        assert len(pngs(outs)) == 1  # the loss plot, redrawn in place
