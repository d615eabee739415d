"""Recipes that pretrain the toy world's models: VAE, text-to-image base, annotators.

Every stage renders its data on the training device at start (a pool of scenes drawn from the
training seed stream), trains with bf16 autocast on CUDA, logs JSON lines to
``<out_dir>/logs/<stage>.jsonl``, and saves into ``<out_dir>`` (fp16 safetensors):

- ``vae``: ``<out_dir>/vae`` (AutoencoderKL with ``scaling_factor`` measured on the data);
- ``base``: ``<out_dir>/pipeline`` (a ``StableDiffusionPipeline`` folder: VAE, CLIP text encoder
  and word-level tokenizer, UNet, DDIM scheduler with SD 1.5's betas), EMA weights;
- ``depth`` / ``normal`` / ``segmentation``: ``<out_dir>/annotators/<kind>.safetensors``.

The base stage (:mod:`.pretrain_base`) checkpoints its full state (``<out_dir>/checkpoints/base.pt``)
and resumes from it; ``resume_from`` continues from the compact state of a run on another machine,
``init_from`` from the weights of an earlier pipeline folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .models import (
    ANNOTATOR_KINDS,
    AnnotatorConfig,
    ToyAnnotator,
)
from .models import make_vae as _make_vae
from .scene import split_seed
from .world import render_scenes


@dataclass
class PretrainConfig:
    """Settings of the pretraining recipes (defaults: the shipped weights' run)."""

    out_dir: str = "runs/toyworld"
    """Where stages read and write their results."""
    seed: int = 0
    """Seed of the scene stream (training split) and of the initialisation."""
    device: str = "cuda"
    """Training device."""
    resolution: int = 64
    """Training resolution of the VAE and base model."""
    time_budget: float | None = None
    """Seconds after which a stage stops early and saves (None: run all steps)."""
    log_every: int = 100
    """Optimizer steps between log lines."""
    vae_steps: int = 3000
    vae_batch: int = 128
    vae_lr: float = 4e-4
    vae_pool: int = 60_000
    base_steps: int = 3600
    base_batch: int = 512
    base_lr: float = 5e-4
    base_pool: int = 250_000
    base_warmup: int = 200
    base_stop_at: int | None = None
    """Stop the base stage (and save) once this optimizer step is reached; the learning-rate schedule
    still spans ``base_steps``, so a run can be done in chunks (None: run to ``base_steps``)."""
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    """Share of empty prompts, for classifier-free guidance."""
    min_snr_gamma: float | None = 5.0
    """Min-SNR loss weighting (Hang et al. 2023); None for the plain epsilon MSE."""
    base_compile: bool = False
    """``torch.compile`` the base stage's forward pass and loss (text encoder, UNet, epsilon MSE): the
    small models at 16x16 latents are bound by kernel launches, which inductor fuses."""
    base_compile_mode: str = "default"
    """``torch.compile`` mode of ``base_compile``: ``default``, or ``reduce-overhead`` (the compiled forward
    and backward replayed as CUDA graphs: one launch each instead of thousands of kernels; the batch is
    fixed, so they are recorded once)."""
    save_every: int = 1000
    init_from: str | None = None
    """Pipeline folder whose text encoder and UNet the base stage starts from (and whose VAE it uses
    when ``<out_dir>/vae`` does not exist)."""
    resume_from: str | None = None
    """A ``base_ema.safetensors`` written by an earlier base run (e.g. on another machine): continue at
    its step from its EMA weights with a fresh optimizer. ``<out_dir>/checkpoints/base.pt``, when it
    exists, takes precedence (an exact resume)."""
    annotator_steps: int = 4000
    annotator_batch: int = 128
    annotator_lr: float = 1e-3
    annotator_pool: int = 50_000
    annotator_pool_128: int = 8_000
    """Scenes at 128 px mixed into annotator training (every 4th step) so 128 px inputs work."""
    annotator_init: str | None = None
    """Folder of ``<kind>.safetensors`` an annotator stage starts from (e.g. the shipped
    ``difftune_control/toyworld/weights``) instead of a fresh initialisation."""
    annotator_edge_weight: float = 1.0
    """Depth: loss weight of the pixels beside a depth discontinuity (a jump of the target's normalised
    inverse depth of more than 0.02 to a 4-neighbour), where most of the annotator's error sits; 1: none."""
    annotator_domains: str = "default"
    """Comma-separated toy-world domains the annotator stages render, in equal shares of their pools (e.g.
    ``default,crowded,dusk,swapped``): annotators that saw a domain can measure generated images of it (the
    detector's floor there); trained on ``default`` alone they fail on dusk and swapped renders."""

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "vae_steps",
            "vae_batch",
            "base_steps",
            "base_batch",
            "annotator_steps",
            "annotator_batch",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.base_compile_mode not in ("default", "reduce-overhead"):
            problems.append(
                f"base_compile_mode must be default or reduce-overhead, got {self.base_compile_mode!r}"
            )
        try:
            self.annotator_domain_list()
        except ValueError as e:
            problems.append(f"annotator_domains: {e}")
        if self.annotator_edge_weight < 1.0:
            problems.append(f"annotator_edge_weight must be >= 1, got {self.annotator_edge_weight}")
        if not 0.0 <= self.caption_dropout < 1.0:
            problems.append(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        if self.resolution % 8:
            problems.append(f"resolution must be a multiple of 8, got {self.resolution}")
        if problems:
            raise ValueError("invalid PretrainConfig: " + "; ".join(problems))

    def annotator_domain_list(self) -> tuple[str, ...]:
        """``annotator_domains`` as checked domain names (ValueError naming the unknown one)."""
        from .domains import get_domain

        names = tuple(d.strip() for d in self.annotator_domains.split(",") if d.strip())
        if not names:
            raise ValueError("name at least one domain")
        return tuple(get_domain(d).name for d in names)


class _Log:
    def __init__(self, cfg: PretrainConfig, stage: str) -> None:
        self.path = Path(cfg.out_dir) / "logs" / f"{stage}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stage, self.t0 = stage, time.time()

    def __call__(self, **record) -> None:
        record = {"stage": self.stage, "time": round(time.time() - self.t0, 2), **record}
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")


def _render_pool(
    n: int,
    cfg: PretrainConfig,
    resolution: int,
    start: int = 0,
    keys: tuple[str, ...] = (),
    domains: tuple[str, ...] = ("default",),
) -> dict:
    """Render ``n`` training scenes on the training device, piecewise, keeping compact copies:
    ``rgb`` as uint8, ``captions``, and the requested ``keys`` (float16, classes as uint8).

    With several ``domains`` each renders an equal share, from consecutive scene indices (scenes
    ``start``.. of the first, the next ones of the second, ...), in that order."""
    seed = split_seed(cfg.seed, "train")
    piece = 16384 * 4096 // (resolution * resolution)
    parts: dict[str, list] = {"rgb": [], "captions": [], **{k: [] for k in keys}}
    first = start
    for i, domain in enumerate(domains):
        share = n // len(domains) + (i < n % len(domains))
        for lo in range(first, first + share, piece):
            m = min(piece, first + share - lo)
            out = render_scenes(m, seed, resolution, device=cfg.device, start=lo, domain=domain)
            parts["rgb"].append((out["rgb"] * 255).round().to(torch.uint8))
            parts["captions"].extend(out["captions"])
            for k in keys:
                parts[k].append(out[k].to(torch.uint8) if k == "classes" else out[k].half())
        first += share
    return {k: (v if k == "captions" else torch.cat(v)) for k, v in parts.items()}


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def _setup(cfg: PretrainConfig) -> None:
    torch.manual_seed(cfg.seed)
    if torch.device(cfg.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def train_vae(cfg: PretrainConfig) -> Path:
    """Train the AutoencoderKL (MSE + L1 + tiny KL) and set ``scaling_factor`` to 1 / latent std."""
    _setup(cfg)
    log = _Log(cfg, "vae")
    pool = _render_pool(cfg.vae_pool, cfg, cfg.resolution)["rgb"]
    log(event="pool", scenes=len(pool))
    vae = _make_vae(cfg.resolution).to(cfg.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
    t0 = time.time()
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, cfg.vae_steps, cfg.vae_lr, 100)
        idx = torch.randint(len(pool), (cfg.vae_batch,), device=cfg.device, generator=gen)
        x = pool[idx].float() / 127.5 - 1.0
        with _autocast(cfg.device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample.float()
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + 0.1 * (rec - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))  # images span [-1, 1]
            log(step=step, loss=round(loss.item(), 6), train_psnr=round(psnr, 2))
        if cfg.time_budget and time.time() - t0 > cfg.time_budget:
            log(event="time_budget", step=step)
            break
    vae.eval()
    with torch.no_grad(), _autocast(cfg.device):
        x = pool[: min(len(pool), 8192)].float() / 127.5 - 1.0
        lat = torch.cat([vae.encode(b).latent_dist.sample(generator=gen).float() for b in x.split(1024)])
    scaling = 1.0 / lat.std().item()
    vae.register_to_config(scaling_factor=scaling)
    out = Path(cfg.out_dir) / "vae"
    vae.to(torch.float16).save_pretrained(out, safe_serialization=True)
    log(event="saved", path=str(out), scaling_factor=round(scaling, 5))
    return out


def depth_edges(inv_depth: torch.Tensor, jump: float = 0.02) -> torch.Tensor:
    """Bool mask [B, 1, H, W] of the pixels whose normalised inverse depth differs from a 4-neighbour's
    by more than ``jump`` (both sides of an occlusion edge)."""
    dx = (inv_depth[..., :, 1:] - inv_depth[..., :, :-1]).abs() > jump
    dy = (inv_depth[..., 1:, :] - inv_depth[..., :-1, :]).abs() > jump
    edge = torch.zeros_like(inv_depth, dtype=torch.bool)
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge


def _annotator_loss(kind: str, pred: torch.Tensor, batch: dict, edge_weight: float = 1.0) -> torch.Tensor:
    if kind == "depth":
        err = pred - batch["inv_depth"]
        per_pixel = err.abs() + err**2
        if edge_weight != 1.0:  # normalised by the weights' sum: the loss keeps its scale
            w = 1.0 + (edge_weight - 1.0) * depth_edges(batch["inv_depth"]).float()
            return (w * per_pixel).sum() / w.sum()
        return per_pixel.mean()
    if kind == "normal":
        return (1.0 - (pred * batch["normal"]).sum(dim=1)).mean()
    return torch.nn.functional.cross_entropy(pred, batch["classes"])


def train_annotator(cfg: PretrainConfig, kind: str) -> Path:
    """Train one annotator on renders (64 px, with a 128 px batch every 4th step)."""
    from ..utils import atomic_save_safetensors

    if kind not in ANNOTATOR_KINDS:
        raise ValueError(f"annotator kind must be one of {ANNOTATOR_KINDS}, got {kind!r}")
    _setup(cfg)
    log = _Log(cfg, f"annotator_{kind}")
    dev = cfg.device
    keys = {"depth": "inv_depth", "normal": "normal", "segmentation": "classes"}
    pools, domains = [], cfg.annotator_domain_list()
    for n, res, start in ((cfg.annotator_pool, 64, 0), (cfg.annotator_pool_128, 128, cfg.annotator_pool)):
        p = _render_pool(n, cfg, res, start=start, keys=(keys[kind],), domains=domains)
        pools.append((p["rgb"], p[keys[kind]]))
    log(event="pool", scenes=[len(p[0]) for p in pools], domains=list(domains))
    if cfg.annotator_init:  # continue from earlier weights (the file's own kind and config are checked)
        from .weights import load_annotator

        start = Path(cfg.annotator_init) / f"{kind}.safetensors"
        model = load_annotator(kind, path=start).requires_grad_(True)
        log(event="init_from", path=str(start))
    else:
        model = ToyAnnotator(AnnotatorConfig(kind=kind))
    model = model.to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.annotator_lr, weight_decay=1e-4)
    gen = torch.Generator(dev).manual_seed(cfg.seed + 2)
    t0 = time.time()
    for step in range(cfg.annotator_steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, cfg.annotator_steps, cfg.annotator_lr, 100)
        big = step % 4 == 3 and len(pools[1][0]) > 0
        rgb, target = pools[1] if big else pools[0]
        b = cfg.annotator_batch // 4 if big else cfg.annotator_batch
        idx = torch.randint(len(rgb), (b,), device=dev, generator=gen)
        x = (rgb[idx].float() / 255.0).contiguous(memory_format=torch.channels_last)
        y = target[idx].long() if kind == "segmentation" else target[idx].float()
        with _autocast(dev):
            pred = model(x)
        loss = _annotator_loss(kind, pred.float(), {keys[kind]: y}, cfg.annotator_edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0:
            log(step=step, loss=round(loss.item(), 6), res=int(x.shape[-1]))
        if cfg.time_budget and time.time() - t0 > cfg.time_budget:
            log(event="time_budget", step=step)
            break
    out = Path(cfg.out_dir) / "annotators" / f"{kind}.safetensors"
    tensors = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
    meta = {
        "format": "pt",
        "kind": kind,
        "config": json.dumps(model.config.to_dict()),
        "recipe": json.dumps(asdict(cfg)),
    }
    atomic_save_safetensors(tensors, out, metadata=meta)
    log(event="saved", path=str(out))
    return out
