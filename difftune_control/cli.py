"""``difftune``: train | bank | extract | report | export.

Thin: parse flags -> typed config -> call the stage. Each stage module that has a command
line contributes its own subparser through an ``add_cli(subparsers)`` hook.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import json
import os
import sys
from pathlib import Path

from difftune_control import __version__
from difftune_control.config import PRESETS, ConfigError, RunConfig, apply_preset, config_from_args
from difftune_control.console import setup_logging
from difftune_control.flags import BANK_FIELDS, SECTIONS, RegistryChoices, add_config_arguments
from difftune_control.utils import mark_one_command

_STAGE_CLIS = {
    "extract": "difftune_control.extractors.cli",
    "report": "difftune_control.report",
    "export": "difftune_control.export",
}

TRAIN_EPILOG = """\
common flags:
  --condition NAME                canny, depth, normal, segmentation, sketch, or a recipe .toml
  --method vanilla|difftuning     the ControlNet baseline, Diff-Tuning with a memory bank, or a
                                  method registered with difftune_control.methods.register_method
  --pretrained_model_name_or_path PATH --train_data_dir DIR
                                  your Stable Diffusion folder and data (without them: the toy world)
  --max_train_steps N --train_batch_size N --learning_rate FLOAT
  --run_name NAME --resume_from_checkpoint latest
                                  name the run folder; continue it where it stopped

examples:
  difftune train --condition canny
  difftune train --method vanilla --run_name depth-vanilla --max_train_steps 500
  accelerate launch scripts/train_controlnet.py --pretrained_model_name_or_path /models/sd15 \\
      --train_data_dir /data/my_set --condition depth --mixed_precision bf16 --train_batch_size 8
"""

BANK_EPILOG = """\
example:
  difftune bank --condition depth --bank_size 512      # then: difftune train --condition depth --bank_size 512
"""


def _config(args: argparse.Namespace) -> RunConfig:
    """Flags over an optional saved config (``--config run/config.json``) over the defaults."""
    base = None
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config: file not found: {path}")
        try:
            base = RunConfig.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path}: not valid JSON ({err})") from err
    return config_from_args(args, apply_preset(base or RunConfig(), getattr(args, "preset", None)))


def _local_path_problem(flag: str, value: str | None, *, pipeline: bool = False) -> str | None:
    """A path-looking value (absolute, ``./``, ``~``) that does not exist; hub ids (``org/name``) pass."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if (path.is_absolute() or value.startswith((".", "~"))) and not path.exists():
        return f"{flag}: not found: {value}"
    if pipeline and path.is_file():
        return (
            f"{flag}: {value} is a file; give the diffusers pipeline folder (model_index.json and unet/ inside; "
            "convert a single-file checkpoint with diffusers' StableDiffusionPipeline.from_single_file(...)"
            ".save_pretrained(DIR))"
        )
    if pipeline and path.is_dir() and not (path / "unet").is_dir():
        return f"{flag}: {value} is not a diffusers pipeline folder (no unet/ inside)"
    return None


def check_early(cfg: RunConfig) -> None:
    """The checks that need no torch, before the heavy imports: a wrong flag or path answers at once.

    The config's own rules (:meth:`RunConfig.validate`), the condition recipe, and the model paths;
    every problem in one :class:`ConfigError`. The run checks again after resolving its defaults.
    """
    problems: list[str] = []
    try:
        cfg.validate()
    except ConfigError as err:
        problems += err.problems
    try:
        from difftune_control.extractors.recipes import load_recipe

        load_recipe(cfg.data.condition)
    except (ValueError, FileNotFoundError) as err:
        problems.append(str(err))
    m = cfg.model
    for problem in (
        _local_path_problem(
            "--pretrained_model_name_or_path", m.pretrained_model_name_or_path, pipeline=True
        ),
        _local_path_problem("--controlnet_model_name_or_path", m.controlnet_model_name_or_path),
        _local_path_problem("--teacher_controlnet", cfg.method.teacher_controlnet),
    ):
        if problem:
            problems.append(problem)
    if (
        cfg.train.fused_backward_pass and int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):  # set by accelerate launch
        from difftune_control.training.fused_step import ONE_PROCESS

        problems.append(ONE_PROCESS)
    if problems:
        raise ConfigError(problems)


def _run_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    check_early(cfg)
    from difftune_control.training.loop import run_training

    run_dir = run_training(cfg)
    print(run_dir)
    return 0


