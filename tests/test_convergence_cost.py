"""What the detector costs at its defaults, against a plain training loop on the same models.

The training side is the fastest loop there can be (latents and text embeddings given, no data
loading, no logging), so the measured share is an upper bound of what a real run pays. The
evaluation side is `ConvergenceMonitor.evaluate` itself: K samples with the detector's sampler
steps, one batched re-extraction, scoring, and the samples file written.

- `toy`: the toy world's architecture (DESIGN.md section 4) at 64 px, batch 64, K = 16,
  10 sampler steps, every 50 steps, with a 1.2M-parameter conv annotator as the extractor.
- `sd15`: SD1.5-sized UNet, VAE and ControlNet at 512 px, batch 4, K = 8, 10 sampler steps,
  every 500 steps, with a DPT-Large depth model (random weights) as the extractor.

Run: `pytest tests/test_convergence_cost.py -m gpu -s` (GPU) or `-m slow -s` (toy scale on CPU).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from difftune_control.config import DetectorConfig
from difftune_control.convergence import ConvergenceMonitor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _aligned_rmse(hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Depth metric: RMSE of the first channel after per-image least-squares scale and shift."""
    a = other[:, 0].flatten(1).float()
    b = hint[:, 0].flatten(1).float()
    design = torch.stack([a, torch.ones_like(a)], -1)  # [B,N,2]
    coef = torch.linalg.lstsq(design, b[..., None]).solution  # [B,2,1]
    return ((design @ coef)[..., 0] - b).pow(2).mean(1).sqrt()


class ConvAnnotator(torch.nn.Module):
    """A small conv encoder-decoder depth annotator (about the toy world's 1.2M parameters)."""

    def __init__(self, width: int = 96) -> None:
        super().__init__()
        w = width
        self.enc = torch.nn.Sequential(
            torch.nn.Conv2d(3, w // 2, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(w // 2, w, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(2 * w, 2 * w, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(2 * w, 2 * w, 3, padding=1), torch.nn.SiLU(),
        )  # fmt: skip
        self.dec = torch.nn.Sequential(
            torch.nn.Upsample(scale_factor=4, mode="bilinear"),
            torch.nn.Conv2d(2 * w, w, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(w, 1, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(self.enc(x * 2 - 1)))


class ModelExtractor:
    """Wraps a depth network into the extractor contract: [B,3,H,W] in [0,1] -> [B,3,H,W] hints."""

    def __init__(self, net: torch.nn.Module, size: int | None = None, dpt: bool = False) -> None:
        self.net, self.size, self.dpt = net, size, dpt

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        inp = x if self.size is None else F.interpolate(x, size=(self.size, self.size), mode="bilinear")
        dtype = next(self.net.parameters()).dtype
        if self.dpt:
            out = self.net(pixel_values=(inp * 2 - 1).to(dtype)).predicted_depth[:, None]
            out = out - out.amin((2, 3), keepdim=True)
            out = out / out.amax((2, 3), keepdim=True).clamp_min(1e-6)
        else:
            out = self.net(inp.to(dtype))
        out = F.interpolate(out.float(), size=(h, w), mode="bilinear")
        return out.clamp(0, 1).repeat(1, 3, 1, 1)

    def dissimilarity(self, hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return _aligned_rmse(hint.to(other.device), other)


@dataclass
class Scale:
    name: str
    resolution: int
    batch: int
    every: int
    k: int
    text_dim: int


TOY = Scale("toy", resolution=64, batch=64, every=50, k=16, text_dim=128)
SD15 = Scale("sd15", resolution=512, batch=4, every=500, k=8, text_dim=768)


def build(scale: Scale, device: torch.device):
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    if scale.name == "toy":
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3, block_out_channels=(64, 128, 128), layers_per_block=1,
            cross_attention_dim=128, attention_head_dim=4,
        )  # fmt: skip
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 128), layers_per_block=1, latent_channels=4, sample_size=64,
        )  # fmt: skip
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))
        extractor = ModelExtractor(ConvAnnotator().to(device).eval())
    else:
        from transformers import DPTConfig, DPTForDepthEstimation

        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # SD1.5's layout
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        )  # fmt: skip
        controlnet = ControlNetModel.from_unet(unet)
        dpt = DPTForDepthEstimation(DPTConfig()).to(device).eval()  # DPT-Large layout, 384 px
        extractor = ModelExtractor(
            dpt.to(torch.bfloat16 if device.type == "cuda" else torch.float32), 384, True
        )
    frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet = unet.to(device, frozen_dtype).requires_grad_(False).eval()
    vae = vae.to(device, frozen_dtype).requires_grad_(False).eval()
    controlnet = controlnet.to(device).train()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").config
    return unet, vae, controlnet, sched, extractor


