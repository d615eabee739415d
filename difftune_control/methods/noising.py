"""The forward diffusion process and the regression target: pure functions of ``alpha_bar``.

DDPM (Ho et al., 2020, eq. 4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. The
v-parameterisation (Salimans & Ho, 2022, "Progressive Distillation", sec. 4):
v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0. The same numbers as diffusers'
``DDPMScheduler.add_noise`` / ``get_velocity``, written once here so that every caller (the trainer,
the distillation trainer) gives bit-identical results for the same inputs.
"""

from __future__ import annotations

from typing import Literal

import torch


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t of ``latents`` [B,C,h,w] with ``noise`` (same shape) at ``alpha_bar`` [B,1,1,1] (or broadcastable)."""
    return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The v target of x_t = :func:`add_noise` ``(latents, noise, alpha_bar)``."""
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents


def prediction_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    alpha_bar: torch.Tensor,
    prediction_type: Literal["epsilon", "v_prediction"],
) -> torch.Tensor:
    """What the denoiser regresses onto at x_t: ``noise`` itself (epsilon) or :func:`velocity`."""
    return noise if prediction_type == "epsilon" else velocity(latents, noise, alpha_bar)
