#!/usr/bin/env python
"""Training throughput at SD1.5 scale: our trainer vs diffusers' example, bank generation, MFU.

    python scripts/bench_throughput.py --out bench/throughput                      # ours only
    python scripts/bench_throughput.py --out DIR --diffusers-example third_party/diffusers_example/train_controlnet.py

Builds a random-initialised SD1.5-sized pipeline (the SD1.5 UNet/VAE/text-encoder configs, the
toy world's tokenizer; nothing is downloaded), then measures at 512 px, bf16:
- our trainer's optimizer steps (vanilla and Diff-Tuning, latents and text embeddings cached
  as our trainer does by default) at several batch sizes and speed settings (``--speed``:
  channels_last, regional torch.compile, both, Adafactor; set up by the training loop's own
  ``prepare_trainable``; ``unet_autocast`` reruns the frozen UNet under autocast, for an A/B):
  images/s, peak GPU memory, MFU;
- batch 1 with gradient checkpointing (peak memory);
- memory-bank generation (DDIM 25 steps, CFG 7.5, VAE re-encode): images/s;
- optionally diffusers' unmodified ``examples/controlnet/train_controlnet.py`` on the same model
  and data (a local parquet dataset with Image features), same batch, precision and attention,
  8 dataloader workers: images/s from its progress bar, peak memory from nvidia-smi.
One training image costs about 2.45 TFLOP (UNet forward 0.80, ControlNet forward 0.28, backward
through both); MFU uses the H200's ~790 TFLOP/s bf16 peak. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from difftune_control.bank import BankRows

FLOP_PER_IMAGE = 2.45e12
PEAK_BF16 = 790e12


SD15_UNET = dict(  # the SD1.5 UNet's architecture
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def optimizer_state_sizes() -> dict:
    """fp32 optimizer state of a SD1.5 ControlNet (default hint encoder), AdamW vs Adafactor, from its
    parameter shapes: AdamW keeps two moments per parameter; transformers' Adafactor (beta1=None)
    keeps, per matrix or convolution, one vector over all dims but the last and one over all but the
    second-to-last, and one value per parameter of a 1-d tensor. Built on the meta device: no memory."""
    import math

    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        controlnet = ControlNetModel.from_config(UNet2DConditionModel(**SD15_UNET).config)
    shapes = [tuple(q.shape) for q in controlnet.parameters()]
    params = sum(math.prod(sh) for sh in shapes)
    adafactor = sum(
        math.prod(sh[:-1]) + math.prod(sh[:-2]) * sh[-1] if len(sh) >= 2 else math.prod(sh) for sh in shapes
    )
    return {
        "what": "optimizer state",
        "parameters": params,
        "adamw_gb": 8 * params / 1e9,
        "adafactor_gb": 4 * adafactor / 1e9,
    }


def build_sd15(folder: Path) -> Path:
    """A random-initialised SD1.5-architecture pipeline folder (fp32 weights, as released checkpoints load)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from difftune_control.toyworld import default_base_model_path

    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(default_base_model_path(), subfolder="tokenizer", model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
    )
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


class SyntheticCached(torch.utils.data.Dataset):
    """Items shaped like the latent cache's, hints uint8 as the training run's loader gets them.

    Args:
        n: rows.
        resolution: image side R (latents [4,R/8,R/8], hints [3,R,R]); SD1.5's 512 by default.
        context: ``encoder_hidden_states`` [L,D] of a row; SD1.5's (77, 768) by default.
        added: the added conditioning of all rows, name -> [n,...] (SDXL's ``text_embeds`` and
            ``time_ids``); none by default, as at SD1.5.
    """

    def __init__(
        self,
        n: int,
        resolution: int = 512,
        context: tuple[int, int] = (77, 768),
        added: dict[str, torch.Tensor] | None = None,
    ):
        g = torch.Generator().manual_seed(0)
        h = resolution // 8
        self.latents = torch.randn(n, 4, h, h, generator=g)
        self.latent_std = torch.full((n, 4, h, h), 0.05).half()  # the bank's posterior spread (format 2)
        self.added = {k: v.float() for k, v in (added or {}).items()}
        self.encoder_hidden_states = torch.randn(n, *context, generator=g).half()
        self.hints = torch.randint(0, 256, (n, 3, resolution, resolution), generator=g, dtype=torch.uint8)
        self.captions = ["a photo"] * n

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {
            "latents": self.latents[i],
            "encoder_hidden_states": self.encoder_hidden_states[i].float(),
            **{k: v[i] for k, v in self.added.items()},
            "conditioning_pixel_values": self.hints[i],  # uint8, as the training loader's cached rows
            "caption": self.captions[i],
            "index": i,
        }


