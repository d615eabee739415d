"""The command line: every subcommand answers --help; bad flags get clear errors."""

import subprocess
import sys

import pytest

from difftune_control.cli import build_parser, main

SUBCOMMANDS = ["train", "bank", "extract", "report", "export"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: difftune" in out and command in out
    assert "not available" not in out


def test_train_help_lists_diffusers_flag_names():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in [
        "--pretrained_model_name_or_path",
        "--train_data_dir",
        "--resolution",
        "--train_batch_size",
        "--learning_rate",
        "--mixed_precision",
        "--gradient_checkpointing",
        "--checkpointing_steps",
        "--resume_from_checkpoint",
        "--validation_steps",
        "--report_to",
        "--condition",
        "--method",
        "--split",
        "--stop_after_convergence",
        "--convergence_every",
    ]:
        assert flag in help_text, flag


def test_bad_choice_is_rejected_with_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "magic"])
    err = capsys.readouterr().err
    assert "--method" in err and "vanilla" in err and "difftuning" in err


def test_config_errors_exit_2_with_every_problem(capsys, tmp_path):
    code = main(
        [
            "train",
            "--train_batch_size",
            "0",
            "--bank_share",
            "3",
            "--train_data_dir",
            str(tmp_path / "nope"),
            "--condition",
            "canny",
            "--pretrained_model_name_or_path",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "--train_batch_size" in err and "--bank_share" in err and "--train_data_dir" in err


def test_missing_config_file(capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "--config" in capsys.readouterr().err


def test_train_script_entry_point_help():
    out = subprocess.run(
        [sys.executable, "scripts/train_controlnet.py", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--pretrained_model_name_or_path" in out.stdout
