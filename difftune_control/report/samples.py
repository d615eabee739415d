"""The report's `samples.png`: at milestone evaluations, hint | sample | re-extracted hint per sample.

The images are the detector's own, saved with each evaluation (``samples/step*.safetensors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .plots import _plt
from .runs import Run, _fmt


@dataclass
class SampleRow:
    """One row of the samples grid: an evaluation, its role and its tensors."""

    run: Run
    role: str
    record: dict[str, Any]
    hint: np.ndarray  # [K,H,W,3] uint8
    sample: np.ndarray
    reextracted: np.ndarray


def _load_samples(run: Run, record: dict[str, Any]) -> tuple[np.ndarray, ...] | None:
    rel = record.get("samples")
    if not rel or not (run.path / rel).is_file():
        return None
    from safetensors.numpy import load_file

    try:
        t = load_file(str(run.path / rel))
    except Exception:  # a file being written or truncated: skip this evaluation
        return None
    if not {"hint", "sample", "reextracted"} <= set(t):
        return None
    return tuple(np.transpose(t[k], (0, 2, 3, 1)) for k in ("hint", "sample", "reextracted"))


def milestone_evaluations(run: Run, compact: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Pick the evaluations shown in the samples grid, with their role.

    Converged: start, just before, at, after convergence (halfway to the last), last; not converged:
    start, one third, two thirds, last. `compact` keeps three rows (before / at / last, or
    start / middle / last). Only evaluations whose samples file exists are considered.
    """
    evals = [r for r in run.evals if r.get("samples") and (run.path / r["samples"]).is_file()]
    if not evals:
        return []
    steps = [r["step"] for r in evals]
    picks: list[tuple[str, int]] = []
    if run.event is not None and run.event["step"] in steps:
        i = steps.index(run.event["step"])
        after = i + max(1, (len(evals) - 1 - i) // 2)
        picks = [
            ("start", 0),
            ("just before", i - 1),
            ("at convergence", i),
            ("after", after),
            ("last", len(evals) - 1),
        ]
        if compact:
            picks = [("just before", i - 1), ("at convergence", i), ("last", len(evals) - 1)]
    else:
        n = len(evals) - 1
        picks = [("start", 0), ("", round(n / 3)), ("", round(2 * n / 3)), ("last", n)]
        if compact:
            picks = [("start", 0), ("", round(n / 2)), ("last", n)]
    out, used = [], set()
    for role, i in picks:
        if 0 <= i < len(evals) and i not in used:
            used.add(i)
            out.append((role, evals[i]))
    return out


def sample_rows(runs: list[Run]) -> list[SampleRow]:
    """The rows of the samples grid for these runs (three per run when there are several)."""
    rows = []
    for run in runs:
        for role, rec in milestone_evaluations(run, compact=len(runs) > 1):
            loaded = _load_samples(run, rec)
            if loaded is not None:
                rows.append(SampleRow(run, role, rec, *loaded))
    return rows


def samples_figure(runs: list[Run], path: Path, max_samples: int = 3) -> Path | None:
    """Write the grid: rows = milestone evaluations, columns = hint | sample | re-extracted per sample.

    Args:
        runs (`list[Run]`): the runs (several: three rows each, two samples).
        path (`Path`): where the PNG goes.
        max_samples (`int`, defaults to 3): validation samples shown (2 when several runs).

    Returns:
        `Path` or `None`: `path`, or None when no evaluation has its samples file.
    """
    rows = sample_rows(runs)
    if not rows:
        return None
    plt = _plt()
    n = min(max_samples if len(runs) == 1 else 2, min(r.hint.shape[0] for r in rows))
    cell, gap = 1.45, 0.18  # inches; a gap column between the samples' groups
    ratios = []
    for si in range(n):
        ratios += ([gap] if si else []) + [1.0, 1.0, 1.0]
    fig = plt.figure(figsize=(1.9 + cell * (3 * n + gap * (n - 1)), 0.45 + len(rows) * (cell + 0.3)))
    grid = fig.add_gridspec(len(rows), len(ratios), width_ratios=ratios)
    axes = np.empty((len(rows), 3 * n), dtype=object)
    for ri in range(len(rows)):
        for si in range(n):
            for ci in range(3):
                axes[ri, 3 * si + ci] = fig.add_subplot(grid[ri, 4 * si + ci])
    names = ["hint", "sample", "re-extracted"]
    for ri, row in enumerate(rows):
        d_per = row.record.get("d_per_sample") or []
        for si in range(n):
            for ci, img in enumerate((row.hint[si], row.sample[si], row.reextracted[si])):
                ax = axes[ri, 3 * si + ci]
                small = img.shape[0] <= 128
                ax.imshow(img, interpolation="nearest" if small else "antialiased")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color("#bbbbbb")
                if ri == 0:
                    ax.set_title(f"#{si + 1} {names[ci]}", fontsize=9, fontweight="normal")
                if ci == 2 and si < len(d_per) and d_per[si] is not None:
                    ax.set_xlabel(f"d = {d_per[si]:.3f}", fontsize=8, labelpad=2)
        p = row.record.get("p")
        lines = [row.run.name, row.run.label] if len(runs) > 1 else []
        lines += [row.role] if row.role else []
        lines += [f"step {row.record['step']}", f"p = {_fmt(p)}"]
        label = "\n".join(lines)
        axes[ri, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9, labelpad=10)
    title = "Samples at milestone evaluations: the hint, the generated sample, the hint re-extracted from it"
    if len(runs) == 1:
        title = f"{runs[0].name}: " + title[0].lower() + title[1:]
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97), w_pad=0.3, h_pad=0.6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
