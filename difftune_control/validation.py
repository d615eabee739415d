"""Fixed-seed sampling with the models already in memory.

One sampler serves the memory bank (base model alone), the sudden-convergence detector and
the validation grids (base model + the ControlNet being trained): no second pipeline is
loaded, nothing is copied, and each sample's initial noise depends only on its own seed, so
a sample is the same whatever batch it is drawn in.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from difftune_control.conditioning import (
    Added,
    added_kwargs,
    cfg_added,
    encode_prompts,
    move_added,
    select_added,
)

__all__ = ["encode_prompts", "controlled_forward", "controlled_prediction", "sample_images"]

Sampler = Literal["ddim", "unipc", "euler"]


def make_scheduler(scheduler_config: Any, sampler: Sampler = "ddim"):
    """A fresh inference scheduler of kind ``sampler`` built from the base model's scheduler config."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    classes = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler, "euler": EulerDiscreteScheduler}
    if sampler not in classes:
        raise ValueError(f"sampler: got {sampler!r}; choose one of {sorted(classes)}")
    config = dict(scheduler_config)
    if sampler == "ddim":
        # SD1.5-style DDIM: no sample clipping, final alpha from the schedule, steps offset 1.
        config.update(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return classes[sampler].from_config(config)


def latent_shape(unet, vae, resolution: int) -> tuple[int, int, int]:
    """[C, h, w] of the latents for square images of side ``resolution``."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
    return (unet.config.in_channels, resolution // factor, resolution // factor)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """Per-sample Gaussian noise, each drawn from its own CPU generator seeded with its seed."""
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


VAE_PIXELS = 2**20  # pixels per VAE call: one 1024 px image; its activations, not the batch, bound the peak


def _vae_parts(x: torch.Tensor, pixels_per_row: int) -> tuple[torch.Tensor, ...]:
    """``x`` split along the batch so each VAE call holds at most ``VAE_PIXELS`` image pixels."""
    return x.split(max(1, VAE_PIXELS // pixels_per_row))


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode scaled latents to images [B,3,H,W] in [0,1] (float32), a few images per call."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    parts = _vae_parts(latents, latents.shape[-2] * latents.shape[-1] * factor**2)
    x = torch.cat([vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float() for z in parts])
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def _posteriors(vae, images: torch.Tensor):
    """The VAE's posterior of images [B,3,H,W] in [0,1], a few images per call."""
    for part in _vae_parts(images, images.shape[-2] * images.shape[-1]):
        yield vae.encode((part * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)).latent_dist


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE-encode images [B,3,H,W] in [0,1]: the scaled posterior mean and standard deviation."""
    dists = list(_posteriors(vae, images))
    f = vae.config.scaling_factor
    return torch.cat([d.mean for d in dists]) * f, torch.cat([d.std for d in dists]) * f


def encode_images(vae, images: torch.Tensor, sample_posterior: bool = False, generator=None) -> torch.Tensor:
    """VAE-encode images [B,3,H,W] in [0,1] to scaled latents (the posterior mean by default)."""
    z = [d.sample(generator) if sample_posterior else d.mean for d in _posteriors(vae, images)]
    return torch.cat(z) * vae.config.scaling_factor


def controlled_forward(
    unet,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    controlnet=None,
    hints: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
    added_cond: Added | None = None,
    *,
    cast_controlnet_inputs: bool = True,
) -> torch.Tensor:
    """The ControlNet -> UNet forward: the ControlNet's residuals added to the frozen UNet's blocks.

    The one implementation of it: training (``ControlNetTrainer.compute_loss``, with gradients), the
    sampler, the trajectory recorder and the distillation teacher (:func:`controlled_prediction`).
    The frozen UNet always runs in its own dtype outside autocast, as diffusers runs it (on CUDA,
    autocast would lift its GroupNorms and LayerNorms to fp32: twice the activation traffic).

    Args:
        unet: the frozen base UNet (its device and dtype are used as they are).
        x_t: noisy latents [B,C,h,w]; timesteps: [B] or a scalar.
        encoder_hidden_states: [B,L,D].
        controlnet, hints, conditioning_scale: an optional ControlNet, its hints [B,3,H,W] in [0,1].
        added_cond: the added conditioning (SDXL: ``text_embeds`` [B,P], ``time_ids`` [B,6]).
        cast_controlnet_inputs: cast the ControlNet's inputs to its dtype (inference); ``False`` leaves
            them as given, for a ControlNet trained under autocast with fp32 master weights.

    Returns:
        The UNet's output [B,C,h,w] in the UNet's dtype.
    """
    dtype = unet.dtype
    down, mid = None, None
    if controlnet is not None:
        cdt = controlnet.dtype if cast_controlnet_inputs else None
        cast = (lambda x: x.to(cdt)) if cdt is not None else (lambda x: x)  # noqa: E731
        down, mid = controlnet(
            cast(x_t),
            timesteps,
            encoder_hidden_states=cast(encoder_hidden_states),
            controlnet_cond=cast(hints.to(x_t.device)),
            conditioning_scale=conditioning_scale,
            added_cond_kwargs=added_kwargs(move_added(added_cond or {}, x_t.device, cdt)),
            return_dict=False,
        )
        down, mid = [d.to(dtype) for d in down], mid.to(dtype)
    with torch.autocast(x_t.device.type, enabled=False):
        return unet(
            x_t.to(dtype),
            timesteps,
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            added_cond_kwargs=added_kwargs(move_added(added_cond or {}, x_t.device, dtype)),
            return_dict=False,
        )[0]


@torch.no_grad()
def controlled_prediction(
    unet,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    controlnet=None,
    hints: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
    added_cond: Added | None = None,
) -> torch.Tensor:
    """:func:`controlled_forward` without gradients, each model in its own dtype (the inference form)."""
    return controlled_forward(
        unet, x_t, timesteps, encoder_hidden_states, controlnet, hints, conditioning_scale, added_cond
    )


SAMPLE_PIXELS = 2**21
"""Image pixels per sampling call of the detector and the validation grids: 8 images at 512 px (SD's defaults
in one call), 2 at 1024 px (an SDXL run's evaluations stay within what its training steps hold)."""


def sampling_batch(resolution: int) -> int:
    """Images per sampling call at ``resolution`` (:data:`SAMPLE_PIXELS`; at least one)."""
    return max(1, SAMPLE_PIXELS // (resolution * resolution))


def sampling_mode(unet) -> contextlib.ExitStack:
    """How the run samples between training steps (the detector, validation grids), with the models it trains.

    - Eager: blocks compiled by ``--torch_compile`` run uncompiled (``torch.compiler.set_stance
      ("force_eager")``); their training graphs do not fit no-grad sampling, which would compile each block
      again, and under CUDA graphs record more graphs, for a few seconds of sampling.
    - Autocast to the frozen UNet's dtype on CUDA when it is half precision, for a ControlNet that holds fp32
      master weights (at SDXL size an fp32 ControlNet pass at 1024 px adds GiBs to the run's peak), without
      autocast's weight cache: it would keep a half-precision copy of every trainable ControlNet weight (2.5
      GiB at SDXL) for the whole sampling loop, where casting each layer's weight when it runs costs a few
      milliseconds per denoising step. A ControlNet prepared by accelerate for mixed precision runs its
      forward inside accelerate's own autocast, with the cache on, and copies cached there live until the
      outermost autocast ends: :func:`sample_images` clears them after each prediction (2.3 GiB held through
      the VAE decode at SDXL otherwise).
    """
    from difftune_control.compiler import run_eagerly

    stack = contextlib.ExitStack()
    stack.enter_context(run_eagerly())
    if unet.device.type == "cuda" and unet.dtype in (torch.float16, torch.bfloat16):
        stack.enter_context(torch.autocast("cuda", dtype=unet.dtype, cache_enabled=False))
    return stack


@torch.no_grad()
def sample_images(
    *,
    unet,
    vae,
    scheduler_config: Any,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    seeds: Sequence[int],
    resolution: int,
    controlnet=None,
    hints: torch.Tensor | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    conditioning_scale: float = 1.0,
    sampler: Sampler = "ddim",
    batch_size: int | None = None,
    return_latents: bool = False,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, slice], None] | None = None,
    added_cond: Added | None = None,
    negative_added_cond: Added | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample images with the given (in-memory) models.

    Args:
        unet, vae: the frozen base model's modules; their device and dtype are used as they are.
        scheduler_config: the base model's scheduler config (a fresh scheduler is made per call).
        prompt_embeds: text-encoder hidden states [B,L,D] for the prompts.
        negative_prompt_embeds: [B,L,D] or [1,L,D] for the empty prompt; needed when guidance_scale > 1.
        seeds: one seed per sample (its initial noise depends on it alone).
        resolution: image side in pixels.
        controlnet, hints: optional ControlNet and its hints [B,3,H,W] in [0,1].
        num_inference_steps, guidance_scale, conditioning_scale, sampler: sampling settings.
        batch_size: split the work into chunks of this many samples (default: all at once).
        return_latents: also return the final (scaled) latents.
        on_step: called as ``on_step(i, t, latents_in, model_output, chunk)`` at every step, for
            trajectory recording; ``chunk`` is the slice of samples in this call.
        added_cond: the prompts' added conditioning, [B,...] per name (SDXL: ``text_embeds``,
            ``time_ids``; see :class:`~difftune_control.conditioning.PromptEncoder`).
        negative_added_cond: the same for the negative prompt ([B,...] or [1,...]); needed with
            ``added_cond`` when guidance_scale > 1.

    Returns:
        images [B,3,H,W] float32 in [0,1] on the models' device (and the latents if asked).
    """
    n = prompt_embeds.shape[0]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    if controlnet is not None and (hints is None or hints.shape[0] != n):
        raise ValueError("a ControlNet needs one hint per prompt")
    use_cfg = guidance_scale > 1.0
    if use_cfg and negative_prompt_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_prompt_embeds (the empty prompt's embedding)")
    added_cond = added_cond or {}
    if use_cfg and added_cond and set(negative_added_cond or {}) != set(added_cond):
        raise ValueError(
            f"guidance_scale > 1 needs negative_added_cond with the keys of added_cond {sorted(added_cond)}"
        )
    device, dtype = unet.device, unet.dtype
    shape = latent_shape(unet, vae, resolution)
    step = batch_size or n
    images, all_latents = [], []
    for start in range(0, n, step):
        chunk = slice(start, min(n, start + step))
        scheduler = make_scheduler(scheduler_config, sampler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        cond = prompt_embeds[chunk].to(device, dtype)
        added = move_added(select_added(added_cond, chunk), device, dtype)
        b = cond.shape[0]
        if use_cfg:
            neg = negative_prompt_embeds.to(device, dtype)
            neg = neg.expand(b, -1, -1) if neg.shape[0] == 1 else neg[chunk]
            cond = torch.cat([neg, cond])
            if added:
                negative = {k: v if v.shape[0] == 1 else v[chunk] for k, v in negative_added_cond.items()}
                added = cfg_added(added, negative, b)
        hint = None
        if controlnet is not None:
            hint = hints[chunk].to(device, controlnet.dtype)
            hint = torch.cat([hint, hint]) if use_cfg else hint
        latents = initial_noise(list(seeds)[chunk], shape, device, torch.float32) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            x = torch.cat([latents, latents]) if use_cfg else latents
            x = scheduler.scale_model_input(x, t).to(dtype)
            out = controlled_prediction(
                unet, x, t, cond, controlnet, hint, conditioning_scale, added_cond=added
            ).float()
            if controlnet is not None and torch.is_autocast_enabled(device.type):
                torch.clear_autocast_cache()  # see sampling_mode: a prepared ControlNet's own cache
            if use_cfg:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            if on_step is not None:
                on_step(i, t, latents, out, chunk)
            latents = scheduler.step(out, t, latents, return_dict=False)[0]
        images.append(decode_latents(vae, latents))
        all_latents.append(latents)
    out_images = torch.cat(images)
    return (out_images, torch.cat(all_latents)) if return_latents else out_images


def save_grid(path: str | os.PathLike, columns: list[torch.Tensor]) -> None:
    """Save a PNG grid: one row per sample, one column per tensor [N,3,H,W] in [0,1]."""
    from PIL import Image

    from difftune_control.utils import atomic_path

    cols = [c.detach().float().clamp(0, 1).cpu() for c in columns]
    rows = torch.cat([torch.cat(list(c_row), dim=2) for c_row in zip(*cols)], dim=1)  # [3, N*H, C*W]
    arr = (rows.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
