"""Compare run summaries with the vanilla run of their condition: speed-ups in steps, AUCC ratios."""

from __future__ import annotations

from typing import Any


def _speedup(run_steps: int | None, ref_steps: int | None, run: dict, ref: dict) -> dict[str, Any]:
    """Speed-up of one measure (convergence or a milestone) against the reference run."""
    out: dict[str, Any] = {
        "steps": run_steps,
        "vanilla_steps": ref_steps,
        "speedup": None,
        "percent_sooner": None,
    }
    if run_steps is not None and ref_steps is not None and run_steps > 0:
        out["speedup"] = ref_steps / run_steps
        out["percent_sooner"] = 100.0 * (1.0 - run_steps / ref_steps) if ref_steps > 0 else None
    elif run_steps is not None and run_steps > 0 and ref_steps is None:
        # the vanilla run had not got there by its last evaluation: a lower bound
        out["speedup_at_least"] = (ref["final_step"] or 0) / run_steps
        out["note"] = f"vanilla not there by step {ref['final_step']}"
    elif run_steps is None and ref_steps is not None:
        out["note"] = f"not there by step {run['final_step']} (vanilla: step {ref_steps})"
    return out


def pick_reference(summary: dict[str, Any], summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The vanilla run a run is compared with: same condition, plain (no loss weighting) before a vanilla
    run with one, same seed when there is one, else the first. None for plain vanilla runs themselves."""
    plain = lambda s: s.get("loss_weighting", "none") == "none"  # noqa: E731
    if summary["method"] == "vanilla" and plain(summary):
        return None
    candidates = [
        s
        for s in summaries
        if s["method"] == "vanilla" and s["condition"] == summary["condition"] and s is not summary
    ]
    candidates = [s for s in candidates if plain(s)] or candidates
    same_seed = [s for s in candidates if s["seed"] == summary["seed"]]
    return (same_seed or candidates or [None])[0]


AUCC_RATIO_FLOOR = 0.01
"""A reference AUCC below this (its p stayed near 0 over the budget) gives no AUCC ratio: a ratio to ~0 is noise."""


def aucc_ratio(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Run AUCC / reference AUCC (> 1: more area under p), None when either is not given or the
    reference's is below ``AUCC_RATIO_FLOOR`` (then `near_zero` is True); a note when the two were
    measured over different budgets."""
    a, b = run.get("aucc"), ref.get("aucc")
    out: dict[str, Any] = {"aucc": a, "vanilla_aucc": b, "ratio": None, "near_zero": False}
    if a is not None and b is not None:
        if b < AUCC_RATIO_FLOOR:
            out["near_zero"] = True
            out["note"] = f"reference AUCC {b:.3f} < {AUCC_RATIO_FLOOR} (p stayed near 0): no ratio"
        else:
            out["ratio"] = a / b
    if run.get("aucc_budget") != ref.get("aucc_budget"):
        note = f"budgets differ: {run.get('aucc_budget')} vs {ref.get('aucc_budget')} steps"
        out["note"] = f"{out['note']}; {note}" if "note" in out else note
    return out


def compare(summaries: list[dict[str, Any]]) -> None:
    """Add `vs_vanilla` to every non-vanilla summary that has a vanilla run of its condition beside it.

    speed-up = vanilla steps / run steps (to sudden convergence, and to each milestone);
    percent sooner = 100 * (1 - run steps / vanilla steps); AUCC ratio = run AUCC / vanilla AUCC.
    """
    for s in summaries:
        ref = pick_reference(s, summaries)
        if ref is None:
            s["vs_vanilla"] = None
            continue
        s["vs_vanilla"] = {
            "reference": ref["name"],
            "convergence": _speedup(s["convergence_step"], ref["convergence_step"], s, ref),
            "milestones": {
                key: _speedup(step, ref["milestones"].get(key), s, ref)
                for key, step in s["milestones"].items()
            },
            "aucc": aucc_ratio(s, ref),
        }
