"""Fidelity measures of the toy world: Frechet distance, latent statistics, denoising loss per band."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftune_control.toyworld import default_base_model_path, load_annotator, render_scenes, split_seed
from difftune_control.toyworld.fidelity import (
    TIMESTEP_BANDS,
    annotator_features,
    channel_stats,
    compare_channel_stats,
    denoising_loss_by_band,
    frechet_distance,
)


def test_frechet_distance_matches_the_closed_form_in_one_dimension():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 1, generator=gen, dtype=torch.float64)
    b = 2.0 * torch.randn(400, 1, generator=gen, dtype=torch.float64) + 3.0
    va, vb = float(a.var()), float(b.var())  # unbiased, as np.cov
    expect = (float(a.mean()) - float(b.mean())) ** 2 + va + vb - 2.0 * np.sqrt(va * vb)
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-9)  # sqrtm of a 1x1 matrix is exact
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-6  # sqrtm's round-off only


def test_channel_stats_and_their_comparison():
    z = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    flat = z.transpose(0, 1).flatten(1)
    z = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).reshape(2, 64, 4, 4).transpose(0, 1)
    ref = torch.stack([0.5 + 2.0 * z[:, 0], -1.0 + 0.5 * z[:, 1]], dim=1)
    stats = channel_stats(ref)
    assert stats["mean"] == pytest.approx([0.5, -1.0], abs=1e-12)
    assert stats["std"] == pytest.approx([2.0, 0.5], abs=1e-12)
    other = channel_stats(torch.stack([0.7 + 2.1 * z[:, 0], -1.0 + 0.5 * z[:, 1]], dim=1))
    cmp = compare_channel_stats(other, stats)
    assert cmp["std_ratio"] == pytest.approx([1.05, 1.0]) and cmp["mean_shift"] == pytest.approx([0.1, 0.0])
    assert cmp["within_tolerance"]  # 5% wider, 0.1 std shifted: on the 10% edge
    assert not compare_channel_stats(other, stats, tolerance=0.05)["within_tolerance"]


@pytest.fixture(scope="module")
def base():
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(default_base_model_path())
    return pipe, DDPMScheduler.from_config(pipe.scheduler.config)


def test_denoising_loss_per_band_knows_the_world(base):
    from difftune_control.validation import encode_images, encode_prompts

    pipe, scheduler = base
    out = render_scenes(8, split_seed(0, "validation"))
    with torch.no_grad():
        latents = encode_images(pipe.vae, out["rgb"])
        embeds = encode_prompts(pipe.text_encoder, pipe.tokenizer, out["captions"])
    real = denoising_loss_by_band(pipe.unet, scheduler, latents, embeds, seed=3)
    assert list(real) == ["t0-200", "t200-500", "t500-1000"] and len(TIMESTEP_BANDS) == 3
    again = denoising_loss_by_band(pipe.unet, scheduler, latents, embeds, seed=3, batch_size=3)
    for band in real:  # the same noise and timesteps; other batch sizes reorder float32 sums only
        assert again[band]["loss"] == pytest.approx(real[band]["loss"], rel=1e-5)
    losses = [real[b]["loss"] for b in real]
    assert losses[0] > losses[1] > losses[2]  # epsilon is hardest to tell near the data
    noise_images = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    fake = denoising_loss_by_band(pipe.unet, scheduler, noise_images, embeds, seed=3)
    assert fake["t0-200"]["loss"] > 1.2 * real["t0-200"]["loss"]  # Gaussian "latents" are not its world
    with pytest.raises(ValueError, match="prompt embeddings"):
        denoising_loss_by_band(pipe.unet, scheduler, latents, embeds[:2])


def test_annotator_features_separate_a_shifted_domain():
    seg, depth = load_annotator("segmentation"), load_annotator("depth")
    stream = split_seed(0, "validation")
    ref = annotator_features(render_scenes(48, stream)["rgb"], seg, depth)
    assert ref.shape == (48, 160) and ref.dtype == torch.float64
    other_default = annotator_features(render_scenes(48, stream, start=48)["rgb"], seg, depth)
    dusk = annotator_features(render_scenes(48, stream, start=48, domain="dusk")["rgb"], seg, depth)
    assert frechet_distance(dusk, ref) > 2.0 * frechet_distance(other_default, ref)