def train_flop_per_image(unet_config: dict, rows: SyntheticCached) -> float:
    """Matmul, convolution and attention FLOPs of one training image, counted on the meta device.

    One step of ours and of diffusers' example per image: the ControlNet forward, the frozen UNet's forward
    with the ControlNet's residuals, and the backward of the loss (the ControlNet's weights and inputs; the
    frozen UNet's activations from the first residual on, none of its weights), at the shapes of
    ``rows`` (latents, context, hint, added conditioning), ControlNet made as the trainer makes it (the
    default hint encoder, 16, 32, 96, 256). Counted by ``torch.utils.flop_counter.FlopCounterMode`` on
    meta tensors: no memory, no GPU, a few seconds at SDXL size. Model FLOPs, as MFU counts them: gradient
    checkpointing's recomputation is not included. Elementwise operations are not counted.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    unet.requires_grad_(False)

    def meta(x: torch.Tensor) -> torch.Tensor:  # one row's shape, batch 1
        return torch.zeros(1, *x.shape[1:], device="meta")

    x, ehs, hint = meta(rows.latents), meta(rows.encoder_hidden_states), meta(rows.hints)
    added = {k: meta(v) for k, v in rows.added.items()} or None
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        # validation.controlled_forward's two calls (its autocast guard has no meta device)
        down, mid = controlnet(
            x, t, encoder_hidden_states=ehs, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False
        )
        pred = unet(
            x,
            t,
            encoder_hidden_states=ehs,
            added_cond_kwargs=added,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        pred.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def synthetic_bank(rows: SyntheticCached, zero_hints: bool = True) -> BankRows:
    """Bank rows shaped like ``rows`` (what the trainer draws through ``bank.batch``); zero hints by
    default, as the default ``--bank_hint zero`` bank's, else ``rows``' random uint8 ones."""
    g = torch.Generator().manual_seed(1)
    return BankRows(
        rows.latents,
        (0.05 + 0.01 * torch.rand(rows.latents.shape, generator=g)).half(),  # the posterior's spread
        rows.encoder_hidden_states,
        torch.zeros_like(rows.hints) if zero_hints else rows.hints,
        added=rows.added,
        zero_hints=zero_hints,
    )


SPEED_SETTINGS = {  # name -> RunConfig.train fields
    "default": {},
    "channels_last": {"channels_last": True},
    "compile": {"torch_compile": True},
    "channels_last+compile": {"channels_last": True, "torch_compile": True},
    "compile-graphs": {"torch_compile": True, "torch_compile_mode": "reduce-overhead"},
    "channels_last+compile-graphs": {
        "channels_last": True,
        "torch_compile": True,
        "torch_compile_mode": "reduce-overhead",
    },
    # whole down/mid/up stages compiled instead of their blocks (--torch_compile_scope stages)
    "compile-stages": {"torch_compile": True, "torch_compile_scope": "stages"},
    "compile-graphs-stages": {
        "torch_compile": True,
        "torch_compile_mode": "reduce-overhead",
        "torch_compile_scope": "stages",
    },
    "bf16-weights": {"bf16_weights": True},  # the ControlNet on a bf16 copy of its fp32 weights
    "bf16-weights+compile": {"bf16_weights": True, "torch_compile": True},
    "bf16-weights+compile-graphs": {
        "bf16_weights": True,
        "torch_compile": True,
        "torch_compile_mode": "reduce-overhead",
    },
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "adafactor": {"optimizer": "adafactor"},
    "fused": {"fused_backward_pass": True},  # AdamW, each parameter updated in backward: no gradients held
    "adafactor+fused": {"optimizer": "adafactor", "fused_backward_pass": True},
    # A/B only: the frozen UNet under autocast again, as the trainer ran it up to commit 085ed8c
    # (autocast lifts its GroupNorms/LayerNorms to fp32); see bench_ours.
    "unet_autocast": {},
    # A/B only: the step with one SDPA backend (torch picks among them by default: cuDNN attention on an H200
    # with torch 2.11); see make_ours.
    **dict.fromkeys(("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"), {}),
}


def bench_config(
    model_dir: Path,
    batch: int,
    method: str,
    resolution: int,
    checkpointing: bool = False,
    speed: str = "default",
    device: str | None = None,
):
    """The run config of a benchmark step: the method's defaults resolved as ``difftune train`` resolves them
    for a Stable Diffusion model, bf16, the speed setting's fields."""
    from difftune_control.config import RunConfig, resolve_defaults

    cfg = RunConfig()
    cfg.model.pretrained_model_name_or_path = str(model_dir)
    cfg.method.method = method
    cfg.data.resolution = resolution
    cfg.train.train_batch_size = batch
    cfg.train.mixed_precision = "bf16"
    cfg.train.gradient_checkpointing = checkpointing
    cfg.train.device = device
    cfg.train.torch_compile = False  # eager unless the setting compiles (a run's auto decides at its start)
    for k, v in SPEED_SETTINGS[speed].items():
        setattr(cfg.train, k, v)
    return resolve_defaults(cfg, toy=False)


