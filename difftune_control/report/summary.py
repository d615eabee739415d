"""The per-run entry of `summary.json`: status line, caveats, AUCC over a budget, data-preparation time.

Computed from a loaded :class:`~difftune_control.report.runs.Run` only (its `config.json` and `metrics.jsonl`).
"""

from __future__ import annotations

import math
from typing import Any

from difftune_control.convergence import area_under_progress

from .runs import Run, _fmt, _num, level_key


def setup_seconds(records: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of setup by part (start-up, base model, latent cache, memory bank, ControlNet and optimizer),
    summed over the starts of a run."""
    out: dict[str, float] = {}
    for r in records:
        for part, value in (r.get("seconds") or {}).items():
            if _num(value) is not None:
                out[part] = out.get(part, 0.0) + float(value)
    return out


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
    setup = setup_seconds(run.setups)
    event_time = _num(event.get("time"))
    before_event = setup_seconds([r for r in run.setups if (r.get("step") or 0) <= (event.get("step") or 0)])
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
        "convergence_time": event_time,
        # the run's cost to sudden convergence: the setup of the starts before it, and the training
        "seconds_to_convergence": (
            event_time + sum(before_event.values()) if event_time is not None else None
        ),
        "setup_seconds": setup,
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
