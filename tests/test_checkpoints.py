"""Checkpoints that are never poisoned, and a resume that verifies them and falls back to an intact one."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from difftune_control.utils import read_jsonl


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]


def _cfg(pipeline, data, out, steps, **kw):
    return tiny_config(
        pipeline, data, out, method__method="vanilla", detector__detect_convergence=False,
        train__max_train_steps=steps, **kw,
    )  # fmt: skip


def test_a_diverged_update_stops_the_run_before_it_reaches_a_checkpoint(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    """Update 2 turns a weight into inf while its loss was finite: the run stops naming step 2 and
    checkpoint-1, and never writes checkpoint-2. The fault is injected through torch's global
    optimizer hook (the issue's `--learning_rate inf` is now refused up front)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from difftune_control.training.loop import run_training

    steps = {"n": 0}

    def diverge(optimizer, args, kwargs):
        steps["n"] += 1
        if steps["n"] == 2:
            optimizer.param_groups[0]["params"][0].data.fill_(float("inf"))

    handle = register_optimizer_step_post_hook(diverge)
    try:
        with pytest.raises(
            FloatingPointError, match="optimizer step 2 made ControlNet weights non-finite"
        ) as err:
            run_training(_cfg(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, 4, train__checkpointing_steps=1))
    finally:
        handle.remove()
    run = tmp_path / "run"
    assert f"is checkpoint-1: resume with --resume_from_checkpoint {run / 'checkpoint-1'}" in str(err.value)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]


def _poison(checkpoint: Path) -> None:
    """Put a NaN into a checkpoint's weights, as a diverged update saved by an older version would."""
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    weights = load_file(path)
    key = next(iter(weights))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, path)


@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir, tiny_dataset_dir, tmp_path_factory):
    """An uninterrupted 6-step run."""
    from difftune_control.training.loop import run_training

    return _losses(run_training(_cfg(tiny_pipeline_dir, tiny_dataset_dir, tmp_path_factory.mktemp("ref"), 6)))


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else data[:16] + b"\0" * (len(data) - 16))


@pytest.mark.parametrize(
    "name, how",
    [
        ("model.safetensors", "truncate"),
        ("optimizer.bin", "truncate"),
        ("random_states_0.pkl", "truncate"),
        ("trainer_state.json", "truncate"),
        ("model.safetensors", "poison"),
    ],
)
def test_resume_latest_skips_a_damaged_checkpoint_naming_the_file(
    reference, tiny_pipeline_dir, tiny_dataset_dir, tmp_path, caplog, name, how
):
    from difftune_control.training.loop import run_training

    run = run_training(_cfg(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, 4))  # checkpoint-2, checkpoint-4
    _poison(run / "checkpoint-4") if how == "poison" else _damage(run / "checkpoint-4" / name, how)
    with caplog.at_level(logging.INFO):
        run_training(
            _cfg(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, 6, train__resume_from_checkpoint="latest")
        )
    skipped = [r.getMessage() for r in caplog.records if "newest intact checkpoint" in r.getMessage()]
    assert skipped and f"checkpoint-4: {name}" in skipped[0], skipped
    assert any(
        f"resumed from {run / 'checkpoint-2'} at optimizer step 2" in r.getMessage() for r in caplog.records
    )
    assert _losses(run) == reference  # the fallback is as exact as any resume


