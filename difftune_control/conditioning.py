"""What the UNet is conditioned on besides x_t and t: prompts through the base model's text encoder(s).

A :class:`PromptEncoder` turns prompts into ``(encoder_hidden_states, added)``: the cross-attention
context [N,L,D] and a dict of *added conditioning*, the per-prompt tensors that diffusers passes as
``added_cond_kwargs`` (empty for SD1.x/2.x; ``text_embeds`` and ``time_ids`` for SDXL, see
:mod:`difftune_control.sdxl`). Everything downstream (latent cache, memory bank, sampler, trainer)
carries the added dict next to the hidden states without knowing what is in it, and stores each
entry under its own name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

Added = dict[str, torch.Tensor]
"""Added conditioning: name -> per-sample tensor [N,...] (``added_cond_kwargs`` of the UNet/ControlNet)."""


@torch.no_grad()
def encode_prompts(
    text_encoder, tokenizer, prompts: Sequence[str], device=None, batch_size: int = 64
) -> torch.Tensor:
    """Text-encoder last hidden states [N,L,D] for ``prompts`` (padded to the tokenizer's max length)."""
    device = device or text_encoder.device
    outs = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(
            list(prompts[start : start + batch_size]),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        outs.append(text_encoder(ids)[0])
    return torch.cat(outs)


class PromptEncoder:
    """SD1.x / SD2.x: one CLIP text encoder; its last hidden states, no added conditioning.

    Args:
        text_encoder (`CLIPTextModel`): the base model's text encoder.
        tokenizer (`CLIPTokenizer`): its tokenizer (prompts are padded to ``model_max_length``).
    """

    added_keys: tuple[str, ...] = ()
    """Names of the added-conditioning tensors this encoder produces (their order is irrelevant)."""

    def __init__(self, text_encoder, tokenizer) -> None:
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    def __call__(
        self, prompts: Sequence[str], device=None, batch_size: int = 64
    ) -> tuple[torch.Tensor, Added]:
        """``(encoder_hidden_states [N,L,D], added)`` for ``prompts``."""
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, device, batch_size), {}

    def negative(self, device=None) -> tuple[torch.Tensor, Added]:
        """The unconditional input of classifier-free guidance, batch 1: the empty prompt's embedding."""
        return self([""], device)

    def modules(self) -> list[torch.nn.Module]:
        """The text encoder(s), to place on a device and dtype."""
        return [self.text_encoder]

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def key(self) -> dict[str, Any]:
        """What the embeddings depend on besides the model id (part of cache keys)."""
        return {"tokenizer_max_length": int(self.tokenizer.model_max_length)}

    def bank_key(self) -> dict[str, Any]:
        """Entries for the memory bank's key; empty, so SD banks keep the key they always had."""
        return {}


def as_prompt_encoder(text_encoder, tokenizer=None) -> PromptEncoder:
    """``text_encoder`` itself when it is a :class:`PromptEncoder`, else one encoder with its tokenizer."""
    if isinstance(text_encoder, PromptEncoder):
        return text_encoder
    if tokenizer is None:
        raise ValueError("a text encoder needs its tokenizer (or pass a PromptEncoder)")
    return PromptEncoder(text_encoder, tokenizer)


def select_added(added: Mapping[str, torch.Tensor], index: Any) -> Added:
    """Every added tensor indexed along the batch dimension (a slice, indices or a mask)."""
    return {k: v[index] for k, v in added.items()}


def cfg_added(added: Mapping[str, torch.Tensor], negative: Mapping[str, torch.Tensor], n: int) -> Added:
    """Added conditioning of a CFG batch ``[unconditional; conditional]``; ``negative`` may have batch 1."""
    out = {}
    for k, v in added.items():
        neg = negative[k].to(v.device, v.dtype)
        neg = neg.expand(n, *neg.shape[1:]) if neg.shape[0] == 1 else neg
        out[k] = torch.cat([neg, v])
    return out


def move_added(added: Mapping[str, torch.Tensor], device=None, dtype: torch.dtype | None = None) -> Added:
    """Every added tensor on ``device`` (and floating ones in ``dtype``)."""
    return {
        k: v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
        for k, v in added.items()
    }


def added_kwargs(added: Mapping[str, torch.Tensor] | None) -> Added | None:
    """``added_cond_kwargs`` for a diffusers UNet/ControlNet call: None when there is nothing to add."""
    return dict(added) if added else None
