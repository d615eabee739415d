"""`report.md` and the self-contained `report.html` (images embedded as base64, inline CSS, no network)."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

from .group_tables import (
    GROUPS_INTRO,
    MAUCC_INTRO,
    PAIRED_INTRO,
    conditions_table,
    differs_text,
    group_table,
    paired_table,
    per_seed_table,
)
from .groups import mean_over_conditions
from .runs import Run
from .runs import _fmt as _fixed

CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1d1d1f; max-width: 1180px; margin: 2em auto; padding: 0 1.2em; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #e3e3e3; padding-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
.status { padding: 0.6em 0.9em; border-radius: 6px; margin: 0.4em 0; background: #f4f6f8; }
.status.ok { background: #eaf6ec; border-left: 4px solid #2e7d32; }
.status.no { background: #fff6e5; border-left: 4px solid #ef8f00; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #dcdcdc; padding: 0.35em 0.6em; text-align: right; }
th { background: #f4f6f8; text-align: center; }
td:first-child, td.l { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
code { background: #f4f4f4; padding: 0 0.25em; border-radius: 3px; }
footer { margin-top: 3em; color: #888; font-size: 0.85em; }
"""

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


def run_details(run: Run, summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Key facts of one run's config and measurement, as (name, value) pairs."""
    cfg = run.config
    tr, det, meth = cfg.get("train") or {}, cfg.get("detector") or {}, cfg.get("method") or {}
    base = (cfg.get("base_model") or {}).get("id") or (cfg.get("model") or {}).get(
        "pretrained_model_name_or_path"
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
        facts.append(
            (
                "Diff-Tuning",
                f"split {meth.get('split')}, bank share {meth.get('bank_share')}, "
                f"bank weight {meth.get('bank_weight')}, psi power {meth.get('psi_power')}",
            )
        )
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


# -- markdown ---------------------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(
    runs: list[Run], summaries: list[dict], figures: dict[str, Path | None], groups: list[dict] | None = None
) -> str:
    """The text of report.md (figures linked by file name, next to it)."""
    out = [f"# {title_of(runs)}", ""]
    for s in summaries:
        out.append(f"- **{s['name']}** ({s['label']}, {s['condition']}): {s['status']}")
        out += [f"  - caveat: {c}" for c in s["caveats"]]
    if groups:
        out += ["", "## Groups of seeds", "", GROUPS_INTRO, "", _md_table(*group_table(groups)), ""]
        notes = [f"- AUCC of {n}" for g in groups for n in g["notes"]]
        out += [*notes, ""] if notes else []
        header, rows = conditions_table(mean_over_conditions(groups))
        if rows:
            out += [MAUCC_INTRO, "", _md_table(header, rows), ""]
        header, rows = paired_table(groups)
        if rows:
            out += [
                "## Paired speed-ups against the reference",
                "",
                PAIRED_INTRO,
                "",
                _md_table(header, rows),
            ]
            out += ["", "Per seed:", "", _md_table(*per_seed_table(groups)), ""]
            out += ["What each group changes against its reference (config.json fields):", ""]
            out += [
                f"- **{g['name']}** vs {g['reference']}: {differs_text(g)}" for g in groups if g["reference"]
            ]
            out.append("")
        out += [f"![groups of seeds]({figures['groups'].name})", ""]
    out += ["", "## Steps to sudden convergence", "", _md_table(*summary_table(summaries)), ""]
    header, rows = speedup_table(summaries)
    if rows and not groups:  # grouped: the paired per-seed tables above hold these
        out += ["## Speed-up against vanilla", "", _md_table(header, rows), ""]
    out += ["## Curves", "", f"![convergence curves]({figures['convergence'].name})", ""]
    if figures.get("samples") is not None:
        out += [
            "## Samples",
            "",
            "Rows: milestone evaluations; columns: hint | sample | re-extracted hint.",
            "",
        ]
        out += [f"![samples]({figures['samples'].name})", ""]
    out += ["## How to read this report", ""]
    out += [f"- **{k}**: {v}" for k, v in EXPLAIN]
    for run, s in zip(runs, summaries):
        out += ["", f"## Run {run.name}", ""]
        out += [f"- {k}: {v}" for k, v in run_details(run, s)]
    out += ["", f"_Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by difftune-control._", ""]
    return "\n".join(out)


# -- html -------------------------------------------------------------------------------------------
def _html_table(header: list[str], rows: list[list[str]], left: int = 3) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="l">{e(c)}</td>' if i < left else f"<td>{e(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def render_html(
    runs: list[Run], summaries: list[dict], figures: dict[str, Path | None], groups: list[dict] | None = None
) -> str:
    """A self-contained HTML page: inline CSS, figures embedded as base64 PNGs, no external resource."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title_of(runs))}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title_of(runs))}</h1>",
        '<p class="sub">Has the ControlNet learned to follow the hint? Sudden convergence measured by '
        "re-extracting the condition from generated images.</p>",
    ]
    for s in summaries:
        cls = "ok" if s["converged"] else "no"
        parts.append(
            f'<div class="status {cls}"><b>{e(s["name"])}</b> ({e(s["label"])}, {e(s["condition"])}): '
            f"{e(s['status'])}"
            + "".join(f"<br><small>caveat: {e(c)}</small>" for c in s["caveats"])
            + "</div>"
        )
    if groups:
        parts += ["<h2>Groups of seeds</h2>", f"<p>{e(GROUPS_INTRO)}</p>", _html_table(*group_table(groups))]
        notes = [n for g in groups for n in g["notes"]]
        if notes:
            parts.append("<ul>" + "".join(f"<li>AUCC of {e(n)}</li>" for n in notes) + "</ul>")
        header, rows = conditions_table(mean_over_conditions(groups))
        if rows:
            parts += [f"<p>{e(MAUCC_INTRO)}</p>"]
            parts.append(_html_table(header, rows, left=2))
        header, rows = paired_table(groups)
        if rows:
            parts += ["<h2>Paired speed-ups against the reference</h2>", f"<p>{e(PAIRED_INTRO)}</p>"]
            parts += [
                _html_table(header, rows, left=2),
                "<p>Per seed:</p>",
                _html_table(*per_seed_table(groups), left=1),
            ]
            parts.append("<p>What each group changes against its reference (config.json fields):</p><dl>")
            parts += [
                f"<dt>{e(g['name'])} vs {e(g['reference'])}</dt><dd>{e(differs_text(g))}</dd>"
                for g in groups
                if g["reference"]
            ]
            parts.append("</dl>")
        parts.append(_img(figures["groups"], "progress over steps per group of seeds, and AUCC per seed"))
    parts += ["<h2>Steps to sudden convergence</h2>", _html_table(*summary_table(summaries))]
    header, rows = speedup_table(summaries)
    if rows and not groups:  # grouped: the paired per-seed tables above hold these
        parts += ["<h2>Speed-up against vanilla</h2>", _html_table(header, rows)]
    parts += ["<h2>Curves</h2>", _img(figures["convergence"], "convergence curves")]
    if figures.get("samples") is not None:
        parts += [
            "<h2>Samples</h2>",
            "<p>Rows: milestone evaluations (step and progress p on the left); columns: the hint, the sample "
            "generated with it, and the hint re-extracted from that sample (with its dissimilarity d).</p>",
            _img(figures["samples"], "hint, sample and re-extracted hint at milestone evaluations"),
        ]
    parts.append("<h2>How to read this report</h2><dl>")
    parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in EXPLAIN]
    parts.append("</dl>")
    for run, s in zip(runs, summaries):
        parts.append(f"<h2>Run {e(run.name)}</h2><dl>")
        parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in run_details(run, s)]
        parts.append("</dl>")
    parts.append(f"<footer>Generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))} by difftune-control.</footer>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
