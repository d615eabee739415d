"""Convergence report of one or several run folders: `difftune report RUN [RUN ...] [--out DIR]`.

Writes, into the output folder:

- `convergence.png`: dissimilarity d and progress p vs optimizer step (d0, d_floor, threshold,
  milestones, the sudden-convergence step marked) and the loss curves; several runs overlaid.
- `samples.png`: hint | sample | re-extracted hint at milestone evaluations.
- `report.md` and a self-contained `report.html` (images embedded, readable offline).
- `summary.json`: per run, steps to convergence, milestones, final p and d, AUCC, references, the
  detector's share of wall time; for several runs the speed-up of each against the vanilla run of
  its condition.
- When some runs differ only by seed (`groups.py`): `groups.png` (p over steps per group, AUCC
  per seed) and, in the report and `summary.json` ("groups"), per group the mean and 95% interval
  of each measure and the paired per-seed speed-ups against the vanilla reference group.

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

from .compare import compare
from .runs import Run, load_run
from .summary import summarize_run

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


def build_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, aucc_budget: int | None = None
) -> Path:
    """Build the convergence report of one or several runs.

    Args:
        run_dirs (`Sequence[str | Path]`): run folders (each with config.json and metrics.jsonl).
        out_dir (`str` or `Path`, *optional*): where the report goes. Default: `<run>/report/` for
            one run, `<first run's parent>/report-<timestamp>/` for several.
        aucc_budget (`int`, *optional*): the step budget of every run's AUCC. Default: each run's
            `max_train_steps`.

    Returns:
        `Path`: the output folder, holding convergence.png, samples.png (when samples exist),
        report.md, report.html and summary.json (and groups.png when some runs differ only by seed).

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

    from .group_plots import grouped_convergence_figure, groups_figure
    from .groups import describe_group, group_runs
    from .plots import convergence_figure
    from .render import render_html, render_markdown
    from .samples import samples_figure

    if aucc_budget is not None and (
        isinstance(aucc_budget, bool) or int(aucc_budget) != aucc_budget or aucc_budget < 1
    ):
        raise ValueError(f"--aucc_budget must be a number of optimizer steps >= 1, got {aucc_budget!r}")
    _unique_names(runs)
    out = Path(out_dir) if out_dir is not None else default_out_dir([Path(p) for p in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize_run(r, aucc_budget) for r in runs]
    if len(runs) > 1:
        compare(summaries)
    groups = group_runs(runs, summaries) if len(runs) > 1 else []
    if not any(len(g.runs) > 1 for g in groups):
        groups = []  # every run is its own experiment: the per-run tables say it all
    group_summaries = [describe_group(g) for g in groups]
    figures: dict[str, Path | None] = {
        "convergence": (
            grouped_convergence_figure(groups, out / "convergence.png")
            if groups
            else convergence_figure(runs, out / "convergence.png")
        ),
        # grouped: the first seed of each group (the grid has three rows per run)
        "samples": samples_figure([g.runs[0] for g in groups] or runs, out / "samples.png"),
        "groups": groups_figure(groups, group_summaries, out / "groups.png") if groups else None,
    }
    for name, fig in figures.items():
        if fig is None:
            (out / f"{name}.png").unlink(missing_ok=True)  # a stale figure from an earlier report
    atomic_write_text(out / "report.md", render_markdown(runs, summaries, figures, group_summaries))
    atomic_write_text(out / "report.html", render_html(runs, summaries, figures, group_summaries))
    summary: dict[str, Any] = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": summaries,
        "files": {k: (v.name if v is not None else None) for k, v in figures.items()},
    }
    if group_summaries:
        summary["groups"] = group_summaries
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return out


DESCRIPTION = (
    "Build the convergence report of run folders: curves of dissimilarity, progress and loss with the "
    "sudden-convergence step marked, a grid of hint | sample | re-extracted hint at milestone steps, "
    "report.md, a self-contained report.html and summary.json. Several runs are overlaid and compared: "
    "steps to convergence and the speed-up of each run against the vanilla run of its condition. Runs "
    "that differ only by seed are grouped: mean and 95% interval of each measure (sudden convergence, "
    "p >= 0.25 / 0.5, AUCC, final p) and paired per-seed speed-ups against the vanilla group."
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="Run folders (with config.json and metrics.jsonl).")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="Output folder. Default: RUN/report/ for one run; <first run's parent>/report-<timestamp>/ for several.",
    )
    p.add_argument(
        "--aucc_budget",
        type=int,
        default=None,
        metavar="STEPS",
        help="Step budget of the AUCC (area under p from step 0 to STEPS, divided by STEPS), the same for "
        "every run. Default: each run's --max_train_steps.",
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
    out = build_report([Path(r) for r in args.runs], args.out, getattr(args, "aucc_budget", None))
    summary = json.loads((out / "summary.json").read_text())
    for s in summary["runs"]:
        aucc = "" if s["aucc"] is None else f"; AUCC {s['aucc']:.3f}"
        print(f"{s['name']} ({s['label']}): {s['status']}{aucc}")
    for g in summary.get("groups", []):
        aucc = g["stats"]["aucc"]
        text = "" if aucc["mean"] is None else f", mean AUCC {aucc['mean']:.3f}"
        print(f"group {g['name']}: {len(g['seeds'])} seeds{text}")
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
