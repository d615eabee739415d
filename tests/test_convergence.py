"""The sudden-convergence detector on synthetic dissimilarity sequences (pure state machine)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from difftune_control.convergence import SuddenConvergenceDetector, progress

D0, FLOOR = 0.40, 0.10  # p = (0.40 - d) / 0.30


def d_of(p: float) -> float:
    return D0 - p * (D0 - FLOOR)


def run(det: SuddenConvergenceDetector, ps, every: int = 50, start: int = 0) -> list[dict]:
    events = []
    for i, p in enumerate(ps):
        events += det.update(start + i * every, d_of(p))
    return events


def make(**kw) -> SuddenConvergenceDetector:
    det = SuddenConvergenceDetector(**kw)
    det.set_reference(D0, FLOOR)
    return det


def test_progress_formula():
    assert progress(0.40, D0, FLOOR) == pytest.approx(0.0)
    assert progress(0.10, D0, FLOOR) == pytest.approx(1.0)
    assert progress(0.25, D0, FLOOR) == pytest.approx(0.5)
    assert progress(0.45, D0, FLOOR) == pytest.approx(-1 / 6)  # worse than no control: negative
    assert math.isnan(progress(0.2, 0.1, 0.1))  # no gap: undefined
    assert math.isnan(progress(float("nan"), D0, FLOOR))


def test_sharp_drop_with_noise_found_at_the_right_evaluation():
    rng = np.random.default_rng(0)
    # flat near 0.05 for 6 evaluations, a jump at evaluation 6 (step 300), shoulder, slow climb
    clean = [0.05] * 6 + [0.38, 0.45, 0.5, 0.52, 0.55, 0.6, 0.65, 0.7, 0.76, 0.78]
    ps = [p + float(rng.normal(0, 0.03)) for p in clean]
    det = make()
    events = run(det, ps)
    conv = [e for e in events if e["type"] == "convergence_event"]
    assert len(conv) == 1
    assert conv[0]["step"] == 300 and det.converged_step == 300
    assert conv[0]["confirmed_step"] == 350 and det.confirmed_step == 350
    assert conv[0]["p"] == pytest.approx(ps[6])
    assert conv[0]["threshold"] == 0.3 and conv[0]["patience"] == 2
    expected_milestones = {
        level: 50 * next(i for i, p in enumerate(ps) if p >= level) for level in (0.25, 0.5, 0.75)
    }
    assert det.milestones == expected_milestones
    assert expected_milestones[0.25] == 300
    mil = {e["level"]: e["step"] for e in events if e["type"] == "milestone"}
    assert mil == expected_milestones
    # the convergence event comes after the milestones of the same evaluation, once
    assert [e["type"] for e in events].count("convergence_event") == 1


def test_flat_curve_never_converges():
    rng = np.random.default_rng(1)
    det = make()
    events = run(det, [0.05 + float(rng.normal(0, 0.05)) for _ in range(60)])
    assert events == []
    assert not det.converged and det.converged_step is None
    assert all(s is None for s in det.milestones.values())
    assert len(det.history) == 60


def test_single_noisy_dip_does_not_trigger_with_patience():
    det = make(patience=2)
    ps = [0.0, 0.05, 0.35, 0.1, 0.05, 0.08, 0.31, 0.2]
    events = run(det, ps)
    assert not det.converged
    # milestones are first crossings, no patience: the dip crosses 0.25 at step 100
    assert [e for e in events if e["type"] == "milestone"] == [
        {"type": "milestone", "step": 100, "level": 0.25, "p": pytest.approx(0.35)}
    ]
    # the same sequence with patience 1 triggers at the dip
    det1 = make(patience=1)
    events1 = run(det1, ps)
    assert det1.converged_step == 100 and det1.confirmed_step == 100
    assert sum(e["type"] == "convergence_event" for e in events1) == 1


def test_patience_three_declares_at_first_of_run():
    det = make(patience=3)
    run(det, [0.0, 0.4, 0.2, 0.4, 0.5, 0.31, 0.9])
    assert det.converged_step == 150  # evaluations 3, 4, 5 hold; 1 was broken by 2
    assert det.confirmed_step == 250


def test_several_milestones_in_one_evaluation_and_no_second_event():
    det = make()
    events = run(det, [0.0, 0.8, 0.9, 0.1, 0.9, 0.95])
    assert [(e["type"], e.get("level")) for e in events] == [
        ("milestone", 0.25),
        ("milestone", 0.5),
        ("milestone", 0.75),
        ("convergence_event", None),
    ]
    assert det.converged_step == 50 and det.confirmed_step == 100  # never retracted or repeated


def test_non_finite_d_breaks_a_run():
    det = make()
    run(det, [0.4])
    det.update(50, float("nan"))
    det.update(100, d_of(0.4))
    assert not det.converged
    assert det.history[1] == {"step": 50, "d": None, "p": None}
    det.update(150, d_of(0.4))
    assert det.converged_step == 100


def test_degenerate_reference_warns_and_never_converges():
    det = SuddenConvergenceDetector()
    with pytest.warns(UserWarning, match="progress is undefined"):
        det.set_reference(0.1, 0.2)
    assert det.degenerate
    assert [det.update(s, 0.0) for s in (0, 50, 100)] == [[], [], []]
    assert det.history[-1]["p"] is None and not det.converged


def test_errors_teach():
    with pytest.raises(ValueError, match="--convergence_threshold must be in \\(0, 1\\), got 1.5"):
        SuddenConvergenceDetector(threshold=1.5)
    with pytest.raises(ValueError, match="--convergence_patience"):
        SuddenConvergenceDetector(patience=0)
    with pytest.raises(ValueError, match="milestones"):
        SuddenConvergenceDetector(milestones=(0.5, 0.5))
    det = SuddenConvergenceDetector()
    with pytest.raises(RuntimeError, match="set_reference"):
        det.update(0, 0.3)
    det.set_reference(D0, FLOOR)
    det.update(100, 0.3)
    with pytest.raises(ValueError, match="increasing step order: got step 100 after step 100"):
        det.update(100, 0.3)


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 9])
def test_resume_round_trip_same_decisions(cut):
    rng = np.random.default_rng(2)
    ps = [0.02, 0.04, 0.05, 0.33, 0.36, 0.45, 0.28, 0.52, 0.6, 0.77, 0.8]
    ps = [p + float(rng.normal(0, 0.01)) for p in ps]
    straight = make()
    events_straight = run(straight, ps)

    first = make()
    events = run(first, ps[:cut])
    state = json.loads(json.dumps(first.state_dict()))  # it goes through trainer_state.json
    resumed = SuddenConvergenceDetector()
    resumed.load_state_dict(state)
    events += run(resumed, ps[cut:], start=50 * cut)
    assert events == events_straight
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.converged_step == straight.converged_step == 150
    assert resumed.milestones == straight.milestones


def test_load_state_dict_rejects_foreign_state_and_warns_on_changed_settings():
    det = make()
    with pytest.raises(ValueError, match="missing keys"):
        det.load_state_dict({"history": []})
    state = make(threshold=0.3).state_dict()
    other = SuddenConvergenceDetector(threshold=0.4)
    with pytest.warns(UserWarning, match="decisions already made are kept"):
        other.load_state_dict(state)
    assert other.threshold == 0.4 and other.d0 == D0