def measure(scale: Scale, device: torch.device, train_steps: int, evals: int, tmp: Path) -> dict:
    unet, vae, controlnet, sched, extractor = build(scale, device)
    n, r, lat = scale.batch, scale.resolution, scale.resolution // 8 if scale.name == "sd15" else 16
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, lat, lat, generator=g).to(device)
    text = torch.randn(n, 77, scale.text_dim, generator=g).to(device)
    hints = torch.rand(n, 3, r, r, generator=g).to(device)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, fused=device.type == "cuda")
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def train_step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (n,), device=device)
        with amp:
            down, mid = controlnet(
                latents, t, encoder_hidden_states=text, controlnet_cond=hints, return_dict=False
            )
            pred = unet(
                latents + noise, t, encoder_hidden_states=text.to(unet.dtype),
                down_block_additional_residuals=[d.to(unet.dtype) for d in down],
                mid_block_additional_residual=mid.to(unet.dtype), return_dict=False,
            )[0]  # fmt: skip
        F.mse_loss(pred.float(), noise).backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        train_step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(train_steps):
        train_step()
    _sync(device)
    step_s = (time.perf_counter() - start) / train_steps

    k = scale.k
    steps = 8 if scale.name == "toy" else 10  # the resolved defaults (config.resolve_defaults); CFG 1
    cfg = DetectorConfig(
        convergence_every=scale.every, convergence_samples=k, convergence_num_inference_steps=steps
    )
    images = torch.rand(k, 3, r, r, generator=g)
    monitor = ConvergenceMonitor(
        cfg, extractor, torch.randn(k, 77, scale.text_dim, generator=g).to(device), extractor(images.to(device)).cpu(),
        images, prompts=[f"prompt {i}" for i in range(k)], run_dir=tmp,
    )  # fmt: skip
    first = monitor.evaluate(0, unet, vae, controlnet, sched)[0]["eval_seconds"]  # includes d0 and d_floor
    times = []
    for i in range(evals):
        _sync(device)
        start = time.perf_counter()
        rec = monitor.evaluate((i + 1) * scale.every, unet, vae, controlnet, sched)[0]
        _sync(device)
        times.append(time.perf_counter() - start)
        assert rec["eval_seconds"] <= times[-1] + 1e-3
    eval_s = statistics.median(times)
    share = eval_s / (eval_s + scale.every * step_s)
    result = {
        "scale": scale.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_step_s": step_s,
        "images_per_s": n / step_s,
        "eval_s": eval_s,
        "first_eval_s": first,
        "every": scale.every,
        "k": k,
        "share": share,
    }
    print(
        f"\n[detector cost] {scale.name} on {result['device']}: train step {1e3 * step_s:.1f} ms "
        f"({n / step_s:.0f} img/s, batch {n}); evaluation (K={k}, 10 steps) {1e3 * eval_s:.0f} ms "
        f"(first, with d0 + d_floor: {1e3 * first:.0f} ms); every {scale.every} steps -> "
        f"{100 * share:.2f}% of training time"
    )
    return result


pytestmark = pytest.mark.filterwarnings("ignore:convergence detector. d0")  # random weights: no gap


@pytest.mark.slow
def test_cost_toy_scale_on_cpu(tmp_path):
    result = measure(TOY, torch.device("cpu"), train_steps=3, evals=2, tmp=tmp_path)
    assert result["share"] < 0.10


@pytest.mark.gpu
def test_cost_toy_scale_on_gpu(tmp_path):
    result = measure(TOY, torch.device("cuda"), train_steps=40, evals=5, tmp=tmp_path)
    assert result["share"] < 0.10


@pytest.mark.gpu
def test_cost_sd15_scale_on_gpu(tmp_path):
    result = measure(SD15, torch.device("cuda"), train_steps=20, evals=3, tmp=tmp_path)
    assert result["share"] < 0.03
