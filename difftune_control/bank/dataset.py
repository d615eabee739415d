"""Loading a memory bank: ``BankDataset`` (rows with posterior draws) and ``load_bank``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from difftune_control.bank.interfaces import read_bank_extras
from difftune_control.bank.manifest import (
    MANIFEST,
    PROGRESS,
    manifest_hash,
    read_json,
    shard_ranges,
)
from difftune_control.bank.rows import BankRows
from difftune_control.utils import hint_to_float

logger = logging.getLogger(__name__)

_TENSORS = ("latents", "latent_std", "encoder_hidden_states", "hints", "indices", "seeds")
"""The shard tensors every bank holds (besides its added conditioning and registered extras)."""


def load_shard(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        out: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        meta = f.metadata() or {}
    out["prompts"], out["bank_key"] = json.loads(meta["prompts"]), meta.get("bank_key")
    return out


class BankDataset(torch.utils.data.Dataset):
    """A complete memory bank, all shards in memory.

    Items have the keys of the target-data cache, so the trainer treats both alike:
    ``latents`` float32 [C,h,w], ``encoder_hidden_states`` float32 [L,D],
    ``conditioning_pixel_values`` float32 [3,R,R] in [0,1], ``caption`` str, ``index`` int, and the
    added conditioning the bank was generated with (SDXL: ``text_embeds`` [P], ``time_ids`` [6]).

    Attributes:
        bank_dir (`Path`), manifest (`dict`, the key), contents (`dict`), latents (`Tensor` f32),
        encoder_hidden_states (`Tensor` f16/f32), hints (`Tensor` uint8), prompts (`list[str]`),
        indices (`Tensor` int64), seeds (`Tensor` int64), rows (`BankRows`: the tensors training batches
        are drawn from, see :meth:`batch`), extras (`dict`: what registered bank extras read
        from the shards, e.g. ``"trajectory"``, the recorded reverse-trajectory states of
        :mod:`difftune_control.distill`; absent when the bank holds none).
    """

    def __init__(self, bank_dir: str | Path):
        self.bank_dir = Path(bank_dir)
        stored = read_json(self.bank_dir / MANIFEST)
        if stored is None:
            progress = read_json(self.bank_dir / PROGRESS)
            if progress is None:
                raise FileNotFoundError(f"--bank_dir: {self.bank_dir} holds no memory bank (no {MANIFEST})")
            n = len(list(self.bank_dir.glob("shard-*.safetensors")))
            total = len(shard_ranges(progress["key"]["size"], progress["key"]["shard_size"]))
            raise FileNotFoundError(
                f"--bank_dir: the memory bank at {self.bank_dir} is incomplete ({n} of {total} shards); "
                "run `difftune bank` (or `difftune train`) with the same settings to resume it"
            )
        self.manifest, self.contents = stored["key"], stored["contents"]
        missing = [s for s in self.contents["shards"] if not (self.bank_dir / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"--bank_dir: the memory bank at {self.bank_dir} lacks shards {missing[:5]}; "
                "run `difftune bank` with the same settings to regenerate them"
            )
        shards = [load_shard(self.bank_dir / s) for s in self.contents["shards"]]
        foreign = [
            n
            for n, s in zip(self.contents["shards"], shards)
            if s["bank_key"] != manifest_hash(self.manifest)
        ]
        if foreign:
            raise ValueError(
                f"memory bank at {self.bank_dir}: shards {foreign[:5]} belong to another bank; "
                "run `difftune bank` with the same settings to regenerate them"
            )
        self.latents = torch.cat([s["latents"] for s in shards])
        self.latent_std = torch.cat([s["latent_std"] for s in shards])  # fp16: the posterior's spread
        embeds = [s["encoder_hidden_states"] for s in shards]
        if len({e.dtype for e in embeds}) > 1:  # a shard kept fp32 because fp16 overflowed
            embeds = [e.float() for e in embeds]
        self.encoder_hidden_states = torch.cat(embeds)
        self.added_keys: tuple[str, ...] = tuple(self.contents.get("added_conditioning", ()))
        self.added = {k: torch.cat([s[k].float() for s in shards]) for k in self.added_keys}
        self.hints = torch.cat([s["hints"] for s in shards])
        self.indices = torch.cat([s["indices"] for s in shards])
        self.seeds = torch.cat([s["seeds"] for s in shards])
        self.prompts = [p for s in shards for p in s["prompts"]]
        self.rows = BankRows(
            self.latents,
            self.latent_std,
            self.encoder_hidden_states,
            self.hints,
            self.added,
            zero_hints=self.manifest.get("bank_hint") == "zero",
        )
        own = {*_TENSORS, *self.added_keys, "prompts", "bank_key"}
        self.extras = read_bank_extras(shards, self.manifest, own, str(self.bank_dir))
        if len(self.prompts) != self.contents["num_samples"]:
            raise ValueError(
                f"memory bank at {self.bank_dir}: {len(self.prompts)} samples in the shards, "
                f"manifest says {self.contents['num_samples']}; delete the folder to rebuild it"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "latents": self.latents[i].float(),
            "encoder_hidden_states": self.encoder_hidden_states[i].float(),
            **{k: v[i] for k, v in self.added.items()},
            "conditioning_pixel_values": hint_to_float(self.hints[i]),
            "caption": self.prompts[i],
            "index": int(self.indices[i]),
        }

    def batch(
        self,
        indices: torch.Tensor,
        device: torch.device | str | None = None,
        posterior_generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The rows ``indices`` stacked, on ``device``: the same values as ``__getitem__``, without a Python loop.

        With ``posterior_generator`` the latents are a draw from each sample's VAE posterior (mean + std *
        noise, the noise from that CPU generator), as target rows are; else the posterior mean. Hints
        travel as uint8 and become float on the device (a quarter of the transfer); a zero-hint bank's
        are made there. See :class:`~difftune_control.bank.rows.BankRows` for what stays on the device.
        """
        return self.rows.batch(indices, device, posterior_generator=posterior_generator)

    def images(self, vae, n: int = 16) -> torch.Tensor:
        """The first ``n`` bank images, decoded with ``vae``: float32 [n,3,R,R] in [0,1] on the VAE's device."""
        from difftune_control.validation import decode_latents

        return decode_latents(vae, self.latents[:n].to(vae.device))


def load_bank(bank_dir: str | Path) -> BankDataset:
    """Load a complete memory bank (raises `FileNotFoundError` naming what is missing otherwise)."""
    return BankDataset(bank_dir)
