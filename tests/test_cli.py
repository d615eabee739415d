"""The command line: every subcommand answers --help; bad flags get clear errors."""

import os
import subprocess
import sys
from pathlib import Path

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


def _help(command: str) -> str:
    return build_parser()._subparsers._group_actions[0].choices[command].format_help()


def test_train_help_reads_in_groups_with_short_metavars_and_each_default_once():
    text = _help("train")
    for title in ("base model and ControlNet:", "data and hints:", "method:", "optimisation:", "examples:"):
        assert title in text, title
    assert "usage: difftune train [options]" in text
    assert "MODEL." not in text and "TRAIN." not in text  # metavars are PATH, N, FLOAT, NAME...
    assert "--train_batch_size N " in text and "--learning_rate FLOAT " in text
    assert "--pretrained_model_name_or_path PATH" in text
    assert "(default:" not in text and "Default: None" not in text
    for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions:
        assert (action.help or "").count("Default:") <= 1, action.dest


def test_model_dependent_defaults_in_help_are_the_resolved_ones():
    import dataclasses

    from difftune_control.config import SECTIONS, RunConfig, resolve_defaults
    from difftune_control.flags import describe_default

    helps = {f.name: f.metadata["help"] for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    plain = RunConfig()
    toy, sd = resolve_defaults(plain, toy=True), resolve_defaults(plain, toy=False)
    checked = 0
    for section in SECTIONS:
        for name, value in vars(getattr(plain, section)).items():
            toy_value, sd_value = getattr(getattr(toy, section), name), getattr(getattr(sd, section), name)
            if value is not None or name in ("convergence_threshold", "convergence_patience"):
                continue  # set by the user's default, or by the condition recipe
            if toy_value is None or name == "conditioning_image_column":
                continue
            if toy_value == sd_value and "Default: toy world" not in helps[name]:
                continue  # resolved from the method, not the base model (loss_weighting, bank_hint)
            # "Default: toy world 64, SD 512." (the toy value may depend on the device: "256 on a GPU, 64 on the CPU")
            toy_part, sd_part = helps[name].split("Default: toy world ", 1)[1].split(" SD ", 1)
            assert f" {describe_default(toy_value)}" in f" {toy_part}", (name, toy_part)
            assert sd_part.startswith(describe_default(sd_value)), (name, sd_part)
            checked += 1
    assert checked >= 10


def test_bank_help_lists_only_what_the_bank_uses_and_accepts_train_flags():
    text = _help("bank")
    assert "--bank_size N" in text and "--condition NAME" in text and "--train_data_dir DIR" in text
    for flag in (
        "--learning_rate",
        "--train_batch_size",
        "--adam_beta1",
        "--convergence_every",
        "--run_name",
    ):
        assert flag not in text, flag
    args = build_parser().parse_args(["bank", "--learning_rate", "1e-3", "--bank_size", "8"])
    assert getattr(args, "train.learning_rate") == 1e-3 and getattr(args, "bank.bank_size") == 8


WRONG_PATHS = [
    ["export", "runs/nope"],
    ["report", "runs/nope"],
    ["extract", "--condition", "depth", "--input", "nope", "--output", "out"],
    ["train", "--train_data_dir", "nope/"],
    ["train", "--config", "nope.json"],
    ["train", "--condition", "nope"],
    ["train", "--pretrained_model_name_or_path", "./nope"],
    ["train", "--controlnet_model_name_or_path", "./nope"],
    ["train", "--resume_from_checkpoint", "nope/checkpoint-1"],
    ["bank", "--bank_prompts", "nope.txt"],
]


def test_wrong_paths_are_answered_before_torch_is_imported(tmp_path):
    # One fresh interpreter for all cases: each must exit 2 naming the path, with torch never imported.
    script = (
        "import sys\n"
        "from difftune_control.cli import main\n"
        f"for argv in {WRONG_PATHS!r}:\n"
        "    assert main(argv) == 2, argv\n"
        "    assert 'torch' not in sys.modules, argv\n"
        "print('ok')\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert out.stderr.count("nope") >= len(WRONG_PATHS)


def test_early_checks_report_every_problem_at_once(capsys, tmp_path):
    code = main(
        [
            "train",
            "--condition",
            "nope",
            "--pretrained_model_name_or_path",
            str(tmp_path),
            "--bank_share",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown condition 'nope'" in err and "no unet/ inside" in err and "--bank_share" in err


def test_a_file_given_as_the_pipeline_folder_is_named_before_a_run_folder_is_made(capsys, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    out = tmp_path / "runs"
    code = main(["train", "--pretrained_model_name_or_path", str(tmp_path / "model_index.json"),
                 "--output_dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "model_index.json is a file" in err and "pipeline folder" in err
    assert not out.exists()


def _train_raising(monkeypatch, error: Exception) -> int:
    """``difftune train`` whose run raises ``error``."""
    from difftune_control import cli

    def run(args):
        raise error

    parser = cli.build_parser()
    parse = parser.parse_args
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: setattr(ns := parse(argv), "func", run) or ns)
    return cli.main(["train", "--condition", "depth"])


def test_out_of_gpu_memory_is_answered_with_the_flags_that_lower_it(monkeypatch, capsys):
    import torch

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
    assert _train_raising(monkeypatch, oom) == 2
    err = capsys.readouterr().err
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in err and "more details" not in err
    for flag in ("--gradient_checkpointing", "--fused_backward_pass", "--resume_from_checkpoint latest"):
        assert flag in err
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not dressed up
        _train_raising(monkeypatch, RuntimeError("something else"))


def test_a_command_records_its_start_up_and_its_process_time(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """Run as a program (the training script), a run's setup record counts the process's start-up (imports,
    configuration, accelerator) and its end record the whole process; the report names every part."""
    import os

    from test_trainer import tiny_flags

    from difftune_control.utils import read_jsonl

    flags = tiny_flags(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, "cli")
    small = [
        "--method",
        "vanilla",
        "--max_train_steps",
        "2",
        "--convergence_every",
        "2",
        "--convergence_samples",
        "2",
    ]
    out = subprocess.run(
        [sys.executable, "scripts/train_controlnet.py", *flags, *small],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_jsonl(tmp_path / "cli" / "metrics.jsonl")
    parts = next(r for r in records if r["type"] == "setup")["seconds"]
    assert list(parts) == ["start", "models", "latent_cache", "bank", "trainable"]
    assert (
        0.5 < parts["start"] < 120
    )  # importing torch and diffusers takes a while; nothing like a test session
    end = next(r for r in records if r["type"] == "end")
    assert end["process_seconds"] >= parts["start"] + parts["models"] + end["time"] - 0.5
    assert main(["report", str(tmp_path / "cli")]) == 0
    assert (
        "- setup: start-up (imports, accelerator, device) "
        in (tmp_path / "cli" / "report" / "report.md").read_text()
    )