def make_ours(
    model_dir: Path,
    batch: int,
    method: str,
    checkpointing: bool = False,
    speed: str = "default",
    rows=SyntheticCached,
    device: str | None = None,
):
    """Our trainer on synthetic cached rows, its ControlNet and optimizer made by the run's own ``prepare_trainable``.

    Synthetic cached rows stand in for the target set and the bank, so the step is measured alone
    (``setup()`` would load a dataset and build a bank first). ``rows(n)`` makes ``n`` rows (a
    :class:`SyntheticCached`); the training resolution and the empty prompt's shape are read from them.
    Returns ``(trainer, optimizer, accelerator)``; the trainer holds the target rows and the ControlNet.
    """
    from difftune_control.methods.registry import trainer_class
    from difftune_control.training.runtime import load_base_model, offload_text_encoders
    from difftune_control.training.setup import equip, make_accelerator, prepare_trainable, weight_dtype

    target = rows(max(batch, 8) * 2)
    cfg = bench_config(model_dir, batch, method, target.hints.shape[-1], checkpointing, speed, device)
    acc = make_accelerator(cfg)
    base = load_base_model(cfg.model, acc.device, weight_dtype(acc))
    if speed == "unet_autocast":
        base.unet.forward = torch.autocast("cuda", dtype=torch.bfloat16)(base.unet.forward)
    torch.manual_seed(0)
    controlnet, opt, _ = prepare_trainable(cfg, acc, base)
    bank = synthetic_bank(rows(64)) if method == "difftuning" else None
    empty = torch.zeros(1, *target.encoder_hidden_states.shape[1:])
    trainer = trainer_class(cfg)(cfg, acc, base, controlnet, target, empty, bank)
    equip(trainer, acc, controlnet, opt)  # --fused_backward_pass, --bf16_weights
    if speed.startswith("sdpa-"):
        only_sdpa_backend(trainer, speed.removeprefix("sdpa-"))
    if acc.device.type == "cuda":  # as a run on cached rows does (training.setup.build_run)
        offload_text_encoders(base)
    return trainer, opt, acc


