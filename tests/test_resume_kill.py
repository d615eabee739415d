"""kill -9 at three moments, then ``--resume_from_checkpoint latest``: the same losses and weights, bit for bit.

Subprocesses on the tiny pipeline (tests/conftest.py) with a toy-world annotator as the extractor: it is
loaded lazily, with a random initialisation first, by whichever process evaluates first, which is
what moved torch's global generator in the resumed process. Exact equality is guaranteed: seeded runs
on one machine with one thread each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difftune_control.utils import read_jsonl

DRIVER = Path(__file__).with_name("kill_driver.py")


def _flags(pipeline: Path, data: Path, out: Path, bank: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(data), "--condition", "depth",
        "--extractor_backend", "toyworld", "--resolution", "16", "--conditioning_embedding_out_channels", "8", "16",
        "--output_dir", str(out), "--run_name", "run", "--report_to", "none", "--device", "cpu",
        "--logging_steps", "1", "--train_batch_size", "4", "--max_train_steps", "6", "--checkpointing_steps", "2",
        "--learning_rate", "1e-3", "--validation_steps", "100", "--bank_size", "8", "--bank_batch_size", "8",
        "--bank_num_inference_steps", "2", "--bank_dir", str(bank), "--convergence_every", "2",
        "--convergence_samples", "2", "--convergence_num_inference_steps", "2",
    ]  # fmt: skip


def _train(point: str, nth: int, flags: list[str]) -> subprocess.CompletedProcess:
    root = str(DRIVER.parent.parent)  # this checkout's package, whatever is installed
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, str(DRIVER), point, str(nth), "--", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _record(run: Path) -> tuple[list, list, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    records = read_jsonl(run / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    evals = [(r["step"], r["d"]) for r in records if r["type"] == "convergence_eval"]
    return losses, evals, load_file(run / "controlnet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny_pipeline_dir, tiny_dataset_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    out = _train("none", 0, _flags(tiny_pipeline_dir, tiny_dataset_dir, root, root / "bank"))
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "bank", _record(root / "run")


def _kill_and_resume(point, nth, resumed_from, uninterrupted, pipeline, data, tmp_path):
    bank, (losses, evals, weights) = uninterrupted
    flags = _flags(pipeline, data, tmp_path, bank)
    killed = _train(point, nth, flags)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL, no cleanup ran
    out = _train("none", 0, [*flags, "--resume_from_checkpoint", "latest"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {tmp_path / 'run' / resumed_from}" in out.stderr
    got_losses, got_evals, got_weights = _record(tmp_path / "run")
    assert got_losses == losses and got_evals == evals
    assert got_weights.keys() == weights.keys()
    assert all(torch.equal(got_weights[k], weights[k]) for k in weights)


def test_kill_during_a_checkpoint_save_then_resume_is_exact(
    uninterrupted, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    # killed while checkpoint-4 is written: its temporary folder is left behind, checkpoint-2 is intact
    _kill_and_resume("save", 2, "checkpoint-2", uninterrupted, tiny_pipeline_dir, tiny_dataset_dir, tmp_path)


@pytest.mark.slow
def test_kill_mid_step_then_resume_is_exact(uninterrupted, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    # killed after the backward of step 5, before its optimizer step
    _kill_and_resume("step", 5, "checkpoint-4", uninterrupted, tiny_pipeline_dir, tiny_dataset_dir, tmp_path)


@pytest.mark.slow
def test_kill_mid_evaluation_then_resume_is_exact(
    uninterrupted, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    # killed inside the detector evaluation of step 4, before checkpoint-4
    _kill_and_resume("eval", 3, "checkpoint-2", uninterrupted, tiny_pipeline_dir, tiny_dataset_dir, tmp_path)
