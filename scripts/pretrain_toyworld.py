"""Pretrain the toy world's models (VAE, base text-to-image model, annotators) and install them.

One command reproduces the shipped weights on a GPU machine:

    python scripts/pretrain_toyworld.py --stage all --out_dir runs/toyworld
    python scripts/pretrain_toyworld.py --stage install --out_dir runs/toyworld

``all`` trains the VAE, then the base model, while the three annotators train in side
processes on the same GPU (tiny models leave it mostly idle). ``install`` copies the results into
``difftune_control/toyworld/weights``. Every ``PretrainConfig`` field is a flag (``--base_steps``,
``--time_budget`` ...). ``install_ema`` writes the EMA weights of a ``base_ema.safetensors`` (the
compact state a base run saves, e.g. fetched from a GPU machine) into the shipped base:

    python scripts/pretrain_toyworld.py --stage install_ema --resume_from .toybase/base_ema.safetensors

Try the whole recipe on a CPU with tiny step counts first:

    python scripts/pretrain_toyworld.py --stage all --device cpu --vae_steps 2 --base_steps 2 \
        --annotator_steps 2 --vae_pool 64 --base_pool 64 --annotator_pool 64 --annotator_pool_128 8
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

from difftune_control.toyworld.pretrain import PretrainConfig, train_annotator, train_vae
from difftune_control.toyworld.pretrain_base import install_portable_state, train_base
from difftune_control.toyworld.weights import WEIGHTS_DIR

STAGES = ("vae", "base", "depth", "normal", "segmentation", "annotators", "all", "install", "install_ema")


def _yes(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0, true/false, yes/no or on/off, got {value!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=STAGES, required=True, help="what to run")
    hints = typing.get_type_hints(PretrainConfig)
    for field in dataclasses.fields(PretrainConfig):
        kind = hints[field.name]
        conv = {int: int, float: float, str: str, bool: _yes}.get(kind)
        if conv is None:  # Optional[...]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            conv = args[0]
        parser.add_argument(
            f"--{field.name}", type=conv, default=field.default, help=f"default: {field.default}"
        )
    return parser


def install(cfg: PretrainConfig) -> None:
    """Copy ``<out_dir>/pipeline`` and ``<out_dir>/annotators/*.safetensors`` into the package."""
    out = Path(cfg.out_dir)
    missing = [
        p
        for p in (
            out / "pipeline",
            *(out / "annotators" / f"{k}.safetensors" for k in ("depth", "normal", "segmentation")),
        )
        if not p.exists()
    ]  # noqa: E501
    if missing:
        raise FileNotFoundError(
            f"cannot install: missing {', '.join(map(str, missing))}; run the training stages first"
        )
    shutil.rmtree(WEIGHTS_DIR / "base", ignore_errors=True)
    shutil.copytree(out / "pipeline", WEIGHTS_DIR / "base")
    for f in (out / "annotators").glob("*.safetensors"):
        shutil.copy2(f, WEIGHTS_DIR / f.name)
    print(f"installed into {WEIGHTS_DIR}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
    cfg = PretrainConfig(**values)
    t0 = time.time()
    if args.stage == "vae":
        train_vae(cfg)
    elif args.stage == "base":
        train_base(cfg)
    elif args.stage in ("depth", "normal", "segmentation"):
        train_annotator(cfg, args.stage)
    elif args.stage == "annotators":
        for kind in ("depth", "normal", "segmentation"):
            train_annotator(cfg, kind)
    elif args.stage == "all":
        # The annotators train in side processes on the same GPU while the VAE and then the base
        # model train here (the tiny models leave the GPU mostly idle, so they share it well).
        forwarded = list(argv if argv is not None else sys.argv[1:])
        i = forwarded.index("--stage")
        sides = {}
        for kind in ("depth", "normal", "segmentation"):
            forwarded[i + 1] = kind
            sides[kind] = subprocess.Popen([sys.executable, __file__, *forwarded])
        train_vae(cfg)
        train_base(cfg)
        failed = [kind for kind, proc in sides.items() if proc.wait() != 0]
        if failed:
            raise SystemExit(f"annotator training failed for: {', '.join(failed)}")
    elif args.stage == "install":
        install(cfg)
    elif args.stage == "install_ema":
        if not cfg.resume_from:
            raise SystemExit("--stage install_ema needs --resume_from PATH/base_ema.safetensors")
        install_portable_state(cfg.resume_from, WEIGHTS_DIR / "base", WEIGHTS_DIR / "base")
        print(f"installed the EMA weights of {cfg.resume_from} into {WEIGHTS_DIR / 'base'}")
    print(f"stage {args.stage} done in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
