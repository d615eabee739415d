"""Measure the toy world's models on held-out renders and write the numbers (and a sample grid).

    python scripts/eval_toyworld.py --device cuda --out docs/toyworld/metrics.json \
        --grid docs/toyworld/samples.png
    python scripts/eval_toyworld.py --device cpu --skip vae annotators text --latent_n 64 \
        --domains crowded dusk swapped --domain_n 256 --out docs/toyworld/fidelity.json

Parts (each can be skipped with ``--skip``): ``vae`` (reconstruction PSNR), ``annotators``,
``text`` (text following at each ``--guidance``), ``latents`` (the base's own samples against the
renders: per-channel latent mean / std, and its denoising loss on its re-encoded samples against
real latents, per timestep band). ``--domains`` adds the gap between each named target domain and
the default world: the base's denoising loss on the domain's renders against the default world's
(same scene indices, same noise), per timestep band, and a Frechet distance to default renders in
the toy annotators' feature space (the ``default`` row is the distance between two independent
default sets: the floor at this sample size), and, with ``annotators``, the annotators' scores on each
domain's renders (in a shifted domain the detector's floor is their error there).

Defaults evaluate the shipped weights; ``--pipeline`` and ``--annotators`` point at a training
run's ``<out_dir>/pipeline`` and ``<out_dir>/annotators`` instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difftune_control.toyworld.domains import domain_names
from difftune_control.toyworld.evaluate import (
    evaluate_annotators,
    evaluate_text_following,
    evaluate_vae,
    ground_truth_specs,
    save_sample_grid,
    score_text_following,
)
from difftune_control.toyworld.fidelity import (
    annotator_features,
    channel_stats,
    compare_channel_stats,
    denoising_loss_by_band,
    frechet_distance,
)
from difftune_control.toyworld.models import ANNOTATOR_KINDS
from difftune_control.toyworld.scene import split_seed
from difftune_control.toyworld.weights import WEIGHTS_DIR, default_base_model_path, load_annotator
from difftune_control.toyworld.world import render_scenes


def _shown(path: Path) -> str:
    """``path`` as the metrics record it: relative to the working directory when under it (the shipped weights
    read the same on every machine), else as given."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _render_latents(pipe, n: int, seed: int, device: str, start: int = 0, domain: str = "default"):
    """Renders of the validation stream, their latents (posterior mean x scaling factor) and captions."""
    from difftune_control.validation import encode_images

    out = render_scenes(n, split_seed(seed, "validation"), 64, device=device, start=start, domain=domain)
    with torch.no_grad():
        latents = torch.cat([encode_images(pipe.vae, x).float() for x in out["rgb"].split(128)])
    return out, latents


def _embed(pipe, prompts: list[str]) -> torch.Tensor:
    from difftune_control.validation import encode_prompts

    return encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts)


def _loss_table(pipe, latents, embeds, seed: int) -> dict:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return denoising_loss_by_band(pipe.unet, scheduler, latents, embeds, seed=seed)


def latent_fidelity(pipe, n: int, seed: int, steps: int, guidance: float, device: str) -> dict:
    """The base's samples (prompted with the captions of n renders) against those renders.

    Latents come in two encodings, compared like with like: the VAE posterior's mean (what the
    memory bank stores for re-encoded samples, ``encode(decode(z))``) and a draw from the posterior
    (``mean + std * N(0, I)``: what the base was trained on and what the target cache feeds the
    trainer). Per-channel mean / std of: the renders (both encodings), the sampler's raw final
    latents, and the re-encoded samples; and the base's denoising loss per timestep band on each
    (same noise and timesteps for all).
    """
    from difftune_control.validation import encode_images, sample_images

    out, real = _render_latents(pipe, n, seed, device)
    gen = torch.Generator(pipe.vae.device).manual_seed(seed)
    with torch.no_grad():
        real_sampled = torch.cat(
            [
                encode_images(pipe.vae, x, sample_posterior=True, generator=gen).float()
                for x in out["rgb"].split(128)
            ]
        )
    embeds = _embed(pipe, out["captions"])
    images, raw = sample_images(unet=pipe.unet, vae=pipe.vae, scheduler_config=pipe.scheduler.config,
                                prompt_embeds=embeds, negative_prompt_embeds=_embed(pipe, [""]),
                                seeds=[seed + i for i in range(n)], resolution=64, num_inference_steps=steps,
                                guidance_scale=guidance, batch_size=128, return_latents=True)  # fmt: skip
    with torch.no_grad():
        reencoded = torch.cat([encode_images(pipe.vae, x).float() for x in images.split(128)])
    sets = {
        "renders_mean": real,
        "renders_sampled": real_sampled,
        "samples_raw": raw,
        "reencoded_mean": reencoded,
    }
    stats = {k: channel_stats(v) for k, v in sets.items()}
    result = {"n": n, "steps": steps, "guidance_scale": guidance, "channel_stats": stats}
    # like with like: the images (posterior means), and the latent distribution the base learnt
    result["reencoded_mean_vs_renders_mean"] = compare_channel_stats(
        stats["reencoded_mean"], stats["renders_mean"]
    )
    result["samples_raw_vs_renders_sampled"] = compare_channel_stats(
        stats["samples_raw"], stats["renders_sampled"]
    )
    # a bank row (posterior mean of a sample) against a target row (posterior draw of a render)
    result["reencoded_mean_vs_renders_sampled"] = compare_channel_stats(
        stats["reencoded_mean"], stats["renders_sampled"]
    )
    losses = {k: _loss_table(pipe, z, embeds, seed) for k, z in sets.items()}
    result["denoising_loss"] = losses
    result["loss_ratio_reencoded_mean_vs_renders_mean"] = {
        band: losses["reencoded_mean"][band]["loss"] / losses["renders_mean"][band]["loss"]
        for band in losses["renders_mean"]
    }
    return result


