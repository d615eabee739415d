"""Memory bank generation: verify, resume or build a bank folder (``ensure_bank``); layout: ``bank``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from difftune_control.bank.dataset import load_shard
from difftune_control.bank.interfaces import BankBaseModel, BankExtras
from difftune_control.bank.manifest import (
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    PREVIEW,
    PROGRESS,
    SHARD_SIZE,
    bank_manifest,
    bank_sample_indices,
    bank_sample_prompts,
    default_bank_dir,
    manifest_diff,
    manifest_hash,
    sample_seed,
    shard_name,
    shard_ranges,
    stored_key,
)
from difftune_control.bank.speed import generate_with
from difftune_control.config import BankConfig
from difftune_control.utils import atomic_save_safetensors, atomic_write_text

logger = logging.getLogger(__name__)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@dataclass
class _Build:
    """One bank folder, its key, and what generating its shards needs."""

    bank_dir: Path
    key: dict
    config: BankConfig
    models: dict[str, Any]  # unet, vae, encoder (a PromptEncoder), scheduler_config
    extractor: Callable[[torch.Tensor], torch.Tensor] | None
    prompts: list[str]  # before the seeded shuffle
    extras: BankExtras | None = None  # only when active

    def __post_init__(self) -> None:
        self.key_hash = manifest_hash(self.key)
        self.ranges = shard_ranges(self.key["size"], self.key["shard_size"])

    def shard_ok(self, s: int) -> bool:
        """True when shard ``s`` is a readable shard of this key with the right sample count."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.bank_dir / shard_name(s)), framework="pt") as f:
                meta = f.metadata() or {}
                n = f.get_slice("indices").get_shape()[0]
        except Exception:  # missing, truncated or foreign file: regenerate it
            return False
        return meta.get("bank_key") == self.key_hash and n == len(self.ranges[s])

    def inspect(self, explicit: bool, verbose: bool) -> Literal["complete", "partial", "mismatch"]:
        """Read-only look at the folder; raises when it must not be touched."""
        stored = stored_key(self.bank_dir)
        if stored is None:
            names = {p.name for p in self.bank_dir.glob("*") if not p.name.startswith(".")}
            if explicit and not all(
                n.startswith("shard-") or n in (PREVIEW, MANIFEST, PROGRESS) for n in names
            ):
                raise ValueError(
                    f"--bank_dir: {self.bank_dir} is not empty and holds no memory bank "
                    f"(found {sorted(names)[:5]}); choose an empty or new folder"
                )
            return "partial"
        if stored != self.key:
            diff = "\n  ".join(manifest_diff(stored, self.key))
            if self.config.bank_on_mismatch == "error":
                raise ValueError(
                    f"--bank_dir: {self.bank_dir} holds a memory bank built with other settings "
                    f"(stored -> requested):\n  {diff}\nchoose another --bank_dir, or pass "
                    "--bank_on_mismatch rebuild to replace it"
                )
            if verbose:
                logger.warning("memory bank at %s has other settings; rebuilding:\n  %s", self.bank_dir, diff)
            return "mismatch"
        complete = (self.bank_dir / MANIFEST).exists() and all(map(self.shard_ok, range(len(self.ranges))))
        return "complete" if complete else "partial"

    def generate_missing(self, rank: int, world: int, show_progress: bool) -> None:
        """Generate this process's missing shards (shard ``s`` belongs to process ``s % world``)."""
        from tqdm.auto import tqdm

        todo = [s for s in range(len(self.ranges)) if s % world == rank and not self.shard_ok(s)]
        total = sum(len(self.ranges[s]) for s in todo)
        if not todo:
            return
        logger.info(
            "memory bank: %d of %d shards (%d images) on process %d of %d into %s",
            *(len(todo), len(self.ranges), total, rank, world, self.bank_dir),
        )
        prompts = bank_sample_prompts(self.prompts, self.key["size"], self.key["seed"])
        extras = self.extras is not None  # they need each sample's place in the prompt list
        order = bank_sample_indices(len(self.prompts), self.key["size"], self.key["seed"]) if extras else None
        cfg_on = self.key["guidance_scale"] > 1.0  # negative: (hidden states [1,L,D], added [1,...])
        negative = self.models["encoder"].negative() if cfg_on else None
        if cuda := torch.cuda.is_available() and torch.cuda.is_initialized():  # the bank's own peak, logged
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        desc = f"memory bank (process {rank} of {world})"
        with tqdm(total=total, desc=desc, unit="img", disable=not show_progress) as bar:
            for s in todo:
                self.generate_shard(s, prompts, order, negative, bar.update)
        seconds = time.perf_counter() - start
        peak = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" * cuda
        logger.info(
            "memory bank: %d images in %.1f s (%.2f images/s%s)", total, seconds, total / seconds, peak
        )

    def generate_shard(
        self,
        s: int,
        prompts: list[str],
        order: list[int] | None,
        negative: tuple[torch.Tensor, dict] | None,
        on_batch: Callable[[int], None],
    ) -> None:
        """Generate shard ``s`` and write it atomically; batches never cross shards (reproducible).

        Out of GPU memory, the batch is halved and the same images follow (each has its own seed)."""
        key = self.key
        indices = self.ranges[s]
        seeds = [sample_seed(key["seed"], i) for i in indices]
        shard_prompts = [prompts[i] for i in indices]
        latents, stds, embeds, hints, extras, added_parts = [], [], [], [], [], []
        step = int(self.config.bank_batch_size)
        b = 0
        while b < len(seeds):
            try:
                where = slice(b, b + step)
                part = self._generate_batch(
                    shard_prompts[where], seeds[where], indices[where], order, negative
                )
            except torch.cuda.OutOfMemoryError:
                if step == 1:
                    raise
                torch.cuda.empty_cache()
                logger.warning("memory bank: out of GPU memory at batch %d, going on at %d", step, step // 2)
                step //= 2
                continue
            emb, added, mean, std, hint, extra = part
            latents.append(mean.float().cpu())
            stds.append(std.to(torch.float16).cpu())
            embeds.append(emb.cpu())
            added_parts.append({k: v.cpu() for k, v in added.items()})
            hints.append(hint)
            if extra is not None:
                extras.append(extra)
            on_batch(len(part[0]))
            b += len(part[0])
        emb_all = torch.cat(embeds)
        emb16 = emb_all.to(torch.float16)
        tensors = {
            "latents": torch.cat(latents),
            "latent_std": torch.cat(stds),
            "encoder_hidden_states": emb16 if torch.isfinite(emb16).all() else emb_all.float(),
            "hints": torch.cat(hints),
            "indices": torch.tensor(list(indices), dtype=torch.int64),
            "seeds": torch.tensor(seeds, dtype=torch.int64),
        }
        for name in added_parts[0]:  # SDXL: pooled text embeddings (fp16, as the hidden states) and time ids
            value = torch.cat([p[name] for p in added_parts]).float()
            half = value.to(torch.float16)
            tensors[name] = half if name != "time_ids" and torch.isfinite(half).all() else value
        if extras:
            tensors.update(self.extras.merge(extras))
        meta = {
            "prompts": json.dumps(shard_prompts),
            "bank_key": self.key_hash,
            "format_version": str(FORMAT_VERSION),
        }
        atomic_save_safetensors(tensors, self.bank_dir / shard_name(s), metadata=meta)

    def _generate_batch(self, prompts, seeds, indices, order, negative):
        """One generation batch: the prompts' embeddings, the re-encoded posterior, hints and extras."""
        from difftune_control.validation import encode_posterior, sample_images

        m, key = self.models, self.key
        emb, added = m["encoder"](prompts)
        extra = None
        if order is not None:
            which = [order[i] for i in indices]  # the prompts' places in the list
            extra = self.extras.batch(m["unet"], emb, which, key, added_cond=added)
        images = sample_images(
            unet=m["unet"],
            vae=m["vae"],
            scheduler_config=m["scheduler_config"],
            prompt_embeds=emb,
            negative_prompt_embeds=None if negative is None else negative[0],
            added_cond=added,
            negative_added_cond=None if negative is None else negative[1],
            seeds=seeds,
            resolution=key["resolution"],
            num_inference_steps=key["num_inference_steps"],
            guidance_scale=key["guidance_scale"],
            sampler=key["sampler"],
            **(extra.sampling if extra is not None else {}),
            on_step=extra.recorder if extra is not None else None,
        )
        # On-manifold latents: re-encode the decoded images (DESIGN.md section 1).
        mean, std = encode_posterior(m["vae"], images)
        hint = extra.hints if extra is not None and extra.hints is not None else self._hints(images)
        return emb, added, mean, std, hint, extra

    def _hints(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 hints [B,3,R,R] of the generated images (zeros for ``bank_hint="zero"``)."""
        if self.extractor is None:
            return torch.zeros(images.shape, dtype=torch.uint8)
        with torch.no_grad():
            hint = self.extractor(images)
        if tuple(hint.shape) != tuple(images.shape):
            raise ValueError(
                f"the extractor returned hints of shape {tuple(hint.shape)} for images of shape "
                f"{tuple(images.shape)}; it must return [B,3,H,W] in [0,1] at the bank resolution"
            )
        return _to_uint8(hint)

    def finish(self) -> None:
        """Check every shard, write ``preview.png`` and ``manifest.json``, drop ``progress.json``."""
        bad = [shard_name(s) for s in range(len(self.ranges)) if not self.shard_ok(s)]
        if bad:
            raise RuntimeError(f"memory bank at {self.bank_dir}: shards missing after generation: {bad[:5]}")
        first = load_shard(self.bank_dir / shard_name(0))
        contents = {
            "num_samples": self.key["size"],
            "shards": [shard_name(s) for s in range(len(self.ranges))],
            "latent_shape": list(first["latents"].shape[1:]),
            "encoder_hidden_states_shape": list(first["encoder_hidden_states"].shape[1:]),
            "hint_shape": list(first["hints"].shape[1:]),
            "added_conditioning": list(self.models["encoder"].added_keys),
            "completed": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if self.extras is not None:
            contents.update(self.extras.contents(first, self.key["size"]))
        _write_preview(
            self.bank_dir / PREVIEW, self.models["vae"], first["latents"][:16], first["hints"][:16]
        )
        manifest = json.dumps({"key": self.key, "contents": contents}, indent=2)
        atomic_write_text(self.bank_dir / MANIFEST, manifest + "\n")
        (self.bank_dir / PROGRESS).unlink(missing_ok=True)
        logger.info("memory bank complete: %d samples at %s", self.key["size"], self.bank_dir)


def ensure_bank(
    base: BankBaseModel,
    *,
    config: BankConfig,
    prompts: list[str],
    resolution: int,
    extractor: Callable[[torch.Tensor], torch.Tensor] | None,
    extractor_id: dict | None,
    extras: BankExtras | None = None,
    accelerator=None,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    shard_size: int = SHARD_SIZE,
) -> Path:
    """Build, resume or reuse the memory bank and return its folder.

    Args:
        base (`BankBaseModel`): the frozen base model (UNet, VAE, text encoder(s), scheduler config and
            where it was loaded from); the bank's prompts are encoded with ``base.prompt_encoder(resolution)``
            (SDXL: the pipeline's micro-conditioning).
        config (`BankConfig`): bank settings; ``bank_size`` and ``bank_batch_size`` must be resolved.
        prompts (`list[str]`): prompt list (target captions or :func:`read_prompts_file`); sample
            ``i`` uses ``bank_sample_prompts(prompts, size, bank_seed)[i]``.
        resolution (`int`): image side in pixels.
        extractor (`Callable`): float [B,3,H,W] in [0,1] -> [B,3,H,W] in [0,1]; unused for ``bank_hint == "zero"``.
        extractor_id (`dict`): the extractor's identity for the manifest.
        extras (`BankExtras`, *optional*): what the build does besides sampling the base model, e.g.
            :class:`~difftune_control.distill.bank_extras.BankDistillation` (record reverse-trajectory
            states and/or sample with a teacher ControlNet on its (caption, hint) pairs, ``prompts``
            being the teacher's captions). Its manifest entry is part of the key when active.
        accelerator (`accelerate.Accelerator`, *optional*): shard ``s`` is generated by process
            ``s % num_processes``; the main process writes the manifest and the preview.
        cache_dir: cache root for the default folder (``<cache_root>/banks/<hash>``).
        show_progress (`bool`): a tqdm bar (images/s) on the main process. shard_size (`int`): samples per
            shard (in the key); generation batches never cross shards (batch ``min(bank_batch_size, shard_size)``).

    Returns:
        `Path`: the complete bank folder (load it with :func:`load_bank`).
    """
    from filelock import FileLock, Timeout

    problems = []
    if config.bank_batch_size is None:
        problems.append("--bank_batch_size is not set; fill model-dependent defaults with resolve_defaults()")
    if config.bank_on_mismatch not in ("rebuild", "error"):
        problems.append(
            f"--bank_on_mismatch: got {config.bank_on_mismatch!r}; choose one of ['rebuild', 'error']"
        )
    if config.bank_hint == "extracted" and extractor is None:
        problems.append(
            "--bank_hint extracted needs the run's extractor; pass extractor= or use --bank_hint zero"
        )
    if problems:
        raise ValueError("cannot build the memory bank:\n  - " + "\n  - ".join(problems))
    encoder = base.prompt_encoder(resolution)
    scheduler_config = base.scheduler_config
    key = bank_manifest(
        config=config,
        prompts=prompts,
        model_id=base.model_id,
        resolution=resolution,
        extractor_id=extractor_id,
        scaling_factor=base.vae.config.scaling_factor,
        revision=base.revision,
        variant=base.variant,
        shard_size=shard_size,
        distillation=(
            extras.manifest_entry(scheduler_config, config.bank_sampler, config.bank_num_inference_steps)
            if extras is not None
            else None
        ),
        text=encoder.bank_key(),
    )
    explicit = config.bank_dir is not None
    bank_dir = Path(config.bank_dir) if explicit else default_bank_dir(key, cache_dir)
    models = dict(unet=base.unet, vae=base.vae, encoder=encoder, scheduler_config=scheduler_config)
    hint_fn = extractor if config.bank_hint == "extracted" else None
    active = extras if extras is not None and extras.active else None
    build = _Build(bank_dir, key, config, models, hint_fn, list(prompts), active)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    wait = accelerator.wait_for_everyone if accelerator is not None else (lambda: None)

    lock = None
    if rank == 0:  # one build per folder at a time, also across runs sharing the cache
        bank_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(bank_dir / LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another process building the memory bank at %s", bank_dir)
            lock.acquire()
    try:
        wait()
        state = build.inspect(explicit, rank == 0)  # every process reads the same folder, decides alike
        wait()
        if state == "complete":
            logger.info("reusing the memory bank at %s", bank_dir)
            return bank_dir
        if rank == 0:
            if state == "mismatch":
                for p in [bank_dir / MANIFEST, bank_dir / PREVIEW, *bank_dir.glob("shard-*.safetensors")]:
                    p.unlink(missing_ok=True)
            atomic_write_text(bank_dir / PROGRESS, json.dumps({"key": key}, indent=2) + "\n")
        wait()
        args = (rank, world, show_progress and rank == 0)
        generate_with(base.unet, base.vae, config.bank_torch_compile, build.generate_missing, *args)
        wait()
        if rank == 0:
            build.finish()
        wait()
    finally:
        if lock is not None:
            lock.release()
    return bank_dir


def _write_preview(path: Path, vae, latents: torch.Tensor, hints: torch.Tensor, columns: int = 8) -> None:
    """A PNG grid: rows of decoded bank images, each followed by the row of their hints."""
    from PIL import Image

    from difftune_control.utils import atomic_path
    from difftune_control.validation import decode_latents

    images = _to_uint8(decode_latents(vae, latents.to(vae.device)))
    n, _, h, w = images.shape
    rows = []
    for start in range(0, n, columns):
        for block in (images[start : start + columns], hints[start : start + columns]):
            row = torch.zeros(3, h, w * columns, dtype=torch.uint8)
            row[:, :, : w * block.shape[0]] = torch.cat(list(block), dim=2)
            rows.append(row)
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
