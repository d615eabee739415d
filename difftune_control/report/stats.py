"""Statistics over seeds: the mean of one measure and a two-sided t-interval of that mean (pure)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Interval:
    """Mean of the defined values and a two-sided t-interval of that mean.

    `low`/`high` are None with fewer than two values; `missing` counts the values that were not
    defined (a level not reached, an AUCC not complete)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    missing: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def mean_interval(values: Sequence[float | None], confidence: float = 0.95) -> Interval:
    """Mean and t-interval: mean +- t_{(1+c)/2, n-1} * sd / sqrt(n), sd with n - 1 in the denominator.

    Args:
        values (`Sequence[float | None]`): one value per seed; None or non-finite = not defined.
        confidence (`float`, defaults to 0.95): coverage of the interval, in (0, 1).

    Returns:
        `Interval`: mean None when no value is defined; low/high None with fewer than two.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    out = Interval(None, None, None, n, len(values) - n, confidence)
    if n == 0:
        return out
    out.mean = sum(vals) / n
    if n >= 2:
        from scipy.stats import t

        sd = math.sqrt(sum((v - out.mean) ** 2 for v in vals) / (n - 1))
        half = float(t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
        out.low, out.high = out.mean - half, out.mean + half
    return out
