#!/usr/bin/env python
"""Training throughput and memory at SDXL scale, 1024 px, bf16: our trainer beside diffusers' SDXL example.

    python scripts/bench_sdxl.py --build-only                  # the model folder and the parquet data
    python scripts/bench_sdxl.py --out DIR --diffusers-example third_party/diffusers_example/train_controlnet_sdxl.py

The SD1.5 benchmark (``scripts/bench_throughput.py``) at SDXL size, from its pieces: its synthetic
cached rows, trainer set-up (the run's own ``prepare_trainable``), parquet data, example runner and
FLOP count.

- The model: a random-initialised SDXL-architecture pipeline folder (``--model-dir``, built once):
  SDXL base 1.0's UNet (2.57 B parameters), CLIP ViT-L and an OpenCLIP-bigG-sized
  ``CLIPTextModelWithProjection``, SDXL's VAE and Euler scheduler; the toy world's tokenizer for both
  encoders (nothing is downloaded). Built on the GPU and saved as bf16 safetensors (7 GB instead of
  14 GB in fp32; quick to write on a fresh machine): both sides compute in bf16 (our loader loads
  with ``torch_dtype=bfloat16``; the example casts the UNet and text encoders to bf16, the VAE to
  float32, and copies the ControlNet from the UNet into float32 master weights).
- Ours: optimizer steps of ``--method vanilla`` and the default ``--method difftuning`` on synthetic
  rows shaped like the SDXL latent cache (latents [4,128,128], context [77,2048], ``text_embeds``
  [1280], ``time_ids`` [6], uint8 hints [3,1024,1024]) and a synthetic bank of the same shape:
  images/s over ``--repeats`` (3) timed chunks of 10 steps after 2 of warm-up (median and range), peak
  ``torch.cuda.max_memory_allocated``, MFU.
- The example: ``train_controlnet_sdxl.py``, its file unmodified, under ``accelerate launch`` on the same
  model folder and a local parquet dataset of 1024 px PNGs, ``--mixed_precision bf16
  --dataloader_num_workers 8``, 15 steps: images/s from its progress bar (its rates at steps 5, 10 and 15:
  median and range), peak memory from nvidia-smi
  (less what the GPU held before it started; its own CUDA context and allocator cache included). It
  encodes the prompts once with both encoders, and the images with its float32 VAE at every step. As
  it is, it fails at its first bf16 step (float32 prompt embeddings into its bf16 UNet), so it runs
  through ``example_unet_cast.py``, which casts them, the one change; ``--example-as-is`` runs it
  without. It has no Adafactor option (only ``--use_8bit_adam``, which needs bitsandbytes): its
  batch-1 row uses AdamW (torch's default, not fused; ours is fused).
- Settings, in the order of ``--batches``: batch 1 with gradient checkpointing (ours: AdamW and
  Adafactor), larger batches without it. A setting that fails (out of memory, an error, a timeout, the
  time budget spent) is a row with its error, and the rest still run.
- MFU: model FLOPs of one training image counted on the meta device (``train_flop_per_image``:
  20.0 TFLOP at 1024 px, 9.8 of them forward; gradient checkpointing's recomputation not counted) over
  the H200's ~790 TFLOP/s bf16 peak.

Writes ``results.json`` and ``results.md`` (table, ours/example ratios, the targets) under ``--out``
after every setting.

SDXL benchmark (to be run): ``OUT=... bash bench/h200_sdxl.sh`` in one device call on one H200 (about
7-8 minutes), carrying .whl (diffusers, datasets), third_party (the example) and REVISION. Targets: at
batch 4, at least 1.5x the example's images/s; batch 1 with gradient checkpointing and Adafactor under
16 GB. Expect the memory target to be tight: the frozen bf16 UNet (5.1 GB), the float32 ControlNet
(5.0 GB) and its float32 gradients (5.0 GB) come to 15 GB before any activation. A run on cached rows
moves both text encoders to the CPU once setup has encoded its prompts (as ``make_ours`` does here); the
VAE stays for the detector; ``text_encoders_vae_gib`` in the results says what of them is left on the GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import (  # noqa: E402
    PEAK_BF16,
    SyntheticCached,
    bench_example,
    bench_ours,
    make_parquet,
    rate_text,
    train_flop_per_image,
)

CAST_WRAPPER = Path(__file__).resolve().parent / "example_unet_cast.py"
SDXL_UNET = dict(  # stable-diffusion-xl-base-1.0's UNet
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG)
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the pooled 1280
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)  # fmt: skip
SDXL_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
SDXL_SCHEDULER = dict(  # stable-diffusion-xl-base-1.0's scheduler
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def build_sdxl(
    folder: Path,
    *,
    unet: Mapping = SDXL_UNET,
    text_encoder: Mapping = CLIP_L,
    text_encoder_2: Mapping = OPENCLIP_BIGG,
    vae: Mapping = SDXL_VAE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A random-initialised SDXL-architecture pipeline folder, saved as ``dtype`` safetensors (once).

    The architecture comes from the config arguments (SDXL's by default; tests pass tiny ones), both
    tokenizers are the toy world's (77 tokens). The models are initialised on ``device`` (the GPU: a
    few seconds for 3.5 B parameters), cast to ``dtype`` and written to a sibling folder that is renamed
    into place when complete, so an interrupted build is never taken for a model.
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from difftune_control.toyworld import default_base_model_path

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    tok = CLIPTokenizer.from_pretrained(default_base_model_path(), subfolder="tokenizer", model_max_length=77)

    def text_config(kw: Mapping) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok),
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
            **kw,
        )

    torch.manual_seed(0)
    with torch.device(device):
        parts = dict(
            unet=UNet2DConditionModel(**unet),
            text_encoder=CLIPTextModel(text_config(text_encoder)),
            text_encoder_2=CLIPTextModelWithProjection(text_config(text_encoder_2)),
            vae=AutoencoderKL(**vae),
        )
    for (
        m
    ) in parts.values():  # torch's .to: ModelMixin.to would warn about modules kept in float32 (none here)
        torch.nn.Module.to(m, dtype=dtype)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    StableDiffusionXLPipeline(
        **parts,
        tokenizer=tok,
        tokenizer_2=tok,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    ).save_pretrained(partial)
    partial.rename(folder)
    return folder


def sdxl_rows(n: int, unet_config: Mapping, resolution: int = 1024, tokens: int = 77) -> SyntheticCached:
    """``n`` synthetic cached rows for an SDXL UNet: what the SDXL latent cache and bank hold per row.

    latents [4,R/8,R/8], ``encoder_hidden_states`` [tokens, cross_attention_dim], ``text_embeds``
    [pooled] (the UNet's ``projection_class_embeddings_input_dim`` less 6 x ``addition_time_embed_dim``),
    ``time_ids`` [6] = (R, R, 0, 0, R, R), uint8 hints [3,R,R].
    """
    from difftune_control.sdxl import add_time_ids

    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    g = torch.Generator().manual_seed(1)
    added = {
        "text_embeds": torch.randn(n, pooled, generator=g),
        "time_ids": add_time_ids((resolution,) * 2, (0, 0), (resolution,) * 2).expand(n, 6).clone(),
    }
    return SyntheticCached(n, resolution, (tokens, unet_config["cross_attention_dim"]), added)


BATCH1_SPEEDS = ("default", "adafactor", "adafactor+fused")


def settings(
    batches: list[int], methods: list[str], example: bool, batch1_speeds=BATCH1_SPEEDS
) -> Iterator[dict]:
    """The benchmark's settings in run order: per batch, the example (if any), then ours per optimizer and method.

    Batch 1 runs with gradient checkpointing, ours with ``batch1_speeds``: AdamW, Adafactor and Adafactor
    with ``--fused_backward_pass`` (the example has AdamW only); larger batches without checkpointing,
    with AdamW.
    """
    for b in batches:
        ckpt = b == 1
        if example:
            yield {"impl": "diffusers example", "batch": b, "checkpointing": ckpt}
        for speed in batch1_speeds if ckpt else ("default",):
            for method in methods:
                yield {"impl": "ours", "batch": b, "checkpointing": ckpt, "speed": speed, "method": method}


def _optimizer(r: dict) -> str:
    name = "Adafactor" if r.get("optimizer") == "adafactor" else "AdamW"
    return name + (" (fused backward pass)" if r.get("fused_backward_pass") else "")


def report(results: list[dict], flop_per_image: float | None) -> str:
    """``results.md``: the table, ours/example at each batch and the two targets; failed settings last."""
    lines = [
        "| implementation | method | batch | grad ckpt | optimizer | images/s median [range] | peak GiB | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    done = [r for r in results if "images_per_s" in r]
    for r in done:
        example = r["impl"] != "ours"
        mem = r["peak_gib_nvsmi"] if example else r["peak_gib"]
        impl = r["impl"] + (" + UNet input cast" if r.get("wrapper") else "")
        lines.append(
            f"| {impl} | {r.get('method', 'vanilla')} | {r['batch']} | {r['gradient_checkpointing']} | "
            f"{_optimizer(r)}{' (no Adafactor option)' if example else ''} | {rate_text(r, 2)} | "
            f"{mem:.1f}{' (nvidia-smi)' if example else ''} | {100 * r['mfu']:.0f}% |"
        )
    if flop_per_image:
        lines.append(
            f"\nMFU: {flop_per_image / 1e12:.1f} TFLOP per training image (model FLOPs, meta-device count) "
            f"over {PEAK_BF16 / 1e12:.0f} TFLOP/s. Peak memory: ours torch.cuda.max_memory_allocated; the "
            "example nvidia-smi (its CUDA context and allocator cache included)."
        )
    if any(r.get("wrapper") for r in done):
        lines.append(
            "\n+ UNet input cast: the example as it is, run through scripts/example_unet_cast.py, which gives its "
            "bf16 UNet the float32 prompt embeddings in bf16 (as it is, it fails at its first bf16 step)."
        )
    ours = [r for r in done if r["impl"] == "ours"]
    examples = {(r["batch"], r["gradient_checkpointing"]): r for r in done if r["impl"] != "ours"}
    lines.append(
        "\nOurs / example, images/s (same batch, same gradient checkpointing; the example uses AdamW):"
    )
    for r in ours:
        ex = examples.get((r["batch"], r["gradient_checkpointing"]))
        if ex:
            ratio = r["images_per_s"] / ex["images_per_s"]
            lines.append(f"- batch {r['batch']}, {r['method']}, {_optimizer(r)}: {ratio:.2f}x")
    lines.append("\nTargets:")
    for r in (r for r in ours if r["batch"] == 4 and not r["gradient_checkpointing"]):
        ex = examples.get((4, False))
        ratio = r["images_per_s"] / ex["images_per_s"] if ex else None
        verdict = f"{ratio:.2f}x the example's images/s (>= 1.5x: {'met' if ratio >= 1.5 else 'not met'})"
        lines.append(f"- batch 4, {r['method']}: {verdict if ex else 'no example row to compare with'}")
    for r in (
        r for r in ours if r["batch"] == 1 and r["gradient_checkpointing"] and r["optimizer"] == "adafactor"
    ):
        met = "met" if r["peak_reserved_gib"] < 16 else "not met"
        lines.append(
            f"- batch 1, grad ckpt, {_optimizer(r)}, {r['method']}: peak {r['peak_gib']:.2f} GiB allocated "
            f"({r['peak_gib'] * 2**30 / 1e9:.2f} GB), {r['peak_reserved_gib']:.2f} GiB reserved "
            f"(under 16 GiB reserved: {met}); of it the frozen models and ControlNet "
            f"{r['setup_gib']:.2f} GiB, text encoders and VAE left on the GPU {r['text_encoders_vae_gib']:.2f} GiB"
        )
    for r in results:
        if "error" in r:
            what = " ".join(str(r[k]) for k in ("impl", "method", "speed") if k in r)
            lines.append(f"\nFailed: {what} batch {r['batch']}: {r['error'][-300:]}")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/sdxl"))
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sdxl-random"))
    p.add_argument("--data-dir", type=Path, default=None, help="default: /tmp/bench-parquet-<R>px-<rows>")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batches", nargs="+", type=int, default=[4, 1, 8], help="in run order")
    p.add_argument(
        "--methods",
        nargs="*",
        default=["vanilla", "difftuning"],
        choices=["vanilla", "difftuning"],
        help="our trainer's methods (none: the example only)",
    )
    p.add_argument(
        "--batch1-speeds",
        nargs="+",
        default=list(BATCH1_SPEEDS),
        choices=BATCH1_SPEEDS,
        help="our optimizers at batch 1: default (AdamW), adafactor, adafactor+fused",
    )
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps of ours")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=3, help="timed chunks per setting (ours) / rate points (the example)"
    )
    p.add_argument("--diffusers-example", type=Path, default=None, help="train_controlnet_sdxl.py")
    p.add_argument("--example-steps", type=int, default=15)
    p.add_argument(
        "--example-as-is",
        action="store_true",
        help="run the example without example_unet_cast.py (it then fails at its first bf16 step)",
    )
    p.add_argument("--example-timeout", type=float, default=180, help="seconds per example run")
    p.add_argument(
        "--time-budget", type=float, default=None, help="seconds: settings not begun by then are skipped"
    )
    p.add_argument(
        "--build-only",
        nargs="*",
        choices=["model", "data"],
        default=None,
        help="build the model folder and/or the parquet data (both when none is named), then exit",
    )
    args = p.parse_args()
    t_start = time.time()
    rows_n = max(args.batches) * (args.example_steps + 1)  # one epoch covers the example's run
    data_dir = args.data_dir or Path(f"/tmp/bench-parquet-{args.resolution}px-{rows_n}")
    if args.build_only is not None:  # the data needs no GPU: it can be made beside the model
        parts = set(args.build_only) or {"model", "data"}
        if "data" in parts:
            make_parquet(data_dir, n=rows_n, resolution=args.resolution)
        if "model" in parts:
            if not torch.cuda.is_available():
                raise SystemExit("bench_sdxl builds the model on a CUDA GPU")
            build_sdxl(args.model_dir, device="cuda")
        print(f"built {sorted(parts)} in {time.time() - t_start:.0f} s", flush=True)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_sdxl needs a CUDA GPU")
    model = build_sdxl(args.model_dir, device="cuda")  # found, when built before
    torch.cuda.empty_cache()
    if args.diffusers_example:
        make_parquet(data_dir, n=rows_n, resolution=args.resolution)
    from diffusers import UNet2DConditionModel

    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    unet_config = dict(UNet2DConditionModel.load_config(model, subfolder="unet"))
    rows = functools.partial(sdxl_rows, unet_config=unet_config, resolution=args.resolution)
    flops = train_flop_per_image(unet_config, rows(1))
    results: list[dict] = []

    def record(r: dict) -> None:
        results.append(r)
        print(json.dumps(r), flush=True)
        meta = {
            "device": torch.cuda.get_device_name(),
            "resolution": args.resolution,
            "flop_per_image": flops,
        }
        (args.out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=1))
        (args.out / "results.md").write_text(report(results, flops))

    for s in settings(args.batches, args.methods, args.diffusers_example is not None, args.batch1_speeds):
        row = {k: s[k] for k in ("impl", "method", "batch", "speed") if k in s}
        row["gradient_checkpointing"] = s["checkpointing"]
        left = None if args.time_budget is None else args.time_budget - (time.time() - t_start)
        if left is not None and left <= 0:
            record({**row, "error": "skipped: --time-budget spent"})
            continue
        try:
            if s["impl"] == "ours":
                r = bench_ours(
                    model, s["batch"], s["method"], args.steps, args.warmup, s["checkpointing"], s["speed"],
                    rows=rows, flop_per_image=flops, repeats=args.repeats,
                )  # fmt: skip
            else:
                b = s["batch"]
                r = bench_example(
                    args.diffusers_example, model, data_dir, b, args.example_steps, args.out / f"example-b{b}.log",
                    resolution=args.resolution, checkpointing=s["checkpointing"], flop_per_image=flops,
                    timeout=args.example_timeout if left is None else min(args.example_timeout, left),
                    wrapper=None if args.example_as_is else CAST_WRAPPER, repeats=args.repeats,
                )  # fmt: skip
            record(r)
        except Exception as e:  # out of memory, or any error: a result too
            record({**row, "error": repr(e)[:2000]})
            torch.cuda.empty_cache()
    print(report(results, flops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
