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


def test_profile_summary_of_a_two_step_gpu_trace():
    """Hand-made trace of 2 steps of 100 us: compute 0-60 and 100-160, NCCL 40-80 and 140-190, a 5 us host sync."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from profile_training import summarize, table

    def x(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [
        x("user_annotation", "ProfilerStep#7", 0, 100),
        x("user_annotation", "ProfilerStep#8", 100, 100),
        x("gpu_user_annotation", "ProfilerStep#7", 0, 100),  # the GPU-side copy: not a step
        x("kernel", "sm90_xmma_gemm", 0, 60),
        x("kernel", "ncclDevKernel_AllReduce_Sum_f32_RING_LL", 40, 40),
        x("kernel", "sm90_xmma_gemm", 100, 60),
        x("kernel", "ncclDevKernel_AllReduce_Sum_f32_RING_LL", 140, 50),
        x("cuda_runtime", "cudaStreamSynchronize", 90, 5),
        x("cuda_runtime", "cudaLaunchKernel", 91, 1),
        x("cpu_op", "c10d::allreduce_", 30, 2),
    ]
    s = summarize(events)
    assert s["steps"] == 2 and s["gpu"]
    assert s["step_ms"] == pytest.approx(0.1)  # 100 us per step
    assert s["compute_ms"] == pytest.approx(0.06) and s["nccl_ms"] == pytest.approx(0.045)
    assert s["nccl_hidden"] == pytest.approx(40 / 90)  # 20 + 20 us of 40 + 50 under compute
    assert s["exposed_nccl_ms"] == pytest.approx(0.025)
    assert s["gpu_idle_ms"] == pytest.approx(0.015)  # 80-100 and 190-200: 30 us over 2 steps
    assert s["sync_wait_ms"] == pytest.approx(0.0025) and s["sync_calls"] == 0.5
    assert s["collective_calls"] == 0.5 and s["collective_cpu_ms"] == pytest.approx(0.001)
    assert "| rank0 | 2 | 0.1 |" in table({"rank0": s}) and summarize([]) == {"steps": 0}


@pytest.mark.slow
def test_bench_scaling_variants_per_gpu_batch_and_profile_on_cpu(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    """--per_gpu_batch, a --variant of DDP flags and --profile: the modes of the two-GPU device script."""
    out = tmp_path / "scaling"
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
    )
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_scaling.py"), "--out", str(out), "--steps", "4",
        "--per_gpu_batch", "2", "--window", "2", "--cpu", "--skip_bank", "--method", "vanilla",
        "--variant", "knobs=--ddp_comm_hook bf16 --ddp_bucket_cap_mb 0.01", "--profile", "1", "--profile_skip", "1",
        "--", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(tiny_dataset_dir),
        "--resolution", "16", "--conditioning_embedding_out_channels", "8", "16", "--condition", "canny",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    one, two = results["train"]
    assert (one["processes"], one["per_process_batch"], one["variant"]) == (1, 2, "-")
    assert (two["processes"], two["per_process_batch"], two["variant"]) == (2, 2, "knobs")
    saved = json.loads((out / "runs" / "train-n2-knobs" / "config.json").read_text())
    assert saved["ddp"]["comm_hooks"] == ["bf16_compress_hook"]
    (prof,) = results["profile"]
    assert prof["variant"] == "knobs" and set(prof["summary"]) == {"rank0", "rank1"}
    assert all(
        s["steps"] == 1 and s["collective_calls"] > 2 for s in prof["summary"].values()
    )  # buckets + vote
    assert (out / "profile-knobs" / "trace-rank1.json").stat().st_size > 0
    assert "profile, 2 processes, variant knobs" in (out / "results.md").read_text()