def only_sdpa_backend(trainer, name: str) -> None:
    """``trainer``'s steps with attention through one SDPA backend (flash, efficient, cudnn or math) instead of
    torch's choice; the backward runs the kernel its forward picked."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    step = trainer.training_step

    def training_step(*args, **kwargs):
        with sdpa_kernel([backend]):
            return step(*args, **kwargs)

    trainer.training_step = training_step


def rate_text(r: dict, digits: int = 1) -> str:
    """``42.1 [40.3, 43.0]``: the median images/s and the range of its chunks (the median alone for one)."""
    chunks = r.get("images_per_s_chunks") or []
    text = f"{r['images_per_s']:.{digits}f}"
    return text if len(chunks) < 2 else f"{text} [{min(chunks):.{digits}f}, {max(chunks):.{digits}f}]"


def timed_steps(trainer, acc, opt, batches, n: int) -> float:
    """Seconds for ``n`` optimizer steps of ``trainer`` on the next ``batches``, the GPU's queue drained
    before and after."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.training_step(next(batches))
        acc.clip_grad_norm_(trainer.controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_ours(
    model_dir: Path,
    batch: int,
    method: str,
    steps: int,
    warmup: int,
    checkpointing: bool = False,
    speed: str = "default",
    rows=SyntheticCached,
    flop_per_image: float = FLOP_PER_IMAGE,
    repeats: int = 1,
) -> dict:
    """Images/s, peak memory and MFU of optimizer steps of our trainer (:func:`make_ours`) after ``warmup`` steps:
    the median of ``repeats`` timed chunks of ``steps`` steps each (``images_per_s_chunks``: every chunk)."""
    gc.collect()  # the previous setting's models and optimizer state must not count in this one's peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    leftover = torch.cuda.memory_allocated()
    trainer, opt, acc = make_ours(model_dir, batch, method, checkpointing, speed, rows)
    controlnet, base = trainer.controlnet, trainer.base
    frozen_idle = sum(  # what steps on cached rows never use but stays on the GPU: the VAE (the detector's)
        q.numel() * q.element_size()
        for m in (base.text_encoder, base.text_encoder_2, base.vae)
        if m is not None
        for q in m.parameters()
        if q.device.type == "cuda"
    )
    # frozen models and the ControlNet (the optimizer makes its state at the first step)
    setup_bytes = torch.cuda.memory_allocated() - leftover
    loader = torch.utils.data.DataLoader(
        trainer.target,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=2,
        pin_memory=True,
        persistent_workers=True,
    )

    def batches():
        while True:
            yield from loader

    it = batches()

    warm_s = timed_steps(trainer, acc, opt, it, warmup)
    chunks = [steps * batch / timed_steps(trainer, acc, opt, it, steps) for _ in range(repeats)]  # images/s
    ips = statistics.median(chunks)
    out = {
        "impl": "ours",
        "method": method,
        "batch": batch,
        "gradient_checkpointing": checkpointing,
        "speed": speed,
        "optimizer": trainer.cfg.train.optimizer,
        "fused_backward_pass": trainer.cfg.train.fused_backward_pass,
        "images_per_s": ips,
        "images_per_s_chunks": chunks,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "leftover_gib": leftover / 2**30,  # allocated before this setting began (counted in peak_gib)
        "setup_gib": setup_bytes / 2**30,
        "text_encoders_vae_gib": frozen_idle / 2**30,
        "mfu": ips * flop_per_image / PEAK_BF16,
        "warmup_seconds": warm_s,
    }
    del trainer, controlnet, opt, base, it
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return out


def bench_bank(model_dir: Path, batch: int = 32, steps: int = 25) -> dict:
    """Memory-bank generation at one batch, eager (``scripts/bench_bank.py`` compares batches and settings)."""
    from bench_bank import bank_flop_per_image, bench_setting

    from difftune_control.config import ModelConfig
    from difftune_control.extractors import get_extractor
    from difftune_control.training.runtime import load_base_model

    base = load_base_model(
        ModelConfig(pretrained_model_name_or_path=str(model_dir)), torch.device("cuda"), torch.bfloat16
    )
    flops = bank_flop_per_image(dict(base.unet.config), dict(base.vae.config), 512, steps, 7.5)["total"]
    r = bench_setting(
        base,
        get_extractor("canny", resolution=512),
        batch=batch,
        steps=steps,
        resolution=512,
        guidance_scale=7.5,
        repeats=1,
        flop_per_image=flops,
    )
    return {"impl": "ours", "what": "bank generation", **r}


def bench_detector(model_dir: Path, train_images_per_s: float, every: int = 500, batch: int = 4) -> dict:
    """One detector evaluation at SD defaults (K=8, 10 DDIM steps, no CFG, canny) vs the training it interrupts."""
    from difftune_control.config import DetectorConfig, ModelConfig
    from difftune_control.convergence import ConvergenceMonitor
    from difftune_control.extractors import get_extractor
    from difftune_control.training.runtime import load_base_model, make_controlnet

    mc = ModelConfig(
        pretrained_model_name_or_path=str(model_dir), conditioning_embedding_out_channels=[16, 32, 96, 256]
    )
    base = load_base_model(mc, torch.device("cuda"), torch.bfloat16)
    controlnet = make_controlnet(mc, base.unet).to("cuda")
    k = 8
    g = torch.Generator().manual_seed(0)
    monitor = ConvergenceMonitor(
        DetectorConfig(convergence_every=every, convergence_samples=k, convergence_num_inference_steps=10),
        get_extractor("canny", resolution=512),
        torch.randn(k, 77, 768, generator=g),
        torch.rand(k, 3, 512, 512, generator=g),
        torch.rand(k, 3, 512, 512, generator=g),
    )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        monitor.evaluate(0, base.unet, base.vae, controlnet, base.scheduler_config)  # references + warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        monitor.evaluate(every, base.unet, base.vae, controlnet, base.scheduler_config)
        torch.cuda.synchronize()
    eval_s = time.perf_counter() - t0
    train_s = every * batch / train_images_per_s
    return {
        "impl": "ours",
        "what": "detector",
        "eval_seconds": eval_s,
        "every": every,
        "batch": batch,
        "train_seconds_between": train_s,
        "cost_share": eval_s / (eval_s + train_s),
    }


def make_parquet(folder: Path, n: int = 256, resolution: int = 512) -> Path:
    """The same kind of data for diffusers' example: a parquet dataset with Image features (PNG, ``resolution`` px)."""
    import datasets
    from PIL import Image

    from difftune_control.toyworld import render_scenes

    if (folder / "train.parquet").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    out = render_scenes(n, seed=0, resolution=128)
    size = (resolution, resolution)
    to_pil = lambda x: Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype("uint8")).resize(size)  # noqa: E731
    ds = (
        datasets.Dataset.from_dict(
            {
                "image": [to_pil(x) for x in out["rgb"]],
                "conditioning_image": [to_pil(x.expand(3, -1, -1)) for x in out["inv_depth"]],
                "text": out["captions"],
            }
        )
        .cast_column("image", datasets.Image())
        .cast_column("conditioning_image", datasets.Image())
    )
    ds.to_parquet(str(folder / "train.parquet"))
    return folder


