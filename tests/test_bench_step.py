"""scripts/bench_step.py at tiny size on the CPU: both methods' interleaved chunks over one ControlNet, the
lambda re-measurement timed apart, the profile's phase split and the table (the numbers are the GPU's job)."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_step import ab_batch, ab_table, bench_batch, table  # noqa: E402
from bench_throughput import SyntheticCached  # noqa: E402


@pytest.fixture
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # the benchmark trains in bf16; other tests in fp32
    yield
    AcceleratorState._reset_state()


def test_both_methods_interleave_over_one_controlnet(tiny_pipeline_dir, tmp_path, fresh_accelerator_state):
    rows = functools.partial(SyntheticCached, resolution=64, context=(8, 16))  # the tiny pipeline's shapes
    args = argparse.Namespace(
        model_dir=tiny_pipeline_dir, repeats=2, steps=2, warmup=1, profile=True, out=tmp_path
    )
    out = bench_batch(args, 4, "default", rows=rows, device="cpu")
    assert [r["method"] for r in out] == ["vanilla", "difftuning"]
    assert all(len(r["step_ms_all"]) == 2 and r["step_ms_median"] > 0 for r in out)
    dt = out[1]
    low, high = dt["overhead_range"]
    assert low <= dt["overhead_median"] <= high and dt["calibration_s"] > 0
    assert 0 < dt["calibration_share"] < 1  # one re-measurement against --bank_pull_every (200) steps
    phases = {"difftune.plan", "difftune.assemble", "difftune.forward", "difftune.backward"}
    assert all(set(r["profile"]["phases_host_ms"]) == phases for r in out)
    assert (tmp_path / "trace-difftuning-b4-default.json").is_file()
    md = table(out)
    assert "| difftuning | 4 | default |" in md and "| assemble | backward | forward | plan |" in md


def test_the_bf16_weights_setting_trains_both_methods_on_one_copy(
    tiny_pipeline_dir, tmp_path, fresh_accelerator_state
):
    """``--speed bf16-weights``: both trainers run the ControlNet's one bf16 copy, and the profile counts its ops
    (the casts autocast makes at every step are gone: fewer ops than the default's step)."""
    rows = functools.partial(SyntheticCached, resolution=64, context=(8, 16))
    args = argparse.Namespace(
        model_dir=tiny_pipeline_dir, repeats=1, steps=1, warmup=1, profile=True, out=tmp_path
    )
    out = {s: bench_batch(args, 4, s, rows=rows, device="cpu") for s in ("default", "bf16-weights")}
    assert all(r["step_ms_median"] > 0 for r in out["bf16-weights"])
    ops = {s: out[s][0]["profile"]["ops_per_step"] for s in out}
    assert 0 < ops["bf16-weights"] < ops["default"], ops


def test_settings_against_each_other_interleave_in_one_process(tiny_pipeline_dir, fresh_accelerator_state):
    """``--ab default bf16-weights``: each setting's own model and optimizer, chunks alternating; the first setting's
    ratio to itself is 1 and each row's ratio lies within its range."""
    rows = functools.partial(SyntheticCached, resolution=64, context=(8, 16))
    args = argparse.Namespace(model_dir=tiny_pipeline_dir, repeats=2, steps=1, warmup=1)
    out = ab_batch(args, 4, ["default", "bf16-weights"], rows=rows, device="cpu")
    assert [r["speed"] for r in out] == ["default", "bf16-weights"]
    assert out[0]["time_vs_first_median"] == 1.0 and all(len(r["step_ms_all"]) == 2 for r in out)
    lo, hi = out[1]["time_vs_first_range"]
    assert lo <= out[1]["time_vs_first_median"] <= hi
    assert "| 4 | bf16-weights |" in ab_table(out)


def test_an_sdpa_setting_runs_the_step_through_that_backend(tiny_pipeline_dir, fresh_accelerator_state):
    """``--ab default sdpa-math`` (the SDPA backend check): the setting's steps call the math attention (no fused
    SDPA kernel), the default's a fused one; the profile tells them apart."""
    import torch
    from bench_throughput import make_ours

    rows = functools.partial(SyntheticCached, resolution=64, context=(8, 16))
    called = {}
    for speed in ("default", "sdpa-math"):
        trainer, opt, acc = make_ours(tiny_pipeline_dir, 4, "vanilla", speed=speed, rows=rows, device="cpu")
        batch = next(iter(torch.utils.data.DataLoader(trainer.target, batch_size=4)))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.training_step(batch)
        called[speed] = {e.key for e in prof.key_averages()}
    fused = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention"}
    assert "aten::scaled_dot_product_attention" in called["default"] & called["sdpa-math"]
    assert called["default"] & fused and not called["sdpa-math"] & fused
    assert "aten::_scaled_dot_product_attention_math" in called["sdpa-math"]
