"""The report of a tiny real training run (the trainer in-process, the detector inside it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config

from difftune_control.report import build_report
from difftune_control.utils import read_jsonl


def _config(pipeline: Path, data: Path, out: Path, name: str, method: str, steps: int = 6):
    return tiny_config(
        pipeline,
        data,
        out,
        train__run_name=name,
        method__method=method,
        train__max_train_steps=steps,
        train__checkpointing_steps=100,
    )


@pytest.fixture(scope="module")
def trained_run(tiny_pipeline_dir, tiny_dataset_dir, tmp_path_factory) -> Path:
    from difftune_control.training.loop import run_training

    out = tmp_path_factory.mktemp("runs")
    return run_training(_config(tiny_pipeline_dir, tiny_dataset_dir, out, "vanilla", "vanilla"))


def test_report_of_a_real_run_agrees_with_its_metrics(trained_run, tmp_path):
    from html.parser import HTMLParser

    report = build_report([trained_run])
    assert report == trained_run / "report"
    for name in ("convergence.png", "samples.png", "report.md", "report.html", "summary.json"):
        assert (report / name).stat().st_size > 0, name
    records = read_jsonl(trained_run / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "convergence_eval"]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    assert all((trained_run / r["samples"]).is_file() for r in evals)
    s = json.loads((report / "summary.json").read_text())["runs"][0]
    assert s["name"] == "vanilla" and s["label"] == "vanilla" and s["condition"] == "canny"
    assert s["steps_trained"] == 6 and s["in_progress"] is False and s["end_reason"] == "max_steps"
    assert s["evaluations"] == 4 and s["final_step"] == 6
    assert s["final_p"] == evals[-1]["p"] and s["final_d"] == evals[-1]["d"]
    assert s["d0"] == evals[-1]["d0"] and s["d_floor"] == evals[-1]["d_floor"]
    assert evals[0]["p"] == pytest.approx(0.0, abs=1e-6)  # zero-initialised ControlNet at step 0
    event = next((r for r in records if r["type"] == "convergence_event"), None)
    assert s["converged"] is (event is not None)
    assert s["convergence_step"] == (event or {}).get("step")
    for level, step in s["milestones"].items():
        hit = [r["step"] for r in records if r["type"] == "milestone" and f"{r['level']:g}" == level]
        assert step == (hit[0] if hit else None)
    setup = [r for r in records if r["type"] == "setup"]
    assert len(setup) == 1 and setup[0]["step"] == 0 and setup[0]["seconds"]["latent_cache"] > 0
    assert s["setup_seconds"] == pytest.approx(setup[0]["seconds"])  # vanilla: no bank, ~0 s for it
    parts = setup[0]["seconds"]  # trained in this (test) process: its age is no run's start-up
    assert list(parts) == ["models", "latent_cache", "bank", "trainable"]
    assert parts["models"] > 0 and parts["trainable"] > 0
    assert next(r for r in records if r["type"] == "end")["process_seconds"] is None
    text = (report / "report.md").read_text()
    assert "- setup: base model " in text and "ControlNet and optimizer" in text
    if s["converged"]:
        assert s["seconds_to_convergence"] == pytest.approx(event["time"] + sum(setup[0]["seconds"].values()))
    wall = max(r["time"] for r in records if "time" in r)
    assert s["eval_cost_share"] == pytest.approx(sum(r["eval_seconds"] for r in evals) / wall)
    HTMLParser().feed((report / "report.html").read_text())


def test_report_of_a_run_in_progress(trained_run, tmp_path):
    """The same run as if it were still training: no end record, a half-written last line."""
    live = tmp_path / "live"
    shutil.copytree(trained_run, live, ignore=shutil.ignore_patterns("report", "checkpoint-*", "controlnet"))
    lines = (live / "metrics.jsonl").read_text().splitlines()
    kept = [x for x in lines if '"type": "end"' not in x and '"step": 6' not in x]
    (live / "metrics.jsonl").write_text("\n".join(kept) + '\n{"type": "train", "step": 5, "lo')
    s = json.loads((build_report([live]) / "summary.json").read_text())["runs"][0]
    assert s["in_progress"] is True and s["final_step"] == 4 and "in progress" in s["status"]