def domain_gap(pipe, models: dict, domains: list[str], n: int, seed: int, device: str) -> dict:
    """Per domain: the base's denoising loss per timestep band against the default world's, and a
    Frechet distance to default renders in the annotators' feature space.

    The reference set is scenes [0, n) of the default world's validation stream; every domain
    (default included) renders scenes [n, 2n), so the default row measures two independent default
    sets (the distance's floor at this n), and the losses of all domains share noise and timesteps.
    """
    seg, depth = models["segmentation"], models["depth"]
    reference, _ = _render_latents(pipe, n, seed, device)
    ref_features = annotator_features(reference["rgb"], seg, depth)
    result = {"n": n}
    for domain in ["default", *[d for d in domains if d != "default"]]:
        out, latents = _render_latents(pipe, n, seed, device, start=n, domain=domain)
        loss = _loss_table(pipe, latents, _embed(pipe, out["captions"]), seed)
        fd = frechet_distance(annotator_features(out["rgb"], seg, depth), ref_features)
        result[domain] = {"denoising_loss": loss, "frechet_to_default": fd}
        print(json.dumps({"domain": domain, **result[domain]}), flush=True)
    base = result["default"]["denoising_loss"]
    for domain in result:
        if domain != "n":
            loss = result[domain]["denoising_loss"]
            result[domain]["loss_ratio_to_default"] = {b: loss[b]["loss"] / base[b]["loss"] for b in loss}
    return result


def save_domain_grid(path: str, domains: list[str], seed: int, per_row: int = 8, scale: int = 2) -> None:
    """One row per domain: the same validation scenes (indices 0..per_row-1) in each domain."""
    from PIL import Image

    rows = [
        torch.cat(list(render_scenes(per_row, split_seed(seed, "validation"), domain=d)["rgb"]), dim=2)
        for d in domains
    ]
    grid = (torch.cat(rows, dim=1).permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(grid)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


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
        "--skip",
        nargs="*",
        default=[],
        choices=["vae", "annotators", "text", "latents"],
        help="parts to skip",
    )
    parser.add_argument("--latent_n", type=int, default=256, help="samples (and renders) for the latent part")
    parser.add_argument(
        "--domains",
        nargs="*",
        default=[],
        metavar="NAME",
        help=f"target domains to measure ({', '.join(domain_names())})",
    )
    parser.add_argument("--domain_n", type=int, default=512, help="renders per domain for the domain gap")
    parser.add_argument("--domain_grid", default=None, help="write a PNG of 8 renders per domain here")
    args = parser.parse_args(argv)
    unknown = [d for d in args.domains if d not in domain_names()]
    if unknown:
        parser.error(f"--domains: unknown {unknown}; choose from {', '.join(domain_names())}")

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
        "pipeline": _shown(path),
        "annotators_dir": _shown(ann_dir),
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
        # in a shifted domain the detector's floor is the annotators' error on its renders
        shifted = [d for d in args.domains if d != "default"]
        if shifted:
            metrics["annotators_by_domain"] = {
                d: evaluate_annotators(models, n=args.n, seed=args.seed, device=args.device, domain=d)
                for d in shifted
            }
            print(json.dumps({"annotators_by_domain": metrics["annotators_by_domain"]}), flush=True)
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
    if "latents" not in args.skip:
        g = args.guidance[0]
        metrics["latents"] = latent_fidelity(pipe, args.latent_n, args.seed, args.steps, g, args.device)
        print(json.dumps({"latents": metrics["latents"]}), flush=True)
    if args.domains:
        metrics["domains"] = domain_gap(pipe, models, args.domains, args.domain_n, args.seed, args.device)
        print(json.dumps({"domains": metrics["domains"]}), flush=True)
    if args.domain_grid:
        save_domain_grid(
            args.domain_grid, ["default", *[d for d in args.domains if d != "default"]], args.seed
        )
    if args.grid:
        save_sample_grid(pipe, args.grid, seed=args.seed, steps=args.steps, guidance_scale=args.guidance[0])
    metrics["seconds"] = round(time.time() - t0, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
