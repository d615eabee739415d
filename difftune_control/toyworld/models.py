"""Model definitions of the toy world: the tiny SD-architecture parts and the annotator network.

The base model uses the real diffusers / transformers classes (``AutoencoderKL``,
``CLIPTextModel``, ``UNet2DConditionModel``, a DDIM scheduler with Stable Diffusion 1.5's noise
schedule), so every code path that loads SD 1.5 loads it. The annotators are a small conv U-Net
(:class:`ToyAnnotator`) with one head per task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

AnnotatorKind = Literal["depth", "normal", "segmentation"]
ANNOTATOR_KINDS: tuple[str, ...] = ("depth", "normal", "segmentation")
_OUT_CHANNELS = {"depth": 1, "normal": 3, "segmentation": 6}

SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
"""Stable Diffusion 1.5's training noise schedule, as a diffusers scheduler config."""


def make_vae(resolution: int = 64):
    """The toy world's ``AutoencoderKL``: channels (32, 64, 128), 1 layer per block, x4 downsampling.

    Args:
        resolution (`int`, defaults to 64): ``sample_size`` recorded in the config.

    Returns:
        `diffusers.AutoencoderKL`: randomly initialised (4 latent channels; 64 px -> 4 x 16 x 16).
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
    )


def make_text_encoder(vocab_size: int, bos_token_id: int, eos_token_id: int, max_length: int = 77):
    """The toy world's ``CLIPTextModel``: 4 layers, width 128, 4 heads (pad = eos, as SD 1.5).

    Args:
        vocab_size (`int`): the tokenizer's size.
        bos_token_id (`int`): id of ``<|startoftext|>``.
        eos_token_id (`int`): id of ``<|endoftext|>`` (also the padding id).
        max_length (`int`, defaults to 77): number of position embeddings.

    Returns:
        `transformers.CLIPTextModel`: randomly initialised.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        projection_dim=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return CLIPTextModel(config)


def make_unet(latent_size: int = 16, cross_attention_dim: int = 128):
    """The toy world's ``UNet2DConditionModel``: channels (64, 128, 128), cross-attention everywhere.

    Args:
        latent_size (`int`, defaults to 16): ``sample_size`` (latent side for 64 px images).
        cross_attention_dim (`int`, defaults to 128): the text encoder's width.

    Returns:
        `diffusers.UNet2DConditionModel`: randomly initialised, epsilon prediction.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers reads this as the number of heads (as SD 1.5's 8)
        norm_num_groups=32,
    )


def make_scheduler():
    """A ``DDIMScheduler`` with Stable Diffusion 1.5's betas (``SD15_SCHEDULER``)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD15_SCHEDULER)


@dataclass
class AnnotatorConfig:
    """Shape of a :class:`ToyAnnotator`."""

    kind: str = "depth"
    """Task: ``depth``, ``normal`` or ``segmentation``."""
    channels: tuple[int, ...] = (32, 64, 96, 128)
    """Width at full, 1/2, 1/4 and 1/8 resolution."""

    def __post_init__(self) -> None:
        if self.kind not in ANNOTATOR_KINDS:
            raise ValueError(f"annotator kind must be one of {ANNOTATOR_KINDS}, got {self.kind!r}")
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 4:
            raise ValueError(f"annotator channels must have 4 entries, got {self.channels}")

    def to_dict(self) -> dict:
        return asdict(self)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(8, c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.GroupNorm(8, c_out),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ToyAnnotator(nn.Module):
    """Small conv U-Net that reads a toy-world render and predicts depth, normals or classes.

    Input: float ``[B, 3, H, W]`` RGB in [0, 1], ``H`` and ``W`` multiples of 8. Output:
    ``depth`` -> ``[B, 1, H, W]`` normalised inverse depth in [0, 1]; ``normal`` -> ``[B, 3, H, W]``
    unit normals in OpenGL camera space; ``segmentation`` -> logits ``[B, 6, H, W]``.
    The bottleneck adds a global-average feature, so per-image normalisation (depth) can be learnt.
    """

    def __init__(self, config: AnnotatorConfig) -> None:
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.channels
        self.stem = _ResBlock(3, c0)
        self.down = nn.ModuleList(
            [nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in ((c0, c1), (c1, c2), (c2, c3))]
        )
        self.enc = nn.ModuleList([_ResBlock(c, c) for c in (c1, c2, c3)])
        self.context = nn.Sequential(nn.Linear(c3, c3), nn.SiLU(), nn.Linear(c3, c3))
        self.dec = nn.ModuleList([_ResBlock(a + b, b) for a, b in ((c3, c2), (c2, c1), (c1, c0))])
        self.head = nn.Conv2d(c0, _OUT_CHANNELS[config.kind], 1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        if rgb.ndim != 4 or rgb.shape[1] != 3 or rgb.shape[2] % 8 or rgb.shape[3] % 8:
            raise ValueError(
                f"ToyAnnotator expects [B, 3, H, W] with H, W multiples of 8, got {tuple(rgb.shape)}"
            )
        x = self.stem(rgb * 2.0 - 1.0)
        skips = [x]
        for down, enc in zip(self.down, self.enc):
            x = enc(down(x))
            skips.append(x)
        x = x + self.context(x.mean(dim=(2, 3)))[:, :, None, None]
        for dec, skip in zip(self.dec, reversed(skips[:-1])):
            x = torch.nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = dec(torch.cat([x, skip], dim=1))
        out = self.head(x)
        if self.config.kind == "depth":
            return torch.sigmoid(out)
        if self.config.kind == "normal":
            return torch.nn.functional.normalize(out, dim=1)
        return out
