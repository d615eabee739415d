"""From a config to the ingredients of a run: recipe, extractor, datasets, validation triples, bank.

Keeps :mod:`difftune_control.methods` about optimisation only. Everything here runs before the
first optimizer step, so bad input fails early with a clear message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from difftune_control.config import RunConfig
from difftune_control.training.runtime import BaseModel

logger = logging.getLogger(__name__)


@dataclass
class ValidationSet:
    """K held-out (prompt, hint, real image) triples with fixed seeds."""

    prompts: list[str]
    prompt_embeds: torch.Tensor  # [K,L,D]
    hints: torch.Tensor  # [K,3,R,R] in [0,1]
    images: torch.Tensor  # [K,3,R,R] in [0,1]
    seeds: list[int]
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids [K,...]
    negative_prompt_embeds: torch.Tensor | None = None  # [1,L,D]: CFG's unconditional input
    negative_added_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # [1,...]


def load_condition(cfg: RunConfig, toy: bool, device: torch.device, recipe: Any = None):
    """The condition recipe and the run's extractor (at training resolution, on ``device``).

    ``recipe``: the recipe of ``cfg.data.condition`` when already loaded (it is then not read again).
    """
    from difftune_control.extractors import build_extractor, load_recipe

    if recipe is None:
        recipe = load_recipe(cfg.data.condition)
    extractor = build_extractor(
        recipe, backend=cfg.data.extractor_backend, resolution=cfg.data.resolution, device=device, toy=toy
    )
    return recipe, extractor


def extractor_identity(recipe: Any, extractor: Any) -> dict:
    """What identifies the hints an extractor makes (for cache and bank manifests)."""
    return {
        "condition": getattr(recipe, "name", str(recipe)),
        "backend": getattr(extractor, "backend", type(extractor).__name__),
        "params": {k: repr(v) for k, v in sorted(getattr(extractor, "params", {}).items())},
    }


def dataset_spec(cfg: RunConfig, source: str, max_samples: int | None = None):
    from difftune_control.data import DatasetSpec

    d = cfg.data
    return DatasetSpec(
        source=source,
        image_column=d.image_column,
        conditioning_image_column=d.conditioning_image_column,
        caption_column=d.caption_column,
        resolution=d.resolution,
        center_crop=d.center_crop,
        random_flip=d.random_flip,
        hint_interpolation=d.hint_interpolation,
        split=d.dataset_split,
        max_samples=max_samples,
        skip_bad_rows=d.skip_bad_rows,
        allow_external_paths=d.allow_external_paths,
        dataset_config_name=d.dataset_config_name,
    )


def train_source(cfg: RunConfig, toy: bool) -> str:
    if cfg.data.train_data_dir:
        return cfg.data.train_data_dir
    if cfg.data.dataset_name:
        return cfg.data.dataset_name
    if not toy:
        raise ValueError(
            "with --pretrained_model_name_or_path, give your data too: --train_data_dir DIR (metadata.jsonl "
            "or prompt.json) or --dataset_name NAME_OR_DIR"
        )
    from difftune_control.toyworld import default_dataset_dir

    # only the scenes the run trains on: --max_train_samples N renders N (or reuses a larger cached set)
    return str(
        default_dataset_dir(
            split="train",
            n=cfg.data.max_train_samples,
            resolution=cfg.data.resolution,
            domain=cfg.data.toy_domain,
        )
    )


def load_target(cfg: RunConfig, base: BaseModel, extractor, device: torch.device, rank_zero_first):
    """The target dataset, cached as latents + text embeddings when ``--cache_latents``."""
    from difftune_control.data import build_latent_cache, load_target_dataset

    source = train_source(cfg, base.is_toy)
    dataset = load_target_dataset(dataset_spec(cfg, source, cfg.data.max_train_samples), hint_fn=extractor)
    logger.info("target dataset: %d samples from %s", len(dataset), source)
    warn_long_captions(dataset, base.tokenizer)
    if not cfg.data.cache_latents:
        return dataset
    from difftune_control.utils import cache_root

    crop = (cfg.data.crops_coords_top_left_h, cfg.data.crops_coords_top_left_w)
    with rank_zero_first():
        cached = build_latent_cache(
            dataset,
            vae=base.vae,
            text_encoder=base.prompt_encoder(cfg.data.resolution, crop),
            cache_dir=cache_root(cfg.data.cache_dir) / "latents",
            model_id=base.model_id,
            device=device,
            dtype=base.unet.dtype,
            vae_dtype=base.vae.dtype,
        )
    cached.compact_hints = True  # uint8 through the loader, float on the device (ControlNetTrainer)
    return cached


def warn_long_captions(dataset, tokenizer) -> None:
    """One warning when captions exceed what the text encoder reads (they are cut), with their count."""
    from difftune_control.data.columns import long_captions

    long = long_captions(dataset.captions, tokenizer)
    if long:
        first = ", ".join(f"{dataset.row_label(i)} ({n} tokens)" for i, n in long[:3])
        logger.warning(
            "%d of %d captions are longer than the text encoder's %d tokens and are cut to that length "
            "(first: %s)", len(long), len(dataset), tokenizer.model_max_length, first,
        )  # fmt: skip


def load_validation(cfg: RunConfig, base: BaseModel, extractor, k: int) -> ValidationSet:
    """K held-out triples: the toy world's validation split, ``--validation_data_dir``, or the train set's tail."""
    from difftune_control.data import load_target_dataset

    tail = False  # take the last k rows (the validation source is the training set itself)
    if cfg.data.validation_data_dir:
        source = cfg.data.validation_data_dir
    elif base.is_toy and not (cfg.data.train_data_dir or cfg.data.dataset_name):
        from difftune_control.toyworld import default_dataset_dir

        source = str(
            default_dataset_dir(
                split="validation", resolution=cfg.data.resolution, domain=cfg.data.toy_domain
            )
        )
    else:
        source, tail = train_source(cfg, base.is_toy), True
        logger.warning("no --validation_data_dir: the detector uses the last %d training samples", k)
    ds = load_target_dataset(dataset_spec(cfg, source), hint_fn=extractor)
    if len(ds) < k:
        raise ValueError(
            f"validation set {source} has {len(ds)} samples; the detector needs {k} (--convergence_samples)"
        )
    idx = list(range(len(ds) - k, len(ds))) if tail else list(range(k))
    items = [ds[i] for i in idx]
    prompts = [it["caption"] for it in items]
    encoder = base.prompt_encoder(cfg.data.resolution)  # sampling: SDXL time ids (R, R, 0, 0, R, R)
    embeds, added = encoder(prompts)
    negative, negative_added = encoder.negative()
    return ValidationSet(
        added_cond={k: v.float().cpu() for k, v in added.items()},
        negative_prompt_embeds=negative.float().cpu(),
        negative_added_cond={k: v.float().cpu() for k, v in negative_added.items()},
        prompts=prompts,
        prompt_embeds=embeds.float().cpu(),
        hints=torch.stack([it["conditioning_pixel_values"] for it in items]).float(),
        images=torch.stack([(it["pixel_values"] + 1) / 2 for it in items]).float().clamp(0, 1),
        seeds=[10_000 + i for i in range(k)],
    )


def bank_prompts(cfg: RunConfig, target) -> list[str]:
    if cfg.bank.bank_prompts:
        from difftune_control.bank import read_prompts_file

        return read_prompts_file(cfg.bank.bank_prompts)
    captions = [c for c in getattr(target, "dataset", target).captions if c]
    if not captions:
        raise ValueError(
            "the target dataset has no captions to prompt the bank with; give --bank_prompts FILE"
        )
    return captions


@dataclass
class PreparedBank:
    """The run's memory bank: the loaded dataset, its folder, and what distillation it was built with
    (``distillation.teacher_controlnet``: the teacher ControlNet, loaded once for the bank and the trainer)."""

    dataset: Any = None
    path: Any = None
    distillation: Any = None

    @property
    def teacher_controlnet(self):
        return self.distillation.teacher_controlnet if self.distillation is not None else None


def prepare_bank(cfg: RunConfig, base: BaseModel, recipe, extractor, target, accelerator) -> PreparedBank:
    """Build or reuse the memory bank and load it (an empty `PreparedBank` when the method uses no bank)."""
    if not cfg.uses_bank:
        return PreparedBank()
    from difftune_control.bank import ensure_bank, load_bank
    from difftune_control.distill.bank_extras import bank_distillation

    distillation = bank_distillation(cfg, base, accelerator.device)  # None unless the bank slots distil
    teacher = distillation.teacher if distillation is not None else None
    path = ensure_bank(
        base,
        config=cfg.bank,
        prompts=teacher.prompts if teacher is not None else bank_prompts(cfg, target),
        resolution=cfg.data.resolution,  # SDXL: the pipeline's micro-conditioning for this size
        extractor=extractor,
        extractor_id=extractor_identity(recipe, extractor),
        extras=distillation,
        accelerator=accelerator,
        cache_dir=cfg.data.cache_dir,
    )
    return PreparedBank(dataset=load_bank(path), path=path, distillation=distillation)
