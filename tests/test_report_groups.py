"""AUCC per run and runs grouped by seed, on tiny run folders written by hand (config.json + metrics.jsonl).

Every expected number is computed by hand in a comment beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_report import check_html

from difftune_control.report import build_report, load_run, main, summarize_run
from difftune_control.report.groups import group_runs, mean_over_conditions, summarize_groups
from difftune_control.report.stats import mean_interval

EXACT = 1e-12  # sums of a few decimals: only float rounding
# t quantiles in closed form: 1 degree of freedom is Cauchy, t = tan(pi (q - 1/2)); with 2,
# t = (2q - 1) / sqrt(2 q (1 - q)); q = 0.975 for a two-sided 95% interval
T1 = math.tan(math.pi * 0.475)  # 12.7062...
T2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # 4.3027...


def tiny_run(
    root: Path,
    name: str,
    *,
    seed: int,
    p: list[float | None],
    every: int = 100,
    method: str = "vanilla",
    split: str = "fixed",
    condition: str = "depth",
    event: int | None = None,
    milestones: dict[float, int] | None = None,
    end: str | None = "max_steps",
    steps_trained: int | None = None,
    max_steps: int = 1000,
    learning_rate: float = 1e-4,
    psi_power: float = 1.0,
    bank_hint: str = "extracted",
    loss_weighting: str | None = None,
    records: list[dict] | None = None,
) -> Path:
    """A run folder with the config fields the report reads and one convergence_eval per `every` steps."""
    path = root / name
    path.mkdir(parents=True)
    config = {
        "model": {"pretrained_model_name_or_path": None},
        "data": {"condition": condition, "resolution": 64},
        "method": {
            "method": method,
            "split": split,
            "psi_power": psi_power,
            "bank_share": 0.2,
            "bank_weight": 0.1,
            **({"loss_weighting": loss_weighting} if loss_weighting is not None else {}),
        },
        "bank": {"bank_hint": bank_hint},
        "detector": {"convergence_every": every, "convergence_threshold": 0.3, "convergence_patience": 2},
        "train": {
            "output_dir": str(root),
            "run_name": name,
            "seed": seed,
            "max_train_steps": max_steps,
            "learning_rate": learning_rate,
            "resume_from_checkpoint": None,
        },
        "condition": {"name": condition, "detector": {"milestones": [0.25, 0.5, 0.75]}},
    }
    (path / "config.json").write_text(json.dumps(config))
    if records is None:
        records = [
            {"type": "convergence_eval", "step": i * every, "time": float(i), "p": v, "d": 0.1, "d0": 0.3, "d_floor": 0.1}
            for i, v in enumerate(p)
        ]  # fmt: skip
        for level, step in (milestones or {}).items():
            records.append({"type": "milestone", "step": step, "level": level, "p": level})
        if event is not None:
            records.append(
                {"type": "convergence_event", "step": event, "p": 0.3, "threshold": 0.3, "patience": 2,
                 "confirmed_step": event + every, "p_confirmed": 0.3}
            )  # fmt: skip
        last = steps_trained if steps_trained is not None else (len(p) - 1) * every
        if end is not None:
            records.append({"type": "end", "step": last, "time": 99.0, "reason": end})
        elif steps_trained is not None:
            records.append({"type": "train", "step": last, "time": 98.0, "loss": 0.1})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def summary_of(path: Path, budget: int | None = None) -> dict:
    return summarize_run(load_run(path), budget)


# -- AUCC of one run -----------------------------------------------------------------------------
def test_aucc_of_a_run_that_never_converges(tmp_path):
    # p = 0 at step 0, then 0.05 to step 1000: (0.5 * 0.05 * 100 + 0.05 * 900) / 1000 = 0.0475
    s = summary_of(tiny_run(tmp_path, "flat", seed=0, p=[0.0] + [0.05] * 10))
    assert s["converged"] is False
    assert s["aucc"] == pytest.approx(0.0475, abs=EXACT)
    assert s["aucc_status"] == "complete" and s["aucc_budget"] == 1000 and s["aucc_note"] is None


def test_aucc_of_a_run_stopped_early(tmp_path):
    # evaluations to step 500 of a 1000-step budget; area to 500: 0 + 20 + 50 + 60 + 60 = 190
    p = [0.0, 0.0, 0.4, 0.6, 0.6, 0.6]
    stopped = summary_of(tiny_run(tmp_path, "stopped", seed=0, p=p, event=200, end="stop_after_convergence"))
    # stopped on purpose after converging: p = 0.6 held from 500 to 1000: (190 + 300) / 1000
    assert stopped["aucc"] == pytest.approx(0.49, abs=EXACT) and stopped["aucc_status"] == "held"
    assert "stopped early by --stop_after_convergence at step 500" in stopped["aucc_note"]
    assert stopped["aucc_lower_bound"] == pytest.approx(0.19, abs=EXACT)
    # interrupted, or still running: no AUCC, only its lower bound 190 / 1000, and the reason
    for name, end in (("killed", "signal"), ("running", None)):
        s = summary_of(tiny_run(tmp_path, name, seed=0, p=p, end=end, steps_trained=520))
        assert s["aucc"] is None and s["aucc_status"] == "incomplete"
        assert s["aucc_lower_bound"] == pytest.approx(0.19, abs=EXACT)
        assert "incomplete: last evaluation at step 500 of the 1000-step budget" in s["aucc_note"]
    # trained to its 550-step budget, evaluated every 100: p held over the last 50 steps, (190 + 30) / 550
    full = summary_of(tiny_run(tmp_path, "full", seed=0, p=p, max_steps=550, steps_trained=550))
    assert full["aucc"] == pytest.approx(220 / 550, abs=EXACT) and full["aucc_status"] == "held"
    # a smaller budget given: the curve is cut at it, complete (0 + 20 + 50) / 300
    assert summary_of(tmp_path / "killed", budget=300)["aucc"] == pytest.approx(70 / 300, abs=EXACT)


def test_aucc_of_a_resumed_run_uses_the_log_as_it_finally_went(tmp_path):
    ev = lambda step, p: {"type": "convergence_eval", "step": step, "p": p}  # noqa: E731
    records = [
        ev(0, 0.0), ev(100, 0.2), ev(200, 0.4),
        {"type": "train", "step": 150},  # resumed from checkpoint-100: the first 200 is dropped
        ev(200, 0.6), ev(300, 0.6), ev(400, 0.8),
        {"type": "end", "step": 400, "reason": "max_steps"},
    ]  # fmt: skip
    run = tiny_run(tmp_path, "resumed", seed=0, p=[], max_steps=400, records=records)
    # 0..100: 10; 100..200: 40; 200..300: 60; 300..400: 70 -> 180 / 400
    s = summary_of(run)
    assert [r["p"] for r in load_run(run).evals] == [0.0, 0.2, 0.6, 0.6, 0.8]
    assert s["aucc"] == pytest.approx(0.45, abs=EXACT) and s["aucc_status"] == "complete"


# -- statistics ----------------------------------------------------------------------------------
def test_mean_and_t_interval_against_hand_computed_values():
    # 300, 400, 500: mean 400, sd 100, half width t * 100 / sqrt(3)
    iv = mean_interval([300, 400, None, 500])
    assert iv.mean == pytest.approx(400) and iv.n == 3 and iv.missing == 1
    assert iv.low == pytest.approx(400 - T2 * 100 / math.sqrt(3), rel=1e-12)
    assert iv.high == pytest.approx(400 + T2 * 100 / math.sqrt(3), rel=1e-12)
    one = mean_interval([7.0, None])
    assert (one.mean, one.low, one.high, one.n, one.missing) == (7.0, None, None, 1, 1)
    assert mean_interval([None, float("nan")]).mean is None
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0], confidence=95)


# -- grouping ------------------------------------------------------------------------------------
P = [0.0, 0.1, 0.4, 0.5, 0.6]  # steps 0..400 every 100, budget 400: 5 + 25 + 45 + 55 = 130 -> 0.325


def test_grouping_ignores_the_seed_and_the_run_name_only(tmp_path):
    root = tmp_path / "runs"
    runs = [
        tiny_run(root, "depth-vanilla-s0", seed=0, p=P, max_steps=400),
        tiny_run(root, "depth-vanilla-s1", seed=1, p=P, max_steps=400),
        tiny_run(tmp_path / "elsewhere", "again-s7", seed=7, p=P, max_steps=400),  # other folder and name
        tiny_run(root, "depth-vanilla-lr-s0", seed=0, p=P, max_steps=400, learning_rate=2e-4),
        tiny_run(root, "depth-zero-s0", seed=0, p=P, max_steps=400, method="difftuning", bank_hint="zero"),
        tiny_run(root, "canny-vanilla-s0", seed=0, p=P, max_steps=400, condition="canny"),
    ]
    resumed = json.loads((runs[1] / "config.json").read_text())
    resumed["train"]["resume_from_checkpoint"] = "latest"  # a resumed run is the same experiment
    (runs[1] / "config.json").write_text(json.dumps(resumed))
    loaded = [load_run(r) for r in runs]
    groups = group_runs(loaded, [summarize_run(r) for r in loaded])
    assert [[r.name for r in g.runs] for g in groups] == [
        ["depth-vanilla-s0", "depth-vanilla-s1", "again-s7"],
        ["depth-vanilla-lr-s0"],
        ["depth-zero-s0"],
        ["canny-vanilla-s0"],
    ]
    assert groups[0].seeds == [0, 1, 7]
    assert groups[0].name == "depth vanilla"  # names without a common stem: condition and method
    assert groups[2].reference is groups[0]  # same training setup: not the one with another lr
    assert groups[2].differs == [
        ("bank.bank_hint", "extracted", "zero"),
        ("method.method", "vanilla", "difftuning"),
    ]
    assert groups[0].reference is None and groups[3].reference is None  # references themselves
    assert groups[1].reference is None  # a vanilla group with another setup is its own reference


def test_the_reference_is_the_plain_vanilla_group(tmp_path):
    root = tmp_path / "runs"
    runs = [
        tiny_run(root, "skewed-vanilla-s0", seed=0, p=P, max_steps=400, psi_power=2.0),  # off the default
        tiny_run(root, "vanilla-s0", seed=0, p=P, max_steps=400),
        tiny_run(root, "difftuning-s0", seed=0, p=P, max_steps=400, method="difftuning"),
    ]
    loaded = [load_run(r) for r in runs]
    skewed, plain, dt = group_runs(loaded, [summarize_run(r) for r in loaded])
    assert plain.reference is None
    assert skewed.reference is plain and dt.reference is plain


def test_the_reference_is_vanilla_without_a_loss_weighting(tmp_path):
    from difftune_control.report.compare import pick_reference

    root = tmp_path / "runs"
    runs = [
        tiny_run(root, "isnr-s0", seed=0, p=P, max_steps=400, loss_weighting="inverse_snr"),
        tiny_run(root, "vanilla-s0", seed=0, p=P, max_steps=400, loss_weighting="none"),
        tiny_run(
            root, "dt-s0", seed=0, p=P, max_steps=400, method="difftuning", loss_weighting="inverse_snr"
        ),
    ]
    loaded = [load_run(r) for r in runs]
    summaries = [summarize_run(r) for r in loaded]
    isnr, plain, dt = group_runs(loaded, summaries)
    assert plain.reference is None and isnr.reference is plain and dt.reference is plain
    # single runs too: the plain vanilla run, not the vanilla run with a loss weighting
    assert pick_reference(summaries[2], summaries)["name"] == summaries[1]["name"]
    assert pick_reference(summaries[0], summaries)["name"] == summaries[1]["name"]
    assert pick_reference(summaries[1], summaries) is None


def test_group_means_intervals_and_paired_speedups_against_hand_computed_values(tmp_path):
    root = tmp_path / "runs"
    # vanilla: events 200 / 300 / 400, p >= 0.5 at 300 / 400 / not reached; AUCC 0.325 each (P)
    vanilla = [
        tiny_run(root, "depth-vanilla-s0", seed=0, p=P, max_steps=400, event=200, milestones={0.5: 300}),
        tiny_run(root, "depth-vanilla-s1", seed=1, p=P, max_steps=400, event=300, milestones={0.5: 400}),
        tiny_run(root, "depth-vanilla-s2", seed=2, p=P, max_steps=400, event=400),
    ]
    # difftuning: events 100 / 200 / never; p >= 0.5 at 100 / 200 / 300
    # AUCC: seed 0 p = 0, .5, .5, .5, .5: 25 + 150 = 175 / 400 = 0.4375; seed 1: 0.325 (P);
    # seed 2 p = 0, 0, .1, .1, .65: 0 + 5 + 10 + 37.5 = 52.5 / 400 = 0.13125
    dt = [
        tiny_run(root, "depth-dt-s0", seed=0, p=[0, 0.5, 0.5, 0.5, 0.5], max_steps=400, method="difftuning",
                 event=100, milestones={0.5: 100}),
        tiny_run(root, "depth-dt-s1", seed=1, p=P, max_steps=400, method="difftuning", event=200,
                 milestones={0.5: 200}),
        tiny_run(root, "depth-dt-s2", seed=2, p=[0, 0, 0.1, 0.1, 0.65], max_steps=400, method="difftuning",
                 milestones={0.5: 300}),
        tiny_run(root, "depth-dt-s3", seed=3, p=P, max_steps=400, method="difftuning"),  # no vanilla seed 3
    ]  # fmt: skip
    loaded = [load_run(r) for r in vanilla + dt]
    ref, g = summarize_groups(loaded, [summarize_run(r) for r in loaded])
    assert (ref["name"], g["name"], g["reference"]) == ("depth-vanilla", "depth-dt", "depth-vanilla")
    st = ref["stats"]
    assert st["event"]["mean"] == pytest.approx(300) and st["event"]["missing"] == 0
    assert st["event"]["high"] - 300 == pytest.approx(T2 * 100 / math.sqrt(3), rel=1e-12)
    assert st["0.5"]["mean"] == pytest.approx(350) and st["0.5"]["n"] == 2 and st["0.5"]["missing"] == 1
    assert st["0.5"]["high"] - 350 == pytest.approx(T1 * 50, rel=1e-12)  # sd 50 * sqrt(2), over sqrt(2)
    assert st["aucc"]["mean"] == pytest.approx(0.325, abs=EXACT) and st["aucc"]["low"] == pytest.approx(0.325)
    assert st["final_p"]["mean"] == pytest.approx(0.6)

    vs = g["vs_reference"]
    assert vs["unpaired"] == [3]
    # event: seed 0 200/100 = 2, seed 1 300/200 = 1.5, seed 2 not reached: mean 1.75, sd 0.3536
    assert vs["event"]["per_seed"] == {0: 2.0, 1: 1.5, 2: None} and vs["event"]["not_reached"] == [2]
    assert vs["event"]["mean"] == pytest.approx(1.75) and vs["event"]["n"] == 2
    assert vs["event"]["high"] - 1.75 == pytest.approx(T1 * 0.25, rel=1e-12)  # sd 0.5 / sqrt(2), over sqrt(2)
    # p >= 0.5: seed 0 300/100 = 3, seed 1 400/200 = 2, seed 2: vanilla never, the run at 300 -> >= 400/300
    assert vs["0.5"]["per_seed"] == {0: 3.0, 1: 2.0, 2: None}
    assert vs["0.5"]["at_least"] == {2: pytest.approx(400 / 300)} and vs["0.5"]["mean"] == pytest.approx(2.5)
    # AUCC ratio: 0.4375 / 0.325, 1, 0.13125 / 0.325
    ratios = [0.4375 / 0.325, 1.0, 0.13125 / 0.325]
    assert list(vs["aucc"]["per_seed"].values()) == pytest.approx(ratios, rel=1e-12)
    assert vs["aucc"]["mean"] == pytest.approx(sum(ratios) / 3, rel=1e-12)


def test_maucc_is_the_mean_over_conditions_of_the_group_means(tmp_path):
    root = tmp_path / "runs"
    half = [0, 0.5, 0.5, 0.5, 0.5]  # AUCC (25 + 150) / 400 = 0.4375; P: 0.325
    dirs = []
    for cond, dt_p, dt_event in (("depth", half, 150), ("canny", P, 300)):
        for seed in (0, 1):
            dirs.append(tiny_run(root, f"{cond}-vanilla-s{seed}", seed=seed, p=P, max_steps=400, condition=cond,
                                 event=300))  # fmt: skip
            dirs.append(tiny_run(root, f"{cond}-dt-s{seed}", seed=seed, p=dt_p, max_steps=400, condition=cond,
                                 method="difftuning", event=dt_event))  # fmt: skip
    loaded = [load_run(d) for d in dirs]
    means = mean_over_conditions(summarize_groups(loaded, [summarize_run(r) for r in loaded]))
    assert [(m["name"], m["conditions"]) for m in means] == [
        ("vanilla", ["depth", "canny"]),
        ("dt", ["depth", "canny"]),
    ]
    vanilla, dt = means
    assert vanilla["maucc"] == pytest.approx(0.325) and vanilla["aucc_ratio"] is None
    assert dt["maucc"] == pytest.approx((0.4375 + 0.325) / 2)
    assert dt["aucc_ratio"] == pytest.approx((0.4375 / 0.325 + 1.0) / 2)
    assert dt["event_speedup"] == pytest.approx((300 / 150 + 300 / 300) / 2)


def test_report_of_grouped_runs(tmp_path, capsys):
    root = tmp_path / "runs"
    dirs = [
        tiny_run(
            root, f"depth-{m}-s{s}", seed=s, p=P, max_steps=400, method=m, event=300 - 100 * (m != "vanilla")
        )
        for m in ("vanilla", "difftuning")
        for s in (0, 1)
    ]
    assert main([*map(str, dirs), "--out", str(tmp_path / "rep"), "--aucc_budget", "200"]) == 0
    printed = capsys.readouterr().out
    assert "group depth-difftuning: 2 seeds, mean AUCC 0.150" in printed  # P to step 200: (5 + 25) / 200
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert [g["name"] for g in summary["groups"]] == ["depth-vanilla", "depth-difftuning"]
    assert summary["groups"][1]["vs_reference"]["event"]["mean"] == pytest.approx(1.5)  # 300 / 200
    assert summary["files"]["groups"] == "groups.png" and (tmp_path / "rep" / "groups.png").is_file()
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Groups of seeds" in md and "| depth-difftuning | depth-vanilla | 2 | 1.50× [1.50, 1.50]" in md
    assert "method.method: vanilla → difftuning" in md
    page = check_html(tmp_path / "rep" / "report.html")
    assert "Paired speed-ups against the reference" in "".join(page.text)
    # two runs that are not repeats of one experiment: the report stays per run
    out = build_report([dirs[0], dirs[2]], tmp_path / "two")
    two = json.loads((out / "summary.json").read_text())
    assert "groups" not in two and not (out / "groups.png").exists()
    assert two["runs"][1]["vs_vanilla"]["aucc"]["ratio"] == pytest.approx(1.0)
    assert main([str(dirs[0]), "--aucc_budget", "0"]) == 2
    assert "--aucc_budget must be a number of optimizer steps >= 1, got 0" in capsys.readouterr().err


def test_time_to_convergence_counts_the_data_preparation_of_the_starts_before_it(tmp_path):
    """A run that built its cache and bank (first start), was resumed at step 200 (a second start, reusing
    them) and converged at step 300 after 40 s of training; a third start after the event does not count."""
    evals = [
        {"type": "convergence_eval", "step": s, "time": float(s) / 10, "p": p, "d": 0.1, "d0": 0.3, "d_floor": 0.1}
        for s, p in ((0, 0.0), (100, 0.0), (200, 0.1), (300, 0.4), (400, 0.5))
    ]  # fmt: skip
    setups = [
        {"type": "setup", "step": 0, "seconds": {"latent_cache": 12.0, "bank": 100.0}},
        {"type": "setup", "step": 200, "seconds": {"latent_cache": 0.5, "bank": 1.5}},
        {"type": "setup", "step": 350, "seconds": {"latent_cache": 0.5, "bank": 1.0}},
    ]
    event = {"type": "convergence_event", "step": 300, "time": 40.0, "p": 0.4, "confirmed_step": 400}
    path = tiny_run(tmp_path, "r", seed=0, p=[], records=[*setups[:1], *evals[:3], setups[1], evals[3], event,
                    setups[2], evals[4]])  # fmt: skip
    s = summary_of(path)
    assert s["setup_seconds"] == {"latent_cache": 13.0, "bank": 102.5}
    assert s["seconds_to_convergence"] == pytest.approx(40.0 + 12.0 + 100.0 + 0.5 + 1.5)
    assert summary_of(tiny_run(tmp_path, "never", seed=0, p=[0.0, 0.1]))["seconds_to_convergence"] is None


def test_no_aucc_ratio_against_a_reference_that_never_moved(tmp_path):
    """Vanilla at p ~ 0 over the whole budget (AUCC 0.002) makes any ratio to it noise: none is given, and the
    tables say why; a reference above the floor still gives one."""
    from difftune_control.report.compare import aucc_ratio
    from difftune_control.report.group_tables import paired_table

    root = tmp_path / "runs"
    flat = [0.0, 0.0, 0.004, 0.004, 0.0]  # (0 + 0.2 + 0.4 + 0.2) / 400 = 0.002
    dirs = [
        tiny_run(root, "depth-vanilla-s0", seed=0, p=flat, max_steps=400),
        tiny_run(root, "depth-vanilla-s1", seed=1, p=P, max_steps=400, event=300),
        tiny_run(root, "depth-dt-s0", seed=0, p=P, max_steps=400, method="difftuning", event=200),
        tiny_run(root, "depth-dt-s1", seed=1, p=P, max_steps=400, method="difftuning", event=200),
    ]
    loaded = [load_run(d) for d in dirs]
    summaries = [summarize_run(r) for r in loaded]
    assert summaries[0]["aucc"] == pytest.approx(0.002, abs=EXACT)
    one = aucc_ratio(summaries[2], summaries[0])
    assert one["ratio"] is None and one["near_zero"] and "p stayed near 0" in one["note"]
    assert aucc_ratio(summaries[3], summaries[1])["ratio"] == pytest.approx(1.0)
    _, g = summarize_groups(loaded, summaries)
    aucc = g["vs_reference"]["aucc"]
    assert aucc["per_seed"] == {0: None, 1: pytest.approx(1.0)} and aucc["reference_near_zero"] == [0]
    assert aucc["mean"] == pytest.approx(1.0) and aucc["n"] == 1
    _, rows = paired_table([g])
    assert "seed 0: reference AUCC < 0.01, no ratio" in rows[0][-1]
