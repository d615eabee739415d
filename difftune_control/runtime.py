"""What a training run stands on: base-model loading, the run folder, checkpoints, data order."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difftune_control.config import ModelConfig

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class BaseModel:
    """The frozen Stable Diffusion parts a ControlNet trains against."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    model_id: str
    is_toy: bool

    @property
    def scheduler_config(self) -> dict:
        return dict(self.noise_scheduler.config)


def is_toy_model(path: str | None) -> bool:
    """True when ``path`` is None (the default) or the shipped toy-world pipeline folder."""
    if path is None:
        return True
    toy_root = Path(__file__).resolve().parent / "toyworld"
    try:
        return Path(path).resolve().is_relative_to(toy_root)
    except OSError:
        return False


def resolve_model_path(cfg: ModelConfig) -> str:
    if cfg.pretrained_model_name_or_path is not None:
        return cfg.pretrained_model_name_or_path
    from difftune_control.toyworld import default_base_model_path

    return str(default_base_model_path())


def load_base_model(cfg: ModelConfig, device: torch.device, weight_dtype: torch.dtype) -> BaseModel:
    """Load UNet, VAE, text encoder, tokenizer and noise scheduler through ``from_pretrained``.

    Works for a local diffusers folder or a hub id (hub ids need network or a filled HF cache).
    All parts are frozen, in eval mode, on ``device`` in ``weight_dtype``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model_path(cfg)
    local = Path(path)
    if (local.is_absolute() or path.startswith(".")) and not local.exists():
        raise FileNotFoundError(f"--pretrained_model_name_or_path: folder not found: {path}")
    if local.is_dir() and not (local / "unet").is_dir():
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path: {path} is not a diffusers pipeline folder (no unet/ inside); "
            "convert a single-file checkpoint with diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR)"
        )
    kw = {"revision": cfg.revision, "variant": cfg.variant, "torch_dtype": weight_dtype}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=cfg.revision)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except OSError as err:
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path {path!r}: could not load the base model ({err}). "
            "Offline, pass a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        ) from err
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
        m.to(device=device)
    return BaseModel(
        unet,
        vae,
        text_encoder,
        tokenizer,
        noise_scheduler,
        path,
        is_toy_model(cfg.pretrained_model_name_or_path),
    )


def make_controlnet(cfg: ModelConfig, unet) -> Any:
    """A trainable ControlNet: copied from the UNet's encoder, or loaded from ``controlnet_model_name_or_path``."""
    from diffusers import ControlNetModel

    if cfg.controlnet_model_name_or_path:
        from difftune_control.export import load_controlnet

        controlnet = load_controlnet(cfg.controlnet_model_name_or_path, unet=unet, torch_dtype=torch.float32)
    else:
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels)
        )
    torch.nn.Module.to(controlnet, dtype=torch.float32)  # ModelMixin.to would warn about no fp32 modules
    controlnet.train()
    controlnet.requires_grad_(True)
    return controlnet


class IndexStream:
    """Deterministic, resumable order of dataset indices: a fresh seeded permutation per epoch.

    Batch ``k`` of the stream depends only on ``k`` (epoch ``k // batches_per_epoch``), so the
    state to save is the number of batches consumed. Each process takes every
    ``world_size``-th index of the permutation, so processes see disjoint data.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_items < batch_size * world_size:
            raise ValueError(
                f"dataset has {num_items} samples, fewer than one global batch "
                f"({batch_size} x {world_size} processes); lower --train_batch_size"
            )
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world = rank, world_size
        self.batches_per_epoch = num_items // (batch_size * world_size)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def batch(self, k: int) -> list[int]:
        epoch, pos = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[
                : self.batches_per_epoch * self.batch_size * self.world
            ]
            self._epoch, self._perm = epoch, perm[self.rank :: self.world]
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size].tolist()


class StreamBatchSampler(torch.utils.data.Sampler):
    """Batches ``start, start+1, ...`` of an :class:`IndexStream`, forever (for a DataLoader)."""

    def __init__(self, stream: IndexStream, start: int = 0):
        self.stream, self.start = stream, start

    def __iter__(self):
        k = self.start
        while True:
            yield self.stream.batch(k)
            k += 1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``latest`` (None if the run has none yet) or an explicit folder."""
    if resume is None:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume}: not a complete checkpoint folder (no trainer_state.json); "
            f"available: {[p.name for p in list_checkpoints(path.parent)] or 'none'}"
        )
    return path


def save_checkpoint(
    accelerator, run_dir: Path, step: int, controlnet, trainer_state: dict, limit: int | None
) -> Path:
    """Write ``checkpoint-<step>`` atomically (a temp folder renamed at the end), then prune old ones."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        accelerator.unwrap_model(controlnet).save_pretrained(tmp / "controlnet", safe_serialization=True)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None:
            for old in list_checkpoints(run_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
                logger.info("removed old checkpoint %s (--checkpoints_total_limit %d)", old.name, limit)
    accelerator.wait_for_everyone()
    return final
