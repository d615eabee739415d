"""Named presets (``--preset``), model-dependent defaults and the flags -> config mapping."""

from __future__ import annotations

import os
from typing import Any

from difftune_control.config.run import RunConfig
from difftune_control.config.sections import SECTIONS, ConfigError

# Named method configurations, applied under the user's flags (``--preset NAME``).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Diff-Tuning as the authors' released code runs it (thuml/Diffusion-Tuning): a fixed 20% of each
    # batch from the bank, lambda 0.1, linear t-skew, the bank's images re-noised with the hint
    # extracted from them.
    "published": {
        "method": {
            "method": "difftuning",
            "split": "fixed",
            "psi_power": 1.0,
            "bank_share": 0.2,
            "bank_weight": 0.1,
            "bank_prompt": "keep",
            "retention": "renoise",
            "loss_weighting": "none",
            "bank_latents": "sample",  # the authors encode every image, bank or target, by a posterior draw
        },
        "bank": {"bank_hint": "extracted"},
    },
}


def apply_preset(cfg: RunConfig, name: str | None) -> RunConfig:
    """A copy of ``cfg`` with the preset's values (``None``: unchanged). Flags given later override them."""
    cfg = RunConfig.from_dict(cfg.to_dict())
    if name is None:
        return cfg
    if name not in PRESETS:
        raise ConfigError([f"--preset: got {name!r}; choose one of {sorted(PRESETS)}"])
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


BANK_REUSE = 4
"""Draws per bank image that an SD run's default bank is sized for: the toy-world benchmark's runs (600
steps of batch 64 with 20% bank rows, a bank of 2,000) drew each image ~3.8 times (BENCHMARKS.md section 0b)."""
SD_BANK_SIZE = (500, 5000)
"""Bounds of the SD default bank size (5,000: the published bank; at SD1.5 scale ~17 minutes on an H200)."""


def sd_bank_size(steps: int, batch: int, accumulation: int, bank_share: float, processes: int = 1) -> int:
    """The SD default ``--bank_size``: about one image per :data:`BANK_REUSE` bank rows the run will draw
    (``steps`` x ``batch`` x ``accumulation`` x ``processes`` x ``bank_share``), within :data:`SD_BANK_SIZE`;
    building the bank is paid before the first step, so a run does not generate images it will barely use."""
    import math

    draws = steps * batch * accumulation * processes * bank_share
    low, high = SD_BANK_SIZE
    return int(min(high, max(low, math.ceil(draws / BANK_REUSE))))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_defaults(
    cfg: RunConfig, *, toy: bool, recipe: Any | None = None, kind: str | None = None
) -> RunConfig:
    """Fill model-dependent defaults (fields left at None) for the toy world or an SD checkpoint.

    Args:
        cfg: the configuration; a resolved copy is returned, the input is not changed.
        toy: True when the base model is the shipped toy world.
        recipe: the condition recipe (its detector defaults fill the detector fields).
        kind: the base model's family (``sd1``, ``sd2``, ``sdxl``); SDXL trains at 1024 px by default.
    """
    cfg = RunConfig.from_dict(cfg.to_dict())
    sd = not toy
    if kind == "sdxl" and cfg.data.resolution is None:
        cfg.data.resolution = 1024

    def fill(obj: Any, name: str, toy_value: Any, sd_value: Any) -> None:
        if getattr(obj, name) is None:
            setattr(obj, name, sd_value if sd else toy_value)

    fill(cfg.data, "resolution", 64, 512)
    fill(cfg.train, "train_batch_size", 64, 4)
    fill(cfg.train, "learning_rate", 1e-4, 1e-5)
    fill(cfg.train, "max_train_steps", 1000, 10000)
    fill(cfg.train, "validation_steps", 250, 1000)
    t = cfg.train
    fill(
        cfg.bank,
        "bank_size",
        2000,
        sd_bank_size(
            t.max_train_steps,
            t.train_batch_size,
            t.gradient_accumulation_steps,
            cfg.method.bank_share,
            int(os.environ.get("WORLD_SIZE", "1")),  # accelerate launch's processes draw from one bank
        ),
    )
    # toy world on a CPU: smaller generation batches, so the progress bar moves every minute or so
    fill(cfg.bank, "bank_batch_size", 256 if _cuda_available() else 64, 16)
    fill(cfg.detector, "convergence_every", 50, 500)
    fill(cfg.detector, "convergence_samples", 16, 8)
    fill(cfg.detector, "convergence_num_inference_steps", 8, 10)
    fill(cfg.model, "conditioning_embedding_out_channels", [16, 32, 64], [16, 32, 96, 256])
    det = getattr(recipe, "detector", None) or {}
    if cfg.detector.convergence_threshold is None:
        cfg.detector.convergence_threshold = float(det.get("threshold", 0.3))
    if cfg.detector.convergence_patience is None:
        cfg.detector.convergence_patience = int(det.get("patience", 2))
    if cfg.method.loss_weighting is None:
        cfg.method.loss_weighting = "inverse_snr" if cfg.method.method == "difftuning" else "none"
    if cfg.bank.bank_hint is None:
        cfg.bank.bank_hint = "extracted" if cfg.method.teacher_controlnet is not None else "zero"
    if cfg.data.conditioning_image_column is None:
        # the recipe's ground-truth column exists in the toy world's own datasets only; a user's dataset
        # (on any base) uses diffusers' name, and a missing column means "extract the hints"
        toy_data = toy and not (cfg.data.train_data_dir or cfg.data.dataset_name)
        toy_col = getattr(recipe, "toy_hint_column", None)
        cfg.data.conditioning_image_column = (toy_col if toy_data else None) or "conditioning_image"
    return cfg


def config_from_args(args: Any, base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from parsed flags (see :func:`difftune_control.flags.add_config_arguments`), over ``base``."""
    cfg = RunConfig.from_dict(base.to_dict()) if base is not None else RunConfig()
    for key, value in vars(args).items():
        if "." not in key or value is None:
            continue
        section, name = key.split(".", 1)
        if section in SECTIONS:
            setattr(getattr(cfg, section), name, value)
    return cfg
