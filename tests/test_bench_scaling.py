"""scripts/bench_scaling.py end to end on the CPU: two gloo processes against one (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_scaling_two_cpu_processes(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "scaling"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_scaling.py"), "--out", str(out), "--steps", "4",
        "--global_batch", "4", "--bank_size", "8", "--window", "2", "--cpu", "--",
        "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(tiny_dataset_dir),
        "--resolution", "16", "--conditioning_embedding_out_channels", "8", "16", "--condition", "canny",
        "--bank_num_inference_steps", "2",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    one, two = results["train"]
    assert (one["processes"], one["per_process_batch"]) == (1, 4)
    assert (two["processes"], two["per_process_batch"]) == (2, 2)
    assert len(one["loss"]) == len(two["loss"]) == 4  # both ran every optimizer step
    assert two["vs_one"]["windows"] == 2 and two["vs_one"]["mean_relative_difference"] is not None
    assert [b["processes"] for b in results["bank"]] == [1, 2] and all(
        b["images_per_s"] for b in results["bank"]
    )
    assert (out / "loss.png").stat().st_size > 0

    # --reuse: a second call keeps the finished training runs (same numbers, no new launch)
    logs = {p.name: p.stat().st_mtime_ns for p in (out / "logs").glob("train-n*.log")}
    res = subprocess.run(
        [*cmd[:2], "--reuse", "--skip_bank", *cmd[2:]], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    again = json.loads((out / "results.json").read_text())
    assert [r["images_per_s"] for r in again["train"]] == [one["images_per_s"], two["images_per_s"]]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "logs").glob("train-n*.log")} == logs
    assert again["bank"] == [] and not (out / "logs" / "prepare.log").stat().st_mtime_ns > max(logs.values())
