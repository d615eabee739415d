"""``difftune``: train | bank | extract | report | export.

Thin: parse flags -> typed config -> call the stage. Each stage module that has a command
line contributes its own subparser through an ``add_cli(subparsers)`` hook.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from difftune_control import __version__
from difftune_control.config import (
    PRESETS,
    ConfigError,
    RunConfig,
    add_config_arguments,
    apply_preset,
    config_from_args,
)

_STAGE_CLIS = {
    "extract": "difftune_control.extractors.cli",
    "report": "difftune_control.report",
    "export": "difftune_control.export",
}


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


def _run_train(args: argparse.Namespace) -> int:
    from difftune_control.loop import run_training

    run_dir = run_training(_config(args))
    print(run_dir)
    return 0


def _run_bank(args: argparse.Namespace) -> int:
    from difftune_control.loop import run_bank_only

    print(run_bank_only(_config(args)))
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """All training flags (shared by ``difftune train`` and ``scripts/train_controlnet.py``)."""
    parser.add_argument(
        "--config", default=None, help="A saved config.json (e.g. a run's) to start from; flags override it."
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="A named method configuration under the other flags: published = Diff-Tuning as the authors' "
        "code runs it (re-noised bank images with extracted hints, lambda 0.1).",
    )
    add_config_arguments(parser)


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
        description=(
            "Train a ControlNet. With no model or data flags it trains on the shipped toy world. "
            "For several GPUs or nodes use: accelerate launch scripts/train_controlnet.py ..."
        ),
    )
    add_train_arguments(p)
    p.set_defaults(func=_run_train)

    p = sub.add_parser(
        "bank",
        help="Build (or verify and reuse) the memory bank of a configuration.",
        description="Generate the Diff-Tuning memory bank with the frozen base model.",
    )
    add_train_arguments(p)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError, PermissionError, FloatingPointError) as err:
        print(f"difftune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"difftune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
