"""The Diff-Tuning memory bank: generate, verify, resume and load it.

Before training, the frozen base model generates ``bank_size`` images from prompts (default:
the target captions). Per sample the bank stores the VAE latent of the *decoded image*
(``encode(decode(z))``, the posterior mean, scaled: on the VAE's manifold, never the sampler's
raw final latent; DESIGN.md section 1), the prompt, its text embedding, and the hint that the
run's extractor computes from the image (``bank_hint="extracted"``) or zeros (``"zero"``).

Folder layout::

    <bank_dir>/
      shard-00000.safetensors   "latents" f32 [n,C,h,w], "encoder_hidden_states" f16 [n,L,D],
      shard-00001.safetensors   "hints" u8 [n,3,R,R], "indices"/"seeds" i64 [n];
      ...                       metadata: "prompts" (JSON list), "bank_key" (manifest hash)
      progress.json             while building: the manifest (so a partial bank is recognised)
      manifest.json             when complete: {"key": manifest, "contents": {...}}
      preview.png               the first 16 samples: image rows over hint rows

The manifest (:func:`bank_manifest`) is the cache key. A bank whose key matches is reused as it
is; missing or foreign shards are regenerated one by one (resume); a folder holding another key
is rebuilt or refused (``bank_on_mismatch``). Sample ``i`` has its own seed
(:func:`sample_seed`) and its prompt comes from a seeded shuffle (:func:`bank_sample_prompts`),
and batches never cross shards, so a regenerated shard equals the original.

Text embeddings are stored in fp16 (half the space, the precision mixed-precision training uses
anyway; a shard whose embeddings overflow fp16 keeps fp32); the loader returns float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from difftune_control.config import BankConfig
from difftune_control.utils import atomic_save_safetensors, atomic_write_text, cache_root

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHARD_SIZE = 256
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
MANIFEST, PROGRESS, PREVIEW, LOCK = "manifest.json", "progress.json", "preview.png", ".lock"


def shard_name(s: int) -> str:
    """File name of shard ``s``."""
    return f"shard-{s:05d}.safetensors"


def sample_seed(bank_seed: int, index: int) -> int:
    """Seed of bank sample ``index``: its initial noise depends on this alone."""
    return bank_seed * 1_000_003 + index


def bank_sample_prompts(prompts: list[str], size: int, seed: int) -> list[str]:
    """Prompt of each bank sample: ``shuffled[i % len(prompts)]`` after a shuffle seeded by ``seed``.

    Every prompt is used equally often (up to one) when ``size >= len(prompts)``, and a random
    subset is used when it is smaller.
    """
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[order[i % len(order)]] for i in range(size)]


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a text file (``--bank_prompts``), one per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--bank_prompts: file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--bank_prompts: {path} holds no prompts (expected one prompt per line)")
    return prompts


def bank_manifest(
    *,
    config: BankConfig,
    prompts: list[str],
    model_id: str,
    resolution: int,
    extractor_id: dict | None,
    scaling_factor: float,
    revision: str | None = None,
    variant: str | None = None,
    shard_size: int = SHARD_SIZE,
) -> dict:
    """The bank's cache key: everything that decides its contents.

    Args:
        config (`BankConfig`): bank settings (size, sampler, steps, CFG, seed, hint mode).
        prompts (`list[str]`): the prompt list before the seeded shuffle (hashed, not stored).
        model_id (`str`): base model path or hub id; `revision` and `variant` are added when given.
            For a local folder or file, a content fingerprint of its weights files is added too, so
            retrained weights at the same path make a new bank.
        resolution (`int`): image side in pixels.
        extractor_id (`dict`): the extractor's identity, e.g. ``{"condition", "backend", "params"}``.
            Left out of the key when ``bank_hint == "zero"`` (the bank does not depend on it then).
        scaling_factor (`float`): the VAE's latent scaling factor.
        shard_size (`int`): samples per shard.

    Returns:
        `dict`: a JSON-compatible dict (tuples become lists, so it compares equal after a round trip).
    """
    if config.bank_size is None:
        raise ValueError("--bank_size is not set; fill model-dependent defaults with resolve_defaults()")
    if config.bank_hint not in ("extracted", "zero"):
        raise ValueError(f"--bank_hint: got {config.bank_hint!r}; choose one of ['extracted', 'zero']")
    if not prompts:
        raise ValueError("the bank needs at least one prompt (target captions or --bank_prompts FILE)")
    key = {
        "format_version": FORMAT_VERSION,
        "model": {
            "id": str(model_id),
            "revision": revision,
            "variant": variant,
            "fingerprint": weights_fingerprint(model_id),
        },
        "prompts_sha256": hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest(),
        "num_prompts": len(prompts),
        "size": int(config.bank_size),
        "sampler": config.bank_sampler,
        "num_inference_steps": int(config.bank_num_inference_steps),
        "guidance_scale": float(config.bank_guidance_scale),
        "seed": int(config.bank_seed),
        "bank_hint": config.bank_hint,
        "extractor": extractor_id if config.bank_hint == "extracted" else None,
        "resolution": int(resolution),
        "scaling_factor": float(scaling_factor),
        "shard_size": int(shard_size),
    }
    try:
        return json.loads(json.dumps(key, sort_keys=True))
    except TypeError as err:
        raise ValueError(f"extractor_id must be JSON-serialisable, got {extractor_id!r}: {err}") from err


def weights_fingerprint(model_id: str | Path) -> str | None:
    """Content fingerprint of a local model's weights files, or None for a hub id.

    Hashes each ``*.safetensors`` / ``*.bin`` / ``*.ckpt`` / ``*.pt`` file's relative path, size, and
    first and last MiB: constant time even for multi-GB checkpoints, and any retraining changes it.
    """
    path = Path(model_id)
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()), path
    else:
        return None
    digest = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        digest.update(f"{p.relative_to(root).as_posix()}:{size}".encode())
        with open(p, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def manifest_hash(manifest: dict) -> str:
    """Short hash (16 hex digits) of a manifest."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def default_bank_dir(manifest: dict, cache_dir: str | Path | None = None) -> Path:
    """``<cache_root>/banks/<short hash of the manifest>``."""
    return cache_root(cache_dir) / "banks" / manifest_hash(manifest)


