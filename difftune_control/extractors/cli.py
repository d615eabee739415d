"""`difftune extract`: precompute the hints of a dataset (see `extract_dataset`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  difftune extract --condition depth --input data/train --output data/train_depth --resolution 512
  difftune extract --condition sketch --backend pidinet --extractor_param model=./weights/Annotators \\
      --input data/train/metadata.jsonl --output data/train_sketch
  difftune extract --condition path/to/my_recipe.toml --input data/train --output data/train"""


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_cli(subparsers: Any) -> None:
    """Add the `extract` subcommand to `difftune`'s subparsers.

    Args:
        subparsers: the object `argparse.ArgumentParser.add_subparsers()` returned.
    """
    p = subparsers.add_parser(
        "extract",
        help="Precompute condition hints for a dataset (writes metadata.jsonl with conditioning_image).",
        description=(
            "Compute one hint per image with a condition's extractor, write them as PNG files under "
            "DIR/conditioning_images/, and write DIR/metadata.jsonl (input columns kept, "
            "conditioning_image added). Existing hints are skipped, so an interrupted run resumes."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--condition",
        required=True,
        metavar="NAME",
        help="Recipe name (canny, depth, normal, segmentation, sketch) or a .toml path.",
    )
    p.add_argument(
        "--backend", default=None, metavar="NAME", help="Extractor backend (default: the recipe's)."
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="PATH",
        help="Image folder, folder with metadata.jsonl, or a metadata.jsonl file.",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="Output folder (may be the input folder).")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        metavar="N",
        help="Hint size: shorter side resized + centre crop (default: image size).",
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="Device of model backends (default: cuda when available).",
    )
    p.add_argument(
        "--batch_size", type=int, default=16, metavar="N", help="Images per extractor call (default: 16)."
    )
    p.add_argument(
        "--image_column",
        default=None,
        metavar="COLUMN",
        help="Column with image paths (default: image, else file_name).",
    )
    p.add_argument(
        "--extractor_param",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Extractor parameter (repeatable; VALUE parsed as JSON when it can be), e.g. model=./weights/dpt.",
    )
    p.add_argument("--toy", action="store_true", help="Use the recipe's toy-world backend and parameters.")
    p.add_argument("--overwrite", action="store_true", help="Recompute hints that already exist.")
    p.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `difftune extract` with parsed arguments; returns the exit status."""
    from .extract_dataset import extract_dataset, read_rows
    from .recipes import build_extractor, load_recipe

    recipe = load_recipe(args.condition)
    read_rows(Path(args.input), args.image_column)  # a wrong --input answers before the extractor loads
    extractor = build_extractor(
        recipe,
        backend=args.backend,
        resolution=args.resolution,
        device=args.device,
        toy=args.toy,
        **dict(args.extractor_param),
    )
    summary = extract_dataset(
        extractor,
        args.input,
        args.output,
        batch_size=args.batch_size,
        image_column=args.image_column,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"{summary.metadata}: {summary.total} rows, {summary.extracted} hints extracted "
        f"({summary.images_per_second:.1f} images/s), {summary.skipped} already done"
    )
    return 0
