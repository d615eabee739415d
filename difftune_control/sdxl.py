"""Stable Diffusion XL: what sets it apart from SD1.x / SD2.x, in one place.

SDXL (Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis",
2023) differs from SD1.x/2.x, for a ControlNet trainer, in three ways:

- two text encoders: a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``; the cross-attention
  context is both encoders' *penultimate* hidden states concatenated ([N,77,768+1280]), and the second
  encoder's projected pooled output ([N,1280]) is the ``text_embeds`` added conditioning;
- micro-conditioning (section 2.2 of the paper): ``time_ids`` = (original height, original width,
  crop top, crop left, target height, target width), embedded next to ``text_embeds``. Training rows
  get ``(R, R, --crops_coords_top_left_h, --crops_coords_top_left_w, R, R)`` as diffusers'
  ``train_controlnet_sdxl.py`` gives them; sampling (memory bank, detector, validation) uses
  ``(R, R, 0, 0, R, R)``, what ``StableDiffusionXLPipeline`` uses for an R x R image;
- a VAE that overflows in fp16: kept in fp32 under fp16 unless ``--pretrained_vae_model_name_or_path``
  names an fp16-safe one (as the diffusers example does).

The UNet and ControlNet take the added conditioning as ``added_cond_kwargs``; the rest of the package
carries it as an opaque dict (:mod:`difftune_control.conditioning`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from difftune_control.conditioning import Added, PromptEncoder

logger = logging.getLogger(__name__)

ModelKind = Literal["sd1", "sd2", "sdxl"]
SDXL_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def kind_from_unet_config(config: Mapping[str, Any]) -> ModelKind:
    """The model family a UNet config belongs to.

    ``sdxl`` when the UNet takes SDXL's added conditioning (``addition_embed_type == "text_time"``);
    ``sd2`` for a 1024-wide cross-attention context (OpenCLIP ViT-H); ``sd1`` otherwise (CLIP ViT-L,
    and every architecture with one text encoder and no added conditioning, the toy world included).
    """
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def detect_model_kind(path: str, revision: str | None = None) -> ModelKind:
    """Read ``unet/config.json`` of a diffusers pipeline (local folder or hub id) and classify it.

    Raises:
        FileNotFoundError: No readable ``unet/config.json`` (naming ``--pretrained_model_name_or_path``).
    """
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(path, subfolder="unet", revision=revision)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path {path!r}: cannot read unet/config.json to tell SD1.x, SD2.x "
            f"and SDXL apart ({err})"
        ) from err
    return kind_from_unet_config(config)


def add_time_ids(
    original_size: tuple[int, int], crops_coords_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning vector [6] (float32): original (h, w), crop top-left (h, w), target (h, w)."""
    return torch.tensor([*original_size, *crops_coords_top_left, *target_size], dtype=torch.float32)


