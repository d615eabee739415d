"""The per-run content of the report, as table rows and text for Markdown and HTML alike: the
steps-to-convergence and speed-up tables, each run's facts, and how to read the measures.
(:mod:`difftune_control.report.group_tables` does the same for groups of seeds.)
"""

from __future__ import annotations

from typing import Any

from .runs import Run
from .runs import _fmt as _fixed

EXPLAIN = [
    (
        "d",
        "mean dissimilarity between each validation hint and the hint re-extracted from the image "
        "generated with it (the condition's metric; lower = the image follows the hint better).",
    ),
    (
        "d0",
        "d for images generated with the ControlNet switched off (what a zero-initialised ControlNet gives).",
    ),
    (
        "d_floor",
        "d for the real validation images passed through the VAE: the annotator's and VAE's own noise.",
    ),
    ("p", "progress (d0 − d) / (d0 − d_floor): 0 = ignores the hint, 1 = as faithful as real images."),
    (
        "sudden convergence",
        "the first evaluation where p ≥ threshold and stays so for `patience` consecutive evaluations.",
    ),
    (
        "AUCC",
        "area under the curve of p (clipped to [0, 1]) from step 0 to a fixed step budget, divided by the "
        "budget: the mean progress over the budget (x0-supervision's measure of convergence speed; mAUCC is "
        "its mean over conditions). 'held': the run stopped before the budget and its last p is held to it; "
        "'≥': the run has not covered the budget, the area so far is a lower bound.",
    ),
    ("speed-up", "vanilla steps / run steps to the same event (same condition); > 1 means sooner."),
    ("AUCC ratio", "run AUCC / vanilla AUCC over the same budget; > 1 means more area under p."),
    ("eval cost", "share of the run's wall time spent in the detector's evaluations."),
]


SETUP_PARTS = {
    "start": "start-up (imports, accelerator, device)",
    "models": "base model",
    "latent_cache": "latent cache",
    "bank": "memory bank",
    "trainable": "ControlNet and optimizer",
}
"""How the report names the parts of a start's setup (``setup`` records in ``metrics.jsonl``)."""


def _steps(x: Any) -> str:
    return "—" if x is None else str(x)


def _p(x: Any) -> str:
    return "—" if x is None else _fixed(x)


def aucc_text(s: dict[str, Any]) -> str:
    """ "0.42", "0.42 (held)", "≥ 0.21 (incomplete)" or "—" for a run summary."""
    status = s.get("aucc_status")
    if s.get("aucc") is not None:
        return f"{s['aucc']:.3f}" + (" (held)" if status == "held" else "")
    if status == "incomplete" and s.get("aucc_lower_bound") is not None:
        return f"≥ {s['aucc_lower_bound']:.3f} (incomplete)"
    return "—"


def ratio_text(entry: dict[str, Any] | None) -> str:
    """ "1.35×" for an AUCC ratio entry, else "—"."""
    if not entry or entry.get("ratio") is None:
        return "—"
    return f"{entry['ratio']:.2f}×" + (f" ({entry['note']})" if entry.get("note") else "")


def speedup_text(entry: dict[str, Any] | None) -> str:
    """ "1.25× (20% sooner)", "≥ 1.40× (vanilla not there by step 1000)", or "—"."""
    if not entry:
        return "—"
    if entry.get("speedup") is not None:
        sooner = entry.get("percent_sooner")
        tail = "" if sooner is None else f" ({sooner:.0f}% {'sooner' if sooner >= 0 else 'later'})"
        return f"{entry['speedup']:.2f}×{tail}"
    if entry.get("speedup_at_least") is not None:
        return f"≥ {entry['speedup_at_least']:.2f}× ({entry['note']})"
    return entry.get("note") or "—"


