"""Schedule functions."""
import math

import pytest

from nanofit import combine_scheds, lr_range, sched_cos, sched_exp, sched_lin, sched_no


@pytest.mark.parametrize("sched, expected", [
    (sched_lin(1.0, 3.0), (1.0, 2.0, 3.0)),
    (sched_cos(1.0, 0.0), (1.0, 0.5, 0.0)),
    (sched_exp(1e-4, 1e-2), (1e-4, 1e-3, 1e-2)),
    (sched_no(0.7, 0.1), (0.7, 0.7, 0.7)),
])
def test_schedules_at_start_middle_end(sched, expected):
    assert [sched(p) for p in (0.0, 0.5, 1.0)] == pytest.approx(expected)


def test_cosine_is_slow_at_both_ends():
    s = sched_cos(0.0, 1.0)
    assert s(0.1) < 0.1 and s(0.9) > 0.9


def test_combine_scheds_runs_each_part_over_its_fraction():
    s = combine_scheds([0.3, 0.7], [sched_lin(0.0, 1.0), sched_cos(1.0, 0.0)])
    assert s(0.0) == 0.0
    assert s(0.15) == pytest.approx(0.5)
    assert s(0.3) == pytest.approx(1.0)
    assert s(0.65) == pytest.approx(0.5)
    assert s(1.0) == pytest.approx(0.0)
    flat_then_down = combine_scheds([0.0, 1.0], [sched_no(5, 5), sched_lin(2.0, 0.0)])
    assert flat_then_down(0.0) == 2.0


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        combine_scheds([0.5, 0.6], [sched_no(1, 1), sched_no(1, 1)])
    with pytest.raises(ValueError, match="2 fractions and 1 schedules"):
        combine_scheds([0.5, 0.5], [sched_no(1, 1)])
    with pytest.raises(ValueError, match="start and end > 0"):
        sched_exp(0.0, 1.0)


def test_lr_range_is_geometric():
    assert lr_range(1e-4, 1e-2, 3) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert lr_range(1e-4, 1e-2, 1) == [1e-2]
    assert math.isclose(lr_range(1.0, 8.0, 4)[1], 2.0)
