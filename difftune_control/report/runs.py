"""Read run folders and summarise their convergence: what `summary.json` holds.

Everything here is computed from the run's `config.json` and `metrics.jsonl` (docs/internals.md):
the convergence step and milestones are the detector's own records, not recomputed, so the
report says exactly what the run logged. A run still in progress (no `end` record, possibly a
half-written last line) and a run that never converged are both summarised.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune_control.convergence import (
    DEFAULT_MILESTONES,
    DEFAULT_PATIENCE,
    DEFAULT_THRESHOLD,
)

from .compare import compare, pick_reference  # noqa: F401  (re-exported: they lived here before)

_STEP_ORDERED = ("train", "convergence_eval")  # one record per step; a repeat means the run was resumed


@dataclass
class Run:
    """One run folder, its config and its de-duplicated metrics records."""

    path: Path
    name: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    event: dict[str, Any] | None = None
    milestones: dict[float, dict[str, Any]] = field(default_factory=dict)
    end: dict[str, Any] | None = None
    bank_check: dict[str, Any] | None = None  # the memory-bank check at step 0 (Diff-Tuning)
    setups: list[dict[str, Any]] = field(default_factory=list)  # each start's setup by part (seconds)

    @property
    def method(self) -> str:
        return str((self.config.get("method") or {}).get("method", "unknown"))

    @property
    def loss_weighting(self) -> str:
        """The run's loss weighting over t (``none`` for runs from before the option existed)."""
        return str((self.config.get("method") or {}).get("loss_weighting") or "none")

    @property
    def split(self) -> str | None:
        return (self.config.get("method") or {}).get("split")

    @property
    def label(self) -> str:
        """Method + split, e.g. "vanilla" or "difftuning (fixed)"."""
        return self.method if self.method != "difftuning" else f"difftuning ({self.split})"

    @property
    def condition(self) -> str:
        recipe = self.config.get("condition") or {}
        return str(recipe.get("name") or (self.config.get("data") or {}).get("condition") or "unknown")

    @property
    def metric_description(self) -> str | None:
        metric = (self.config.get("condition") or {}).get("metric") or {}
        return metric.get("description") or metric.get("name")

    @property
    def seed(self) -> int | None:
        return (self.config.get("train") or {}).get("seed")

    @property
    def max_train_steps(self) -> int | None:
        """The step budget the run was configured for (`train.max_train_steps`)."""
        value = (self.config.get("train") or {}).get("max_train_steps")
        return int(value) if isinstance(value, (int, float)) and value > 0 else None

    @property
    def steps_trained(self) -> int:
        """Latest optimizer step the log reached."""
        return max((int(r.get("step", 0)) for r in self.records), default=0)

    @property
    def in_progress(self) -> bool:
        """No `end` record yet: still training (or killed before it could write one)."""
        return self.end is None

    @property
    def threshold(self) -> float:
        det = self.config.get("detector") or {}
        value = (self.event or {}).get("threshold") or det.get("convergence_threshold")
        return float(value if value is not None else DEFAULT_THRESHOLD)

    @property
    def patience(self) -> int:
        det = self.config.get("detector") or {}
        value = (self.event or {}).get("patience") or det.get("convergence_patience")
        return int(value if value is not None else DEFAULT_PATIENCE)

    @property
    def milestone_levels(self) -> list[float]:
        recipe_levels = ((self.config.get("condition") or {}).get("detector") or {}).get("milestones")
        levels = set(recipe_levels or DEFAULT_MILESTONES) | set(self.milestones)
        return sorted(float(x) for x in levels)


def _log_step(record: dict[str, Any]) -> int:
    """The step at which a record was written (a convergence event is written when it is confirmed)."""
    return int(record.get("confirmed_step", record.get("step", 0)))


def dedupe_resumed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Make a log that was resumed read as one run.

    When a `train` or `convergence_eval` record repeats a step already logged, the run was resumed
    from an earlier checkpoint: everything logged at or after that step before the resume is
    dropped. Events are then kept once: the last `convergence_event`, the last milestone per level.

    Args:
        records (`list[dict]`): metrics.jsonl records in file order.

    Returns:
        `list[dict]`: the records of the run as it finally went.
    """
    kept: list[dict[str, Any]] = []
    last: dict[str, int] = {}
    for r in records:
        kind, step = r.get("type"), r.get("step")
        if kind in _STEP_ORDERED and step is not None:
            if kind in last and step <= last[kind]:
                kept = [k for k in kept if _log_step(k) < step]
                last = {t: s for t, s in last.items() if s < step}
            last[kind] = int(step)
        kept.append(r)
    final: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for r in reversed(kept):
        key: tuple[Any, ...] | None = None
        if r.get("type") == "convergence_event":
            key = ("convergence_event",)
        elif r.get("type") == "milestone":
            key = ("milestone", float(r.get("level", -1)))
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        final.append(r)
    return final[::-1]


def load_run(path: str | Path) -> Run:
    """Load a run folder (`config.json` + `metrics.jsonl`).

    Args:
        path (`str` or `Path`): the run folder, as `difftune train` made it.

    Returns:
        `Run`: the config and the de-duplicated records, split by type.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing (the message names it).
        ValueError: `config.json` is not valid JSON, or `metrics.jsonl` is corrupt before its last line.
    """
    from difftune_control.utils import read_jsonl

    path = Path(path)
    layout = "a run folder, as `difftune train` writes it, holds config.json and metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"run folder not found: {path}; {layout}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file, not a run folder; {layout}")
    missing = [n for n in ("config.json", "metrics.jsonl") if not (path / n).is_file()]
    if missing:
        inside = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file())
        hint = (
            f"; it holds run folders: {', '.join(inside[:8])}{' ...' if len(inside) > 8 else ''}"
            if inside
            else ""
        )
        raise FileNotFoundError(
            f"{path} is not a run folder: missing {' and '.join(missing)}; {layout}{hint}"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / 'config.json'}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    records = dedupe_resumed([r for r in read_jsonl(path / "metrics.jsonl") if isinstance(r, dict)])
    run = Run(path=path, name=path.resolve().name, config=config, records=records)
    for r in records:
        kind = r.get("type")
        if kind == "train":
            run.train.append(r)
        elif kind == "convergence_eval":
            run.evals.append(r)
        elif kind == "convergence_event":
            run.event = r
        elif kind == "milestone":
            run.milestones[float(r["level"])] = r
        elif kind == "end":
            run.end = r
        elif kind == "bank_check":
            run.bank_check = r
        elif kind == "setup":
            run.setups.append(r)
    run.train.sort(key=lambda r: r["step"])
    run.evals.sort(key=lambda r: r["step"])
    return run


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def level_key(level: float) -> str:
    """JSON key of a milestone level: 0.25 -> "0.25", 0.5 -> "0.5"."""
    return f"{level:g}"


def _fmt(x: Any, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, "n/a" for none; a value that rounds to zero reads 0.00, never -0.00."""
    v = _num(x)
    return "n/a" if v is None else f"{round(v, digits) + 0.0:.{digits}f}"