def test_train_state_keeps_the_dict_format_of_trainer_state_json(
    reference, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    """``trainer_state.json`` is the JSON object the loop always wrote; one written by an older version
    (a plain dict without the file sizes) still loads and resumes exactly."""
    from difftune_control.training.checkpoints import TrainState
    from difftune_control.training.loop import run_training

    run = run_training(_cfg(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, 4))
    path = run / "checkpoint-4" / "trainer_state.json"
    saved = json.loads(path.read_text())
    assert list(saved) == [
        "global_step", "consumed_batches", "elapsed", "stop_at", "trainer", "lr_scheduler", "monitor", "files",
    ]  # fmt: skip
    state = TrainState.load(path.parent)
    assert state.to_dict() == {k: v for k, v in saved.items() if k != "files"}
    assert (state.global_step, state.consumed_batches, state.stop_at) == (4, 4, None)

    old = {
        k: saved[k]
        for k in ("global_step", "consumed_batches", "elapsed", "stop_at", "trainer", "lr_scheduler")
    }
    path.write_text(json.dumps(old, indent=1))  # as written before the file sizes and the monitor were saved
    assert TrainState.load(path.parent) == dataclasses.replace(state, monitor=None)
    run_training(
        _cfg(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, 6, train__resume_from_checkpoint="latest")
    )
    assert _losses(run) == reference
    with pytest.raises(ValueError, match=r"keys \['trainer'\] missing"):
        TrainState.from_dict({"global_step": 1, "lr_scheduler": {}})


def test_an_explicit_damaged_checkpoint_is_refused_with_the_file_and_the_intact_ones(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    from difftune_control.training.loop import run_training

    run = run_training(_cfg(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, 4))
    _damage(run / "checkpoint-4" / "optimizer.bin", "truncate")
    cfg = _cfg(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        6,
        train__resume_from_checkpoint=str(run / "checkpoint-4"),
    )
    with pytest.raises(ValueError, match="optimizer.bin") as err:
        run_training(cfg)
    assert "['checkpoint-2']" in str(err.value)


def test_last_finite_checkpoint_and_verification_see_poisoned_weights(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    from difftune_control.training.checkpoints import (
        last_finite_checkpoint,
        safetensors_problem,
        verify_checkpoint,
    )
    from difftune_control.training.loop import run_training

    run = run_training(_cfg(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, 4))
    assert (
        last_finite_checkpoint(run) == run / "checkpoint-4" and verify_checkpoint(run / "checkpoint-4") == []
    )
    _poison(run / "checkpoint-4")
    assert last_finite_checkpoint(run) == run / "checkpoint-2"
    assert any(p.startswith("model.safetensors ") for p in verify_checkpoint(run / "checkpoint-4"))
    assert "non-finite" in safetensors_problem(run / "checkpoint-4" / "model.safetensors", check_finite=True)


def test_resume_latest_without_run_name_continues_the_newest_run_of_this_kind(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, caplog
):
    from difftune_control.training.loop import run_training

    first = run_training(_cfg(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, 2, train__run_name=None))
    assert first.name.startswith("canny-vanilla-")
    with caplog.at_level(logging.WARNING):
        again = run_training(
            _cfg(
                tiny_pipeline_dir,
                tiny_dataset_dir,
                tmp_path,
                4,
                train__run_name=None,
                train__resume_from_checkpoint="latest",
            )
        )
    assert again == first and (first / "checkpoint-4").is_dir()
    assert f"resuming {first}, the newest of 1 run(s) named canny-vanilla-*" in caplog.text
    # only runs of other names: which one is meant is ambiguous
    first.rename(tmp_path / "mine")
    cfg = _cfg(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        6,
        train__run_name=None,
        train__resume_from_checkpoint="latest",
    )
    with pytest.raises(
        ValueError, match=r"no run named canny-vanilla-<time>, but these runs have checkpoints: mine"
    ):
        run_training(cfg)


@pytest.mark.gpu
def test_weight_watch_on_cuda_defers_the_read_to_the_next_check(tmp_path):
    from difftune_control.training.finite import WeightWatch

    weights = [torch.ones(3, device="cuda"), torch.ones(2, device="cuda")]
    watch = WeightWatch(lambda: iter(weights), tmp_path, 1e-4)
    watch.watch(1)
    weights[1][0] = float("nan")
    watch.watch(2)  # queued behind an event: nothing raised, no host sync
    watch.check(keep=1)  # step 1 read: finite
    with pytest.raises(FloatingPointError, match="optimizer step 2 made ControlNet weights non-finite"):
        watch.check()


def test_a_full_disk_at_a_checkpoint_names_it_keeps_the_last_one_and_the_run_resumes(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, monkeypatch, capsys
):
    """The disk fills while checkpoint-2 is written: the error names it and says what to do, the partial
    folder is gone, checkpoint-1 is intact, and the same command continues from it once there is space."""
    import errno

    import accelerate

    from difftune_control.cli import main
    from difftune_control.training.checkpoints import verify_checkpoint

    real = accelerate.Accelerator.save_state

    def fill_at_2(self, output_dir=None, **kw):
        real(self, output_dir, **kw)
        if ".checkpoint-2" in str(output_dir):
            raise OSError(errno.ENOSPC, "No space left on device")

    cfg = _cfg(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, 3, train__checkpointing_steps=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    argv = ["train", "--config", str(tmp_path / "config.json"), "--resume_from_checkpoint", "latest"]
    monkeypatch.setattr(accelerate.Accelerator, "save_state", fill_at_2)
    assert main(argv) == 2
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert f"no space left on device while writing {run / 'checkpoint-2'}" in err and "free space" in err
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    verify_checkpoint(run / "checkpoint-1")
    monkeypatch.setattr(accelerate.Accelerator, "save_state", real)
    assert main(argv) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
