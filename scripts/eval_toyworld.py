"""Measure the toy world's models on held-out renders and write the numbers (and a sample grid).

    python scripts/eval_toyworld.py --device cuda --out docs/toyworld/metrics.json \
        --grid docs/toyworld/samples.png

Defaults evaluate the shipped weights; ``--pipeline`` and ``--annotators`` point at a training
run's ``<out_dir>/pipeline`` and ``<out_dir>/annotators`` instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difftune_control.toyworld.evaluate import (
    evaluate_annotators,
    evaluate_text_following,
    evaluate_vae,
    ground_truth_specs,
    save_sample_grid,
    score_text_following,
)
from difftune_control.toyworld.models import ANNOTATOR_KINDS
from difftune_control.toyworld.scene import split_seed
from difftune_control.toyworld.weights import WEIGHTS_DIR, default_base_model_path, load_annotator
from difftune_control.toyworld.world import render_scenes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", default=None, help="pipeline folder (default: the shipped base model)")
    parser.add_argument("--annotators", default=None, help="folder of <kind>.safetensors (default: shipped)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=512, help="held-out scenes for the VAE and annotators")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps for text following")
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5], help="CFG scales to score")
    parser.add_argument(
        "--single_repeats", type=int, default=4, help="samples per single-object prompt (x32)"
    )
    parser.add_argument("--two", type=int, default=128, help="two-object prompts")
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    parser.add_argument("--grid", default=None, help="write a PNG grid of prompts -> samples here")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["vae", "annotators", "text"], help="parts to skip"
    )
    args = parser.parse_args(argv)

    from diffusers import StableDiffusionPipeline

    t0 = time.time()
    path = Path(args.pipeline) if args.pipeline else default_base_model_path()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    ann_dir = Path(args.annotators) if args.annotators else WEIGHTS_DIR
    models = {
        k: load_annotator(k, device=args.device, path=ann_dir / f"{k}.safetensors") for k in ANNOTATOR_KINDS
    }
    metrics: dict = {
        "pipeline": str(path),
        "annotators_dir": str(ann_dir),
        "device": args.device,
        "seed": args.seed,
    }
    if "vae" not in args.skip:
        vae32 = pipe.vae.to(torch.float32)
        metrics["vae"] = evaluate_vae(vae32, n=args.n, seed=args.seed, device=args.device)
        pipe.vae.to(dtype)
        print(json.dumps({"vae": metrics["vae"]}), flush=True)
    if "annotators" not in args.skip:
        metrics["annotators"] = {}
        for res, n in ((64, args.n), (128, max(64, args.n // 4))):
            metrics["annotators"].update(
                evaluate_annotators(models, n=n, seed=args.seed, device=args.device, resolution=res)
            )
        print(json.dumps({"annotators": metrics["annotators"]}), flush=True)
    if "text" not in args.skip:
        # Calibration: the same scorer on real renders (the ceiling the annotator + hue rules allow).
        out = render_scenes(1024, split_seed(args.seed, "validation"), 64, device=args.device)
        keep, specs = ground_truth_specs(out)
        images = out["rgb"][keep].cpu()
        classes = models["segmentation"](out["rgb"][keep]).argmax(dim=1).cpu()
        metrics["scorer_on_renders"] = score_text_following(images, classes, specs)
        metrics["scorer_on_renders_exact_classes"] = score_text_following(
            images, out["classes"][keep].cpu(), specs
        )
        print(
            json.dumps({k: metrics[k] for k in ("scorer_on_renders", "scorer_on_renders_exact_classes")}),
            flush=True,
        )
        metrics["text_following"] = []
        for g in args.guidance:
            scores = evaluate_text_following(pipe, models["segmentation"], seed=args.seed, steps=args.steps,
                                             guidance_scale=g, n_single_repeats=args.single_repeats, n_two=args.two)  # fmt: skip
            metrics["text_following"].append(scores)
            print(json.dumps({"text_following": scores}), flush=True)
    if args.grid:
        save_sample_grid(pipe, args.grid, seed=args.seed, steps=args.steps, guidance_scale=args.guidance[0])
    metrics["seconds"] = round(time.time() - t0, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
