"""On-disk caches of VAE latents, text embeddings and hints for a `TargetDataset`.

Layout of one cache, ``cache_dir / cache_slot(dataset, model_id)``::

    manifest.json                 key (model, resolution, dataset fingerprint, crop, dtype, ...), shard list
    shard-00000.safetensors       rows [0, shard_size): latent_mean, latent_std, encoder_hidden_states,
    shard-00001.safetensors       crop_top_left, flip, hints (uint8, extracted or decoded from the hint
                                  files once, when every row has one), and the added conditioning
                                  (e.g. SDXL's text_embeds and time_ids)
    empty_prompt.safetensors      the text embedding of "" (for caption dropout), with its added conditioning

Latents: the VAE posterior's mean and standard deviation are both stored, scaled as the UNet
sees them (``(mean - shift_factor) * scaling_factor`` and ``std * scaling_factor``), so
`CachedTargetDataset` can draw a fresh ``mean + std * N(0, I)`` per access (what diffusers'
training does with ``latent_dist.sample()``) or return the mean. Each shard is written through a
temporary file and ``os.replace``, and carries the key's hash in its metadata: a build that was
cut off resumes from the completed shards; a changed key (new model, resized images, edited
dataset...) logs what changed and rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from difftune_control.conditioning import PromptEncoder, as_prompt_encoder
from difftune_control.data.cached import (
    EMPTY_PROMPT,
    LATENTS_NOTE,
    MANIFEST,
    CachedTargetDataset,
    read_manifest,
)
from difftune_control.data.dataset import TargetDataset
from difftune_control.utils import atomic_save_safetensors, atomic_write_text

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def hint_fn_key(hint_fn: Any) -> str | None:
    """Identity of a hint function for cache keys.

    In order: its ``cache_key`` (a string attribute or a method returning one); for extractors, the
    type with its ``params`` (constructor arguments); else its repr, or its qualified type name
    when the repr is the default one with a memory address. Memoised hints are rebuilt when this
    changes, so a hint function whose output depends on settings should expose them this way.
    """
    if hint_fn is None:
        return None
    key = getattr(hint_fn, "cache_key", None)
    if callable(key):
        key = key()
    if isinstance(key, str):
        return key
    kind = hint_fn if hasattr(hint_fn, "__qualname__") else type(hint_fn)
    name = f"{kind.__module__}.{kind.__qualname__}"
    params = getattr(hint_fn, "params", None)
    if isinstance(params, dict):
        return f"{name}({', '.join(f'{k}={v!r}' for k, v in sorted(params.items()))})"
    text = repr(hint_fn)
    return name if " at 0x" in text else text


def cache_slot(dataset: TargetDataset, model_id: str) -> str:
    """Sub-folder of a cache root for one (dataset source, split, model, resolution, hints).

    Different datasets, models or hints (another hint column, another extractor) get different
    folders, so runs of several conditions on one dataset, alternating or in parallel, never
    rebuild each other's cache; an edited dataset or a changed crop mode or dtype reuses the
    folder and rebuilds.
    """
    spec = dataset.spec
    source = str(spec.source)
    path = Path(source).expanduser()
    where = str(path.resolve()) if path.exists() else source
    hints = [spec.conditioning_image_column, hint_fn_key(dataset.hint_fn) if dataset.extracts_hints else None]
    ident = json.dumps([where, spec.split, spec.dataset_config_name, model_id, spec.resolution, hints])
    slug = (
        re.sub(r"[^A-Za-z0-9_.-]+", "_", (path.stem if path.exists() else source))[-40:].strip("_.")
        or "dataset"
    )
    return f"{slug}-{spec.resolution}px-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _place(model: Any, device: str | torch.device, dtype: torch.dtype) -> None:
    """Move ``model`` to ``device`` and ``dtype`` in place, unless it is there already."""
    param = next(model.parameters())
    if param.device != torch.device(device) or param.dtype != dtype:
        model.to(device=device, dtype=dtype)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def encoders_fingerprint(*modules: torch.nn.Module) -> str:
    """Short content hash of the encoders the cached tensors came from: each tensor's name, shape and its first
    and last 64 values (as float32). A VAE or text encoder retrained in place (or a `--pretrained_vae_model_name_or_path`
    that swaps the VAE under the same model id) changes it, so a cache is never reused across weights."""
    digest = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            flat = t.detach().reshape(-1)
            ends = torch.cat([flat[:64], flat[-64:]]).float().cpu()
            digest.update(f"{i}.{name}:{tuple(t.shape)}".encode() + ends.numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(
    dataset: TargetDataset,
    *,
    model_id: str,
    vae: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    shard_size: int,
    seed: int,
) -> dict[str, Any]:
    """Everything the cached tensors depend on; a cache is reused only when this matches exactly.

    ``tokenizer`` is the text side: a tokenizer, or a `PromptEncoder` (whose ``key()`` names every
    text encoder and, for SDXL, the micro-conditioning).
    """
    spec = dataset.spec
    text = (
        tokenizer.key()
        if isinstance(tokenizer, PromptEncoder)
        else {"tokenizer_max_length": int(tokenizer.model_max_length)}
    )
    return {
        "format": CACHE_FORMAT,
        "model_id": model_id,
        "resolution": spec.resolution,
        "dataset_fingerprint": dataset.fingerprint,
        "num_rows": len(dataset),
        "crop": "center" if spec.center_crop else f"random(seed={seed})",
        "random_flip": spec.random_flip,
        "hint_interpolation": spec.hint_interpolation,
        # stored with the latents: extracted ones (named by the function) and files' (decoded once, not per step)
        "hints": hint_fn_key(dataset.hint_fn)
        if dataset.extracts_hints
        else ("files" if dataset.hints_for_every_row else None),
        "encoder_dtype": str(dtype).removeprefix("torch."),
        "vae_scaling_factor": float(vae.config.scaling_factor),
        "vae_shift_factor": getattr(vae.config, "shift_factor", None),
        "encoders": encoders_fingerprint(
            vae, *(tokenizer.modules() if isinstance(tokenizer, PromptEncoder) else [])
        ),
        **text,
        "shard_size": shard_size,
    }


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _key_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return "; ".join(changed)


def _shard_is_valid(path: Path, key_hash: str, start: int, stop: int) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a foreign or damaged file is recomputed, never trusted
        return False
    return (
        meta.get("key_hash") == key_hash and meta.get("start") == str(start) and meta.get("stop") == str(stop)
    )


class _EncodeRows(Dataset):
    """Samples of a `TargetDataset` for encoding: a per-row seeded crop/flip, so resumed shards match."""

    def __init__(self, dataset: TargetDataset, indices: Sequence[int], seed: int, with_hint: bool) -> None:
        self.dataset, self.indices, self.seed, self.with_hint = dataset, list(indices), seed, with_hint

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        sample = self.dataset.load_sample(index, with_hint=self.with_hint, generator=generator)
        hint = sample.conditioning_pixel_values
        return {
            "pixel_values": sample.pixel_values,
            "hints": torch.empty(0, dtype=torch.uint8)
            if hint is None
            else (hint * 255.0).round().to(torch.uint8),
            "crop_top_left": torch.tensor([sample.geometry.top, sample.geometry.left], dtype=torch.int64),
            "flip": torch.tensor(sample.geometry.flip, dtype=torch.uint8),
            "caption": sample.caption,
        }


@torch.no_grad()
def _encode_shard(
    rows: _EncodeRows, *, vae: Any, encoder: PromptEncoder, batch_size: int, device: Any,
    dtype: torch.dtype, num_workers: int, progress: Any,
) -> dict[str, torch.Tensor]:  # fmt: skip
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    parts: dict[str, list[torch.Tensor]] = {}
    loader = DataLoader(rows, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    for batch in loader:
        dist = vae.encode(batch["pixel_values"].to(device=device, dtype=vae.dtype)).latent_dist
        ehs, added = encoder(batch["caption"], device=device)
        out = {
            "latent_mean": (dist.mean.to(dtype) - shift) * scale,  # [B,4,r,r]
            "latent_std": dist.std.to(dtype) * scale,
            "encoder_hidden_states": ehs,
            **added,  # e.g. SDXL's text_embeds [B,P] and time_ids [B,6]
            "crop_top_left": batch["crop_top_left"],
            "flip": batch["flip"],
        }
        if rows.with_hint:
            out["hints"] = batch["hints"]  # [B,3,R,R] uint8
        for name, value in out.items():
            parts.setdefault(name, []).append(value.detach().cpu())
        progress.update(len(batch["caption"]))
    return {name: torch.cat(values) for name, values in parts.items()}


def build_latent_cache(
    dataset: TargetDataset,
    *,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any = None,
    cache_dir: str | Path,
    model_id: str,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
    shard_size: int = 1024,
    seed: int = 0,
    num_workers: int = 0,
    sample_latents: bool = True,
    vae_dtype: torch.dtype | None = None,
) -> CachedTargetDataset:
    """Precompute (or reuse) VAE latents and text embeddings for every row of ``dataset``.

    Args:
        dataset (`TargetDataset`): the target data; its spec fixes resolution and crop mode. With
            random crops, each row's crop (and flip) is drawn once, from ``seed`` and the row index.
        vae (`AutoencoderKL`): encodes the target images; moved to ``device`` and ``dtype`` in place.
        text_encoder (`CLIPTextModel` or `PromptEncoder`): encodes captions (last hidden state); moved
            likewise. A `PromptEncoder` (e.g. SDXL's two encoders, ``BaseModel.prompt_encoder``) also
            gives the added conditioning, cached under its names.
        tokenizer (`CLIPTokenizer`, *optional*): pads to its ``model_max_length`` (unused with a
            `PromptEncoder`).
        cache_dir (`str` or `Path`): root of latent caches; this one lives in ``cache_dir / cache_slot(dataset,
            model_id)`` (`CachedTargetDataset.cache_dir`), one folder per dataset source, split, model
            and resolution.
        model_id (`str`): names the base model in the key (path or hub id, plus revision if any).
        batch_size (`int`, defaults to 32): rows per encoder call.
        device (`str` or `torch.device`, defaults to `"cpu"`): where encoding runs.
        dtype (`torch.dtype`, defaults to `torch.float32`): encoder dtype; also the stored dtype.
        show_progress (`bool`, defaults to `True`): a tqdm bar over rows.
        shard_size (`int`, defaults to 1024): rows per shard file (the unit of resumption).
        seed (`int`, defaults to 0): seeds random crops and flips.
        num_workers (`int`, defaults to 0): DataLoader workers that decode and transform images.
        sample_latents (`bool`, defaults to `True`): passed to `CachedTargetDataset`.
        vae_dtype (`torch.dtype`, *optional*): the VAE's own dtype when it differs from ``dtype``
            (SDXL's VAE in float32 under fp16); latents are stored in ``dtype`` either way.

    Returns:
        `CachedTargetDataset`, whose ``build_stats`` says how many shards were reused or computed.
    """
    if not isinstance(dataset, TargetDataset):
        raise TypeError(
            f"dataset must be a TargetDataset (see load_target_dataset), got {type(dataset).__name__}"
        )
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id must name the base model (path or hub id), got {model_id!r}")
    from filelock import FileLock

    encoder = as_prompt_encoder(text_encoder, tokenizer)
    folder = Path(cache_dir) / cache_slot(dataset, model_id)
    folder.mkdir(parents=True, exist_ok=True)
    # several runs sharing a cache (processes, parallel runs) wait for one build, then reuse it
    with FileLock(str(folder / ".lock")):
        return _build_locked(
            dataset, folder, vae=vae, encoder=encoder, model_id=model_id, batch_size=batch_size,
            device=device, dtype=dtype, show_progress=show_progress, shard_size=shard_size, seed=seed,
            num_workers=num_workers, sample_latents=sample_latents, vae_dtype=vae_dtype or dtype,
        )  # fmt: skip


def _build_locked(
    dataset, folder: Path, *, vae, encoder: PromptEncoder, model_id, batch_size, device, dtype,
    show_progress, shard_size, seed, num_workers, sample_latents, vae_dtype,
) -> CachedTargetDataset:  # fmt: skip
    from tqdm.auto import tqdm

    started = time.perf_counter()
    key = cache_key(
        dataset,
        model_id=model_id,
        vae=vae,
        tokenizer=encoder,
        dtype=dtype,
        shard_size=shard_size,
        seed=seed,
    )
    key_hash = _key_hash(key)
    old = read_manifest(folder)
    reason = None
    if old is not None and old.get("key") != key:
        reason = _key_changes(old.get("key") or {}, key)
        logger.warning("latent cache %s does not match (%s); rebuilding", folder, reason)
        for stale in [*folder.glob("shard-*.safetensors"), folder / EMPTY_PROMPT]:
            stale.unlink(missing_ok=True)
    shards = [
        {"file": _shard_name(k), "start": start, "stop": min(start + shard_size, len(dataset))}
        for k, start in enumerate(range(0, len(dataset), shard_size))
    ]
    manifest = {
        "key": key,
        "key_hash": key_hash,
        "shards": shards,
        "complete": False,
        "latents": LATENTS_NOTE,
        "added_conditioning": list(encoder.added_keys),
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    todo = [s for s in shards if not _shard_is_valid(folder / s["file"], key_hash, s["start"], s["stop"])]
    if todo:
        _place(vae, device, vae_dtype)
        for module in encoder.modules():
            _place(module, device, dtype)
        logger.info(
            "latent cache %s: encoding %d of %d shards (%d rows)",
            folder, len(todo), len(shards), sum(s["stop"] - s["start"] for s in todo),
        )  # fmt: skip
    meta = {"key_hash": key_hash}
    with tqdm(
        total=sum(s["stop"] - s["start"] for s in todo),
        disable=not show_progress or not todo,  # no empty bar when every shard is reused
        desc="caching latents",
    ) as bar:
        for shard in todo:
            rows = _EncodeRows(
                dataset, range(shard["start"], shard["stop"]), seed, dataset.hints_for_every_row
            )
            tensors = _encode_shard(
                rows, vae=vae, encoder=encoder, batch_size=batch_size, device=device, dtype=dtype,
                num_workers=num_workers, progress=bar,
            )  # fmt: skip
            shard_meta = {**meta, "start": str(shard["start"]), "stop": str(shard["stop"])}
            atomic_save_safetensors(tensors, folder / shard["file"], metadata=shard_meta)
    if not _shard_is_valid(folder / EMPTY_PROMPT, key_hash, 0, 1):
        for module in encoder.modules():
            _place(module, device, dtype)
        with torch.no_grad():
            empty, added = encoder([""], device=device)  # [1,L,D] and e.g. SDXL's [1,P], [1,6]
        tensors = {"embedding": empty, **added}
        atomic_save_safetensors(
            {k: v.detach().cpu() for k, v in tensors.items()},
            folder / EMPTY_PROMPT,
            metadata={**meta, "start": "0", "stop": "1"},
        )
    stats = {
        "reused_shards": len(shards) - len(todo),
        "computed_shards": len(todo),
        "seconds": round(time.perf_counter() - started, 3),
        "rebuild_reason": reason,
    }
    manifest.update(complete=True, build_stats=stats)
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    cached = CachedTargetDataset(folder, dataset, sample_latents=sample_latents)
    cached.build_stats = stats
    return cached