def manifest_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Lines ``"key: old -> new"`` for every (dotted, nested) key whose value differs."""
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += manifest_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            lines.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return lines


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _stored_key(bank_dir: Path) -> dict | None:
    """The key a folder holds: manifest.json's when complete, else progress.json's."""
    stored = _read_json(bank_dir / MANIFEST) or _read_json(bank_dir / PROGRESS) or {}
    return stored.get("key")


def _shard_ranges(size: int, shard_size: int) -> list[range]:
    return [range(s, min(size, s + shard_size)) for s in range(0, size, shard_size)]


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@dataclass
class _Build:
    """One bank folder, its key, and what generating its shards needs."""

    bank_dir: Path
    key: dict
    config: BankConfig
    models: dict[str, Any]  # unet, vae, text_encoder, tokenizer, scheduler_config
    extractor: Callable[[torch.Tensor], torch.Tensor] | None
    prompts: list[str]  # before the seeded shuffle

    def __post_init__(self) -> None:
        self.key_hash = manifest_hash(self.key)
        self.ranges = _shard_ranges(self.key["size"], self.key["shard_size"])

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
        stored = _stored_key(self.bank_dir)
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

        from difftune_control.validation import encode_prompts

        todo = [s for s in range(len(self.ranges)) if s % world == rank and not self.shard_ok(s)]
        total = sum(len(self.ranges[s]) for s in todo)
        if not todo:
            return
        logger.info(
            "memory bank: %d of %d shards (%d images) on process %d of %d into %s",
            *(len(todo), len(self.ranges), total, rank, world, self.bank_dir),
        )
        prompts = bank_sample_prompts(self.prompts, self.key["size"], self.key["seed"])
        negative = None
        if self.key["guidance_scale"] > 1.0:
            negative = encode_prompts(self.models["text_encoder"], self.models["tokenizer"], [""])
        start = time.perf_counter()
        desc = f"memory bank (process {rank} of {world})"
        with tqdm(total=total, desc=desc, unit="img", disable=not show_progress) as bar:
            for s in todo:
                self.generate_shard(s, prompts, negative, bar.update)
        seconds = time.perf_counter() - start
        logger.info("memory bank: %d images in %.1f s (%.2f images/s)", total, seconds, total / seconds)

    def generate_shard(
        self, s: int, prompts: list[str], negative: torch.Tensor | None, on_batch: Callable[[int], None]
    ) -> None:
        """Generate shard ``s`` and write it atomically; batches never cross shards (reproducible)."""
        from difftune_control.validation import encode_images, encode_prompts, sample_images

        m, key = self.models, self.key
        indices = self.ranges[s]
        seeds = [sample_seed(key["seed"], i) for i in indices]
        shard_prompts = [prompts[i] for i in indices]
        latents, embeds, hints = [], [], []
        step = int(self.config.bank_batch_size)
        for b in range(0, len(seeds), step):
            emb = encode_prompts(m["text_encoder"], m["tokenizer"], shard_prompts[b : b + step])
            images = sample_images(
                unet=m["unet"],
                vae=m["vae"],
                scheduler_config=m["scheduler_config"],
                prompt_embeds=emb,
                negative_prompt_embeds=negative,
                seeds=seeds[b : b + step],
                resolution=key["resolution"],
                num_inference_steps=key["num_inference_steps"],
                guidance_scale=key["guidance_scale"],
                sampler=key["sampler"],
            )
            # On-manifold latents: re-encode the decoded images (DESIGN.md section 1).
            latents.append(encode_images(m["vae"], images).float().cpu())
            embeds.append(emb.cpu())
            hints.append(self._hints(images))
            on_batch(images.shape[0])
        emb_all = torch.cat(embeds)
        emb16 = emb_all.to(torch.float16)
        tensors = {
            "latents": torch.cat(latents),
            "encoder_hidden_states": emb16 if torch.isfinite(emb16).all() else emb_all.float(),
            "hints": torch.cat(hints),
            "indices": torch.tensor(list(indices), dtype=torch.int64),
            "seeds": torch.tensor(seeds, dtype=torch.int64),
        }
        meta = {"prompts": json.dumps(shard_prompts), "bank_key": self.key_hash, "format_version": "1"}
        atomic_save_safetensors(tensors, self.bank_dir / shard_name(s), metadata=meta)

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
        first = _load_shard(self.bank_dir / shard_name(0))
        contents = {
            "num_samples": self.key["size"],
            "shards": [shard_name(s) for s in range(len(self.ranges))],
            "latent_shape": list(first["latents"].shape[1:]),
            "encoder_hidden_states_shape": list(first["encoder_hidden_states"].shape[1:]),
            "hint_shape": list(first["hints"].shape[1:]),
            "completed": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_preview(
            self.bank_dir / PREVIEW, self.models["vae"], first["latents"][:16], first["hints"][:16]
        )
        manifest = json.dumps({"key": self.key, "contents": contents}, indent=2)
        atomic_write_text(self.bank_dir / MANIFEST, manifest + "\n")
        (self.bank_dir / PROGRESS).unlink(missing_ok=True)
        logger.info("memory bank complete: %d samples at %s", self.key["size"], self.bank_dir)


def ensure_bank(
    *,
    config: BankConfig,
    prompts: list[str],
    unet,
    vae,
    text_encoder,
    tokenizer,
    scheduler_config: Any,
    extractor: Callable[[torch.Tensor], torch.Tensor] | None,
    extractor_id: dict | None,
    model_id: str,
    resolution: int,
    accelerator=None,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    revision: str | None = None,
    variant: str | None = None,
    shard_size: int = SHARD_SIZE,
) -> Path:
    """Build, resume or reuse the memory bank and return its folder.

    Args:
        config (`BankConfig`): bank settings; ``bank_size`` and ``bank_batch_size`` must be resolved.
        prompts (`list[str]`): prompt list (target captions or :func:`read_prompts_file`); sample
            ``i`` uses ``bank_sample_prompts(prompts, size, bank_seed)[i]``.
        unet, vae, text_encoder, tokenizer: the frozen base model, already on its device.
        scheduler_config: the base model's scheduler config.
        extractor (`Callable`): float [B,3,H,W] in [0,1] -> [B,3,H,W] in [0,1]; unused when
            ``bank_hint == "zero"``.
        extractor_id (`dict`): the extractor's identity for the manifest.
        model_id (`str`): base model path or hub id (with `revision` / `variant`, part of the key).
        resolution (`int`): image side in pixels.
        accelerator (`accelerate.Accelerator`, *optional*): shard ``s`` is generated by process
            ``s % num_processes``; the main process writes the manifest and the preview.
        cache_dir: cache root for the default folder (``<cache_root>/banks/<hash>``).
        show_progress (`bool`): a tqdm bar (images/s) on the main process.
        shard_size (`int`): samples per shard (part of the key). Generation batches never cross
            shards, so the effective batch is ``min(bank_batch_size, shard_size)``.

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
    key = bank_manifest(
        config=config,
        prompts=prompts,
        model_id=model_id,
        resolution=resolution,
        extractor_id=extractor_id,
        scaling_factor=vae.config.scaling_factor,
        revision=revision,
        variant=variant,
        shard_size=shard_size,
    )
    explicit = config.bank_dir is not None
    bank_dir = Path(config.bank_dir) if explicit else default_bank_dir(key, cache_dir)
    models = dict(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=scheduler_config
    )
    hint_fn = extractor if config.bank_hint == "extracted" else None
    build = _Build(bank_dir, key, config, models, hint_fn, list(prompts))
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
        build.generate_missing(rank, world, show_progress and rank == 0)
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