def _run_bank(args: argparse.Namespace) -> int:
    cfg = _config(args)
    check_early(cfg)
    if not cfg.uses_bank:
        raise ValueError(f"--method {cfg.method.method} --split {cfg.method.split} uses no memory bank")
    from difftune_control.training.setup import run_bank_only

    print(run_bank_only(cfg))
    return 0


def add_train_arguments(parser: argparse.ArgumentParser, shown: frozenset[str] | None = None) -> None:
    """All training flags (shared by ``difftune train``, ``difftune bank`` and ``scripts/train_controlnet.py``).

    Args:
        parser: the subcommand's parser.
        shown: field names listed in ``--help`` (the others are accepted, not listed). Default: all.
    """
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="A saved config.json (e.g. a run's) to start from; flags override it.",
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        metavar="NAME",
        help="A named method configuration under the other flags: published = Diff-Tuning as the authors' "
        "code runs it (re-noised bank images with extracted hints, lambda 0.1).",
    )
    add_config_arguments(parser, shown=shown, choices={"method": RegistryChoices(_registered_methods)})


def _registered_methods() -> list[str]:
    """The names ``--method`` accepts: the methods registry's (built-in and registered since)."""
    from difftune_control.methods.registry import available_methods

    return available_methods()


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftune",
        description="Train ControlNets with Diff-Tuning, detect sudden convergence, report, export.",
    )
    parser.add_argument("--version", action="version", version=f"difftune-control {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="Train a ControlNet (vanilla or Diff-Tuning).",
        usage="%(prog)s [options]",
        description=(
            "Train a ControlNet. With no model or data flags it trains on the shipped toy world.\n"
            "Defaults that depend on the base model are given for both (toy world, SD); the resolved\n"
            "values are saved in the run's config.json.\n"
            "For several GPUs or nodes: accelerate launch scripts/train_controlnet.py [options]"
        ),
        epilog=TRAIN_EPILOG,
        formatter_class=_formatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=_run_train)

    p = sub.add_parser(
        "bank",
        help="Build (or verify and reuse) the memory bank of a configuration.",
        usage="%(prog)s [options]",
        description=(
            "Generate the Diff-Tuning memory bank with the frozen base model, or verify and reuse a\n"
            "cached one. Lists the flags that change the bank; every other flag of `difftune train` is\n"
            "accepted and ignored, so a training command line works as it is."
        ),
        epilog=BANK_EPILOG,
        formatter_class=_formatter,
    )
    bank_fields = BANK_FIELDS | {f.name for f in dataclasses.fields(SECTIONS["bank"])}
    add_train_arguments(p, shown=bank_fields)
    p.set_defaults(func=_run_bank)

    for name, module in _STAGE_CLIS.items():
        try:
            importlib.import_module(module).add_cli(sub)
        except ModuleNotFoundError as err:
            if err.name is None or not module.startswith(err.name):
                raise
            _add_unavailable(sub, name, module)
    return parser


def _add_unavailable(sub, name: str, module: str) -> None:
    def run(args: argparse.Namespace) -> int:
        print(f"difftune {name}: not available in this installation ({module} is missing)", file=sys.stderr)
        return 2

    p = sub.add_parser(name, help=f"({name}: not available in this installation)")
    p.set_defaults(func=run)


OOM_ADVICE = (
    "Out of GPU memory. What a step holds shrinks with --gradient_checkpointing, --optimizer adafactor, "
    "--fused_backward_pass, --mixed_precision bf16, or a smaller --train_batch_size (with "
    "--gradient_accumulation_steps to keep the effective batch); the detector's with --convergence_samples; "
    "the memory bank's with --bank_batch_size. Checkpoints already written are intact: continue with "
    "--resume_from_checkpoint latest."
)


DISK_ADVICE = (
    ". Files already written (checkpoints, caches, exports) are intact: free space and run the same command "
    "again (`difftune train` continues with --resume_from_checkpoint latest)."
)


def main(argv: list[str] | None = None, *, program: bool = False) -> int:
    """The ``difftune`` command; ``program``: this process runs only this command (the entry points; so is
    ``argv=None``, reading the process's own arguments)."""
    if argv is None or program:
        mark_one_command()
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError, PermissionError, FloatingPointError) as err:
        print(f"difftune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError and its older RuntimeError form
        if "out of memory" not in str(err):
            raise
        print(f"difftune {args.command}: error: {str(err).splitlines()[0]}\n{OOM_ADVICE}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"difftune {args.command}: error: {err.strerror}{where}{DISK_ADVICE}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"difftune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
