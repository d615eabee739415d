"""File-name rules and the ``difftune export`` command line."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel

from difftune_control.export import add_cli, webui_filename
from difftune_control.export.cli import main

SD15 = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768}
SD21 = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024}
SDXL = {
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
}
TOY = {"block_out_channels": [64, 128, 128], "cross_attention_dim": 128}
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (SD15, "control_mydepth_sd15_depth_fp16.safetensors"),
        (SD21, "control_mydepth_sd21_depth_fp16.safetensors"),
        (SDXL, "control_mydepth_xl_depth_fp16.safetensors"),
        (TOY, "control_mydepth_toy_depth_fp16.safetensors"),
    ],
    ids=["sd15", "sd21", "xl", "toy"],
)
def test_filename_carries_the_sd_family_of_the_architecture(config, expected):
    assert webui_filename("mydepth", "depth", config) == expected


def test_filename_cleans_names_and_keeps_dtype():
    assert (
        webui_filename("My_Run 2", "Segmentation", SD15, "bf16")
        == "control_my-run-2_sd15_segmentation_bf16.safetensors"
    )


@pytest.mark.parametrize(
    ("name", "condition", "message"),
    [
        ("pretty-xl", "depth", r"--name 'pretty-xl' contains \['xl'\]"),
        ("depth-sd21", "depth", r"contains \['sd21'\]"),
        ("sd14-xl", "depth", r"contains \['xl'\]"),  # sd14 is SD1.x: fine in an sd15 name
        ("shuffled", "canny", "shuffle"),
        ("ok", "shuffle-ish", "shuffle"),
        ("__", "depth", "no letters or digits"),
    ],
)
def test_names_a_webui_would_misread_are_refused(name, condition, message):
    with pytest.raises(ValueError, match=message):
        webui_filename(name, condition, SD15)


def test_markers_of_the_own_family_are_allowed():
    assert webui_filename("sd15-run", "depth", SD15) == "control_sd15-run_sd15_depth_fp16.safetensors"
    assert webui_filename("xl-run", "depth", SDXL) == "control_xl-run_xl_depth_fp16.safetensors"
    with pytest.raises(ValueError, match=r"\['sd15'\]"):
        webui_filename("sd15-run", "depth", TOY)


def test_unknown_dtype_is_refused_with_choices():
    with pytest.raises(ValueError, match=r"--dtype 'fp64' is not one of \('fp16', 'bf16', 'fp32'\)"):
        webui_filename("a", "depth", SD15, "fp64")


def parser_with_export() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difftune")
    add_cli(parser.add_subparsers(dest="command"))
    return parser


def test_add_cli_registers_export_with_defaults_and_choices(capsys):
    args = parser_with_export().parse_args(["export", "runs/x"])
    assert (args.format, args.dtype, args.verify, args.name, args.out) == ("webui", "fp16", True, None, None)
    assert args.func.__name__ == "run"
    args = parser_with_export().parse_args(
        ["export", "runs/x", "--format", "diffusers", "--dtype", "bf16", "--no-verify"]
    )
    assert (args.format, args.dtype, args.verify) == ("diffusers", "bf16", False)
    with pytest.raises(SystemExit):
        parser_with_export().parse_args(["export", "runs/x", "--format", "ckpt"])
    assert "invalid choice: 'ckpt'" in capsys.readouterr().err


def test_run_exports_and_prints_the_path(tmp_path, capsys):
    torch.manual_seed(0)
    ControlNetModel(
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
        conditioning_embedding_out_channels=(4, 8),
    ).save_pretrained(tmp_path / "cn")
    args = parser_with_export().parse_args(
        [
            "export",
            str(tmp_path / "cn"),
            "--condition",
            "canny",
            "--name",
            "mine",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "o" / "control_mine_toy_canny_fp16.safetensors")
    assert Path(printed).is_file()


def test_run_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_script_entry_point_shows_help():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_webui.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0
    assert "RUN_OR_CHECKPOINT" in done.stdout and "--no-verify" in done.stdout


def test_provenance_reads_the_trainers_config_forms():
    from difftune_control.export import ExportSource

    toy = ExportSource(
        Path("r/controlnet"),
        Path("r"),
        run_config={
            "model": {},
            "base_model": {"id": "/x/toy", "is_toy": True},
            "data": {"condition": "depth"},
        },
    )
    assert (toy.base_model, toy.condition) == ("toyworld", "depth")
    local = ExportSource(
        Path("r/controlnet"), Path("r"), run_config={"base_model": {"id": "/m/sd", "is_toy": False}}
    )
    assert local.base_model == "/m/sd"
    assert ExportSource(Path("c")).base_model is None


def test_model_card_puts_only_hub_ids_in_the_yaml_header():
    from difftune_control.export.diffusers_folder import model_card

    info = {"base_model": "/home/me/sd15", "condition": "depth", "method": "vanilla"}
    card = model_card("x", info, [], None, "sd15", Path("runs/x"))
    assert "base_model:" not in card.split("---")[1] and "/home/me/sd15" in card
    assert "difftune report runs/x" in card
    card = model_card(
        "x", {**info, "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, [], None, "sd15"
    )
    assert "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5" in card
