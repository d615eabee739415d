"""`report.md` and the self-contained `report.html` (images embedded as base64, inline CSS, no network).

Both lay out the same content: the tables of :mod:`~difftune_control.report.run_tables` and
:mod:`~difftune_control.report.group_tables`, and the figures.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

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
from .run_tables import EXPLAIN, run_details, speedup_table, summary_table, title_of
from .runs import Run

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
