"""`groups.png`: progress over steps per group of seeds (mean, spread, each seed), and the AUCC per seed.

One row per condition. Left: p over optimizer steps, each seed a thin line in its group's colour,
the group's mean bold with the min-max band of its seeds; under it, a strip with each seed's step
of sudden convergence and the group's mean with its 95% interval. Right: every seed's AUCC as a
dot, the group's mean and 95% interval as a bar. The same method has the same colour in every
condition. `grouped_convergence_figure` is `convergence.png` of a grouped report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .groups import METHOD_SECTIONS, RunGroup
from .plots import COLORS, VANILLA_COLOR, _plt
from .runs import Run


def _method_signature(group: RunGroup) -> str:
    keys = sorted(k for k in group.config if k.split(".", 1)[0] in METHOD_SECTIONS and k != "bank_dir")
    return json.dumps({k: group.config[k] for k in keys})


def group_colors(groups: list[RunGroup]) -> list[str]:
    """A colour per group, shared by groups of one method configuration across conditions; the plain
    vanilla reference dark grey."""
    refs = {id(g.reference) for g in groups if g.reference is not None}
    palette: dict[str, str] = {}
    out = []
    for g in groups:
        sig = _method_signature(g)
        if sig not in palette:
            is_ref = id(g) in refs or (g.method == "vanilla" and g.reference is None)
            palette[sig] = (
                VANILLA_COLOR
                if is_ref
                else COLORS[sum(c != VANILLA_COLOR for c in palette.values()) % len(COLORS)]
            )
        out.append(palette[sig])
    return out


def _curve(run: Run, summary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int | None]:
    """The run's (steps, p) and, when its AUCC holds the last p to the budget, that budget."""
    pts = [(r["step"], r["p"]) for r in run.evals if r.get("p") is not None]
    steps = np.asarray([s for s, _ in pts], dtype=float)
    ps = np.asarray([p for _, p in pts], dtype=float)
    held = summary.get("aucc_budget") if summary.get("aucc_status") == "held" else None
    return steps, ps, held


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray, int | None]]) -> tuple[np.ndarray, ...]:
    """Mean, min and max over seeds at each evaluated step; a run held to its budget counts with its
    last p after it stopped (as its AUCC does), a run that has not got there yet does not count."""
    grid = np.unique(np.concatenate([c[0] for c in curves])) if curves else np.zeros(0)
    values = np.full((len(curves), len(grid)), np.nan)
    for i, (steps, ps, held) in enumerate(curves):
        if not len(steps):
            continue
        idx = np.searchsorted(grid, steps)
        values[i, idx] = ps
        if held is not None:
            after = (grid > steps[-1]) & (grid <= held)
            values[i, after] = ps[-1]
    ok = np.isfinite(values).any(0)  # every column left has a value: no all-NaN warnings
    values = values[:, ok]
    return grid[ok], np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)


def _dots(ax, y: float, vals: list[float], iv: dict[str, Any], color: str, marker: str, bounds) -> None:
    """One group's row of a dot panel: each seed a dot, the mean a marker with its 95% interval, the bar cut
    to ``bounds`` (what the measure can take: a few seeds' t-interval runs far past them)."""
    jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(len(vals))
    ax.scatter(vals, y + jitter, color=color, s=18, alpha=0.75, zorder=3, lw=0)
    if iv["mean"] is not None:
        low, high = (
            (None, None) if iv["low"] is None else (max(iv["low"], bounds[0]), min(iv["high"], bounds[1]))
        )
        xerr = None if low is None else [[max(iv["mean"] - low, 0)], [max(high - iv["mean"], 0)]]
        ax.errorbar(
            iv["mean"], y, xerr=xerr, fmt=marker, color=color, mec="black", mew=0.6, ms=6.5,
            capsize=4, lw=1.6, zorder=4,
        )  # fmt: skip
    if iv["missing"]:
        word = "not reached" if marker == "o" else "incomplete"
        ax.annotate(
            f"{iv['missing']} {word}", (1, y + 0.22), xycoords=("axes fraction", "data"), xytext=(-3, 0),
            textcoords="offset points", fontsize=7.5, color=color, ha="right", va="bottom",
        )  # fmt: skip


