#!/usr/bin/env python
"""Memory-bank generation: images/s, peak memory and MFU per generation batch, eager and compiled.

    python scripts/bench_bank.py --out DIR                                  # SD1.5-sized, random weights, CUDA
    python scripts/bench_bank.py --out DIR --batches 16 32 64 128 --settings eager channels_last compile
    python scripts/bench_bank.py --out DIR --model-dir PIPELINE --resolution 512

What the bank builder does per batch (``difftune_control.bank.build``): DDIM sampling of the frozen base with
classifier-free guidance (the conditional and unconditional rows in one UNet call per step), the VAE decode,
the VAE re-encode of the images (posterior mean and spread) and the condition's hints, here canny. The
model is the random-initialised SD1.5-architecture pipeline of ``bench_throughput.py`` unless
``--model-dir`` names one, loaded as a run loads it (``load_base_model``: frozen, bf16 on CUDA).

``--settings``: ``eager`` (what the builder does), ``channels_last`` (the UNet's and the VAE's weights in
channels-last memory format: cuDNN's convolutions run NHWC without converting each input), ``compile`` (their
transformer and ResNet blocks compiled in place, the regional compile of ``--torch_compile``) and
``channels_last+compile``. The warm-up batch's time (compilation included) is reported apart. MFU counts the model FLOPs of one image (:func:`bank_flop_per_image`: every UNet call of
the sampler, the VAE decode and encode; matmuls, convolutions and attention, counted on meta tensors)
against the H200's ~790 TFLOP/s bf16 peak. Each setting repeats ``--repeats`` timed batches; the median
and the range are reported. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_BF16 = 790e12


def bank_flop_per_image(
    unet_config: dict, vae_config: dict, resolution: int, steps: int, guidance_scale: float
) -> dict[str, float]:
    """Model FLOPs of one bank image, counted by ``FlopCounterMode`` on meta tensors (no memory, no GPU).

    ``steps`` UNet forwards, twice each under classifier-free guidance (``guidance_scale > 1``: the
    unconditional row), one VAE decode and one VAE encode, at ``resolution``. Returns the parts and
    ``total``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    side = resolution // down
    latent = torch.zeros(1, unet.config.in_channels, side, side, device="meta")
    context = torch.zeros(1, 77, unet.config.cross_attention_dim, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    unet_call = count(lambda: unet(latent, t, encoder_hidden_states=context))
    decode = count(lambda: vae.decode(torch.zeros(1, vae.config.latent_channels, side, side, device="meta")))
    encode = count(lambda: vae.encode(torch.zeros(1, 3, resolution, resolution, device="meta")))
    calls = steps * (2 if guidance_scale > 1.0 else 1)
    parts = {"unet_call": unet_call, "unet": calls * unet_call, "vae_decode": decode, "vae_encode": encode}
    parts["total"] = parts["unet"] + decode + encode
    return parts


def generate_batch(
    base, extractor, batch: int, steps: int, resolution: int, guidance_scale: float, seed: int
):
    """One bank batch as the builder makes it: sample, decode, re-encode the posterior, extract hints."""
    from difftune_control.validation import encode_posterior, encode_prompts, sample_images

    prompts = [f"a red sphere on a grey floor, view {i}" for i in range(batch)]
    embeds = encode_prompts(base.text_encoder, base.tokenizer, prompts)
    empty = encode_prompts(base.text_encoder, base.tokenizer, [""])
    images = sample_images(
        unet=base.unet,
        vae=base.vae,
        scheduler_config=base.scheduler_config,
        prompt_embeds=embeds,
        negative_prompt_embeds=empty,
        seeds=list(range(seed, seed + batch)),
        resolution=resolution,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
    )
    mean, std = encode_posterior(base.vae, images)
    hints = extractor(images)
    return mean, std, hints


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_setting(
    base,
    extractor,
    *,
    batch: int,
    steps: int,
    resolution: int,
    guidance_scale: float,
    repeats: int,
    flop_per_image: float,
) -> dict:
    """``repeats`` timed batches after one warm-up batch at the same shapes (its time reported apart)."""
    device = base.unet.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    generate_batch(base, extractor, batch, steps, resolution, guidance_scale, seed=0)
    sync(device)
    warmup = time.perf_counter() - t0
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        generate_batch(base, extractor, batch, steps, resolution, guidance_scale, seed=(r + 1) * batch)
        sync(device)
        rates.append(batch / (time.perf_counter() - t0))
    ips = statistics.median(rates)
    out = {
        "batch": batch,
        "steps": steps,
        "resolution": resolution,
        "guidance_scale": guidance_scale,
        "warmup_seconds": warmup,
        "images_per_s": ips,
        "images_per_s_range": [min(rates), max(rates)],
        "flop_per_image": flop_per_image,
        "mfu": ips * flop_per_image / PEAK_BF16,
    }
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


SETTINGS = ("eager", "channels_last", "compile", "channels_last+compile")


def apply_setting(base, setting: str) -> int:
    """``setting`` on the UNet and the VAE (see the module's doc), as ``--bank_torch_compile`` sets them up;
    the number of blocks compiled."""
    from difftune_control.bank.speed import prepare_for_generation

    parts = setting.split("+")
    done = prepare_for_generation(base.unet, base.vae, "channels_last" in parts, "compile" in parts)
    return done["blocks"]


def run(args: argparse.Namespace) -> list[dict]:
    from difftune_control.config import ModelConfig
    from difftune_control.extractors import get_extractor
    from difftune_control.training.runtime import load_base_model

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model_dir is None:
        from bench_throughput import build_sd15

        args.model_dir = build_sd15(Path("/tmp/sd15-random"))
    extractor = get_extractor("canny", resolution=args.resolution)
    results, flops = [], None
    for setting in args.settings:
        base = load_base_model(ModelConfig(pretrained_model_name_or_path=str(args.model_dir)), device, dtype)
        if flops is None:  # the same model and shapes in every setting
            flops = bank_flop_per_image(
                dict(base.unet.config),
                dict(base.vae.config),
                args.resolution,
                args.steps,
                args.guidance_scale,
            )["total"]
        blocks = apply_setting(base, setting)
        for batch in args.batches:
            try:
                r = bench_setting(
                    base,
                    extractor,
                    batch=batch,
                    steps=args.steps,
                    resolution=args.resolution,
                    guidance_scale=args.guidance_scale,
                    repeats=args.repeats,
                    flop_per_image=flops,
                )
            except torch.cuda.OutOfMemoryError as e:  # the largest batch that fits is a result too
                r = {"batch": batch, "error": f"out of GPU memory: {str(e)[:200]}"}
            r.update(setting=setting, compiled_blocks=blocks)
            results.append(r)
            print(json.dumps(r), flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del base
        torch._dynamo.reset()
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| setting | batch | images/s median [range] | MFU | peak GiB | warm-up s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['batch']} | {r['error']} | | | |")
            continue
        lo, hi = r["images_per_s_range"]
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        lines.append(
            f"| {r['setting']} | {r['batch']} | {r['images_per_s']:.2f} [{lo:.2f}, {hi:.2f}] | "
            f"{100 * r['mfu']:.0f}% | {peak} | {r['warmup_seconds']:.1f} |"
        )
    first = next((r for r in results if "flop_per_image" in r), None)
    if first:
        lines.append(
            f"\nDDIM {first['steps']} steps, CFG {first['guidance_scale']}, {first['resolution']} px, VAE decode + "
            f"re-encode + canny; {first['flop_per_image'] / 1e12:.1f} TFLOP per image (model FLOPs); MFU against "
            f"{PEAK_BF16 / 1e12:.0f} TFLOP/s."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model-dir", type=Path, default=None, help="a diffusers pipeline (default: SD1.5-sized)")
    p.add_argument("--batches", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--settings", nargs="+", default=["eager"], choices=SETTINGS)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (the bank's default)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_bank: --device cuda, but no CUDA GPU here (--device cpu for a small model)")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    results = run(args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    (args.out / "results.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
    (args.out / "results.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
