"""Generative distillation: the pure pieces (SNR switch, state choice, conversions) and trajectory recording."""

from __future__ import annotations

import pytest
import torch

from difftune_control.distill.trajectory import (
    TrajectoryRecorder,
    convert_prediction,
    nearest_state,
    snr,
    trajectory_slot_mask,
    trajectory_step_indices,
    trajectory_storage,
)

RES = 16  # the tiny VAE downsamples x2: latents [4,8,8]


def sd_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    """SD1.5's scaled-linear schedule, written out: betas = linspace(sqrt(0.00085), sqrt(0.012))^2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def test_snr_switch_follows_the_threshold():
    alphas = torch.tensor([0.9, 0.5, 0.2, 0.75], dtype=torch.float64)  # SNR 9, 1, 0.25, 3
    torch.testing.assert_close(snr(alphas), torch.tensor([9.0, 1.0, 0.25, 3.0], dtype=torch.float64))
    t = torch.tensor([0, 1, 2, 3, 2])
    assert trajectory_slot_mask(t, alphas, "snr", 1.0).tolist() == [False, False, True, False, True]
    assert trajectory_slot_mask(t, alphas, "snr", 3.5).tolist() == [False, True, True, True, True]
    assert trajectory_slot_mask(t, alphas, "snr", 0.1).tolist() == [False] * 5
    assert trajectory_slot_mask(t, alphas, "renoise").tolist() == [False] * 5
    assert trajectory_slot_mask(t, alphas, "trajectory").tolist() == [True] * 5
    with pytest.raises(ValueError, match="renoise"):
        trajectory_slot_mask(t, alphas, "nigd")
    # SD's schedule: SNR crosses 1 between t = 353 and 354 (alpha_bar crosses 0.5 there).
    a = sd_alphas_cumprod()
    assert float(a[353]) > 0.5 > float(a[354])
    mask = trajectory_slot_mask(torch.tensor([0, 353, 354, 999]), a, "snr", 1.0)
    assert mask.tolist() == [False, False, True, True]


def test_recorded_steps_spread_and_bounded():
    ddim25 = list(range(960, -1, -40))  # 25 steps, noisiest first
    assert trajectory_step_indices(ddim25, 4) == [0, 8, 16, 24]
    assert trajectory_step_indices(ddim25, 1) == [12]
    assert trajectory_step_indices(ddim25, 25) == list(range(25))
    # snr: only steps with SNR(t) < 1 (t >= 354: 960 ... 360, the first 16 steps) are eligible
    a = sd_alphas_cumprod()
    steps = trajectory_step_indices(ddim25, 4, alphas_cumprod=a, max_snr=1.0)
    assert steps == [0, 5, 10, 15] and ddim25[15] == 360
    with pytest.raises(ValueError, match="--trajectory_states 17: the bank sampler has 16 steps"):
        trajectory_step_indices(ddim25, 17, alphas_cumprod=a, max_snr=1.0)
    with pytest.raises(ValueError, match="--trajectory_states 0"):
        trajectory_step_indices(ddim25, 0)


def test_nearest_recorded_state():
    recorded = torch.tensor([960, 640, 320, 0])
    every = torch.ones(4, dtype=torch.bool)
    t = torch.tensor([0, 100, 160, 161, 900, 480, 999])
    # 160 and 480 are ties: the lower timestep wins
    assert nearest_state(t, recorded, every).tolist() == [3, 3, 3, 2, 0, 2, 0]
    high_noise_only = torch.tensor([True, True, False, False])
    assert nearest_state(t, recorded, high_noise_only).tolist() == [1, 1, 1, 1, 0, 1, 0]
    with pytest.raises(ValueError):
        nearest_state(t, recorded, torch.zeros(4, dtype=torch.bool))


def test_convert_prediction_matches_the_definitions():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    a = torch.tensor([0.9, 0.5, 0.01])
    s, n = a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)
    x_t = s * x0 + n * eps
    v = s * eps - n * x0
    torch.testing.assert_close(convert_prediction(eps, x_t, a, "epsilon", "v_prediction"), v)
    torch.testing.assert_close(convert_prediction(v, x_t, a, "v_prediction", "epsilon"), eps)
    assert convert_prediction(eps, x_t, a, "epsilon", "epsilon") is eps


def test_storage_is_bounded_and_reported():
    # toy world default: 4 states, latents 4x16x16, fp16, x_t + prediction
    toy = trajectory_storage(4, (4, 16, 16), 2000)
    assert toy == {"states_per_image": 4, "bytes_per_image": 4 * 2 * 2 * 1024, "bytes_total": 2000 * 16384}
    sd = trajectory_storage(4, (4, 64, 64), 5000)
    assert sd["bytes_per_image"] == 262144 and sd["bytes_total"] == 5000 * 262144


class _Linear(torch.nn.Module):
    """A stand-in denoiser with the UNet call signature: out = x * w + mean(ehs) (for the recorder's own test)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x, t, encoder_hidden_states, down_block_additional_residuals=None, **kw):
        return (x * self.w + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1),)


def test_recorder_keeps_only_the_recorded_steps_and_the_conditional_prediction():
    unet = _Linear()
    emb = torch.arange(3, dtype=torch.float32).view(3, 1, 1).expand(3, 2, 2).contiguous()
    rec = TrajectoryRecorder([1, 3], unet, emb, guidance_scale=5.0)
    for i, t in enumerate([900, 600, 300, 0]):
        x = torch.full((3, 4, 2, 2), float(i))
        guided = torch.full((3, 4, 2, 2), -100.0)  # what a CFG sampler would pass: never recorded
        rec(i, torch.tensor(t), x, guided, slice(0, 3))
    out = rec.tensors()
    assert out["trajectory_timesteps"].tolist() == [600, 0]
    assert out["trajectory_latents"].shape == (3, 2, 4, 2, 2)
    assert out["trajectory_latents"].dtype == torch.float16
    assert out["trajectory_latents"][:, 0].unique().tolist() == [1.0]
    assert out["trajectory_latents"][:, 1].unique().tolist() == [3.0]
    # conditional prediction: x * 0.5 + mean(prompt embedding of that sample)
    expected = torch.tensor([0.5, 1.5, 2.5])
    torch.testing.assert_close(out["trajectory_predictions"][:, 0, 0, 0, 0].float(), expected)
    # without CFG the sampler's output is the conditional prediction and is kept as it is
    rec = TrajectoryRecorder([0], unet, emb, guidance_scale=1.0)
    rec(0, torch.tensor(5), torch.zeros(3, 4, 2, 2), torch.full((3, 4, 2, 2), 7.0), slice(0, 3))
    assert rec.tensors()["trajectory_predictions"].unique().tolist() == [7.0]
    with pytest.raises(RuntimeError, match="incomplete"):
        TrajectoryRecorder([0, 9], unet, emb, guidance_scale=1.0).tensors()
