"""AUCC: the area under the progress-over-steps curve, normalised over a fixed step budget (pure, no I/O).

x0-supervision (Sangare et al., "Improving Controllable Generation: Faster Training and Better
Performance via x0-Supervision", CVPR 2026) measures how fast a ControlNet becomes controllable by
the area under its convergence curve (AUCC), and summarises a method by mAUCC, the mean AUCC over
conditions. Here the curve is the detector's progress p(step) (0 = the hint is ignored, 1 = as
faithful as real images), so AUCC in [0, 1] is the mean progress over the budget: 1 for a
ControlNet that followed its hints perfectly from step 0, 0 for one that never did. Unlike a step
to an event, it counts a run that never converges (with what it did reach) and rewards both an
early jump and a high level after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def area_under_progress(
    steps: Sequence[int | float],
    p: Sequence[float | None],
    budget: int | float,
    *,
    hold_last: bool = False,
) -> float:
    """AUCC = (1 / budget) * integral from step 0 to `budget` of clip(p(step), 0, 1), by the trapezoid rule.

    Sangare et al., CVPR 2026, "Improving Controllable Generation: Faster Training and Better
    Performance via x0-Supervision" (AUCC; mAUCC is its mean over conditions).

    The curve goes through the evaluations (step, clip(p, 0, 1)), linearly between them:

    - before the first evaluation it starts from p = 0 at step 0 (what a zero-initialised ControlNet
      gives: its samples are those of the base model, d = d0);
    - past the budget it is cut at `budget` (p there interpolated between the evaluations around it);
    - when the last evaluation comes before the budget, `hold_last=True` holds its p to the budget
      (a run stopped on purpose after it converged); otherwise the area stops at the last
      evaluation, which makes the result a lower bound of the AUCC (p >= 0 after clipping), and the
      caller should say the run is incomplete;
    - evaluations whose p is undefined (None or non-finite) are skipped: the curve joins their
      neighbours.

    Args:
        steps (`Sequence[int | float]`): optimizer steps of the evaluations, strictly increasing.
        p (`Sequence[float | None]`): progress at each evaluation (None: undefined).
        budget (`int | float`): the step budget the area is normalised over, > 0.
        hold_last (`bool`, defaults to False): hold the last p from the last evaluation to `budget`.

    Returns:
        `float`: the AUCC in [0, 1]; NaN when no evaluation has a defined p.

    Raises:
        ValueError: `budget` <= 0, `steps` and `p` of different lengths, steps not increasing or negative.

    Example:
        ```python
        area_under_progress([0, 100, 200], [0.0, 0.5, 1.0], budget=200)  # (25 + 75) / 200 = 0.5
        area_under_progress([0, 100], [0.0, 0.5], budget=200, hold_last=True)  # (25 + 50) / 200 = 0.375
        ```
    """
    problems = []
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        problems.append(f"budget must be a number of steps > 0, got {budget!r}")
    if len(steps) != len(p):
        problems.append(f"got {len(steps)} steps and {len(p)} progress values; they must pair up")
    if any(s < 0 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        problems.append(f"steps must be >= 0 and strictly increasing, got {list(steps)}")
    if problems:
        raise ValueError("AUCC: " + "; ".join(problems))
    pts = [
        (float(s), _clip01(float(v))) for s, v in zip(steps, p) if v is not None and math.isfinite(float(v))
    ]
    if not pts:
        return float("nan")
    if pts[0][0] > 0:
        pts.insert(0, (0.0, 0.0))
    budget = float(budget)
    area = 0.0
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 >= budget:
            break
        if s1 > budget:  # cut the segment at the budget
            v1 = v0 + (v1 - v0) * (budget - s0) / (s1 - s0)
            s1 = budget
        area += 0.5 * (v0 + v1) * (s1 - s0)
    last_step, last_p = pts[-1]
    if hold_last and last_step < budget:
        area += last_p * (budget - last_step)
    return area / budget
