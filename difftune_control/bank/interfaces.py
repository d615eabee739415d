"""What the memory bank needs from the packages above it, handed in rather than imported.

The bank sits below the trainer and distillation in the data flow, so it never imports ``training/``,
``methods/`` or ``distill/``: the caller passes a base model with the attributes of
:class:`BankBaseModel` and, optionally, a :class:`BankExtras` (more work per generation batch, more
tensors per shard); a package whose extras add shard tensors registers their reader with
:func:`register_bank_extra`, which :class:`~difftune_control.bank.BankDataset` calls on load.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

import torch

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


class BankExtrasBatch(Protocol):
    """What a :class:`BankExtras` adds to one generation batch."""

    sampling: dict[str, Any]  # more keyword arguments of ``sample_images`` (e.g. a ControlNet and its hints)
    recorder: Callable[..., None] | None  # ``sample_images``' ``on_step`` callback
    hints: torch.Tensor | None  # uint8 [b,3,R,R] stored instead of the extracted hints


class BankExtras(Protocol):
    """Work a bank build does besides sampling the base model, and what it stores.

    :class:`difftune_control.distill.bank_extras.BankDistillation` is one (recorded reverse-trajectory
    states, a teacher ControlNet). Its manifest entry is the key's ``distillation`` entry.
    """

    @property
    def active(self) -> bool:
        """False when it changes nothing (then the build runs without it)."""
        ...

    def manifest_entry(self, scheduler_config: Any, sampler: str, num_inference_steps: int) -> dict:
        """Its part of the bank's key (``{}`` when inactive: the key is unchanged)."""
        ...

    def batch(
        self,
        unet: Any,
        prompt_embeds: torch.Tensor,
        prompt_indices: list[int],
        key: dict,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> BankExtrasBatch:
        """The extras of one batch whose samples use prompts ``prompt_indices`` of the list (key: the bank's)."""
        ...

    def merge(self, batches: list[Any]) -> dict[str, torch.Tensor]:
        """The shard tensors it adds, from the shard's batches (``{}`` when none)."""
        ...

    def contents(self, first_shard: dict[str, Any], num_samples: int) -> dict[str, Any]:
        """Entries for the manifest's ``contents`` once the bank is complete (``{}`` when none)."""
        ...


ShardReader = Callable[[list[dict[str, Any]], dict], Any]
"""``read(shards, key)``: a bank-wide value from every loaded shard (dicts of tensors), or None."""

_SHARD_READERS: dict[str, tuple[str, ShardReader]] = {}


def register_bank_extra(name: str, prefix: str, read: ShardReader) -> None:
    """Register the reader of the shard tensors named ``prefix...`` (``BankDataset.extras[name]`` on load).

    Args:
        name (`str`): lowercase identifier, unique (``"trajectory"``).
        prefix (`str`): the tensor names it owns start with it (``"trajectory_"``); prefixes do not overlap.
        read (`ShardReader`): ``read(shards, key) -> value``, None when the bank holds none of its tensors.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"bank extra name must be a lowercase identifier: {name!r}")
    if name in _SHARD_READERS:
        raise ValueError(f"bank extra {name!r} is already registered")
    clash = [n for n, (p, _) in _SHARD_READERS.items() if p.startswith(prefix) or prefix.startswith(p)]
    if not prefix or clash:
        raise ValueError(f"bank extra {name!r}: tensor prefix {prefix!r} is empty or overlaps {clash}")
    _SHARD_READERS[name] = (prefix, read)


def read_bank_extras(shards: list[dict[str, Any]], key: dict, own: set[str], where: str) -> dict[str, Any]:
    """The registered readers' values for a loaded bank (only those not None).

    ``own``: the tensor names the bank reads itself. A tensor that neither it nor a registered reader
    owns raises `ValueError` (the package that wrote it registers its reader when imported).
    """
    unread = sorted(
        k for k in shards[0] if k not in own and not any(k.startswith(p) for p, _ in _SHARD_READERS.values())
    )
    if unread:
        raise ValueError(
            f"memory bank at {where}: its shards hold {unread}, which no registered bank extra reads "
            f"(registered: {sorted(_SHARD_READERS)}); import the package that built it first "
            "(difftune_control.distill for trajectory_*)"
        )
    values = {name: read(shards, key) for name, (_, read) in _SHARD_READERS.items()}
    return {name: value for name, value in values.items() if value is not None}
