"""scripts/hint_gain.py: the hint's gain per timestep band, on a tiny real pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import build_trainer, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from hint_gain import measure  # noqa: E402


@pytest.fixture
def trainer(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, method__method="vanilla")
    cfg.data.proportion_empty_prompts = 0.0
    trainer, _ = build_trainer(cfg)
    return trainer


def test_a_fresh_controlnet_gains_nothing_and_is_the_base(trainer):
    rows = measure(trainer, trainer.target, samples=4, bands=2, batch_size=4)
    assert [r["band"] for r in rows] == ["t0-500", "t500-1000"]
    for r in rows:  # zero convolutions: the base's prediction whatever the hint
        assert r["loss_base"] == pytest.approx(r["loss_null_hint"], abs=1e-7)
        assert r["loss_hint"] == pytest.approx(r["loss_null_hint"], abs=1e-7)
        assert r["gain"] == pytest.approx(0.0, abs=1e-7)


def test_a_controlnet_that_reads_its_hint_gains_and_the_shares_add_up(trainer):
    torch.manual_seed(0)
    with torch.no_grad():  # open the zero convolutions: the hint now moves the prediction
        net = trainer.controlnet
        for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.05)
        for p in net.controlnet_cond_embedding.conv_out.parameters():
            p.normal_(0, 0.05)
    rows = measure(trainer, trainer.target, samples=4, bands=2, batch_size=2)
    assert all(r["loss_hint"] != pytest.approx(r["loss_null_hint"], abs=1e-6) for r in rows)
    assert all(r["loss_base"] != pytest.approx(r["loss_hint"], abs=1e-6) for r in rows)
    for k in ("none", "inverse_snr", "min_snr"):
        assert sum(r[f"share_{k}"] for r in rows) == pytest.approx(1.0)
    from hint_gain import summary

    total = summary(rows)  # bands t0-500 and t500-1000: the share below 500 is the first band's
    assert total["summed_gain"] == pytest.approx(rows[0]["gain"] + rows[1]["gain"])
    assert total["share_below_none"] == pytest.approx(rows[0]["share_none"])
    assert summary(rows, below=1000)["share_below_inverse_snr"] == pytest.approx(1.0)
    # the same rows, noise and timesteps each call: the measurement repeats exactly
    again = measure(trainer, trainer.target, samples=4, bands=2, batch_size=2)
    assert [r["gain"] for r in again] == pytest.approx([r["gain"] for r in rows], abs=1e-7)


def test_toy_domain_names_the_rows_it_measures_on(tmp_path, monkeypatch):
    import json

    from hint_gain import data_flags

    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path))
    flags, rest = data_flags(["--condition", "sketch", "--toy_domain", "swapped"], "validation", 4)
    assert rest == ["--condition", "sketch"] and flags[0] == "--train_data_dir"
    info = json.loads((Path(flags[1]) / "dataset_info.json").read_text())
    assert (info["domain"], info["split"]) == ("swapped", "validation") and info["n"] >= 4
    default, _ = data_flags(["--condition", "sketch"], "validation", 4)
    assert json.loads((Path(default[1]) / "dataset_info.json").read_text())["domain"] == "default"
    given = ["--train_data_dir", "DATA", "--toy_domain", "swapped"]
    assert data_flags(given, "validation", 4) == ([], given)  # the run's own check refuses the pair
