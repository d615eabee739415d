"""What a training run stands on: base-model loading, the trainable ControlNet, data order, the
learning-rate schedule and the stop signal.

Checkpoints live in :mod:`difftune_control.training.checkpoints`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difftune_control.config import ModelConfig
from difftune_control.utils import derive_seed

logger = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """The frozen Stable Diffusion parts a ControlNet trains against (a :class:`~difftune_control.bank.BankBaseModel`)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    model_id: str
    is_toy: bool
    kind: str = "sd1"  # sd1 | sd2 | sdxl (difftune_control.sdxl.ModelKind)
    text_encoder_2: Any = None  # SDXL: CLIPTextModelWithProjection
    tokenizer_2: Any = None
    force_zeros_negative: bool = False  # SDXL: CFG's unconditional input is zeros
    revision: str | None = None  # --revision and --variant it was loaded with (with model_id: its identity)
    variant: str | None = None

    @property
    def scheduler_config(self) -> dict:
        return dict(self.noise_scheduler.config)

    def prompt_encoder(self, size: int | None = None, crop: tuple[int, int] = (0, 0)):
        """The text side of the model as a :class:`~difftune_control.conditioning.PromptEncoder`.

        ``size`` and ``crop`` are the micro-conditioning of the images the embeddings go with (SDXL's
        ``time_ids``; unused by SD1.x/2.x).
        """
        if self.kind != "sdxl":
            from difftune_control.conditioning import PromptEncoder

            return PromptEncoder(self.text_encoder, self.tokenizer)
        from difftune_control.sdxl import SDXLPromptEncoder

        if size is None:
            raise ValueError("SDXL prompt embeddings need the image size (micro-conditioning)")
        return SDXLPromptEncoder(
            self.text_encoder,
            self.tokenizer,
            self.text_encoder_2,
            self.tokenizer_2,
            size=size,
            crop=crop,
            force_zeros_negative=self.force_zeros_negative,
        )


def offload_text_encoders(base: BaseModel, to: str = "cpu") -> int:
    """Move the frozen text encoders off the training device; returns the bytes moved.

    For a run on cached rows, once setup has encoded every prompt it needs (the latent cache, the empty
    prompt, the validation set, the memory bank): steps never call them again, and an SDXL pair holds
    ~1.6 GB of a small card's memory (SD1.5: 0.25 GB).
    """
    moved = 0
    for module in (base.text_encoder, base.text_encoder_2):
        if module is None:
            continue
        moved += sum(q.numel() * q.element_size() for q in module.parameters() if q.device.type != to)
        module.to(to)
    return moved


