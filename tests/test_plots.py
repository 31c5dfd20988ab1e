"""Plot helpers."""
import pytest

from nanofit.plots import plot_loss, smooth_ema


def test_smooth_ema_is_debiased():
    assert smooth_ema([2.0, 2.0, 2.0], beta=0.9) == pytest.approx([2.0, 2.0, 2.0])
    a = 0.5 * 1.0
    b = 0.5 * a + 0.5 * 3.0
    assert smooth_ema([1.0, 3.0], beta=0.5) == pytest.approx([a / 0.5, b / 0.75])


def test_plot_loss_saves_png(tmp_path):
    fig = plot_loss([3.0, 2.0, 1.5, 1.0], [(2, 2.5), (4, 1.2)], path=tmp_path / "a" / "l.png")
    assert (tmp_path / "a" / "l.png").read_bytes()[:4] == b"\x89PNG"
    assert [line.get_label() for line in fig.axes[0].lines] == \
        ["train (per batch)", "train (smoothed)", "valid"]


def test_lr_find_plot_clips_the_divergent_tail():
    from nanofit.plots import plot_lr_find

    lrs = [10 ** (-6 + i / 10) for i in range(60)]
    losses = [2.0 - 0.02 * i for i in range(40)] + [1.3 * 3**i for i in range(18)] + \
        [float("inf"), float("nan")]
    fig = plot_lr_find(lrs, losses, {"valley": 1e-3})
    ax = fig.axes[0]
    bottom, top = ax.get_ylim()
    assert bottom < min(losses) and 2.0 < top < 2.5  # the start to the lowest loss, not 1e8
    xs = ax.lines[0].get_xdata()
    assert len(xs) < 50 and max(xs) < lrs[45]  # drawn until it climbs past where it started


def test_schedule_plot_leaves_out_what_never_changes():
    from nanofit.plots import plot_sched

    fig = plot_sched({"lr": [0.1, 0.5, 0.2], "mom": [0.9, 0.8, 0.9], "wd": [0.0, 0.0, 0.0]})
    assert [ax.get_ylabel() for ax in fig.axes] == ["lr", "mom"]
    assert fig.get_suptitle() == "constant: wd 0"
    flat = plot_sched({"lr": [0.1] * 4, "mom": [0.9] * 4})  # nothing changes: still the lr
    assert [ax.get_ylabel() for ax in flat.axes] == ["lr"] and "mom 0.9" in flat.get_suptitle()


def test_figures_show_as_png_in_jupyter_and_pickle():
    import pickle

    from nanofit.plots import new_figure

    fig = new_figure(figsize=(2, 2))
    fig.add_subplot().plot([1, 2])
    assert fig._repr_png_()[:4] == b"\x89PNG"  # what Jupyter calls for a cell's value
    again = pickle.loads(pickle.dumps(fig))
    assert type(again) is type(fig) and len(again.axes) == 1


def test_a_file_written_where_the_user_did_not_say_is_named(tmp_path, monkeypatch, capsys):
    from nanofit.plots import new_figure, show_or_save

    monkeypatch.chdir(tmp_path)
    show_or_save(new_figure(), "lr_find.png", default="lr_find.png")
    assert (tmp_path / "lr_find.png").exists()
    said = capsys.readouterr().err
    assert said == f"nanofit: saved the plot to {tmp_path / 'lr_find.png'}\n"
    show_or_save(new_figure(), tmp_path / "mine.png", default="lr_find.png")
    assert (tmp_path / "mine.png").exists() and capsys.readouterr().err == ""


def test_activation_plots_label_their_axes():
    import torch.nn.functional as F
    from torch import nn

    from nanofit import ActivationStats, Learner
    from tests.helpers import make_dls, make_model

    astats = ActivationStats(nn.ReLU)
    Learner(make_model(), make_dls(), F.cross_entropy, cbs=[astats]).fit(1)
    for fig in (astats.color_dim(), astats.dead_chart()):
        assert fig.get_supxlabel().startswith("recorded training batches")
        assert fig.get_supylabel()
    stats = astats.plot_stats()
    assert [ax.get_ylabel() for ax in stats.axes] == ["mean", "standard deviation"]
