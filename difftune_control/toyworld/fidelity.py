"""How well the base model knows a set of images: denoising loss per timestep band, latent
statistics, and a Frechet distance in the toy annotators' feature space.

Used by ``scripts/eval_toyworld.py`` (the base's own samples against renders; the gap between a
target domain and the default world) and by the convergence benchmark's retention score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TIMESTEP_BANDS: tuple[tuple[int, int], ...] = ((0, 200), (200, 500), (500, 1000))
"""Timestep bands ``[lo, hi)`` of the loss tables: near the data, the middle, mostly noise."""


def band_name(band: tuple[int, int]) -> str:
    return f"t{band[0]}-{band[1]}"


@torch.no_grad()
def denoising_loss_by_band(
    unet,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    bands: tuple[tuple[int, int], ...] = TIMESTEP_BANDS,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, dict[str, float]]:
    """The base's epsilon-prediction MSE on ``latents``, per timestep band.

    Each latent is noised once per band, at a timestep drawn uniformly from the band, with noise
    and timesteps drawn from ``seed`` alone: two calls with the same seed and the same number of
    latents use the same noise and timesteps, so their losses compare pair by pair (e.g. a
    domain's renders against the default world's renders of the same scene indices).

    Args:
        unet: a ``UNet2DConditionModel`` predicting epsilon.
        scheduler: a diffusers scheduler with ``add_noise`` (the base's training schedule).
        latents (`torch.Tensor`): ``[N, C, h, w]`` scaled latents (VAE latents x ``scaling_factor``).
        prompt_embeds (`torch.Tensor`): ``[N, L, D]`` text-encoder states of each latent's prompt.
        bands (`tuple`): ``(lo, hi)`` timestep ranges.
        seed (`int`, defaults to 0): noise and timestep stream.
        batch_size (`int`, defaults to 128): UNet batch.

    Returns:
        `dict`: per band name (``"t0-200"`` ...), ``{"loss": mean MSE, "sem": its standard error}``.
    """
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"the scheduler predicts {scheduler.config.prediction_type!r}, not epsilon")
    n = latents.shape[0]
    if prompt_embeds.shape[0] != n:
        raise ValueError(f"{n} latents but {prompt_embeds.shape[0]} prompt embeddings")
    device, dtype = unet.device, unet.dtype
    gen = torch.Generator("cpu").manual_seed(seed)
    result = {}
    for lo, hi in bands:
        t = torch.randint(lo, hi, (n,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        per_sample = []
        for s in range(0, n, batch_size):
            sl = slice(s, s + batch_size)
            x0, eps, tt = latents[sl].to(device).float(), noise[sl].to(device), t[sl].to(device)
            noisy = scheduler.add_noise(x0, eps, tt)
            pred = unet(noisy.to(dtype), tt, encoder_hidden_states=prompt_embeds[sl].to(device, dtype)).sample
            per_sample.append((pred.float() - eps).pow(2).mean(dim=(1, 2, 3)).cpu())
        v = torch.cat(per_sample).double()
        sem = float(v.std() / n**0.5) if n > 1 else float("nan")
        result[band_name((lo, hi))] = {"loss": float(v.mean()), "sem": sem}
    return result


def channel_stats(latents: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and standard deviation of ``[N, C, h, w]`` latents (over samples and pixels)."""
    x = latents.double().transpose(0, 1).flatten(1)  # [C, N*h*w]
    return {"mean": x.mean(dim=1).tolist(), "std": x.std(dim=1).tolist()}


def compare_channel_stats(stats: dict, reference: dict, tolerance: float = 0.1) -> dict:
    """How far ``stats`` lie from ``reference`` (both from :func:`channel_stats`), per channel.

    Returns:
        `dict`: ``std_ratio`` (stats std / reference std), ``mean_shift`` (difference of the means in
        units of the reference std) and ``within_tolerance``: every ratio in ``1 +- tolerance`` and
        every shift within ``tolerance``.
    """
    ratio = [s / r for s, r in zip(stats["std"], reference["std"])]
    shift = [(m - rm) / r for m, rm, r in zip(stats["mean"], reference["mean"], reference["std"])]
    ok = all(abs(x - 1.0) <= tolerance for x in ratio) and all(abs(x) <= tolerance for x in shift)
    return {"std_ratio": ratio, "mean_shift": shift, "within_tolerance": ok, "tolerance": tolerance}


@torch.no_grad()
def annotator_features(images: torch.Tensor, segmenter, depth, batch_size: int = 256) -> torch.Tensor:
    """Per-image features from the toy annotators, for Frechet distances between image sets.

    The features are 4x4-pooled class probabilities (segmentation annotator), 4x4-pooled depth
    (depth annotator) and 4x4-pooled RGB: what is where, how far, in which colour.

    Args:
        images (`torch.Tensor`): float ``[N, 3, H, W]`` in [0, 1].
        segmenter, depth: toy annotators (:func:`~.weights.load_annotator`), on one device.

    Returns:
        `torch.Tensor`: float64 ``[N, 160]`` on the CPU.
    """
    param = next(segmenter.parameters())
    out = []
    for x in images.split(batch_size):
        x = x.to(param.device, param.dtype)
        probs = segmenter(x).float().softmax(1)
        d = depth(x).float()
        pooled = [F.adaptive_avg_pool2d(v, 4).flatten(1) for v in (probs, d, x.float())]
        out.append(torch.cat(pooled, 1).double().cpu())
    return torch.cat(out)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, F]`` and ``[M, F]``.

    As FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule"), here on
    :func:`annotator_features`: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.
    """
    import numpy as np
    from scipy import linalg

    a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = (covmean[0] if isinstance(covmean, tuple) else covmean).real  # scipy < 1.10 returns a tuple
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