class PeakMeter:
    """The most CUDA memory this process's tensors held: over the run (``run()``, in every train record)
    and within each phase that asks (``phase()``: the detector's sampling, a validation grid, a
    checkpoint), so a record says which part of a run sets its peak. Host-side counters, no
    synchronisation; nothing on other devices.

    Args:
        device (`torch.device`): the training device.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.peak = 0

    def _fold(self) -> int:
        self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        return self.peak

    def run(self) -> dict:
        """``{"gpu_peak_gib": ...}`` over the run so far (``{}`` off CUDA)."""
        return {"gpu_peak_gib": round(self._fold() / 2**30, 2)} if self.cuda else {}

    @contextlib.contextmanager
    def phase(self):
        """Yields a dict that holds ``{"gpu_peak_gib": ...}`` of the block alone once it ends."""
        got: dict = {}
        if self.cuda:
            self._fold()
            torch.cuda.reset_peak_memory_stats(self.device)
        yield got
        if self.cuda:
            got["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
            self._fold()


def is_toy_model(path: str | None) -> bool:
    """True when ``path`` is None (the default) or a folder inside the package's ``toyworld/`` (the shipped base)."""
    if path is None:
        return True
    toy_root = Path(__file__).resolve().parents[1] / "toyworld"
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
    """Load UNet, VAE, text encoder(s), tokenizer(s) and noise scheduler through ``from_pretrained``.

    Works for a local diffusers folder or a hub id (hub ids need network or a filled HF cache), of
    SD1.x, SD2.x or SDXL (detected from ``unet/config.json``; SDXL adds its second text encoder).
    ``--pretrained_vae_model_name_or_path`` replaces the pipeline's VAE. All parts are frozen, in eval
    mode, on ``device`` in ``weight_dtype``, except an SDXL VAE under fp16 without a separate VAE,
    which stays in float32 (it overflows in fp16).
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from difftune_control import sdxl

    path = resolve_model_path(cfg)
    local = Path(path)
    if (local.is_absolute() or path.startswith(".")) and not local.exists():
        raise FileNotFoundError(f"--pretrained_model_name_or_path: folder not found: {path}")
    if local.is_dir() and not (local / "unet").is_dir():
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path: {path} is not a diffusers pipeline folder (no unet/ inside); "
            "convert a single-file checkpoint with diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR)"
        )
    kind = sdxl.detect_model_kind(path, cfg.revision)
    if kind == "sdxl" and local.is_dir() and sdxl.missing_subfolders(local):
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path: {path} is an SDXL pipeline (its UNet takes text_time "
            f"conditioning) but lacks {sdxl.missing_subfolders(local)}; an SDXL folder needs "
            f"{list(sdxl.SDXL_SUBFOLDERS)} (the refiner, with one text encoder, is not supported)"
        )
    kw = {"revision": cfg.revision, "variant": cfg.variant, "torch_dtype": weight_dtype}
    text_encoder_2 = tokenizer_2 = None
    force_zeros = False
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=cfg.revision)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        if kind == "sdxl":
            text_encoder_2, tokenizer_2, force_zeros = sdxl.load_sdxl_text_encoders(path, **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except OSError as err:
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path {path!r}: could not load the base model ({err}). "
            "Offline, pass a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/; "
            "SDXL also text_encoder_2/, tokenizer_2/)."
        ) from err
    vae = load_vae(cfg, path, kind, weight_dtype)
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is None:
            continue
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
        kind=kind,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        force_zeros_negative=force_zeros,
        revision=cfg.revision,
        variant=cfg.variant,
    )


def load_vae(cfg: ModelConfig, path: str, kind: str, weight_dtype: torch.dtype) -> Any:
    """The pipeline's VAE, or ``--pretrained_vae_model_name_or_path`` (a VAE folder or hub id)."""
    from diffusers import AutoencoderKL

    separate = cfg.pretrained_vae_model_name_or_path
    dtype = weight_dtype
    if kind == "sdxl":
        from difftune_control.sdxl import vae_dtype

        dtype = vae_dtype(weight_dtype, separate is not None)
    try:
        if separate is None:
            return AutoencoderKL.from_pretrained(
                path, subfolder="vae", revision=cfg.revision, variant=cfg.variant, torch_dtype=dtype
            )
        return AutoencoderKL.from_pretrained(separate, torch_dtype=dtype)
    except OSError as err:
        flag = "--pretrained_vae_model_name_or_path" if separate else "--pretrained_model_name_or_path"
        raise FileNotFoundError(f"{flag} {separate or path!r}: could not load the VAE ({err})") from err


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


def check_hint_embedding(controlnet, vae) -> None:
    """The hint embedding must shrink hints as much as the VAE shrinks images, or the first step fails on
    mismatched shapes deep inside diffusers: a clear error names the flag instead."""
    channels = list(controlnet.config.conditioning_embedding_out_channels)
    levels = len(vae.config.block_out_channels)
    if len(channels) != levels:
        raise ValueError(
            f"--conditioning_embedding_out_channels {' '.join(map(str, channels))}: the hint embedding shrinks "
            f"hints {2 ** (len(channels) - 1)}x but the VAE shrinks images {2 ** (levels - 1)}x; give {levels} "
            "widths (Stable Diffusion's: 16 32 96 256)"
        )


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

    def keys(self, k: int) -> list[tuple[int, int]]:
        """Batch ``k`` as dataset keys ``(index, draw seed)``: the seed derives from (seed, epoch, index).

        A dataset draws everything random about an item (posterior sample, random crop, flip) from a
        generator seeded with it, so an item's values depend on where it sits in the stream, never on
        what ran before (a resume, a model initialised at random in between, a DataLoader worker).
        """
        epoch = k // self.batches_per_epoch
        return [(i, derive_seed(self.seed, "sample", epoch, i)) for i in self.batch(k)]


class StreamBatchSampler(torch.utils.data.Sampler):
    """Batches ``start, start+1, ...`` of an :class:`IndexStream` as dataset keys, forever (for a DataLoader)."""

    def __init__(self, stream: IndexStream, start: int = 0):
        self.stream, self.start = stream, start

    def __iter__(self):
        k = self.start
        while True:
            yield self.stream.keys(k)
            k += 1


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so it can save a checkpoint before exiting."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received signal %d: saving a checkpoint after this step, then stopping", signum)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def lr_lambda(name: str, warmup: int, total: int):
    def f(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if name == "constant_with_warmup":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return (
            max(0.0, 1.0 - progress)
            if name == "linear"
            else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        )

    return f
