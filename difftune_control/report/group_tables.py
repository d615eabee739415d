"""Table rows of the grouped report (`groups.summarize_groups` output -> header, rows), for
report.md, report.html and the benchmark scripts' Markdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .compare import AUCC_RATIO_FLOOR
from .groups import LEVELS

# -- tables -------------------------------------------------------------------------------------
GROUPS_INTRO = (
    "Runs whose config.json files are equal but for the seed (and the run name, output folder and resume "
    "flag) form a group. Cells: mean [95% t-interval] over the group's seeds; '(k/n not reached)' counts "
    "seeds that did not get there by their last evaluation (left out of the mean); an AUCC is left out "
    "when the run has not covered the budget."
)
MAUCC_INTRO = (
    "The same experiment on several conditions: mAUCC is the mean over conditions of each condition's mean "
    "AUCC (as x0-supervision reports it); the speed-up and AUCC ratio are the means over conditions of the "
    "paired means below."
)
PAIRED_INTRO = (
    "Runs paired by seed with the reference group (plain vanilla, same condition and training setup): "
    "speed-up = reference steps / run steps, AUCC ratio = run AUCC / reference AUCC, per seed; cells: "
    "their mean [95% t-interval] over the seeds where both got there."
)


def differs_text(group: dict[str, Any]) -> str:
    """ "method.method: vanilla → difftuning; bank.bank_hint: extracted → zero" (at most 8 fields)."""
    items = [f"{d['field']}: {d['reference']} → {d['value']}" for d in group["differs"]]
    return "; ".join(items[:8]) + (f"; and {len(items) - 8} more" if len(items) > 8 else "") or "nothing"


def _fmt_interval(iv: dict[str, Any], fmt: str, unit: str = "") -> str:
    """ "412 [350, 474]" / "412" (one value) / "—" (none)."""
    if iv["mean"] is None:
        return "—"
    text = format(iv["mean"], fmt) + unit
    if iv["low"] is not None:
        text += f" [{format(iv['low'], fmt)}, {format(iv['high'], fmt)}]"
    return text


def _fmt_stat(iv: dict[str, Any], fmt: str, missing_word: str) -> str:
    text = _fmt_interval(iv, fmt)
    n = iv["n"] + iv["missing"]
    if iv["missing"]:
        text += f" ({iv['missing']}/{n} {missing_word})"
    return text


def group_table(
    groups: list[dict[str, Any]], levels: Sequence[str] = LEVELS
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per group, mean [95% interval] over seeds of each measure (`summarize_groups`)."""
    header = ["group", "method", "condition", "seeds", "sudden convergence", *[f"p ≥ {lv}" for lv in levels]]
    header += ["AUCC", "final p"]
    rows = []
    for g in groups:
        st = g["stats"]
        rows.append(
            [
                g["name"],
                g["label"],
                g["condition"],
                str(len(g["seeds"])),
                _fmt_stat(st["event"], ".0f", "not reached"),
                *[_fmt_stat(st[lv], ".0f", "not reached") for lv in levels],
                _fmt_stat(st["aucc"], ".3f", "incomplete"),
                _fmt_stat(st["final_p"], ".2f", "undefined"),
            ]
        )
    return header, rows


def _fmt_paired(entry: dict[str, Any]) -> str:
    text = _fmt_interval(entry, ".2f", "×")
    paired = len(entry["per_seed"])
    notes = [f"mean of {entry['n']}"] if 0 < entry["n"] < paired else []
    if entry["not_reached"]:
        seeds = entry["not_reached"]
        notes.append(f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))} not reached")
    if entry["at_least"]:
        notes += [f"seed {s}: ≥ {v:.2f}×" for s, v in entry["at_least"].items()]
    if entry.get("reference_near_zero"):
        seeds = entry["reference_near_zero"]
        notes.append(
            f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}: reference AUCC < {AUCC_RATIO_FLOOR}, no ratio"
        )
    return text + (f" ({'; '.join(notes)})" if notes else "")


def paired_table(
    groups: list[dict[str, Any]], levels: Sequence[str] = LEVELS
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per compared group, the mean [95% interval] of its per-seed speed-ups."""
    header = ["group", "vs reference", "seeds paired", "sudden convergence", *[f"p ≥ {lv}" for lv in levels]]
    header += ["AUCC ratio"]
    rows = []
    for g in groups:
        vs = g["vs_reference"]
        if not vs:
            continue
        paired = len(vs["event"]["per_seed"])
        rows.append(
            [
                g["name"],
                vs["reference"],
                str(paired) + (f" ({len(vs['unpaired'])} unpaired)" if vs["unpaired"] else ""),
                _fmt_paired(vs["event"]),
                *[_fmt_paired(vs[lv]) for lv in levels],
                _fmt_paired(vs["aucc"]),
            ]
        )
    return header, rows


def per_seed_table(groups: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: every paired seed's speed-up to the event and AUCC ratio (what the means average)."""
    header = ["group", "seed", "event speed-up", "AUCC ratio"]
    rows = []
    for g in groups:
        vs = g["vs_reference"]
        if not vs:
            continue
        for seed, up in vs["event"]["per_seed"].items():
            if up is not None:
                event = f"{up:.2f}×"
            elif seed in vs["event"]["at_least"]:
                event = f"≥ {vs['event']['at_least'][seed]:.2f}× (reference not there)"
            else:
                event = "not reached"
            ratio = vs["aucc"]["per_seed"].get(seed)
            rows.append([g["name"], str(seed), event, "—" if ratio is None else f"{ratio:.2f}×"])
    return header, rows


def conditions_table(means: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of `groups.mean_over_conditions`: mAUCC and mean speed-ups per experiment."""
    header = ["experiment", "conditions", "mAUCC", "mean event speed-up", "mean AUCC ratio"]

    def f(x: float | None, unit: str = "") -> str:
        return "—" if x is None else f"{x:.3f}" if not unit else f"{x:.2f}{unit}"

    rows = [
        [
            m["name"],
            ", ".join(m["conditions"]),
            f(m["maucc"]),
            f(m["event_speedup"], "×"),
            f(m["aucc_ratio"], "×"),
        ]
        for m in means
    ]
    return header, rows