def gpu_memory_used_mib() -> int | None:
    """The most memory in use on any GPU, from nvidia-smi (MiB), or None without one."""
    try:
        used = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        ).stdout.split()
        return max(int(u) for u in used)
    except (OSError, ValueError):
        return None


class GpuMemoryPoll(threading.Thread):
    """Peak of :func:`gpu_memory_used_mib` every 0.5 s; ``baseline``: the reading when it was made (what
    other processes, this one included, already held)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.baseline = gpu_memory_used_mib() or 0
        self.peak, self.stop = 0, False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, gpu_memory_used_mib() or 0)
            time.sleep(0.5)


def example_rates(stderr: str, points: int = 1) -> list[float]:
    """Steps/s of the example's progress bar at ``points`` evenly spaced steps, the last one its last step.

    tqdm's rate is a moving average of recent steps, so at a step well past the warm-up it is the steady
    rate of the steps before it: the rates at 1/3, 2/3 and the end of a run are three chunks of it, as
    our trainer's timed chunks are. At each point the first refresh at or past it counts (the bar skips
    steps between refreshes); later refreshes of the last step include the final save and understate it.
    """
    shown: dict[int, float] = {}
    total = None
    for n, tot, rate, unit in re.findall(
        r"Steps:\s+\d+%.*?(\d+)/(\d+) \[[^,]*,\s*([\d.]+)(it/s|s/it)", stderr
    ):
        total = int(tot)
        shown.setdefault(int(n), float(rate) if unit == "it/s" else 1.0 / float(rate))
    if total is None or total not in shown:
        return []
    out = []
    for k in range(1, points + 1):
        mark = round(total * k / points)
        at = min((n for n in shown if n >= mark), default=None)
        if at is not None:
            out.append(shown[at])
    return out


def example_rate(stderr: str) -> float | None:
    """Steps/s of the example's progress bar when it first reaches the last step (None without one)."""
    rates = example_rates(stderr)
    return rates[0] if rates else None


