"""The report's curves: `convergence.png` (d, p and the losses vs optimizer step); `samples.png` is
drawn by :mod:`difftune_control.report.samples`.

matplotlib runs headless (Agg backend); nothing here needs a display or the network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .runs import Run
from .summary import status_line

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
VANILLA_COLOR = "#4d4d4d"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.25,
            "legend.fontsize": 8.5,
            "legend.framealpha": 0.85,
        }
    )
    return plt


def ema(values: list[float], span: int) -> np.ndarray:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing), NaNs skipped."""
    alpha = 2.0 / (max(span, 1) + 1.0)
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        if v is not None and np.isfinite(v):
            acc = (1 - alpha) * acc + alpha * v
            weight = (1 - alpha) * weight + alpha
        out.append(acc / weight if weight > 0 else np.nan)
    return np.asarray(out, dtype=float)


def run_colors(runs: list[Run]) -> list[str]:
    """One colour per run; vanilla runs are dark grey when there is a single one."""
    vanilla = [r for r in runs if r.method == "vanilla"]
    colors, i = [], 0
    for r in runs:
        if r.method == "vanilla" and len(vanilla) == 1 and len(runs) > 1:
            colors.append(VANILLA_COLOR)
        else:
            colors.append(COLORS[i % len(COLORS)])
            i += 1
    return colors


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts)
    return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)


def _mark_convergence(ax, run: Run, color: str, text: bool, y_text: float | None = None) -> None:
    if run.event is None:
        return
    s = run.event["step"]
    ax.axvline(s, color=color, lw=1.6, ls="-", alpha=0.85, zorder=1)
    if text:
        conf = run.event.get("confirmed_step", s)
        label = f"sudden convergence\nstep {s}" + (f" (confirmed {conf})" if conf != s else "")
        ax.annotate(
            label,
            xy=(s, y_text if y_text is not None else 0.5),
            xycoords=("data", "axes fraction"),
            xytext=(6, 0),
            textcoords="offset points",
            color=color,
            fontsize=9,
            fontweight="bold",
            va="center",
            bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": color, "alpha": 0.9},
        )


