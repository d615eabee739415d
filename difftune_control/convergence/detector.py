"""The sudden-convergence state machine: progress p from dissimilarities, events, resume (pure, no I/O)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from .aucc import area_under_progress

DEFAULT_THRESHOLD = 0.3
DEFAULT_PATIENCE = 2
DEFAULT_MILESTONES = (0.25, 0.5, 0.75)
_STATE_VERSION = 1


def progress(d: float, d0: float, d_floor: float) -> float:
    """Controllability progress p = (d0 - d) / (d0 - d_floor).

    p = 0 means the samples follow the hint no better than a model without ControlNet (d = d0);
    p = 1 means they follow it as well as the real images do through the VAE and the annotator
    (d = d_floor). p can leave [0, 1] (noise, or samples that beat the annotator's own floor).

    Args:
        d (`float`): mean dissimilarity of the current evaluation.
        d0 (`float`): mean dissimilarity without control (zero-initialised ControlNet).
        d_floor (`float`): mean dissimilarity of real images (VAE round trip) re-extracted.

    Returns:
        `float`: p, or NaN when it is undefined (d0 <= d_floor, or a non-finite input).
    """
    gap = d0 - d_floor
    if not (math.isfinite(d) and math.isfinite(gap)) or gap <= 0.0:
        return float("nan")
    return (d0 - d) / gap


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class SuddenConvergenceDetector:
    """Declare sudden convergence from a sequence of controllability evaluations.

    Sudden convergence is declared at the first evaluation of the first run of `patience`
    consecutive evaluations with p >= `threshold`: the event's `step` is where p crossed the
    threshold and stayed, its `confirmed_step` the evaluation that completed the run. Each level
    in `milestones` is recorded once, at the first evaluation with p >= level (no patience: these
    locate the jump, the threshold + patience decide it). A non-finite p never counts as above a
    level and breaks a run. Once declared, convergence is never retracted.

    When d0 <= d_floor the samples already follow the hint as well as the real images do before
    any training, so progress is undefined: `set_reference` warns, p is NaN (logged as null) and
    the detector never declares convergence.

    Args:
        threshold (`float`, defaults to 0.3): progress that counts as converged, in (0, 1).
        patience (`int`, defaults to 2): consecutive evaluations p must hold, >= 1.
        milestones (`Sequence[float]`, defaults to (0.25, 0.5, 0.75)): levels in (0, 1] whose first
            crossing is recorded.

    Example:
        ```python
        det = SuddenConvergenceDetector(threshold=0.3, patience=2)
        det.set_reference(d0=0.40, d_floor=0.10)
        for step, d in [(0, 0.40), (50, 0.39), (100, 0.29), (150, 0.28)]:
            for event in det.update(step, d):
                print(event)  # milestone 0.25 at 100, convergence_event at 100 (confirmed at 150)
        ```
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        patience: int = DEFAULT_PATIENCE,
        milestones: Sequence[float] = DEFAULT_MILESTONES,
    ) -> None:
        problems = []
        if not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            problems.append(f"--convergence_threshold must be in (0, 1), got {threshold!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            problems.append(f"--convergence_patience must be an int >= 1, got {patience!r}")
        levels = list(milestones)
        if not all(isinstance(m, (int, float)) and 0.0 < m <= 1.0 for m in levels) or len(set(levels)) != len(
            levels
        ):
            problems.append(f"milestones must be distinct levels in (0, 1], got {levels!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.threshold = float(threshold)
        self.patience = int(patience)
        self.milestone_levels: tuple[float, ...] = tuple(sorted(float(m) for m in levels))
        self.d0: float | None = None
        self.d_floor: float | None = None
        self.history: list[dict[str, float | int | None]] = []
        """One entry per evaluation: {"step", "d", "p"} (p None when undefined)."""
        self.converged_step: int | None = None
        """Step where p first crossed the threshold and held for `patience` evaluations."""
        self.confirmed_step: int | None = None
        """Evaluation at which that was confirmed (== converged_step when patience is 1)."""
        self.milestones: dict[float, int | None] = dict.fromkeys(self.milestone_levels)
        """Level -> step of the first evaluation with p >= level (None until crossed)."""
        self._run: list[int] = []  # indices into history of the current run of p >= threshold

    # -- reference -------------------------------------------------------------------------------
    def set_reference(self, d0: float, d_floor: float) -> None:
        """Set the normalisation: d0 (no control) and d_floor (real images through VAE + annotator).

        Args:
            d0 (`float`): mean dissimilarity of samples made without control.
            d_floor (`float`): mean dissimilarity of the VAE round trip of the real images.
        """
        if not (math.isfinite(d0) and math.isfinite(d_floor)):
            raise ValueError(f"reference dissimilarities must be finite, got d0={d0!r}, d_floor={d_floor!r}")
        if d0 <= d_floor:
            warnings.warn(
                f"convergence detector: d0 = {d0:.4g} <= d_floor = {d_floor:.4g}: samples without control "
                "already match the hints as well as the real images do, so progress is undefined (logged "
                "as null) and sudden convergence will not be declared. Check that the validation hints "
                "belong to their images and that the extractor is the run's.",
                stacklevel=2,
            )
        self.d0, self.d_floor = float(d0), float(d_floor)

    @property
    def has_reference(self) -> bool:
        """Whether `set_reference` was called (or restored)."""
        return self.d0 is not None and self.d_floor is not None

    @property
    def degenerate(self) -> bool:
        """True when d0 <= d_floor: progress is undefined and convergence is never declared."""
        return self.has_reference and self.d0 <= self.d_floor

    def progress(self, d: float) -> float:
        """p = (d0 - d) / (d0 - d_floor) for this run's references; NaN when undefined (see class doc)."""
        if not self.has_reference:
            raise RuntimeError("call set_reference(d0, d_floor) before progress()/update()")
        return progress(float(d), self.d0, self.d_floor)

    # -- the state machine ---------------------------------------------------------------------
    @property
    def last_step(self) -> int | None:
        """Optimizer step of the latest evaluation, None before the first."""
        return int(self.history[-1]["step"]) if self.history else None

    @property
    def converged(self) -> bool:
        """Whether sudden convergence has been declared."""
        return self.converged_step is not None

    def aucc_so_far(self) -> float | None:
        """AUCC of the evaluations so far, over a budget of the latest evaluation's step.

        The mean of clip(p, 0, 1) from step 0 to the latest evaluation (trapezoid rule, see
        `area_under_progress`): at a run's last evaluation at its `max_train_steps`, this is the run's
        AUCC. At step 0 it is clip(p(0), 0, 1), the limit of the mean over an empty budget.

        Returns:
            `float` or `None`: None before the first evaluation with a defined p.
        """
        pts = [(int(h["step"]), h["p"]) for h in self.history if h["p"] is not None]
        if not pts:
            return None
        steps, ps = zip(*pts)
        if self.last_step == 0:
            return min(1.0, max(0.0, float(ps[0])))
        return area_under_progress(steps, ps, budget=self.last_step)

    def update(self, step: int, d: float) -> list[dict[str, Any]]:
        """Add one evaluation and return the events it triggers.

        Args:
            step (`int`): optimizer step of the evaluation; must exceed the previous one.
            d (`float`): mean dissimilarity of the evaluation.

        Returns:
            `list[dict]`: zero or more events, in order: `{"type": "milestone", "step", "level", "p"}`
            for each level first crossed now, then `{"type": "convergence_event", "step", "p",
            "threshold", "patience", "confirmed_step", "p_confirmed"}` when convergence is confirmed
            now (`step` there is the first evaluation of the run, possibly earlier than this one).
        """
        step = int(step)
        if self.history and step <= self.last_step:
            raise ValueError(
                f"convergence evaluations must come in increasing step order: got step {step} after "
                f"step {self.last_step}"
            )
        p = self.progress(d)
        p_rec = _finite_or_none(p)
        self.history.append({"step": step, "d": _finite_or_none(float(d)), "p": p_rec})
        events: list[dict[str, Any]] = []
        if p_rec is None:
            self._run = []
            return events
        for level in self.milestone_levels:
            if self.milestones[level] is None and p >= level:
                self.milestones[level] = step
                events.append({"type": "milestone", "step": step, "level": level, "p": p_rec})
        if self.converged:
            return events
        if p >= self.threshold:
            self._run.append(len(self.history) - 1)
        else:
            self._run = []
        if len(self._run) >= self.patience:
            first = self.history[self._run[0]]
            self.converged_step = int(first["step"])
            self.confirmed_step = step
            events.append(
                {
                    "type": "convergence_event",
                    "step": self.converged_step,
                    "p": first["p"],
                    "threshold": self.threshold,
                    "patience": self.patience,
                    "confirmed_step": step,
                    "p_confirmed": p_rec,
                }
            )
        return events

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after resume, JSON-serialisable."""
        return {
            "version": _STATE_VERSION,
            "threshold": self.threshold,
            "patience": self.patience,
            "milestone_levels": list(self.milestone_levels),
            "d0": self.d0,
            "d_floor": self.d_floor,
            "history": [dict(h) for h in self.history],
            "converged_step": self.converged_step,
            "confirmed_step": self.confirmed_step,
            "milestones": [[level, s] for level, s in self.milestones.items()],
            "run": list(self._run),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output. The history and decisions are kept as saved; when this
        detector's threshold / patience / milestones differ from the saved ones, a warning says so
        (earlier decisions were made with the saved settings, later ones use the current)."""
        missing = {"d0", "d_floor", "history", "converged_step", "confirmed_step", "milestones", "run"} - set(
            state
        )
        if missing:
            raise ValueError(f"not a convergence detector state: missing keys {sorted(missing)}")
        saved = (state.get("threshold"), state.get("patience"), tuple(state.get("milestone_levels", ())))
        if saved != (self.threshold, self.patience, self.milestone_levels):
            warnings.warn(
                f"convergence detector resumed with threshold/patience/milestones {saved} -> "
                f"{(self.threshold, self.patience, self.milestone_levels)}; decisions already made are kept",
                stacklevel=2,
            )
        self.d0 = None if state["d0"] is None else float(state["d0"])
        self.d_floor = None if state["d_floor"] is None else float(state["d_floor"])
        self.history = [dict(h) for h in state["history"]]
        self.converged_step = state["converged_step"]
        self.confirmed_step = state["confirmed_step"]
        saved_milestones = {float(level): s for level, s in state["milestones"]}
        self.milestones = {level: saved_milestones.get(level) for level in self.milestone_levels}
        for level in self.milestone_levels:  # a new level: recover its first crossing from history
            if level not in saved_milestones:
                self.milestones[level] = next(
                    (int(h["step"]) for h in self.history if h["p"] is not None and h["p"] >= level), None
                )
        self._run = [int(i) for i in state["run"]]