class SDXLPromptEncoder(PromptEncoder):
    """SDXL's two text encoders plus its micro-conditioning for images of one size and crop.

    Args:
        text_encoder (`CLIPTextModel`), tokenizer (`CLIPTokenizer`): the first encoder.
        text_encoder_2 (`CLIPTextModelWithProjection`), tokenizer_2 (`CLIPTokenizer`): the second.
        size (`int`): image side R; original and target size are (R, R).
        crop (`tuple[int, int]`): crop top-left (h, w) in the time ids.
        force_zeros_negative (`bool`): the unconditional input of CFG is all zeros (hidden states and
            pooled), as ``StableDiffusionXLPipeline`` does with ``force_zeros_for_empty_prompt``.
    """

    added_keys = ("text_embeds", "time_ids")

    def __init__(
        self,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        *,
        size: int,
        crop: tuple[int, int] = (0, 0),
        force_zeros_negative: bool = True,
    ) -> None:
        super().__init__(text_encoder, tokenizer)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.size, self.crop = int(size), (int(crop[0]), int(crop[1]))
        self.force_zeros_negative = force_zeros_negative

    @property
    def time_ids(self) -> torch.Tensor:
        """[6]: ``(R, R, crop_h, crop_w, R, R)``."""
        return add_time_ids((self.size, self.size), self.crop, (self.size, self.size))

    @torch.no_grad()
    def __call__(
        self, prompts: Sequence[str], device=None, batch_size: int = 64
    ) -> tuple[torch.Tensor, Added]:
        """``(encoder_hidden_states [N,L,D1+D2], {"text_embeds": [N,P], "time_ids": [N,6]})``."""
        device = device or self.text_encoder.device
        hidden, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            states = []
            for encoder, tokenizer in (
                (self.text_encoder, self.tokenizer),
                (self.text_encoder_2, self.tokenizer_2),
            ):
                ids = tokenizer(
                    chunk,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(device)
                out = encoder(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
            hidden.append(torch.cat(states, dim=-1))  # [n,L,D1+D2]
            pooled.append(out.text_embeds)  # the second encoder's projected pooled output [n,P]
        ehs, text_embeds = torch.cat(hidden), torch.cat(pooled)
        time_ids = self.time_ids.to(device=ehs.device, dtype=ehs.dtype).expand(len(prompts), 6).clone()
        return ehs, {"text_embeds": text_embeds, "time_ids": time_ids}

    def negative(self, device=None) -> tuple[torch.Tensor, Added]:
        ehs, added = self([""], device)
        if self.force_zeros_negative:
            ehs, added = (
                torch.zeros_like(ehs),
                {**added, "text_embeds": torch.zeros_like(added["text_embeds"])},
            )
        return ehs, added

    def modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def key(self) -> dict[str, Any]:
        return {
            **super().key(),
            "text_encoders": [_encoder_identity(self.text_encoder), _encoder_identity(self.text_encoder_2)],
            "tokenizer_2_max_length": int(self.tokenizer_2.model_max_length),
            "time_ids": [int(x) for x in self.time_ids.tolist()],
        }

    def bank_key(self) -> dict[str, Any]:
        return {
            "text_encoders": self.key()["text_encoders"],
            "time_ids": [int(x) for x in self.time_ids.tolist()],
            "negative": "zeros" if self.force_zeros_negative else "empty prompt",
        }


def _encoder_identity(encoder) -> dict[str, Any]:
    """Class, source and widths of a text encoder: what its embeddings depend on besides the weights."""
    config = encoder.config
    return {
        "class": type(encoder).__name__,
        "name_or_path": str(getattr(config, "_name_or_path", "")),
        "hidden_size": int(config.hidden_size),
        "layers": int(config.num_hidden_layers),
        "projection_dim": int(getattr(config, "projection_dim", 0) or 0),
    }


def load_sdxl_text_encoders(path: str, **kw) -> tuple[Any, Any, bool]:
    """``(text_encoder_2, tokenizer_2, force_zeros_for_empty_prompt)`` of an SDXL pipeline folder or hub id.

    ``kw`` goes to ``from_pretrained`` of the encoder (``revision``, ``variant``, ``torch_dtype``).
    """
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=kw.get("revision"))
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
    return text_encoder_2, tokenizer_2, _force_zeros(path)


def _force_zeros(path: str) -> bool:
    """``force_zeros_for_empty_prompt`` from ``model_index.json`` (True, the pipeline's default, if absent)."""
    index = Path(path) / "model_index.json"
    if index.is_file():
        return bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True))
    return True


def missing_subfolders(path: str | Path) -> list[str]:
    """The subfolders of a local SDXL pipeline folder that are missing (empty when complete)."""
    return [name for name in SDXL_SUBFOLDERS if not (Path(path) / name).is_dir()]


def vae_dtype(weight_dtype: torch.dtype, separate_vae: bool) -> torch.dtype:
    """The SDXL VAE's dtype: float32 under fp16 unless a separate (fp16-safe) VAE was given.

    SDXL's VAE overflows in float16 (NaN latents and black images); bfloat16 has float32's range.
    """
    return torch.float32 if weight_dtype == torch.float16 and not separate_vae else weight_dtype
