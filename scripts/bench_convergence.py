#!/usr/bin/env python
"""Does Diff-Tuning converge sooner? Vanilla vs Diff-Tuning on the toy world, several seeds.

    python scripts/bench_convergence.py --out bench/convergence                 # 5 conditions x 2 methods x 3 seeds
    python scripts/bench_convergence.py --out bench/ablations --ablations       # depth: splits, s, r/lambda, bank
    python scripts/bench_convergence.py --out DIR --aggregate-only              # tables + plots from finished runs
    python scripts/bench_convergence.py --out bench/search --conditions depth canny --candidates vanilla published null-auto ...

Every run is an ordinary ``difftune train`` subprocess (same data, same steps, same
hyper-parameters but the method); several share one GPU at once (the models are tiny and the
steps launch-bound). Caches (toy dataset, latents, bank) are built once per condition first.
Afterwards each run's retention of the base model's text-to-image behaviour is measured: the
toy world's text-following score of samples made with the ControlNet and an uninformative
(all-zero) hint, and a Frechet distance of those samples to real renders in the feature space
of the toy annotators. Results: ``results.json``, ``results.md`` and ``curves.png`` in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONDITIONS = ["canny", "depth", "normal", "segmentation", "sketch"]
ABLATIONS = {  # name -> flags, all on depth, against difftuning (fixed) and vanilla
    "mixture": ["--split", "mixture"],
    "psi-only": ["--split", "psi-only"],
    "s=0": ["--psi_power", "0"],
    "s=0.5": ["--psi_power", "0.5"],
    "s=2": ["--psi_power", "2"],
    "r=0.4": ["--bank_share", "0.4"],
    "lambda=0": ["--bank_weight", "0"],
    "lambda=0.3": ["--bank_weight", "0.3"],
    "bank=500": ["--bank_size", "500"],
    "bank_hint=zero": ["--bank_hint", "zero"],
}
# Named method configurations for --candidates; every flag that differs from the CLI's defaults is
# spelled out, so a candidate means the same thing whatever the default method is.
_VANILLA = ["--method", "vanilla", "--loss_weighting", "none"]
_BANK = ["--method", "difftuning", "--split", "fixed", "--loss_weighting", "none", "--bank_prompt", "keep"]
_BANK += ["--bank_latents", "mean"]  # as measured on 2026-12-01 (the posterior draw came later: *-sample)
_NULL = [*_BANK, "--bank_hint", "zero"]
# the default from 1baf4bf to 13e8b3c: null-hint rows drawn from the posterior, lambda measured (pull 0.5),
# inverse-SNR on the data; its -pull25 variant is the default since (BENCHMARKS.md 0e)
_NULL_AUTO_ISNR_SAMPLE = [*_NULL[:4], "--loss_weighting", "inverse_snr", *_NULL[6:], "--bank_weight", "auto"]
_NULL_AUTO_ISNR_SAMPLE += ["--bank_latents", "sample", "--bank_pull", "0.5"]
CANDIDATES = {
    "default": [],  # what `difftune train` does with no method flag (the final grid measures this one)
    "vanilla": _VANILLA,
    # Diff-Tuning as published: re-noised bank rows carrying hints extracted from the base's samples
    "published": [*_BANK, "--bank_hint", "extracted", "--bank_weight", "0.1"],
    "psi-only": ["--method", "difftuning", "--split", "psi-only", "--loss_weighting", "none"],
    "inverse-snr": [*_VANILLA[:2], "--loss_weighting", "inverse_snr"],  # x0-supervision
    "min-snr": [*_VANILLA[:2], "--loss_weighting", "min_snr"],  # Min-SNR-gamma, gamma 5
    # null-condition bank rows (the authors' null class): an all-zero hint
    "null": [*_NULL, "--bank_weight", "0.1"],
    "null-drop": [*_NULL[:-2], "--bank_prompt", "drop", "--bank_hint", "zero", "--bank_weight", "0.1"],
    "null-l05": [*_NULL, "--bank_weight", "0.05"],
    "null-auto": [*_NULL, "--bank_weight", "auto", "--bank_pull", "0.5"],
    "null-auto-isnr": [*_NULL[:4], "--loss_weighting", "inverse_snr", *_NULL[6:], "--bank_weight", "auto"],
    # bank rows drawn from the VAE posterior, as target rows are (and as the authors' code encodes images)
    "published-sample": [
        *_BANK,
        "--bank_hint",
        "extracted",
        "--bank_weight",
        "0.1",
        "--bank_latents",
        "sample",
    ],
    "null-auto-isnr-sample": _NULL_AUTO_ISNR_SAMPLE,
    # the default with a smaller bank (the toy default is 2,000 images): is the bank's up-front cost needed?
    **{
        f"null-auto-isnr-sample-bank{n}": [*_NULL_AUTO_ISNR_SAMPLE, "--bank_size", str(n)]
        for n in (250, 500, 1000)
    },
    # lambda's measurement: pooled over 48 bank rows (4 plans at the toy batch; re-measured every 800 steps),
    # or measured at step 0 only (the default pools 12 rows, one plan at the toy batch, every 200 steps)
    **{
        f"null-auto-isnr-sample-{name}": [*_NULL_AUTO_ISNR_SAMPLE, *flags]
        for name, flags in (
            ("rows48", ["--bank_pull_rows", "48"]),
            ("once", ["--bank_pull_every", "0"]),
            ("rows1", ["--bank_pull_rows", "1"]),  # one plan, whatever it holds (before 49468ff)
            ("pull25", ["--bank_pull", "0.25"]),  # a lighter bank: the default of BENCHMARKS.md 0e
            ("pull10", ["--bank_pull", "0.1"]),  # lighter still: the default since BENCHMARKS.md 0f
            ("pull05", ["--bank_pull", "0.05"]),  # is the trend of 0e-0f still going?
            ("pull02", ["--bank_pull", "0.02"]),
            ("pull25-once", ["--bank_pull", "0.25", "--bank_pull_every", "0"]),  # lambda from step 0 only
            (
                "pull25-share10",
                ["--bank_pull", "0.25", "--bank_share", "0.1"],
            ),  # half the bank rows, same pull
        )
    },  # fmt: skip
    # the default with its bank generated at a lower guidance scale: the toy base's samples spread 11-23% wider
    # than its world's at CFG 7.5 (the bank's scale), within 10% without guidance (docs/toyworld/MODEL_CARD.md)
    **{f"default-bankcfg{g}": ["--bank_guidance_scale", g] for g in ("1", "4")},
    # the chain of forgetting's t-skew with x0-supervision's weighting, no bank
    "psi-isnr": ["--method", "difftuning", "--split", "psi-only", "--loss_weighting", "inverse_snr"],
}
LEVELS = ["0.25", "event", "0.5"]
# flags that change what the bank holds: a bank of their own
BANK_FLAGS = ("--bank_hint", "--bank_size", "--bank_guidance_scale")


def limit_threads(parallel: int) -> None:
    """Share the CPU cores between the runs: each child gets cores // parallel intra-op threads.

    Without this every process starts one OpenMP thread per core; with a dozen runs on one machine
    the spinning threads slow the small CPU-side ops (per-image hint extraction while caching) ~20x.
    """
    import os

    threads = str(max(1, (os.cpu_count() or 2) // max(1, parallel)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)


def run_cmd(cmd: list[str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode


def train_cmd(args, name: str, condition: str, method: str, seed: int, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "difftune_control.cli",
        "train",
        "--condition",
        condition,
        "--method",
        method,
        "--seed",
        str(seed),
        "--max_train_steps",
        str(args.max_train_steps),
        "--convergence_every",
        str(args.convergence_every),
        "--output_dir",
        str(args.out / "runs"),
        "--run_name",
        name,
        "--report_to",
        "none",
        "--checkpointing_steps",
        str(args.max_train_steps),
        "--validation_steps",
        str(args.max_train_steps),
        "--resume_from_checkpoint",
        "latest",
        *args.train_args,
        *extra,
    ]


def jobs(args) -> list[tuple[str, str, str, int, list[str]]]:
    out = []
    if args.ablations:
        variants = {"vanilla": ("vanilla", []), "difftuning": ("difftuning", [])}
        variants.update({k: ("difftuning", v) for k, v in ABLATIONS.items()})
        if args.variants:
            unknown = sorted(set(args.variants) - set(variants))
            if unknown:
                raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(variants)}")
            variants = {k: v for k, v in variants.items() if k in args.variants}
        for label, (method, extra) in variants.items():
            for seed in args.seeds:
                out.append((f"depth-{label}-s{seed}", "depth", method, seed, extra))
        return out
    if args.candidates:
        unknown = sorted(set(args.candidates) - set(CANDIDATES))
        if unknown:
            raise SystemExit(f"--candidates: unknown {unknown}; choose from {sorted(CANDIDATES)}")
        for condition in args.conditions:
            for name in args.candidates:
                for seed in args.seeds:
                    flags = CANDIDATES[name]
                    method = flags[flags.index("--method") + 1] if "--method" in flags else default_method()
                    out.append((f"{condition}-{name}-s{seed}", condition, method, seed, flags))
        return out
    for condition in args.conditions:
        for method in ("vanilla", "difftuning"):
            for seed in args.seeds:
                out.append((f"{condition}-{method}-s{seed}", condition, method, seed, []))
    return out


def default_method() -> str:
    """The method `difftune train` runs without --method."""
    from difftune_control.config import RunConfig

    return RunConfig().method.method


def bank_flags(extra: list[str]) -> tuple[str, ...]:
    """The flags of ``extra`` that change what the bank holds (with their values)."""
    out = []
    for i, flag in enumerate(extra[:-1]):
        if flag in BANK_FLAGS:
            out += [flag, extra[i + 1]]
    return tuple(out)


def prepare(args, conditions: set[str], extra_sets: list[list[str]]) -> None:
    """Build the toy dataset, latent caches and banks once, before runs race for them."""
    for condition in sorted(conditions):
        for extra in extra_sets:
            cmd = [
                sys.executable,
                "-m",
                "difftune_control.cli",
                "bank",
                "--condition",
                condition,
                "--max_train_steps",
                str(args.max_train_steps),
                *args.train_args,
                *extra,
            ]
            t = time.time()
            rc = run_cmd(cmd, args.out / "logs" / f"prepare-{condition}-{'_'.join(extra) or 'default'}.log")
            print(f"prepared {condition} {extra or ''}: rc={rc} in {time.time() - t:.0f}s", flush=True)


# -- retention ----------------------------------------------------------------------------------
def retention(run_dir: Path, device: str, n_two: int = 64) -> dict:
    """Text following with an all-zero hint, and a Frechet distance to real renders (toy annotator features)."""
    import torch
    from diffusers import ControlNetModel

    from difftune_control.toyworld import render_scenes
    from difftune_control.toyworld.evaluate import score_text_following, text_following_prompts
    from difftune_control.validation import encode_prompts, sample_images

    base = _cached_base(device)
    specs = text_following_prompts(seed=1, n_single_repeats=1, n_two=n_two)
    prompts = [s["prompt"] for s in specs]
    embeds = encode_prompts(base.text_encoder, base.tokenizer, prompts)
    empty = encode_prompts(base.text_encoder, base.tokenizer, [""])
    controlnet = None
    if run_dir is not None:
        controlnet = ControlNetModel.from_pretrained(run_dir / "controlnet").to(device).eval()
    hints = torch.zeros(len(prompts), 3, 64, 64, device=device)
    images = sample_images(
        unet=base.unet,
        vae=base.vae,
        scheduler_config=base.scheduler_config,
        prompt_embeds=embeds,
        negative_prompt_embeds=empty,
        seeds=list(range(len(prompts))),
        resolution=64,
        controlnet=controlnet,
        hints=hints if controlnet is not None else None,
        num_inference_steps=25,
        guidance_scale=7.5,
    )
    seg = _annotator("segmentation", device)
    with torch.no_grad():
        classes = seg(images).argmax(1)
    score = score_text_following(images, classes, specs)
    real = render_scenes(len(prompts), seed=123_456, resolution=64, device=device)["rgb"]
    score["frechet"] = frechet(features(images, device), features(real.to(device), device))
    return score


_CACHE: dict = {}


def _cached_base(device: str):
    import torch

    from difftune_control.config import ModelConfig
    from difftune_control.training.runtime import load_base_model

    if "base" not in _CACHE:
        _CACHE["base"] = load_base_model(ModelConfig(), torch.device(device), torch.float32)
    return _CACHE["base"]


def _annotator(kind: str, device: str):
    from difftune_control.toyworld import load_annotator

    if kind not in _CACHE:
        _CACHE[kind] = load_annotator(kind, device=device)
    return _CACHE[kind]


def features(images, device: str):
    """Per-image toy-annotator features (``toyworld.fidelity.annotator_features``)."""
    from difftune_control.toyworld.fidelity import annotator_features

    return annotator_features(images, _annotator("segmentation", device), _annotator("depth", device))


def frechet(a, b) -> float:
    """Frechet distance between two feature sets (``toyworld.fidelity.frechet_distance``)."""
    from difftune_control.toyworld.fidelity import frechet_distance

    return frechet_distance(a, b)


def score_retention(args, device: str) -> None:
    """Retention scores of the base and of every finished run in --out that has none yet (resumable)."""
    out = args.out / "retention"
    out.mkdir(exist_ok=True)
    if not (out / "_base.json").exists():
        (out / "_base.json").write_text(json.dumps(retention(None, device)))
    t0 = time.time()
    for run_dir in sorted((args.out / "runs").iterdir()):
        dest = out / f"{run_dir.name}.json"
        if (run_dir / "controlnet").is_dir() and not dest.exists():
            dest.write_text(json.dumps(retention(run_dir, device)))
            print(f"retention {run_dir.name}: {time.time() - t0:.0f}s", flush=True)


# -- aggregation --------------------------------------------------------------------------------
def summarize(args) -> dict:
    from difftune_control.report.runs import load_run
    from difftune_control.report.summary import summarize_run

    rows = {}
    for run_dir in sorted((args.out / "runs").iterdir()):
        if not (run_dir / "metrics.jsonl").exists():
            continue
        s = summarize_run(load_run(run_dir))
        s["budget"] = budget_view(run_dir / "metrics.jsonl", args.max_train_steps)
        s["aucc"] = s["budget"]["aucc"]
        ret = args.out / "retention" / f"{run_dir.name}.json"
        s["retention"] = json.loads(ret.read_text()) if ret.exists() else None
        rows[run_dir.name] = s
    return rows


def budget_view(metrics: Path, budget: int, threshold: float = 0.3, patience: int = 2) -> dict:
    """The run's curve cut at ``budget`` steps: first steps with p >= 0.25 / 0.5, the detector's event,
    AUCC and p at the budget.

    The run's evaluations up to the budget are replayed through the detector itself, so runs longer
    than the budget compare with runs of exactly the budget. ``complete`` is False when the
    evaluations stop before the budget.
    """
    from difftune_control.convergence import SuddenConvergenceDetector
    from difftune_control.convergence.aucc import area_under_progress
    from difftune_control.utils import read_jsonl

    evals = {r["step"]: r for r in read_jsonl(metrics) if r["type"] == "convergence_eval"}
    evals = [evals[s] for s in sorted(evals) if s <= budget and evals[s].get("d") is not None]
    det = SuddenConvergenceDetector(threshold, patience, milestones=(0.25, 0.5))
    if evals:
        det.set_reference(evals[0]["d0"], evals[0]["d_floor"])
    for r in evals:
        det.update(r["step"], r["d"])
    steps = [h["step"] for h in det.history if h["p"] is not None]
    ps = [h["p"] for h in det.history if h["p"] is not None]
    complete = bool(steps) and steps[-1] == budget
    return {
        "0.25": det.milestones[0.25],
        "event": det.converged_step,
        "0.5": det.milestones[0.5],
        "aucc": area_under_progress(steps, ps, budget) if complete else None,
        "p_end": ps[-1] if complete else None,
        "complete": complete,
    }


def _steps(s: dict, level: str):
    return s["convergence_step"] if level == "event" else s["milestones"].get(level)


def _ms(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "not reached"
    missing = len(values) - len(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.0f} ± {sd:.0f}" + (f" ({missing} not reached)" if missing else "")


def _msf(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def _mean(values, fmt: str) -> str:
    vals = [v for v in values if v is not None]
    return format(statistics.mean(vals), fmt) if vals else "-"


def group_key(name: str) -> str:
    return name.rsplit("-s", 1)[0]


def tables(rows: dict) -> tuple[str, dict]:
    groups: dict[str, list[dict]] = {}
    for name, s in rows.items():
        groups.setdefault(group_key(name), []).append(s)
    agg = {}
    lines = [
        "| group | seeds | p>=0.25 | event (p>=0.3 x2) | p>=0.5 | AUCC | final p | final d | text-following (single / two L-R) | Frechet |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g, ss in sorted(groups.items()):
        entry = {lv: [_steps(s, lv) for s in ss] for lv in LEVELS}
        entry["final_p"] = [s["final_p"] for s in ss]
        entry["aucc"] = [s.get("aucc") for s in ss]
        entry["final_d"] = [s["final_d"] for s in ss]
        rets = [s["retention"] for s in ss if s["retention"]]
        entry["retention"] = rets
        agg[g] = entry
        tf = (
            (
                f"{statistics.mean(r['single_correct'] for r in rets):.2f} / "
                f"{statistics.mean(r['two_left_right'] for r in rets):.2f}"
            )
            if rets
            else "-"
        )
        fr = f"{statistics.mean(r['frechet'] for r in rets):.2f}" if rets else "-"
        lines.append(
            f"| {g} | {len(ss)} | {_ms(entry['0.25'])} | {_ms(entry['event'])} | {_ms(entry['0.5'])} | "
            f"{_msf(entry['aucc'])} | {_mean(entry['final_p'], '.2f')} | {_mean(entry['final_d'], '.4f')} | {tf} | {fr} |"
        )
    lines += [
        "",
        "Speed-up of Diff-Tuning against vanilla (mean steps, vanilla / difftuning; >1 = sooner; the change in steps in brackets):",
        "",
        "| condition / variant | p>=0.25 | event | p>=0.5 |",
        "|---|---|---|---|",
    ]
    ups = {lv: [] for lv in LEVELS}
    for g in sorted(agg):
        ref = (
            "depth-vanilla"
            if g.startswith("depth-") and "depth-vanilla" in agg
            else g.split("-")[0] + "-vanilla"
        )
        if g == ref or ref not in agg:
            continue
        cells = []
        for lv in LEVELS:
            a = [v for v in agg[ref][lv] if v is not None]
            b = [v for v in agg[g][lv] if v is not None]
            if a and b and len(b) == len(agg[g][lv]):
                up = statistics.mean(a) / statistics.mean(b)
                cells.append(f"{up:.2f}x ({100 * (1 / up - 1):+.0f}% steps)")
                if g.endswith("-difftuning"):
                    ups[lv].append(up)
            else:
                cells.append("n/a")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    if any(ups.values()):
        lines.append(
            "| **mean over conditions** | "
            + " | ".join(f"{statistics.mean(ups[lv]):.2f}x" if ups[lv] else "n/a" for lv in LEVELS)
            + " |"
        )
    return "\n".join(lines), agg


def search_tables(rows: dict, budget: int) -> str:
    """Per condition and candidate, over seeds: steps to p >= 0.25 / event / p >= 0.5, AUCC and p at the
    budget (mean and 95% t-interval), retention; then paired per-seed speed-ups against vanilla."""
    from difftune_control.report.compare import AUCC_RATIO_FLOOR, aucc_ratio
    from difftune_control.report.stats import mean_interval

    def ci(values: list, digits: int = 0, missing: str = "not reached") -> str:
        iv = mean_interval(values)
        if iv.mean is None:
            return f"{missing} ({iv.missing})"
        text = f"{iv.mean:.{digits}f}"
        if iv.low is not None:
            text += f" [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"
        return text + (f" ({iv.missing} {missing})" if iv.missing else "")

    groups: dict[str, dict[int, dict]] = {}
    for name, s in rows.items():
        g, seed = name.rsplit("-s", 1)
        groups.setdefault(g, {})[int(seed)] = s
    measures = ["0.25", "event", "0.5"]
    lines = [
        f"Measured on each run's curve up to step {budget}; mean [95% t-interval] over seeds.",
        "",
        "| condition | candidate | seeds | p>=0.25 | event | p>=0.5 | AUCC | p at budget | text-following single / two L-R | Frechet |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in sorted(groups):
        cond, cand = g.split("-", 1)
        runs = groups[g]
        views = [r["budget"] for r in runs.values()]
        rets = [r["retention"] for r in runs.values() if r.get("retention")]
        tf = (
            f"{statistics.mean(r['single_correct'] for r in rets):.2f} / "
            f"{statistics.mean(r['two_left_right'] for r in rets):.2f} (n={len(rets)})"
            if rets
            else "-"
        )
        fr = f"{statistics.mean(r['frechet'] for r in rets):.2f}" if rets else "-"
        lines.append(
            f"| {cond} | {cand} | {len(runs)} | "
            + " | ".join(ci([v[m] for v in views]) for m in measures)
            + f" | {ci([v['aucc'] for v in views], 3)} | {ci([v['p_end'] for v in views], 2)} | {tf} | {fr} |"
        )
    lines += [
        "",
        "Paired per-seed speed-ups against vanilla of the same condition (vanilla steps / candidate steps; "
        "AUCC: candidate / vanilla); mean [95% t-interval] over the seeds both reached; where only the "
        "candidate got there, the lower bound budget / candidate steps (the smallest over those seeds):",
        "",
        "| condition | candidate | p>=0.25 | event | p>=0.5 | AUCC ratio |",
        "|---|---|---|---|---|---|",
    ]
    for g in sorted(groups):
        cond, cand = g.split("-", 1)
        ref = groups.get(f"{cond}-vanilla")
        if cand == "vanilla" or ref is None:
            continue
        cells = []
        for m in [*measures, "aucc"]:
            ratios, bounds, near_zero = [], [], 0
            for seed, r in groups[g].items():
                a = ref.get(seed, {}).get("budget", {}).get(m)
                b = r["budget"].get(m)
                if m == "aucc":
                    one = aucc_ratio(r["budget"], ref.get(seed, {}).get("budget", {}))
                    ratios.append(one["ratio"])
                    near_zero += one["near_zero"]
                    continue
                ratios.append(a / b if a and b else None)
                if b and a is None and seed in ref:  # vanilla not there by the budget: at least budget / b
                    bounds.append(budget / b)
            cell = ci(ratios, 2, "without a ratio") if any(x is not None for x in ratios) else "-"
            if bounds:
                cell += f"; >= {min(bounds):.2f}x on {len(bounds)} (vanilla not by {budget})"
            if near_zero:
                cell += f"; {near_zero} with vanilla AUCC < {AUCC_RATIO_FLOOR}: no ratio"
            cells.append(cell)
        lines.append(f"| {cond} | {cand} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RULE = (
    "The rule (BENCHMARKS.md section 0): among the configurations whose null-hint single-object text following "
    "is at least 90% of the base's on every condition measured and whose p at the step budget is no more than "
    "0.05 below vanilla's, the default is the one with the highest mean AUCC over the conditions; if none "
    "qualifies, the highest mean AUCC among those that reach the event sooner than vanilla on every condition."
)


def rule_table(rows: dict, budget: int, base_single: float | None) -> str:
    """The default-method rule applied to the runs: per candidate run on every condition vanilla ran, its mean
    AUCC over those conditions, its worst retention and p-at-budget margins, whether it qualifies, the winner."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for name, r in rows.items():
        cond, cand = group_key(name).split("-", 1)
        groups.setdefault(cand, {}).setdefault(cond, []).append(r)
    conds = sorted(groups.get("vanilla", {}))
    if not conds:
        return "The rule needs vanilla runs: not applied."

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return statistics.mean(xs) if xs else None

    def event(runs):  # a run that never got there counts as just past the budget
        return mean([r["budget"]["event"] if r["budget"]["event"] is not None else budget + 1 for r in runs])

    van = groups["vanilla"]
    lines = [
        RULE,
        "",
        "| candidate | mean AUCC | lowest text following / base's (>= 0.90) | lowest p at budget - vanilla's "
        "(>= -0.05) | event sooner than vanilla on all | qualifies |",
        "|---|---|---|---|---|---|",
    ]
    scored = []
    for cand in sorted(groups):
        by = groups[cand]
        if any(c not in by for c in conds):
            continue
        aucc = mean([mean([r["budget"]["aucc"] for r in by[c]]) for c in conds])
        singles = [mean([(r.get("retention") or {}).get("single_correct") for r in by[c]]) for c in conds]
        kept = None if base_single is None or None in singles else min(singles) / base_single
        margin = min(mean([r["budget"]["p_end"] for r in by[c]]) - mean([r["budget"]["p_end"] for r in van[c]])
                     for c in conds)  # fmt: skip
        sooner = cand != "vanilla" and all(event(by[c]) < event(van[c]) for c in conds)
        ok = kept is not None and kept >= 0.9 and margin >= -0.05
        scored.append((cand, aucc, ok, sooner))
        lines.append(
            f"| {cand} | {aucc:.3f} | {'not scored' if kept is None else f'{kept:.2f}'} | {margin:+.2f} | "
            f"{'yes' if sooner else 'no'} | {'yes' if ok else 'no'} |"
        )
    winners = [x for x in scored if x[2]] or [x for x in scored if x[3]]
    best = max(winners, key=lambda x: x[1]) if winners else None
    how = "qualifies" if best and best[2] else "no candidate qualifies; the fastest to the event"
    lines += ["", f"Conditions: {', '.join(conds)} ({budget} steps). "
              + (f"Winner: **{best[0]}** (mean AUCC {best[1]:.3f}; {how})." if best else "No winner.")]  # fmt: skip
    return "\n".join(lines)