def bench_example(
    script: Path,
    model_dir: Path,
    data: Path,
    batch: int,
    steps: int,
    log: Path,
    resolution: int = 512,
    checkpointing: bool = False,
    flop_per_image: float = FLOP_PER_IMAGE,
    timeout: float | None = None,
    wrapper: Path | None = None,
    repeats: int = 1,
) -> dict:
    """diffusers' example ``script`` as it is, under ``accelerate launch``: images/s from its progress bar
    (the median of its rates at ``repeats`` evenly spaced steps, :func:`example_rates`),
    peak memory from nvidia-smi (less what the GPU held before it started). A run past ``timeout`` seconds
    is killed with its whole process group (the launcher's child included) and recorded as an error.
    ``wrapper``: a script that runs ``script`` (its first argument) with a fix applied from outside
    (``example_unet_cast.py``)."""
    out_dir = Path("/tmp/diffusers-example-out")
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--mixed_precision",
        "bf16",
        *([str(wrapper)] if wrapper else []),
        str(script),
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out_dir),
        "--resolution",
        str(resolution),
        "--learning_rate",
        "1e-5",
        "--train_batch_size",
        str(batch),
        "--max_train_steps",
        str(steps),
        "--mixed_precision",
        "bf16",
        "--dataloader_num_workers",
        "8",
        "--checkpointing_steps",
        "100000",
        "--set_grads_to_none",
        "--report_to",
        "tensorboard",
    ] + (["--gradient_checkpointing"] if checkpointing else [])
    row = {
        "impl": "diffusers example",
        "batch": batch,
        "gradient_checkpointing": checkpointing,
        "optimizer": "adamw",
        "wrapper": wrapper.name if wrapper else None,
    }
    poll = GpuMemoryPoll()
    poll.start()
    t0 = time.time()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this run started: the launcher and its child
        stdout, stderr = proc.communicate()
        stderr += f"\n[bench] killed after {timeout:.0f} s"
    poll.stop = True
    log.write_text(stdout + "\n" + stderr)
    rates = example_rates(stderr, repeats)
    if proc.returncode != 0 or not rates:
        return {**row, "error": stderr[-1500:]}
    its = statistics.median(rates)
    return {
        **row,
        "images_per_s": its * batch,
        "images_per_s_chunks": [r * batch for r in rates],
        "peak_gib_nvsmi": (poll.peak - poll.baseline) / 1024,
        "mfu": its * batch * flop_per_image / PEAK_BF16,
        "wall_s": time.time() - t0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/throughput"))
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sd15-random"))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--repeats", type=int, default=3, help="timed chunks per setting (ours) / rate points (the example)"
    )
    p.add_argument("--diffusers-example", type=Path, default=None)
    p.add_argument("--example-steps", type=int, default=40)
    p.add_argument("--example-batches", nargs="+", type=int, default=None, help="default: --batches")
    p.add_argument(
        "--speed",
        nargs="+",
        default=["default"],
        choices=list(SPEED_SETTINGS),
        help="trainer speed settings to compare (each at every batch size and method)",
    )
    p.add_argument(
        "--methods", nargs="+", default=["vanilla", "difftuning"], choices=["vanilla", "difftuning"]
    )
    p.add_argument("--checkpointing-speed", default="default", choices=list(SPEED_SETTINGS))
    p.add_argument(
        "--grid-checkpointing", action="store_true", help="gradient checkpointing in the grid rows too"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["checkpointing", "bank", "detector"])
    p.add_argument(
        "--state-sizes", action="store_true", help="only print the optimizer-state sizes (CPU) and exit"
    )
    args = p.parse_args()
    if args.state_sizes:
        print(json.dumps(optimizer_state_sizes()))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench_throughput needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_sd15(args.model_dir)
    results = []

    def record(r):
        results.append(r)
        print(json.dumps(r), flush=True)
        (args.out / "results.json").write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1)
        )

    if args.diffusers_example:  # first: the comparison the benchmark exists for
        data = make_parquet(Path("/tmp/bench-parquet"))
        for b in args.example_batches or args.batches:
            record(
                bench_example(
                    args.diffusers_example,
                    model,
                    data,
                    b,
                    args.example_steps,
                    args.out / f"example-b{b}.log",
                    repeats=args.repeats,
                )  # fmt: skip
            )
    for b in args.batches:
        for speed in args.speed:
            for method in args.methods:
                try:
                    record(
                        bench_ours(
                            model,
                            b,
                            method,
                            args.steps,
                            args.warmup,
                            args.grid_checkpointing,
                            speed=speed,
                            repeats=args.repeats,
                        )  # fmt: skip
                    )
                except Exception as e:  # a setting that fails here (e.g. a compiler error) is a result too
                    record(
                        {
                            "impl": "ours",
                            "method": method,
                            "batch": b,
                            "speed": speed,
                            "error": repr(e)[:2000],
                        }
                    )
                    torch._dynamo.reset()
                    torch.cuda.empty_cache()
    if "checkpointing" not in args.skip:
        record(
            bench_ours(
                model,
                1,
                "difftuning",
                args.steps,
                args.warmup,
                checkpointing=True,
                speed=args.checkpointing_speed,
            )
        )
    if "bank" not in args.skip:
        record(bench_bank(model))
    ref = [
        r
        for r in results
        if r.get("method") == "difftuning"
        and r["batch"] == max(args.batches)
        and not r["gradient_checkpointing"]
    ]
    if (
        ref and "detector" not in args.skip
    ):  # the largest batch's throughput: a conservative (high) estimate of the detector's share
        record(bench_detector(model, min(r["images_per_s"] for r in ref)))
    lines = [
        "| implementation | method | batch | speed settings | grad. ckpt | images/s median [range] | peak GiB | of it left over | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "images_per_s" in r and "what" not in r:
            mem = r.get("peak_gib", r.get("peak_gib_nvsmi"))
            lines.append(
                f"| {r['impl']} | {r.get('method', 'vanilla')} | {r['batch']} | {r.get('speed', '-')} | "
                f"{r.get('gradient_checkpointing', False)} | "
                f"{rate_text(r)} | {mem:.1f} | {r.get('leftover_gib', 0):.1f} | {100 * r['mfu']:.0f}% |"
            )
    for r in results:
        if "error" in r:
            lines.append(
                f"\nFailed: {r['impl']} {r.get('method', '')} batch {r['batch']} {r.get('speed', '')}: {r['error'][-300:]}"
            )
    for r in results:
        if r.get("what") == "detector":
            lines.append(
                f"\nDetector evaluation (K=8, DDIM 10, canny) at 512 px: {r['eval_seconds']:.2f} s every "
                f"{r['every']} steps of batch {r['batch']} ({r['train_seconds_between']:.0f} s of training): "
                f"{100 * r['cost_share']:.1f}% of the time"
            )
        elif r.get("what"):
            lines.append(
                f"\nBank generation (DDIM {r['steps']} steps, CFG 7.5, re-encode + canny), batch {r['batch']}: "
                f"{r['images_per_s']:.2f} images/s ({100 * r['mfu']:.0f}% MFU)"
            )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
