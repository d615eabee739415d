"""Several processes: the --ddp_* flags, the stop vote, deferred log values, two gloo processes on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_trainer import tiny_flags

from difftune_control.config import ConfigError
from difftune_control.training.distributed import StopVote, WindowMeans, ddp_kwargs
from difftune_control.utils import read_jsonl

ROOT = Path(__file__).resolve().parent.parent


def test_ddp_flags_become_accelerate_kwargs(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    from accelerate.utils import DDPCommunicationHookType

    t = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path).train
    # defaults: DDP's own, but gradients as bucket views (one copy of the gradients less)
    assert ddp_kwargs(t).to_kwargs() == {"gradient_as_bucket_view": True}
    assert ddp_kwargs(t).comm_hook == DDPCommunicationHookType.NO
    t.ddp_bucket_cap_mb, t.ddp_gradient_as_bucket_view, t.ddp_static_graph = 100, False, True
    t.ddp_comm_hook = "bf16"
    kw = ddp_kwargs(t)
    assert kw.to_kwargs() == {"bucket_cap_mb": 100, "static_graph": True}
    assert kw.comm_hook == DDPCommunicationHookType.BF16


def test_ddp_flags_are_validated_together(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(
        tiny_pipeline_dir, tiny_dataset_dir, tmp_path, train__ddp_bucket_cap_mb=0, train__ddp_comm_hook="fp8"
    )
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    problems = "\n".join(err.value.problems)
    assert "--ddp_bucket_cap_mb must be > 0, got 0" in problems
    assert "--ddp_comm_hook: got 'fp8'; choose one of ['none', 'fp16', 'bf16']" in problems


def test_stop_vote_one_process_decides_at_every_step():
    vote = StopVote(every=5)
    assert [vote(step, flag) for step, flag in [(1, False), (2, True), (3, False)]] == [False, True, False]


def test_stop_vote_collects_only_at_due_steps_and_answers_one_step_later():
    """The all-reduce (accelerate's reduce, counted) runs at multiples of ``every`` only; its answer comes next step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a process-wide singleton other tests set up differently
    acc = Accelerator(cpu=True)
    calls: list[int] = []
    step = 0

    def counted_reduce(tensor, reduction="sum"):
        calls.append(step)
        return acc.reduce(tensor, reduction=reduction)

    vote = StopVote(every=3, reduce=counted_reduce)
    decisions = {}
    for step in range(1, 12):
        decisions[step] = vote(step, flag=step >= 4)  # a signal arrives during step 4
        if decisions[step]:
            break
    assert calls == [3, 6]  # steps 1, 2, 4, 5 made no collective call; step 7 only reads
    assert [s for s, d in decisions.items() if d] == [7] and max(decisions) == 7


def test_window_means_match_the_plain_means():
    window = [
        {"loss": torch.tensor(1.0), "loss_bank": None, "bank_share": 0.25},
        {"loss": torch.tensor(3.0), "loss_bank": torch.tensor(2.0), "bank_share": 0.5},
    ]
    means = WindowMeans(window, ("loss", "loss_bank", "bank_share", "bank_weight")).get()
    assert means == {"loss": 2.0, "loss_bank": 2.0, "bank_share": 0.375, "bank_weight": None}


def _env() -> dict:
    """The environment of a launched run: this checkout's package, one thread per process."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def _launch(run_flags: list[str]) -> list[str]:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*accelerate, str(ROOT / "scripts" / "train_controlnet.py"), *run_flags]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]


VANILLA = [
    "--method",
    "vanilla",
    "--no-detect_convergence",
    "--learning_rate",
    "1e-3",
    "--validation_steps",
    "100",
]


@pytest.mark.slow
def test_two_gloo_processes_with_the_ddp_knobs_train_like_one(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """Two CPU processes (gloo) at a global batch of 4 against one process at batch 4, 8 steps.

    - DDP defaults vs a 0.01 MB bucket (several buckets), gradients as bucket views and a static
      graph: the same arithmetic, so the same losses bit for bit; adding the fp16 compression hook
      (gloo has fp16 and bf16 all-reduce on the CPU) changes the averaged gradients by fp16 rounding:
      losses within 1e-4 relative (measured: <= 1e-5).
    - Against one process: each process draws its own noise and timesteps, and the logged loss is
      rank 0's two rows, so the curves agree in level, not step by step. Per-step losses of this
      model spread by about 5% around ~1.05, so the mean of 8 steps differs by ~3% (1 sd) between
      the runs; the bound is 12%, 4 sd.
    """
    from difftune_control.training.loop import run_training

    steps = ["--max_train_steps", "8", "--checkpointing_steps", "8"]
    runs = {}
    for name, knobs in {
        "defaults": ["--no-ddp_gradient_as_bucket_view"],
        "knobs": ["--ddp_bucket_cap_mb", "0.01", "--ddp_static_graph"],
        "fp16": ["--ddp_bucket_cap_mb", "0.01", "--ddp_static_graph", "--ddp_comm_hook", "fp16"],
    }.items():
        flags = tiny_flags(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, name) + VANILLA + steps
        out = subprocess.run(
            _launch([*flags, "--train_batch_size", "2", *knobs]),
            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = _losses(tmp_path / name)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["world_size"] == 2
        runs[name + "-ddp"] = saved["ddp"]
    assert runs["defaults-ddp"] == {
        "bucket_cap_mb": 25.0, "gradient_as_bucket_view": False, "static_graph": False, "comm_hooks": []
    }  # fmt: skip
    assert runs["fp16-ddp"]["comm_hooks"] == ["fp16_compress_hook"] and runs["fp16-ddp"]["static_graph"]
    assert runs["knobs-ddp"]["gradient_as_bucket_view"] and runs["knobs-ddp"]["bucket_cap_mb"] < 0.011
    assert len(runs["defaults"]) == 8 and runs["knobs"] == runs["defaults"]
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(runs["defaults"], runs["fp16"]))

    cfg = tiny_config(
        tiny_pipeline_dir, tiny_dataset_dir, tmp_path, method__method="vanilla", train__run_name="one",
        train__max_train_steps=8, train__checkpointing_steps=8, detector__detect_convergence=False,
    )  # fmt: skip
    one = _losses(run_training(cfg))
    mean_one, mean_two = sum(one) / len(one), sum(runs["fp16"]) / len(runs["fp16"])
    assert len(one) == 8 and abs(mean_two - mean_one) <= 0.12 * mean_one, (one, runs["fp16"])


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    """SIGTERM to rank 1 only: the vote at the next logging step tells rank 0, both stop one step later,
    save the same checkpoint (each its own RNG state) and exit cleanly."""
    import psutil

    run = tmp_path / "sig2"
    flags = tiny_flags(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, "sig2") + VANILLA
    flags += ["--train_batch_size", "2", "--max_train_steps", "100000", "--checkpointing_steps", "100000"]
    flags += ["--logging_steps", "3"]
    proc = subprocess.Popen(
        _launch(flags), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and '"train"' in (run / "metrics.jsonl").read_text():
                break
            time.sleep(0.5)
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            rank = child.environ().get("RANK")
            if rank is not None and "train_controlnet.py" in " ".join(child.cmdline()):
                ranks[rank] = child
        assert set(ranks) == {"0", "1"}, ranks
        ranks["1"].send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    end = read_jsonl(run / "metrics.jsonl")[-1]
    assert end["type"] == "end" and end["reason"] == "signal"
    step = end["step"]
    assert (step - 1) % 3 == 0  # voted at a logging step, stopped at the next one
    for rank in (0, 1):
        assert f"process {rank} stops at optimizer step {step} (signal)" in err
    ckpt = run / f"checkpoint-{step}"
    assert (ckpt / "trainer_state.json").is_file()
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
