"""``difftune export RUN_OR_CHECKPOINT --format webui|diffusers ...``: the command-line hook."""

from __future__ import annotations

import argparse
import logging
import sys

from difftune_control.config import ExportConfig
from difftune_control.export.exporter import export_controlnet
from difftune_control.export.verify import VerificationError
from difftune_control.flags import add_config_arguments

DESCRIPTION = (
    "Export a trained ControlNet. 'webui': one control_<name>_<sd>_<condition>_<dtype>.safetensors in the "
    "original LDM layout that AUTOMATIC1111's sd-webui-controlnet, Forge and ComfyUI load as they are "
    "(put it in models/ControlNet or extensions/sd-webui-controlnet/models; SD2.x ControlNets compute "
    "right only in ComfyUI and Forge; a toy-world ControlNet is for the demo and loads in no UI). 'diffusers': a "
    "ControlNetModel.save_pretrained folder with a model card. The export is reloaded and checked "
    "against the trained model unless --no-verify."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the export flags to ``parser``."""
    parser.add_argument(
        "source",
        metavar="RUN_OR_CHECKPOINT",
        help="run folder (uses controlnet/, else the latest checkpoint), checkpoint-N folder, or diffusers ControlNet folder",
    )
    add_config_arguments(parser, {"export": ExportConfig}, overlay=False)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``export`` subcommand on ``subparsers`` (``set_defaults(func=run)``).

    Args:
        subparsers (`argparse._SubParsersAction`): From ``parser.add_subparsers()`` of the main CLI.
    """
    parser = subparsers.add_parser(
        "export", help="Export a trained ControlNet for WebUI/ComfyUI or diffusers.", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``difftune export`` with parsed ``args``; print the written path.

    Returns:
        `int`: 0 on success, 2 for bad input (path, flags, output folder), 1 when verification fails.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = export_controlnet(
            args.source,
            format=args.format,
            out_dir=args.out,
            dtype=args.dtype,
            name=args.name,
            verify=args.verify,
            condition=args.condition,
        )
    except VerificationError as err:
        print(f"difftune export: verification failed: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"difftune export: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``scripts/export_webui.py``)."""
    parser = argparse.ArgumentParser(prog="export_webui.py", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
