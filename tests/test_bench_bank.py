"""scripts/bench_bank.py: the bank's FLOP count adds up, and the benchmark runs the builder's batch on a CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_bank import apply_setting, bank_flop_per_image, main  # noqa: E402

from difftune_control.toyworld import default_base_model_path  # noqa: E402


def toy_configs() -> tuple[dict, dict]:
    base = Path(default_base_model_path())
    return (
        json.loads((base / "unet" / "config.json").read_text()),
        json.loads((base / "vae" / "config.json").read_text()),
    )


def test_flop_count_adds_up_over_steps_and_guidance():
    unet, vae = toy_configs()
    cfg = bank_flop_per_image(unet, vae, resolution=64, steps=4, guidance_scale=7.5)
    assert cfg["unet_call"] > 0 and cfg["vae_decode"] > 0 and cfg["vae_encode"] > 0
    assert cfg["unet"] == pytest.approx(4 * 2 * cfg["unet_call"])  # the unconditional row is one more call
    assert cfg["total"] == pytest.approx(cfg["unet"] + cfg["vae_decode"] + cfg["vae_encode"])
    plain = bank_flop_per_image(unet, vae, resolution=64, steps=8, guidance_scale=1.0)
    assert plain["unet"] == pytest.approx(cfg["unet"])  # 8 calls without guidance = 4 steps with it
    bigger = bank_flop_per_image(unet, vae, resolution=128, steps=4, guidance_scale=7.5)
    assert bigger["unet_call"] > 3 * cfg["unet_call"]  # 4x the latent pixels


def test_channels_last_setting_changes_the_weights_layout():
    from difftune_control.config import ModelConfig
    from difftune_control.training.runtime import load_base_model

    base = load_base_model(
        ModelConfig(pretrained_model_name_or_path=default_base_model_path()),
        torch.device("cpu"),
        torch.float32,
    )
    conv = next(m for m in base.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert apply_setting(base, "channels_last") == 0
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_benchmark_runs_eager_and_compiled_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTUNE_COMPILE_BACKEND", "aot_eager")  # no C compiler needed
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = main(
        [
            "--out",
            str(out),
            "--device",
            "cpu",
            "--model-dir",
            str(default_base_model_path()),
            "--resolution",
            "64",
            "--batches",
            "2",
            "--steps",
            "2",
            "--repeats",
            "2",
            "--settings",
            "eager",
            "compile",
        ]  # fmt: skip
    )
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["setting"], r["batch"]) for r in rows] == [("eager", 2), ("compile", 2)]
    assert rows[0]["compiled_blocks"] == 0 and rows[1]["compiled_blocks"] > 0
    for r in rows:
        lo, hi = r["images_per_s_range"]
        assert 0 < lo <= r["images_per_s"] <= hi
        assert r["mfu"] == pytest.approx(r["images_per_s"] * r["flop_per_image"] / 790e12)
    md = (out / "results.md").read_text()
    assert "| eager | 2 |" in md and "| compile | 2 |" in md and "DDIM 2 steps, CFG 7.5, 64 px" in md
