"""What the memory bank needs from the packages above it, handed in rather than imported.

The bank sits below the trainer in the data flow, so it never imports ``training/`` or ``methods/``:
the caller passes a base model with the attributes of :class:`BankBaseModel`.
"""

from __future__ import annotations

from typing import Any, Protocol

from difftune_control.conditioning import PromptEncoder


class BankBaseModel(Protocol):
    """What the bank needs of the frozen base model, already on its device.

    :class:`difftune_control.training.runtime.BaseModel` is one; anything with these attributes will do.
    """

    unet: Any
    vae: Any
    model_id: str  # path or hub id; with ``revision`` and ``variant`` part of the bank's key
    revision: str | None
    variant: str | None

    @property
    def scheduler_config(self) -> dict: ...

    def prompt_encoder(self, size: int | None = None, crop: tuple[int, int] = (0, 0)) -> PromptEncoder:
        """The text side as a :class:`PromptEncoder` (SDXL: with the micro-conditioning of ``size``)."""
        ...
