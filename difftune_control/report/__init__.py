"""Convergence report of one or several run folders: `difftune report RUN [RUN ...] [--out DIR]`.

Writes, into the output folder:

- `convergence.png`: dissimilarity d and progress p vs optimizer step (d0, d_floor, threshold,
  milestones, the sudden-convergence step marked) and the loss curves; several runs overlaid.
- `samples.png`: hint | sample | re-extracted hint at milestone evaluations.
- `report.md` and a self-contained `report.html` (images embedded, readable offline).
- `summary.json`: per run, steps to convergence, milestones, final p and d, references, the
  detector's share of wall time; for several runs the speed-up of each against the vanilla run of
  its condition.

Works on runs still in progress and on runs that have not converged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runs import Run, compare, load_run, summarize_run

__all__ = ["build_report", "add_cli", "run", "main", "load_run", "summarize_run"]


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """`<run>/report/` for one run; `<first run's parent>/report-<YYYYmmdd-HHMMSS>/` for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    return Path(run_dirs[0]).resolve().parent / f"report-{time.strftime('%Y%m%d-%H%M%S')}"


def _unique_names(runs: list[Run]) -> None:
    """Runs of one name from different parents get their parent in the name."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> Path:
    """Build the convergence report of one or several runs.

    Args:
        run_dirs (`Sequence[str | Path]`): run folders (each with config.json and metrics.jsonl).
        out_dir (`str` or `Path`, *optional*): where the report goes. Default: `<run>/report/` for
            one run, `<first run's parent>/report-<timestamp>/` for several.

    Returns:
        `Path`: the output folder, holding convergence.png, samples.png (when samples exist),
        report.md, report.html and summary.json.

    Raises:
        FileNotFoundError: a folder is missing or is not a run folder (the message names the file).
        ValueError: no run given, or a run's files cannot be parsed.

    Example:
        ```python
        out = build_report(["runs/depth-vanilla", "runs/depth-difftuning"])
        print(json.loads((out / "summary.json").read_text())["runs"][1]["vs_vanilla"])
        ```
    """
    if not run_dirs:
        raise ValueError("report: give at least one run folder")
    runs = [load_run(p) for p in run_dirs]
    # the plotting stack only now: a wrong path answers without its seconds of import
    from difftune_control.utils import atomic_write_text

    from .plots import convergence_figure, samples_figure
    from .render import render_html, render_markdown

    _unique_names(runs)
    out = Path(out_dir) if out_dir is not None else default_out_dir([Path(p) for p in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize_run(r) for r in runs]
    if len(runs) > 1:
        compare(summaries)
    figures: dict[str, Path | None] = {
        "convergence": convergence_figure(runs, out / "convergence.png"),
        "samples": samples_figure(runs, out / "samples.png"),
    }
    if figures["samples"] is None:
        (out / "samples.png").unlink(missing_ok=True)  # a stale grid from an earlier report
    atomic_write_text(out / "report.md", render_markdown(runs, summaries, figures))
    atomic_write_text(out / "report.html", render_html(runs, summaries, figures))
    summary: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": summaries,
        "files": {k: (v.name if v is not None else None) for k, v in figures.items()},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return out


DESCRIPTION = (
    "Build the convergence report of run folders: curves of dissimilarity, progress and loss with the "
    "sudden-convergence step marked, a grid of hint | sample | re-extracted hint at milestone steps, "
    "report.md, a self-contained report.html and summary.json. Several runs are overlaid and compared: "
    "steps to convergence and the speed-up of each run against the vanilla run of its condition."
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="Run folders (with config.json and metrics.jsonl).")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="Output folder. Default: RUN/report/ for one run; <first run's parent>/report-<timestamp>/ for several.",
    )


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `report` subcommand to the `difftune` command line."""
    p = subparsers.add_parser(
        "report",
        help="Convergence report of one or several runs (PNG curves, sample grid, Markdown, HTML, JSON).",
        description=DESCRIPTION,
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `difftune report` from parsed arguments; prints where the report went."""
    out = build_report([Path(r) for r in args.runs], args.out)
    summary = json.loads((out / "summary.json").read_text())
    for s in summary["runs"]:
        print(f"{s['name']} ({s['label']}): {s['status']}")
    print(f"report: {out / 'report.html'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (`scripts/convergence_report.py RUN [RUN ...] [--out DIR]`)."""
    parser = argparse.ArgumentParser(prog="convergence_report.py", description=DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"convergence_report: error: {err}", file=sys.stderr)
        return 2
