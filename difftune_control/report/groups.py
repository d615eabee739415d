"""Group runs that differ only by seed: means with 95% intervals, paired per-seed speed-ups.

Runs belong to one group when their saved `config.json` files are equal once the seed and the
run's name, output folder, resume flag and the resolved bank folder (a cache path that follows from
the bank settings) are removed (`IGNORED_KEYS`): the same experiment
repeated with other seeds. Each group gets, over its seeds, the mean and a 95% t-interval of the
steps to sudden convergence and to p >= 0.25 / 0.5, of the AUCC and of the final p, with the count
of seeds that did not get there. Against its reference group (the plain vanilla run of the same
condition and the same training setup, as `compare.pick_reference` picks a vanilla run for a single
run) the runs are paired by seed: speed-up = reference steps / run steps, AUCC ratio = run AUCC /
reference AUCC, per seed, then their mean and interval.

`summarize_groups` is the library entry (the report and the benchmark scripts call it);
`group_tables` turns its output into table rows for Markdown or HTML.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .compare import aucc_ratio
from .runs import Run
from .stats import mean_interval

IGNORED_KEYS = (
    "train.seed",
    "train.run_name",
    "train.output_dir",
    "train.resume_from_checkpoint",
    "bank_dir",
)
"""Config fields that do not make another experiment: the seed, where the run went, and how it resumed."""
METHOD_SECTIONS = ("method", "bank", "bank_dir")
"""Config sections in which a run may differ from its vanilla reference (the method and its bank)."""
CONDITION_KEYS = ("data.condition", "data.conditioning_image_column", "data.extractor_backend", "bank_dir")
"""Config fields (besides the recipe, `condition.*`) that follow from the condition: equal elsewhere,
groups are the same experiment on other conditions."""
LEVELS = ("0.25", "0.5")
"""Milestone levels whose steps the group tables show beside the convergence event."""


# -- grouping -----------------------------------------------------------------------------------
def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"section.key": JSON of the value}, comparable and hashable."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True)
    return out


def experiment_config(config: dict[str, Any]) -> dict[str, str]:
    """The flattened config without `IGNORED_KEYS`: equal for runs that differ only by seed."""
    return {k: v for k, v in flatten_config(config).items() if k not in IGNORED_KEYS}


def _in_method_sections(key: str) -> bool:
    return key.split(".", 1)[0] in METHOD_SECTIONS


@dataclass
class RunGroup:
    """Runs of one experiment that differ only by seed, with their summaries (`summarize_run`)."""

    name: str
    runs: list[Run]
    summaries: list[dict[str, Any]]
    config: dict[str, str]
    reference: RunGroup | None = None
    differs: list[tuple[str, Any, Any]] = field(default_factory=list)
    """(field, reference value, this group's value) for each config field that differs from the reference."""

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def label(self) -> str:
        return self.runs[0].label

    @property
    def condition(self) -> str:
        return self.runs[0].condition

    @property
    def seeds(self) -> list[Any]:
        return [s["seed"] for s in self.summaries]


def _strip_seed(name: str, seed: Any) -> str:
    """ "depth-vanilla-s3" with seed 3 -> "depth-vanilla"; unchanged when the seed is not at the end."""
    if seed is None:
        return name
    return re.sub(rf"(?:^|[-_. ]+)(?:seed|s)?[-_]?0*{re.escape(str(seed))}$", "", name) or name


def _group_name(runs: list[Run]) -> str:
    if len(runs) == 1:
        return runs[0].name
    stripped = {_strip_seed(r.name, r.seed) for r in runs}
    if len(stripped) == 1:
        return stripped.pop()
    names = [r.name for r in runs]
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    prefix = re.sub(r"[-_. ]+(?:seed|s)?[-_]?\d*$", "", prefix).rstrip("-_. ")
    return prefix or f"{runs[0].condition} {runs[0].label}"


def _default_method_config() -> dict[str, str]:
    """The method and bank sections of plain vanilla as resolved (no loss weighting): a vanilla group
    closest to them is the baseline, not vanilla with another loss weighting."""
    from difftune_control.config import RunConfig, resolve_defaults

    plain = RunConfig()
    plain.method.method = "vanilla"
    plain = resolve_defaults(plain, toy=True)  # method-dependent defaults (loss_weighting: none)
    return flatten_config(
        {"method": dataclasses.asdict(plain.method), "bank": dataclasses.asdict(plain.bank)}
    )


def _diff(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def pick_reference_group(group: RunGroup, groups: list[RunGroup]) -> RunGroup | None:
    """The group `group` is compared with: a vanilla group of the same condition (as `pick_reference`).

    Among them, the one with (1) the fewest differing fields outside the method and bank sections
    (the same training setup), then (2) the fewest method / bank fields off their defaults (plain
    vanilla, not vanilla with another loss weighting), then (3) the fewest differing fields in all.
    None when `group` is that group itself (it is the reference) or there is no vanilla group.
    """
    candidates = [g for g in groups if g.method == "vanilla" and g.condition == group.condition]
    if not candidates:
        return None
    defaults = _default_method_config()

    def rank(g: RunGroup) -> tuple[int, int, int, int]:
        diff = _diff(group.config, g.config)
        off_default = [
            k for k in g.config if _in_method_sections(k) and k in defaults and k != "method.method"
            and g.config[k] != defaults[k]
        ]  # fmt: skip
        setup = [k for k in diff if not _in_method_sections(k)]
        return len(setup), len(off_default), len(diff), groups.index(g)

    best = min(candidates, key=rank)
    return None if best is group else best


def group_runs(runs: Sequence[Run], summaries: Sequence[dict[str, Any]]) -> list[RunGroup]:
    """Group runs that differ only by seed, in order of first appearance, and pick each one's reference.

    Args:
        runs (`Sequence[Run]`): loaded runs.
        summaries (`Sequence[dict]`): their `summarize_run` entries, in the same order.

    Returns:
        `list[RunGroup]`: runs within a group sorted by seed; `reference` and `differs` set.
    """
    by_key: dict[str, RunGroup] = {}
    for run, summary in zip(runs, summaries):
        cfg = experiment_config(run.config)
        key = json.dumps(cfg, sort_keys=True)
        if key not in by_key:
            by_key[key] = RunGroup(name="", runs=[], summaries=[], config=cfg)
        by_key[key].runs.append(run)
        by_key[key].summaries.append(summary)
    groups = list(by_key.values())
    for g in groups:
        order = sorted(range(len(g.runs)), key=lambda i: (g.runs[i].seed is None, g.runs[i].seed or 0))
        g.runs = [g.runs[i] for i in order]
        g.summaries = [g.summaries[i] for i in order]
        g.name = _group_name(g.runs)
    names = [g.name for g in groups]
    for i, g in enumerate(groups):
        if names.count(g.name) > 1:
            g.name = f"{g.name} #{names[: i + 1].count(g.name)}"
    for g in groups:
        g.reference = pick_reference_group(g, groups)
        if g.reference is not None:
            g.differs = [
                (k, _loads(g.reference.config.get(k)), _loads(g.config.get(k)))
                for k in _diff(g.reference.config, g.config)
            ]
    return groups


def _loads(x: str | None) -> Any:
    return None if x is None else json.loads(x)


# -- measures -----------------------------------------------------------------------------------
def _steps_of(summary: dict[str, Any], measure: str) -> int | None:
    return summary["convergence_step"] if measure == "event" else summary["milestones"].get(measure)


def group_stats(group: RunGroup, levels: Sequence[str] = LEVELS, confidence: float = 0.95) -> dict[str, Any]:
    """Mean and interval over the group's seeds of: steps to the event and to each level, AUCC, final p."""
    ss = group.summaries
    out: dict[str, Any] = {
        m: mean_interval([_steps_of(s, m) for s in ss], confidence).to_dict() for m in ("event", *levels)
    }
    out["aucc"] = mean_interval([s.get("aucc") for s in ss], confidence).to_dict()
    out["final_p"] = mean_interval([s.get("final_p") for s in ss], confidence).to_dict()
    return out


def _pair(group: RunGroup) -> tuple[list[tuple[Any, dict, dict]], list[Any]]:
    """(seed, run summary, reference summary) for the seeds both groups ran; the seeds left unpaired."""
    ref = {}
    for s in group.reference.summaries:
        ref.setdefault(s["seed"], s)
    pairs, unpaired, seen = [], [], set()
    for s in group.summaries:
        if s["seed"] in ref and s["seed"] not in seen:
            pairs.append((s["seed"], s, ref[s["seed"]]))
            seen.add(s["seed"])
        else:
            unpaired.append(s["seed"])
    unpaired += [seed for seed in ref if seed not in seen]
    return pairs, unpaired


def paired_speedups(
    group: RunGroup, levels: Sequence[str] = LEVELS, confidence: float = 0.95
) -> dict[str, Any] | None:
    """Per-seed speed-ups against the reference group, and their mean and interval.

    For the event and each level: reference steps / run steps, per seed both runs reached it. A seed
    where only the run got there gives a lower bound (reference's last evaluated step / run steps),
    listed but left out of the mean; a seed where the run did not get there is left out too. AUCC:
    run AUCC / reference AUCC per seed both are given, except where the reference's is below
    :data:`~.compare.AUCC_RATIO_FLOOR` (listed in `reference_near_zero`: the reference never left p ~ 0).

    Returns:
        `dict` or `None` (no reference): `reference`, `unpaired` (seeds in only one of the groups),
        and per measure (`event`, levels, `aucc`): `per_seed` {seed: value or None}, `at_least`
        {seed: lower bound}, `not_reached` [seeds], and the `Interval` fields of the defined values.
    """
    if group.reference is None:
        return None
    pairs, unpaired = _pair(group)
    out: dict[str, Any] = {"reference": group.reference.name, "unpaired": unpaired}
    for m in ("event", *levels):
        per, at_least, missing = {}, {}, []
        for seed, s, r in pairs:
            a, b = _steps_of(s, m), _steps_of(r, m)
            per[seed] = b / a if a and b is not None else None
            if a and b is None:
                at_least[seed] = (r["final_step"] or 0) / a
            elif a is None:
                missing.append(seed)
        out[m] = {"per_seed": per, "at_least": at_least, "not_reached": missing}
        out[m].update(mean_interval(list(per.values()), confidence).to_dict())
    ratios, near_zero = {}, []
    for seed, s, r in pairs:
        one = aucc_ratio(s, r)
        ratios[seed] = one["ratio"]
        if one["near_zero"]:
            near_zero.append(seed)
    out["aucc"] = {"per_seed": ratios, "at_least": {}, "not_reached": [], "reference_near_zero": near_zero}
    out["aucc"].update(mean_interval(list(ratios.values()), confidence).to_dict())
    return out


def _family(group: RunGroup) -> str:
    """A short id shared by groups that run the same experiment on other conditions."""
    import hashlib

    keys = sorted(k for k in group.config if k not in CONDITION_KEYS and not k.startswith("condition."))
    text = json.dumps({k: group.config[k] for k in keys}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def describe_group(
    group: RunGroup, levels: Sequence[str] = LEVELS, confidence: float = 0.95
) -> dict[str, Any]:
    """One group's entry of `summarize_groups` (JSON-serialisable)."""
    return {
        "name": group.name,
        "family": _family(group),
        "label": group.label,
        "method": group.method,
        "condition": group.condition,
        "runs": [r.name for r in group.runs],
        "seeds": group.seeds,
        "aucc_budget": sorted({s.get("aucc_budget") for s in group.summaries}, key=str),
        "reference": group.reference.name if group.reference is not None else None,
        "differs": [{"field": k, "reference": a, "value": b} for k, a, b in group.differs],
        "notes": [
            f"{r.name}: {s['aucc_note']}" for r, s in zip(group.runs, group.summaries) if s.get("aucc_note")
        ],
        "stats": group_stats(group, levels, confidence),
        "vs_reference": paired_speedups(group, levels, confidence),
    }


def summarize_groups(
    runs: Sequence[Run],
    summaries: Sequence[dict[str, Any]],
    levels: Sequence[str] = LEVELS,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """Group the runs (`group_runs`) and measure each group: what `summary.json` holds under "groups".

    Args:
        runs (`Sequence[Run]`): loaded runs.
        summaries (`Sequence[dict]`): their `summarize_run` entries (with the AUCC), in the same order.
        levels (`Sequence[str]`, defaults to ("0.25", "0.5")): milestone levels to measure.
        confidence (`float`, defaults to 0.95): coverage of the t-intervals.

    Returns:
        `list[dict]`: per group `name`, `family` (an id shared with the same experiment on other
        conditions, see `mean_over_conditions`), `label`, `condition`, `runs`, `seeds`, `reference` (group
        name or None), `differs` (fields that differ from the reference), `notes` (runs whose AUCC
        is held or incomplete, and why), `stats` (`group_stats`)
        and `vs_reference` (`paired_speedups`, None for a reference group).

    Example:
        ```python
        runs = [load_run(p) for p in sorted(Path("bench/runs").iterdir())]
        for g in summarize_groups(runs, [summarize_run(r) for r in runs]):
            print(g["name"], g["stats"]["aucc"]["mean"], (g["vs_reference"] or {}).get("aucc"))
        ```
    """
    return [describe_group(g, levels, confidence) for g in group_runs(runs, summaries)]


def mean_over_conditions(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means over conditions of the groups that run one experiment on several conditions.

    mAUCC (x0-supervision, Sangare et al., CVPR 2026) is the mean over conditions of the AUCC; here,
    of each condition's mean over seeds. The mean paired speed-up to the event and AUCC ratio are
    averaged the same way, over the conditions where they are defined.

    Args:
        groups (`list[dict]`): `summarize_groups` output.

    Returns:
        `list[dict]`: per experiment on two or more conditions: `name`, `groups`, `conditions`,
        `maucc`, `event_speedup`, `aucc_ratio` (None where no condition has the value).
    """

    def mean(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return sum(vals) / len(vals) if vals else None

    families: dict[str, list[dict[str, Any]]] = {}
    for g in groups:
        families.setdefault(g["family"], []).append(g)
    out = []
    for members in families.values():
        if len({g["condition"] for g in members}) < 2:
            continue
        stems = {
            re.sub(rf"(^|[-_. ]){re.escape(g['condition'])}([-_. ]|$)", r"\1", g["name"]).strip("-_. ")
            for g in members
        }
        out.append(
            {
                "name": stems.pop() if len(stems) == 1 and "" not in stems else members[0]["label"],
                "groups": [g["name"] for g in members],
                "conditions": [g["condition"] for g in members],
                "maucc": mean([g["stats"]["aucc"]["mean"] for g in members]),
                "event_speedup": mean(
                    [(g["vs_reference"] or {}).get("event", {}).get("mean") for g in members]
                ),
                "aucc_ratio": mean([(g["vs_reference"] or {}).get("aucc", {}).get("mean") for g in members]),
            }
        )
    return out