def convergence_figure(runs: list[Run], path: Path) -> Path:
    """Write the curves: d, p and the losses vs optimizer step (one run, or several overlaid).

    Args:
        runs (`list[Run]`): the runs (one colour each when several).
        path (`Path`): where the PNG goes.

    Returns:
        `Path`: `path`.
    """
    plt = _plt()
    single = len(runs) == 1
    colors = ["#1f77b4"] if single else run_colors(runs)
    fig, (ax_d, ax_p, ax_l) = plt.subplots(
        3, 1, figsize=(10, 10.5), sharex=True, gridspec_kw={"height_ratios": [1, 1.15, 0.9]}
    )
    for i, (run, color) in enumerate(zip(runs, colors)):
        first = i == 0
        name = run.label if single else f"{run.name} · {run.label}"
        steps, d = _series(run.evals, "d")
        if len(steps):
            ax_d.plot(steps, d, "-o", color=color, ms=3.5, lw=1.6, label="d (mean of K)" if single else name)
            per = [r.get("d_per_sample") or [] for r in run.evals if r.get("d") is not None]
            if single and per and all(len(x) == len(per[0]) > 1 for x in per):
                arr = np.asarray(per, dtype=float)
                ax_d.fill_between(
                    steps,
                    np.nanmin(arr, 1),
                    np.nanmax(arr, 1),
                    color=color,
                    alpha=0.12,
                    label="min-max over samples",
                )
        last = run.evals[-1] if run.evals else {}
        if last.get("d0") is not None:
            ax_d.axhline(
                last["d0"],
                color=color,
                ls="--",
                lw=1.1,
                alpha=0.8,
                label=f"d0 = {last['d0']:.3f} (no control)"
                if single
                else ("d0 (no control)" if first else None),
            )
            ax_d.axhline(
                last["d_floor"],
                color=color,
                ls=":",
                lw=1.4,
                alpha=0.9,
                label=f"d_floor = {last['d_floor']:.3f} (real images)"
                if single
                else ("d_floor (real images)" if first else None),
            )
        steps, p = _series(run.evals, "p")
        if len(steps):
            ax_p.plot(steps, p, "-o", color=color, ms=3.5, lw=1.8, label="progress p" if single else name)
        for level, rec in sorted(run.milestones.items()):
            ax_p.plot(
                rec["step"],
                rec["p"],
                marker="D",
                ms=7,
                color=color,
                mec="black",
                mew=0.6,
                zorder=5,
                ls="none",
                label="first p ≥ " + " / ".join(f"{lv:g}" for lv in run.milestone_levels)
                if first and level == min(run.milestones)
                else None,
            )
        if single:  # one label per evaluation: levels first reached at the same step share it
            by_step: dict[int, list[float]] = {}
            for level, rec in sorted(run.milestones.items()):
                by_step.setdefault(rec["step"], []).append(level)
            for step, levels in by_step.items():
                rec = run.milestones[levels[0]]
                ax_p.annotate(
                    f"p ≥ {', '.join(f'{lv:g}' for lv in levels)} @ {step}",
                    (rec["step"], rec["p"]),
                    xytext=(-8, 9),
                    textcoords="offset points",
                    ha="right",
                    fontsize=8.5,
                )
        for ax in (ax_d, ax_p, ax_l):
            _mark_convergence(ax, run, "#d62728" if single else color, text=False)
        steps, lt = _series(run.train, "loss_target")
        if len(steps):
            span = max(3, len(steps) // 15)
            if single:
                ax_l.plot(steps, lt, color=color, alpha=0.22, lw=0.9)
            ax_l.plot(
                steps, ema(list(lt), span), color=color, lw=1.8, label="target (EMA)" if single else name
            )
        steps, lb = _series(run.train, "loss_bank")
        if len(steps):
            bank_color = "#ff7f0e" if single else color
            if single:
                ax_l.plot(steps, lb, color=bank_color, alpha=0.22, lw=0.9)
            ax_l.plot(
                steps,
                ema(list(lb), max(3, len(steps) // 15)),
                color=bank_color,
                lw=1.5,
                ls="--",
                label="bank (EMA)" if single else f"{run.name} bank",
            )
    threshold = runs[0].threshold
    ax_p.axhline(
        threshold,
        color="#d62728",
        ls="--",
        lw=1.1,
        alpha=0.8,
        label=f"threshold {threshold:g} (patience {runs[0].patience})",
    )
    ax_p.axhline(0, color="black", lw=0.6, alpha=0.5)
    ax_p.axhline(1, color="black", lw=0.6, alpha=0.5, ls=":")
    if single:
        _mark_convergence(ax_p, runs[0], "#d62728", text=True, y_text=0.85)
    else:
        for run, color in zip(runs, colors):
            if run.event is not None:
                ax_p.annotate(
                    f"converged\n{run.event['step']}",
                    (run.event["step"], 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(3, -3),
                    textcoords="offset points",
                    color=color,
                    fontsize=8.5,
                    fontweight="bold",
                    va="top",
                )
    metric = runs[0].metric_description
    title = "Controllability: dissimilarity d of the re-extracted hint (lower is better)"
    ax_d.set_title(title + (f"\n{_wrap(f'd = {metric}', 110)}" if metric else ""))
    ax_d.set_ylabel("d", fontsize=9)
    ax_p.set_title("Progress p = (d0 − d) / (d0 − d_floor)")
    ax_p.set_ylabel("p  (0 = no control, 1 = real images)", fontsize=9)
    ax_l.set_title("Training loss")
    ax_l.set_ylabel("loss (raw faint, EMA bold)" if single else "loss (EMA)", fontsize=9)
    ax_l.set_xlabel("optimizer step")
    if any(len(_series(r.train, "loss_target")[0]) for r in runs):
        lo = min(np.nanmin(_series(r.train, "loss_target")[1]) for r in runs if len(r.train))
        hi = max(np.nanmax(_series(r.train, "loss_target")[1]) for r in runs if len(r.train))
        if lo > 0 and hi / lo > 8:
            ax_l.set_yscale("log")
    for ax in (ax_d, ax_p, ax_l):
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="best")
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    if single:
        title = f"{runs[0].name} — {runs[0].label}, {runs[0].condition}\n{status_line(runs[0])}"
    else:
        conds = sorted({r.condition for r in runs})
        title = f"{len(runs)} runs, condition {', '.join(conds)}: sudden convergence compared"
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
