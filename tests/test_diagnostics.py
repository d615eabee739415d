"""The memory-bank check: how hard bank rows pull a fresh ControlNet against target rows."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import PUBLISHED, build_trainer, target_batch, tiny_config

from difftune_control.training.diagnostics import bank_pull, per_timestep_pull, warn_if_bank_dominates


def test_bank_pull_is_linear_in_lambda_and_leaves_no_trace(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    trainer, _ = build_trainer(tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, **PUBLISHED))
    batch = target_batch(trainer, 8)
    before = trainer.generator.get_state().clone()
    check = bank_pull(trainer, batch)
    assert torch.equal(trainer.generator.get_state(), before)  # training draws are not shifted
    assert all(p.grad is None for p in trainer.controlnet.parameters())
    assert check["bank_slots"] == 12 and check["plans"] == 6 and check["batch"] == 8  # pooled to >= 12 rows
    assert check["target_grad"] > 0 and check["bank_grad"] > 0
    assert check["ratio"] == pytest.approx(check["bank_grad"] / check["target_grad"])
    # the bank part scales with lambda; the target part does not move
    trainer.cfg.method.bank_weight *= 3
    tripled = bank_pull(trainer, batch)
    assert tripled["bank_grad"] == pytest.approx(3 * check["bank_grad"], rel=1e-4)
    assert tripled["target_grad"] == pytest.approx(check["target_grad"], rel=1e-6)
    trainer.cfg.method.bank_weight = 0.0
    assert bank_pull(trainer, batch)["bank_grad"] == 0.0


def test_teacher_targets_pull_nothing_at_step_zero(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """With the base's own predictions as bank targets a zero ControlNet is already optimal on the bank."""
    renoise, _ = build_trainer(tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "a", **PUBLISHED))
    trajectory, _ = build_trainer(
        tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path / "b",
            method__retention="trajectory",
            bank__trajectory_states=2,
            **PUBLISHED,
        )
    )
    a = bank_pull(renoise, target_batch(renoise, 8))
    b = bank_pull(trajectory, target_batch(trajectory, 8))
    assert a["bank_grad"] > 0.05 * a["target_grad"]
    assert b["bank_grad"] < 1e-4 * b["target_grad"]


def test_per_timestep_pull_rows(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    trainer, _ = build_trainer(tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path))
    rows = per_timestep_pull(trainer, target_batch(trainer, 4), [10, 900])
    assert [r["t"] for r in rows] == [10, 900]
    for r in rows:
        assert r["target_grad"] > 0 and r["bank_grad"] > 0 and r["target_loss"] > 0
        assert r["ratio"] == pytest.approx(r["bank_grad"] / r["target_grad"])


def test_warning_names_the_remedy(caplog):
    check = {"ratio": 1.2, "bank_grad": 0.0098, "target_grad": 0.0082}
    with caplog.at_level(logging.INFO, logger="difftune_control.training.diagnostics"):
        assert warn_if_bank_dominates(check, "renoise")
        assert not warn_if_bank_dominates({**check, "ratio": 0.4}, "renoise")
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "1.20x" in warning[0].getMessage()
    assert "--bank_weight auto" in warning[0].getMessage()
    assert (
        "--bank_latents sample" in warning[0].getMessage() and "--bank_hint zero" in warning[0].getMessage()
    )


def test_training_logs_the_check_and_the_report_shows_it(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    from difftune_control.report.runs import load_run
    from difftune_control.report.summary import summarize_run
    from difftune_control.training.loop import run_training
    from difftune_control.utils import read_jsonl

    run = run_training(tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "on"))
    checks = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "bank_check"]
    assert len(checks) == 1 and checks[0]["step"] == 0 and checks[0]["ratio"] > 0
    summary = summarize_run(load_run(run))
    assert summary["bank_check"]["ratio"] == pytest.approx(checks[0]["ratio"])

    off = run_training(
        tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "off", method__bank_check=False)
    )
    assert not [r for r in read_jsonl(off / "metrics.jsonl") if r["type"] == "bank_check"]
    assert summarize_run(load_run(off))["bank_check"] is None


@pytest.mark.parametrize("batch, distill", [(1, False), (4, False), (1, True)])
def test_bank_pull_passes_have_the_steps_shapes(
    batch, distill, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    """A compiled model must not recompile for the measurement, nor hold more activations than a step:
    every pass has the batch's rows (a batch of one measures its two-row plans one row at a time, its
    distilled bank row's own input and target cut with it)."""
    kw = {"method__retention": "trajectory", "bank__trajectory_states": 2, **PUBLISHED} if distill else {}
    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, train__train_batch_size=batch, **kw)
    trainer, _ = build_trainer(cfg)
    sizes, compute = [], trainer.compute_loss

    def recording(b):
        sizes.append(b["latents"].shape[0])
        return compute(b)

    trainer.compute_loss = recording
    check = bank_pull(trainer, target_batch(trainer, batch))
    assert check["plans"] > 1 and len(sizes) == 2 * check["plans"]  # target and bank passes, pooled
    assert set(sizes) == {batch}
    assert check["target_grad"] > 0 and check["bank_grad"] >= 0
    if not distill:  # the base's own predictions as targets pull a zero ControlNet (almost) nowhere
        assert check["bank_grad"] > 0
