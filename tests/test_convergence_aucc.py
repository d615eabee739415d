"""AUCC, the area under the progress curve over a fixed step budget, against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from difftune_control.convergence import SuddenConvergenceDetector, area_under_progress

# exact in binary floating point: sums of halves and quarters of round step counts
EXACT = 1e-12


def test_trapezoid_over_the_budget():
    # 0..100: mean 0.25 -> 25; 100..200: mean 0.75 -> 75; (25 + 75) / 200
    assert area_under_progress([0, 100, 200], [0.0, 0.5, 1.0], budget=200) == pytest.approx(0.5, abs=EXACT)
    # p outside [0, 1] is clipped before the area: the same curve
    assert area_under_progress([0, 100, 200], [-0.2, 0.5, 1.4], budget=200) == pytest.approx(0.5, abs=EXACT)


def test_a_run_that_never_converges_keeps_its_small_area():
    steps = list(range(0, 1001, 50))
    assert area_under_progress(steps, [0.05] * len(steps), budget=1000) == pytest.approx(0.05, abs=EXACT)
    assert area_under_progress(steps, [0.0] * len(steps), budget=1000) == 0.0


def test_evaluations_past_the_budget_are_cut_at_it():
    # budget 150: 0..100 -> 25; 100..150: p(150) = 0.75 by interpolation, mean 0.625 * 50 = 31.25
    assert area_under_progress([0, 100, 200], [0.0, 0.5, 1.0], budget=150) == pytest.approx(
        56.25 / 150, abs=EXACT
    )
    # a budget on an evaluation ignores what follows it
    assert area_under_progress([0, 100, 200, 300], [0.0, 0.5, 1.0, 0.0], budget=200) == pytest.approx(
        0.5, abs=EXACT
    )


def test_a_short_curve_is_held_or_left_as_a_lower_bound():
    # stopped at step 100 with p = 0.5, budget 200: held -> (25 + 50) / 200; not held -> 25 / 200
    assert area_under_progress([0, 100], [0.0, 0.5], budget=200, hold_last=True) == pytest.approx(
        0.375, abs=EXACT
    )
    assert area_under_progress([0, 100], [0.0, 0.5], budget=200) == pytest.approx(0.125, abs=EXACT)


def test_start_and_undefined_points():
    # no evaluation at step 0: the curve starts from p = 0 there: 25 + 50 over 200
    assert area_under_progress([100, 200], [0.5, 0.5], budget=200) == pytest.approx(0.375, abs=EXACT)
    # an undefined p is skipped: the curve joins its neighbours, (0 + 1) / 2 over the whole budget
    assert area_under_progress([0, 100, 200], [0.0, None, 1.0], budget=200) == pytest.approx(0.5, abs=EXACT)
    assert area_under_progress([0, 100, 200], [0.0, float("nan"), 1.0], budget=200) == pytest.approx(
        0.5, abs=EXACT
    )
    assert math.isnan(area_under_progress([0, 100], [None, None], budget=100))
    assert math.isnan(area_under_progress([], [], budget=100))


def test_bad_input_is_reported_all_at_once():
    with pytest.raises(ValueError) as err:
        area_under_progress([0, 100, 50], [0.0, 0.1], budget=0)
    msg = str(err.value)
    assert "budget must be a number of steps > 0, got 0" in msg
    assert "2 progress values" in msg and "strictly increasing" in msg


def test_the_detector_reports_the_area_so_far_and_keeps_it_through_resume():
    det = SuddenConvergenceDetector()
    det.set_reference(0.40, 0.10)  # p = (0.40 - d) / 0.30
    assert det.aucc_so_far() is None
    det.update(0, 0.40)  # p = 0
    assert det.aucc_so_far() == 0.0
    det.update(50, 0.25)  # p = 0.5: (0 + 0.5) / 2
    assert det.aucc_so_far() == pytest.approx(0.25, abs=1e-9)
    det.update(100, 0.10)  # p = 1: (12.5 + 37.5) / 100
    assert det.aucc_so_far() == pytest.approx(0.5, abs=1e-9)
    again = SuddenConvergenceDetector()
    again.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert again.aucc_so_far() == det.aucc_so_far()
