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
    area_under_progress,
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
    run.train.sort(key=lambda r: r["step"])
    run.evals.sort(key=lambda r: r["step"])
    return run


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def level_key(level: float) -> str:
    """JSON key of a milestone level: 0.25 -> "0.25", 0.5 -> "0.5"."""
    return f"{level:g}"


def status_line(run: Run) -> str:
    """One sentence on where the run stands, e.g. "not converged by step 1000, p = 0.12"."""
    if not run.evals:
        text = f"no convergence evaluation yet (step {run.steps_trained})"
    elif run.event is not None:
        text = (
            f"sudden convergence at step {run.event['step']} (p = {_fmt(run.event.get('p'))}, "
            f"confirmed at step {run.event.get('confirmed_step', run.event['step'])})"
        )
    else:
        last = run.evals[-1]
        if last.get("p") is None:
            text = (
                f"not converged by step {last['step']}: progress undefined "
                f"(d0 = {_fmt(last.get('d0'), 4)} <= d_floor = {_fmt(last.get('d_floor'), 4)})"
            )
        else:
            text = f"not converged by step {last['step']}, p = {_fmt(last.get('p'))}"
    if run.in_progress:
        text += f"; in progress (no end record, last step {run.steps_trained})"
    return text


def _fmt(x: Any, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, "n/a" for none; a value that rounds to zero reads 0.00, never -0.00."""
    v = _num(x)
    return "n/a" if v is None else f"{round(v, digits) + 0.0:.{digits}f}"


def caveats(run: Run) -> list[str]:
    """Warnings a reader needs to trust p: a d0 - d_floor gap within the evaluation noise."""
    notes = []
    ratio = _num((run.bank_check or {}).get("ratio"))
    if ratio is not None and ratio > 1:
        notes.append(
            f"at step 0 the weighted memory-bank rows pulled the ControlNet {ratio:.2f}x as hard as the target "
            "rows: the bank can delay or prevent sudden convergence (BENCHMARKS.md sections 0 and 2; the default "
            "--method difftuning measures lambda with --bank_weight auto and draws bank rows with --bank_latents "
            "sample)"
        )
    if not run.evals:
        return notes
    first, last = run.evals[0], run.evals[-1]
    d0, floor = _num(last.get("d0")), _num(last.get("d_floor"))
    per = [v for v in (first.get("d_per_sample") or []) if _num(v) is not None]
    if d0 is not None and floor is not None and len(per) > 1:
        mean = sum(per) / len(per)
        se = math.sqrt(sum((v - mean) ** 2 for v in per) / (len(per) - 1) / len(per))
        gap = d0 - floor
        if gap <= 0:
            notes.append(f"d0 = {d0:.4g} <= d_floor = {floor:.4g}: progress is undefined")
        elif gap < 3 * se:
            notes.append(
                f"d0 - d_floor = {gap:.3g} is within 3 standard errors ({se:.3g}) of the step-{first['step']} "
                f"evaluation: p moves by about {se / gap:.2f} from sampling noise alone; use more validation "
                "samples (--convergence_samples) or a base model / extractor pair that separates them"
            )
    return notes


def run_aucc(run: Run, budget: int | None = None) -> dict[str, Any]:
    """The run's AUCC over a fixed step budget, and how far its curve covers that budget.

    The area is `area_under_progress` over the run's evaluations (p clipped to [0, 1]). When the
    last evaluation comes before the budget, the last p is held to the budget only if the run
    trained to the budget (the evaluation interval did not land on it) or stopped on purpose after
    converging (`--stop_after_convergence`); otherwise (in progress, interrupted, or trained fewer
    steps than the budget) the AUCC is not given, only its lower bound (the area so far).

    Args:
        run (`Run`): the loaded run.
        budget (`int`, *optional*): the step budget. Default: the run's `max_train_steps`.

    Returns:
        `dict`: `aucc` (float or None), `aucc_budget`, `aucc_status` ("complete", "held",
        "incomplete" or "undefined"), `aucc_lower_bound` (the area so far over the budget, a lower
        bound; equal to `aucc` when complete), `aucc_note` (a sentence for the reader, or None).
    """
    budget = run.max_train_steps if budget is None else int(budget)
    out: dict[str, Any] = {
        "aucc": None,
        "aucc_budget": budget,
        "aucc_status": "undefined",
        "aucc_lower_bound": None,
        "aucc_note": None,
    }
    pts = [(int(r["step"]), _num(r.get("p"))) for r in run.evals]
    pts = [(st, p) for st, p in pts if p is not None]
    if budget is None or budget <= 0:
        out["aucc_note"] = "no step budget: config.json has no train.max_train_steps (pass --aucc_budget)"
        return out
    if not pts:
        out["aucc_note"] = "no evaluation with a defined progress p"
        return out
    steps, ps = [st for st, _ in pts], [p for _, p in pts]
    last_step, last_p = steps[-1], ps[-1]
    out["aucc_lower_bound"] = area_under_progress(steps, ps, budget)
    reason = (run.end or {}).get("reason")
    if last_step >= budget:
        out["aucc"], out["aucc_status"] = out["aucc_lower_bound"], "complete"
        return out
    held = f"p = {last_p:.2f} of the last evaluation (step {last_step}) held to step {budget}"
    if reason == "stop_after_convergence":
        out["aucc_status"] = "held"
        out["aucc_note"] = f"stopped early by --stop_after_convergence at step {run.steps_trained}; {held}"
    elif run.end is not None and run.steps_trained >= budget:
        out["aucc_status"] = "held"
        out["aucc_note"] = f"trained to the budget, last evaluation before it: {held}"
    else:
        why = (
            "still in progress or killed"
            if run.end is None
            else f"ended by {reason} at step {run.steps_trained}"
        )
        out["aucc_status"] = "incomplete"
        out["aucc_note"] = (
            f"incomplete: last evaluation at step {last_step} of the {budget}-step budget ({why}); "
            f"AUCC >= {out['aucc_lower_bound']:.3f}"
        )
        return out
    out["aucc"] = area_under_progress(steps, ps, budget, hold_last=True)
    return out


def summarize_run(run: Run, budget: int | None = None) -> dict[str, Any]:
    """The per-run entry of `summary.json`, computed from the run's records only.

    Args:
        run (`Run`): the loaded run.
        budget (`int`, *optional*): step budget of the AUCC (`run_aucc`). Default: the run's
            `max_train_steps`.
    """
    last = run.evals[-1] if run.evals else {}
    eval_seconds = sum(_num(r.get("eval_seconds")) or 0.0 for r in run.evals)
    wall = max((_num(r.get("time")) or 0.0 for r in run.records), default=0.0)
    event = run.event or {}
    return {
        "name": run.name,
        "path": str(run.path),
        "label": run.label,
        "method": run.method,
        "split": run.split if run.method == "difftuning" else None,
        "loss_weighting": run.loss_weighting,
        "condition": run.condition,
        "seed": run.seed,
        "steps_trained": run.steps_trained,
        "in_progress": run.in_progress,
        "end_reason": (run.end or {}).get("reason"),
        "evaluations": len(run.evals),
        "threshold": run.threshold,
        "patience": run.patience,
        "converged": run.event is not None,
        "convergence_step": event.get("step"),
        "confirmed_step": event.get("confirmed_step", event.get("step")),
        "convergence_p": _num(event.get("p")),
        "convergence_time": _num(event.get("time")),
        "milestones": {
            level_key(lv): (run.milestones[lv]["step"] if lv in run.milestones else None)
            for lv in run.milestone_levels
        },
        "final_step": last.get("step"),
        "final_p": _num(last.get("p")),
        **run_aucc(run, budget),
        "final_d": _num(last.get("d")),
        "d0": _num(last.get("d0")),
        "d_floor": _num(last.get("d_floor")),
        "eval_seconds": eval_seconds,
        "wall_seconds": wall,
        "eval_cost_share": eval_seconds / wall if wall > 0 else None,
        "status": status_line(run),
        "bank_check": (
            {k: _num(run.bank_check.get(k)) for k in ("ratio", "target_grad", "bank_grad")}
            if run.bank_check
            else None
        ),
        "caveats": caveats(run),
    }