def summary_table(summaries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the steps-to-convergence table."""
    levels = list(summaries[0]["milestones"]) if summaries else []
    header = ["run", "method", "condition", "steps", "sudden convergence", *[f"p ≥ {lv}" for lv in levels]]
    header += ["final p", "AUCC", "speed-up vs vanilla", "eval cost"]
    rows = []
    for s in summaries:
        conv = _steps(s["convergence_step"]) if s["converged"] else f"not by {_steps(s['final_step'])}"
        vs = s.get("vs_vanilla")
        speed = speedup_text(vs["convergence"]) if vs else ("reference" if s["method"] == "vanilla" else "—")
        share = s["eval_cost_share"]
        rows.append(
            [
                s["name"] + (" (in progress)" if s["in_progress"] else ""),
                s["label"],
                s["condition"],
                str(s["steps_trained"]),
                conv,
                *[_steps(s["milestones"].get(lv)) for lv in levels],
                _p(s["final_p"]),
                aucc_text(s),
                speed,
                "—" if share is None else f"{100 * share:.1f}%",
            ]
        )
    return header, rows


def speedup_table(summaries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per compared run and measure: vanilla steps, run steps, speed-up."""
    header = ["run", "vs vanilla run", "measure", "vanilla", "run", "speed-up"]
    rows = []
    for s in summaries:
        vs = s.get("vs_vanilla")
        if not vs:
            continue
        measures = [("sudden convergence", vs["convergence"])]
        measures += [(f"p ≥ {lv}", e) for lv, e in vs["milestones"].items()]
        for label, e in measures:
            rows.append(
                [
                    s["name"],
                    vs["reference"],
                    label,
                    _steps(e["vanilla_steps"]),
                    _steps(e["steps"]),
                    speedup_text(e),
                ]
            )
        a = vs.get("aucc")
        if a is not None:
            rows.append(
                [s["name"], vs["reference"], "AUCC", _p3(a["vanilla_aucc"]), _p3(a["aucc"]), ratio_text(a)]
            )
    return header, rows


def _p3(x: Any) -> str:
    return "—" if x is None else f"{x:.3f}"


def _lambdas(run: Run) -> str | None:
    """``0.4 at step 10, 0.9 at step 210``: the bank weight of the train records, where it changed."""
    changes, last = [], None
    for r in run.train:
        w = r.get("bank_weight")
        if w is not None and w != last:
            changes.append(f"{w:.3g} at step {r['step']}")
            last = w
    return ", ".join(changes) or None


_PEAK_PARTS = {"train": "the run", "convergence_eval": "detector evaluations", "validation": "validation grids",
               "checkpoint": "checkpoints"}  # fmt: skip


def _gpu_peaks(run: Run) -> str | None:
    """``the run 13.6 GiB, detector evaluations 16.0 GiB, ...``: the largest ``gpu_peak_gib`` per kind of
    record (train records carry the run's peak so far; the others their own part's)."""
    peaks: dict[str, float] = {}
    for r in run.records:
        if r.get("gpu_peak_gib") is not None and r.get("type") in _PEAK_PARTS:
            peaks[r["type"]] = max(peaks.get(r["type"], 0.0), float(r["gpu_peak_gib"]))
    return ", ".join(f"{name} {peaks[k]:.1f} GiB" for k, name in _PEAK_PARTS.items() if k in peaks) or None


def run_details(run: Run, summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Key facts of one run's config and measurement, as (name, value) pairs."""
    cfg = run.config
    tr, det, meth = cfg.get("train") or {}, cfg.get("detector") or {}, cfg.get("method") or {}
    model = cfg.get("base_model") or {}
    # the shipped toy world is named as such, not by the folder it was installed in
    base = (
        None
        if model.get("is_toy")
        else model.get("id") or (cfg.get("model") or {}).get("pretrained_model_name_or_path")
    )
    facts = [
        ("folder", str(run.path)),
        ("status", summary["status"]),
        ("method", run.label),
        (
            "condition",
            f"{run.condition}" + (f" — {run.metric_description}" if run.metric_description else ""),
        ),
        ("base model", str(base or "toy world")),
    ]
    if run.method == "difftuning":
        weight = meth.get("bank_weight")
        if weight == "auto":
            weight = f"auto (the bank rows pull {meth.get('bank_pull')}x as hard as the target rows)"
        bank = cfg.get("bank") or {}
        facts.append(
            (
                "Diff-Tuning",
                f"split {meth.get('split')}, bank share {meth.get('bank_share')}, bank weight {weight}, "
                f"bank hint {bank.get('bank_hint')}, bank latents {meth.get('bank_latents')}, "
                f"psi power {meth.get('psi_power')}, target loss weighting {meth.get('loss_weighting')}",
            )
        )
        lambdas = _lambdas(run)
        if lambdas:
            facts.append(("bank weight lambda, as logged", lambdas))
    facts += [
        (
            "optimisation",
            f"batch {tr.get('train_batch_size')}, lr {tr.get('learning_rate')}, "
            f"max steps {tr.get('max_train_steps')}, seed {tr.get('seed')}",
        ),
        (
            "detector",
            f"every {det.get('convergence_every')} steps, K = {det.get('convergence_samples')} samples, "
            f"{det.get('convergence_num_inference_steps')} sampler steps, CFG {det.get('convergence_guidance_scale')}, "
            f"threshold {summary['threshold']:g}, patience {summary['patience']}",
        ),
        ("references", f"d0 = {_fmt(summary['d0'])}, d_floor = {_fmt(summary['d_floor'])}"),
        (
            "last evaluation",
            f"step {_steps(summary['final_step'])}: d = {_fmt(summary['final_d'])}, "
            f"p = {_p(summary['final_p'])} ({summary['evaluations']} evaluations)",
        ),
        (
            "AUCC",
            f"{aucc_text(summary)} over a budget of {_steps(summary.get('aucc_budget'))} steps"
            + (f"; {summary['aucc_note']}" if summary.get("aucc_note") else ""),
        ),
        (
            "time",
            f"{summary['wall_seconds']:.0f} s wall, {summary['eval_seconds']:.1f} s in evaluations"
            + ("" if summary["eval_cost_share"] is None else f" ({100 * summary['eval_cost_share']:.1f}%)"),
        ),
    ]
    peaks = _gpu_peaks(run)
    if peaks:
        facts.append(("GPU memory, peak allocated", peaks))
    setup = summary.get("setup_seconds") or {}
    if setup:
        parts = ", ".join(
            f"{SETUP_PARTS.get(name, name.replace('_', ' '))} {sec:.0f} s" for name, sec in setup.items()
        )
        facts.append(("setup", f"{parts} (a reused latent cache or bank costs ~0)"))
    if summary.get("seconds_to_convergence") is not None:
        facts.append(
            (
                "to sudden convergence",
                f"{summary['seconds_to_convergence']:.0f} s: the setup before it and "
                f"{summary['convergence_time']:.0f} s of training",
            )
        )
    check = summary.get("bank_check")
    if check and check["ratio"] is not None:
        facts.append(
            (
                "memory bank at step 0",
                f"the weighted bank rows pull the ControlNet {check['ratio']:.2f}x as hard as the target rows "
                f"(gradient norm {_fmt(check['bank_grad'])} vs {_fmt(check['target_grad'])})",
            )
        )
    if summary["end_reason"]:
        facts.append(("ended", summary["end_reason"]))
    facts += [("caveat", c) for c in summary["caveats"]]
    return facts


def _fmt(x: Any) -> str:
    return "—" if x is None else f"{x:.4f}"


def title_of(runs: list[Run]) -> str:
    return (
        f"Convergence report: {runs[0].name}" if len(runs) == 1 else f"Convergence report: {len(runs)} runs"
    )