def _load_shard(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        out: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        meta = f.metadata() or {}
    out["prompts"], out["bank_key"] = json.loads(meta["prompts"]), meta.get("bank_key")
    return out


class BankDataset(torch.utils.data.Dataset):
    """A complete memory bank, all shards in memory.

    Items have the keys of the target-data cache, so the trainer treats both alike:
    ``latents`` float32 [C,h,w], ``encoder_hidden_states`` float32 [L,D],
    ``conditioning_pixel_values`` float32 [3,R,R] in [0,1], ``caption`` str, ``index`` int.

    Attributes:
        bank_dir (`Path`), manifest (`dict`, the key), contents (`dict`), latents (`Tensor` f32),
        encoder_hidden_states (`Tensor` f16/f32), hints (`Tensor` uint8), prompts (`list[str]`),
        indices (`Tensor` int64), seeds (`Tensor` int64).
    """

    def __init__(self, bank_dir: str | Path):
        self.bank_dir = Path(bank_dir)
        stored = _read_json(self.bank_dir / MANIFEST)
        if stored is None:
            progress = _read_json(self.bank_dir / PROGRESS)
            if progress is None:
                raise FileNotFoundError(f"--bank_dir: {self.bank_dir} holds no memory bank (no {MANIFEST})")
            n = len(list(self.bank_dir.glob("shard-*.safetensors")))
            total = len(_shard_ranges(progress["key"]["size"], progress["key"]["shard_size"]))
            raise FileNotFoundError(
                f"--bank_dir: the memory bank at {self.bank_dir} is incomplete ({n} of {total} shards); "
                "run `difftune bank` (or `difftune train`) with the same settings to resume it"
            )
        self.manifest, self.contents = stored["key"], stored["contents"]
        missing = [s for s in self.contents["shards"] if not (self.bank_dir / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"--bank_dir: the memory bank at {self.bank_dir} lacks shards {missing[:5]}; "
                "run `difftune bank` with the same settings to regenerate them"
            )
        shards = [_load_shard(self.bank_dir / s) for s in self.contents["shards"]]
        foreign = [
            n
            for n, s in zip(self.contents["shards"], shards)
            if s["bank_key"] != manifest_hash(self.manifest)
        ]
        if foreign:
            raise ValueError(
                f"memory bank at {self.bank_dir}: shards {foreign[:5]} belong to another bank; "
                "run `difftune bank` with the same settings to regenerate them"
            )
        self.latents = torch.cat([s["latents"] for s in shards])
        embeds = [s["encoder_hidden_states"] for s in shards]
        if len({e.dtype for e in embeds}) > 1:  # a shard kept fp32 because fp16 overflowed
            embeds = [e.float() for e in embeds]
        self.encoder_hidden_states = torch.cat(embeds)
        self.hints = torch.cat([s["hints"] for s in shards])
        self.indices = torch.cat([s["indices"] for s in shards])
        self.seeds = torch.cat([s["seeds"] for s in shards])
        self.prompts = [p for s in shards for p in s["prompts"]]
        if len(self.prompts) != self.contents["num_samples"]:
            raise ValueError(
                f"memory bank at {self.bank_dir}: {len(self.prompts)} samples in the shards, "
                f"manifest says {self.contents['num_samples']}; delete the folder to rebuild it"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "latents": self.latents[i].float(),
            "encoder_hidden_states": self.encoder_hidden_states[i].float(),
            "conditioning_pixel_values": self.hints[i].float() / 255.0,
            "caption": self.prompts[i],
            "index": int(self.indices[i]),
        }

    def images(self, vae, n: int = 16) -> torch.Tensor:
        """The first ``n`` bank images, decoded with ``vae``: float32 [n,3,R,R] in [0,1] on the VAE's device."""
        from difftune_control.validation import decode_latents

        return decode_latents(vae, self.latents[:n].to(vae.device))


def load_bank(bank_dir: str | Path) -> BankDataset:
    """Load a complete memory bank (raises `FileNotFoundError` naming what is missing otherwise)."""
    return BankDataset(bank_dir)
