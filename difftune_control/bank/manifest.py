"""The memory bank's key: sample seeds and prompts, the manifest and its hash, the bank folder.

See :mod:`difftune_control.bank` for the folder layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

from difftune_control.config import BankConfig
from difftune_control.utils import (
    cache_root,
    weights_fingerprint,
)

logger = logging.getLogger(__name__)


FORMAT_VERSION = 2  # 2: shards also hold the posterior std ("latent_std")
SHARD_SIZE = 256
MANIFEST, PROGRESS, PREVIEW, LOCK = "manifest.json", "progress.json", "preview.png", ".lock"


def shard_name(s: int) -> str:
    """File name of shard ``s``."""
    return f"shard-{s:05d}.safetensors"


def sample_seed(bank_seed: int, index: int) -> int:
    """Seed of bank sample ``index``: its initial noise depends on this alone."""
    return bank_seed * 1_000_003 + index


def bank_sample_indices(num_prompts: int, size: int, seed: int) -> list[int]:
    """Index into the prompt list of each bank sample: ``order[i % num_prompts]`` after a seeded shuffle."""
    order = list(range(num_prompts))
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(size)]


def bank_sample_prompts(prompts: list[str], size: int, seed: int) -> list[str]:
    """Prompt of each bank sample: ``shuffled[i % len(prompts)]`` after a shuffle seeded by ``seed``.

    Every prompt is used equally often (up to one) when ``size >= len(prompts)``, and a random
    subset is used when it is smaller.
    """
    return [prompts[j] for j in bank_sample_indices(len(prompts), size, seed)]


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a text file (``--bank_prompts``), one per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--bank_prompts: file not found: {path}")
    from difftune_control.data.formats import decode_utf8

    prompts = [line.strip() for line in decode_utf8(path.read_bytes(), path).splitlines() if line.strip()]
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
    distillation: dict | None = None,
    text: dict | None = None,
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
        distillation (`dict`, *optional*): recorded trajectory states and/or teacher identity
            (:meth:`difftune_control.distill.bank_extras.BankDistillation.manifest_entry`); in the key only
            when non-empty, so banks without distillation keep their key.
        text (`dict`, *optional*): what the prompt embeddings depend on beyond the model id
            (``PromptEncoder.bank_key()``: SDXL's encoders, micro-conditioning and negative); in the key
            only when non-empty, so SD banks keep their key.

    Returns:
        `dict`: a JSON-compatible dict (tuples become lists, so it compares equal after a round trip).
    """
    if config.bank_size is None:
        raise ValueError("--bank_size is not set; fill model-dependent defaults with resolve_defaults()")
    if config.bank_hint is None:
        raise ValueError(
            "bank_hint is not resolved: pass 'zero' or 'extracted' (resolve_defaults fills it from the method)"
        )
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
    if distillation:
        key["distillation"] = distillation
    if text:
        key["text"] = text
    try:
        return json.loads(json.dumps(key, sort_keys=True))
    except TypeError as err:
        raise ValueError(f"extractor_id must be JSON-serialisable, got {extractor_id!r}: {err}") from err


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


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def stored_key(bank_dir: Path) -> dict | None:
    """The key a folder holds: manifest.json's when complete, else progress.json's."""
    stored = read_json(bank_dir / MANIFEST) or read_json(bank_dir / PROGRESS) or {}
    return stored.get("key")


def shard_ranges(size: int, shard_size: int) -> list[range]:
    return [range(s, min(size, s + shard_size)) for s in range(0, size, shard_size)]
