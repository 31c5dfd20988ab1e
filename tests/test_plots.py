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
        ["train (per batch)", "train (smoothed)", "valid (per epoch)"]