def curves(args, rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difftune_control.utils import read_jsonl

    groups = sorted({group_key(n) for n in rows})
    panels = sorted({g.split("-")[0] for g in groups}) if not args.ablations else ["depth"]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.2 * len(panels), 6.5), 3.8), squeeze=False)
    # one colour per method across the panels: vanilla black (the reference), the others tab10's distinct
    # hues, then tab20's lighter ones (tab20 alone pairs a dark and a light shade of one hue)
    methods = sorted({g.split("-", 1)[1] for g in groups} - {"vanilla"})
    hues = [*plt.get_cmap("tab10").colors, *plt.get_cmap("tab20").colors[1::2]]
    colour = {"vanilla": "black", **{m: hues[i % len(hues)] for i, m in enumerate(methods)}}
    for ax, panel in zip(axes[0], panels):
        for g in (x for x in groups if x.startswith(panel + "-")):
            for name in (n for n in rows if group_key(n) == g):
                ev = [
                    r
                    for r in read_jsonl(args.out / "runs" / name / "metrics.jsonl")
                    if r["type"] == "convergence_eval"
                ]
                xs = [r["step"] for r in ev if r.get("p") is not None]
                ys = [r["p"] for r in ev if r.get("p") is not None]
                ax.plot(
                    xs,
                    ys,
                    color=colour[g.split("-", 1)[1]],
                    alpha=0.7,
                    lw=1.2,
                    label=g.split("-", 1)[1] if name.endswith("-s" + str(args.seeds[0])) else None,
                )
        ax.axhline(0.3, color="grey", ls="--", lw=0.8)
        ax.set_title(panel)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("progress p")
        ax.set_ylim(-0.1, 1.0)
        ax.legend(fontsize=7)
    fig.suptitle(
        "Controllability progress p (0 = hint ignored, 1 = annotator floor); dashed: detector threshold",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/convergence"))
    p.add_argument("--conditions", nargs="+", default=CONDITIONS, choices=CONDITIONS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--convergence_every", type=int, default=25)
    p.add_argument("--parallel", type=int, default=8, help="training processes at once")
    p.add_argument(
        "--ablations", action="store_true", help="the depth ablation grid instead of the 5 conditions"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="with --ablations: only these (vanilla, difftuning, " + ", ".join(ABLATIONS) + ")",
    )
    p.add_argument(
        "--candidates",
        nargs="+",
        default=None,
        help="named method configurations on --conditions (instead of vanilla vs difftuning): "
        + ", ".join(CANDIDATES),
    )
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument("--no-retention", action="store_true")
    p.add_argument(
        "--retention-only",
        action="store_true",
        help="only score the finished runs in --out that have no score yet",
    )
    p.add_argument("--device", default=None)
    p.add_argument("train_args", nargs="*", help="extra flags for every run (after --)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    todo = jobs(args)
    if not args.aggregate_only and not args.retention_only:
        limit_threads(args.parallel)
        # a bank of its own for variants that change what the bank holds
        # (the first preparation of a condition also renders its dataset and caches its latents)
        extra_sets = [list(e) for e in sorted({bank_flags(e) for *_, e in todo})]
        # one condition prepared at a time (they share the rendered dataset); a condition's runs start
        # as soon as it is ready, while the next one is prepared
        conditions = list(dict.fromkeys(c for _, c, _, _, _ in todo))
        t0 = time.time()
        with ThreadPoolExecutor(1) as prep_pool, ThreadPoolExecutor(args.parallel) as pool:
            ready = {c: prep_pool.submit(prepare, args, {c}, extra_sets) for c in conditions}

            def run_when_ready(name, c, cmd):
                ready[c].result()
                return run_cmd(cmd, args.out / "logs" / f"{name}.log")

            futs = {
                name: pool.submit(run_when_ready, name, c, train_cmd(args, name, c, m, s, e))
                for name, c, m, s, e in todo
            }
            for name, fut in futs.items():
                print(f"{name}: rc={fut.result()} ({time.time() - t0:.0f}s)", flush=True)
        print(f"all runs: {time.time() - t0:.0f}s", flush=True)
    if not args.aggregate_only and not args.no_retention:
        score_retention(args, device)
    rows = summarize(args)
    md, agg = tables(rows)
    if args.candidates:
        md = search_tables(rows, args.max_train_steps) + "\n\n" + md
    base_ret = args.out / "retention" / "_base.json"
    b = json.loads(base_ret.read_text()) if base_ret.exists() else None
    if args.candidates:
        md += "\n\n" + rule_table(rows, args.max_train_steps, b and b["single_correct"])
    if b:
        md += (
            f"\n\nBase model alone (no ControlNet): text-following single {b['single_correct']:.2f}, "
            f"two L-R {b['two_left_right']:.2f}, Frechet {b['frechet']:.2f}."
        )
    (args.out / "results.md").write_text(md + "\n")

    def relative(row: dict) -> dict:  # run folders named under --out, so the results read the same anywhere
        path = Path(str(row.get("path", "")))
        inside = path.is_absolute() and path.is_relative_to(args.out.resolve())
        return {**row, "path": str(path.relative_to(args.out.resolve()))} if inside else row

    runs = {name: relative(row) for name, row in rows.items()} if isinstance(rows, dict) else rows
    (args.out / "results.json").write_text(json.dumps({"runs": runs, "groups": agg}, indent=1, default=str))
    print(md)
    curves(args, rows, args.out / "curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