def groups_figure(groups: list[RunGroup], stats: list[dict[str, Any]], path: Path) -> Path:
    """Write `groups.png`.

    Args:
        groups (`list[RunGroup]`): from `group_runs`.
        stats (`list[dict]`): the matching `summarize_groups` entries (same order).
        path (`Path`): where the PNG goes.

    Returns:
        `Path`: `path`.
    """
    plt = _plt()
    colors = group_colors(groups)
    conditions = list(dict.fromkeys(g.condition for g in groups))
    sizes = [sum(g.condition == c for g in groups) for c in conditions]
    strip = [0.5 + 0.28 * n for n in sizes]  # inches of each condition's event strip
    fig = plt.figure(figsize=(13, sum(3.4 + st + 0.9 for st in strip)), layout="constrained")
    outer = fig.add_gridspec(
        len(conditions), 2, width_ratios=[2.6, 1], height_ratios=[3.4 + st for st in strip]
    )
    threshold = groups[0].runs[0].threshold
    for row, cond in enumerate(conditions):
        inner = outer[row, 0].subgridspec(2, 1, height_ratios=[3.4, strip[row]], hspace=0.0)
        ax = fig.add_subplot(inner[0])
        ax_e = fig.add_subplot(inner[1], sharex=ax)
        ax_a = fig.add_subplot(outer[row, 1])
        members = [(g, st, c) for g, st, c in zip(groups, stats, colors) if g.condition == cond]
        for g, _, color in members:
            curves = [_curve(r, s) for r, s in zip(g.runs, g.summaries)]
            for steps, ps, held in curves:
                ax.plot(steps, ps, color=color, lw=0.8, alpha=0.4)
                if held is not None and len(steps) and steps[-1] < held:
                    ax.plot([steps[-1], held], [ps[-1], ps[-1]], color=color, lw=0.8, alpha=0.4, ls=":")
            grid_steps, mean, lo, hi = mean_curve(curves)
            seeds = len(g.runs)
            ax.plot(
                grid_steps, mean, color=color, lw=2.2, label=f"{g.name} ({seeds} seed{'s' * (seeds > 1)})"
            )
            if seeds > 1:
                ax.fill_between(grid_steps, lo, hi, color=color, alpha=0.1, lw=0)
        ax.axhline(threshold, color="#d62728", ls="--", lw=1.0, alpha=0.7, label=f"threshold {threshold:g}")
        ax.axhline(0, color="black", lw=0.6, alpha=0.5)
        ax.set_title(f"{cond}: progress p over steps (bold: mean over seeds, band: min-max, thin: each seed)")
        ax.set_ylabel("p  (0 = no control, 1 = real images)", fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
        ax.tick_params(labelbottom=False)
        # steps to sudden convergence and AUCC: each seed a dot, the mean and its 95% interval
        last = max((s.get("final_step") or 0 for g, _, _ in members for s in g.summaries), default=0)
        for y, (g, st, color) in enumerate(reversed(members)):
            steps = [s["convergence_step"] for s in g.summaries if s["convergence_step"] is not None]
            _dots(ax_e, y, steps, st["stats"]["event"], color, "o", (0, last or float("inf")))
            aucc = [s["aucc"] for s in g.summaries if s.get("aucc") is not None]
            _dots(ax_a, y, aucc, st["stats"]["aucc"], color, "D", (0, 1))
        names = [g.name for g, _, _ in reversed(members)]
        for a in (ax_e, ax_a):
            a.set_yticks(range(len(members)))
            a.set_yticklabels(names, fontsize=8)
            a.set_ylim(-0.6, len(members) - 0.4)
        ax_e.set_xlabel(
            "optimizer step;  strip: step of sudden convergence (dots: seeds, circle: mean, bar: 95% interval within "
            "the steps run)",
            fontsize=8.5,
        )
        budgets = sorted({str(s.get("aucc_budget")) for g, _, _ in members for s in g.summaries})
        ax_a.set_title(f"{cond}: AUCC over {' / '.join(budgets)} steps")
        ax_a.set_xlabel("AUCC (dots: seeds; diamond: mean;\nbar: 95% interval, within [0, 1])", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grouped_convergence_figure(groups: list[RunGroup], path: Path) -> Path:
    """Write `convergence.png` for grouped runs: dissimilarity d and training loss of every run, in its
    group's colour, one column per condition (p per group is in `groups.png`).

    Args:
        groups (`list[RunGroup]`): from `group_runs`.
        path (`Path`): where the PNG goes.

    Returns:
        `Path`: `path`.
    """
    from .plots import _series, ema

    plt = _plt()
    colors = group_colors(groups)
    conditions = list(dict.fromkeys(g.condition for g in groups))
    fig, axes = plt.subplots(
        2, len(conditions), figsize=(max(6.5, 6.5 * len(conditions)), 8), squeeze=False, layout="constrained"
    )
    for col, cond in enumerate(conditions):
        ax_d, ax_l = axes[0, col], axes[1, col]
        for g, color in zip(groups, colors):
            if g.condition != cond:
                continue
            for i, run in enumerate(g.runs):
                label = f"{g.name} ({len(g.runs)} seeds)" if i == 0 else None
                steps, d = _series(run.evals, "d")
                ax_d.plot(steps, d, color=color, lw=1.0, alpha=0.75, label=label)
                steps, lt = _series(run.train, "loss_target")
                if len(steps):
                    ax_l.plot(steps, ema(list(lt), max(3, len(steps) // 15)), color=color, lw=1.0, alpha=0.75,
                              label=label)  # fmt: skip
                steps, lb = _series(run.train, "loss_bank")
                if len(steps):
                    ax_l.plot(steps, ema(list(lb), max(3, len(steps) // 15)), color=color, lw=1.0, alpha=0.6,
                              ls="--", label=f"{g.name} bank" if i == 0 else None)  # fmt: skip
        metric = next(g.runs[0].metric_description for g in groups if g.condition == cond)
        ax_d.set_title(f"{cond}: dissimilarity d (lower is better)" + (f"\nd = {metric}" if metric else ""))
        ax_d.set_ylabel("d", fontsize=9)
        ax_l.set_title(f"{cond}: training loss (EMA; dashed: bank rows)")
        ax_l.set_ylabel("loss", fontsize=9)
        ax_l.set_xlabel("optimizer step")
        for ax in (ax_d, ax_l):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", fontsize=8)
    fig.suptitle(
        f"{sum(len(g.runs) for g in groups)} runs in {len(groups)} groups: every run, coloured by group"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
