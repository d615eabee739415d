"""`CachedTargetDataset`: a `TargetDataset` served from the latents, embeddings and hints on disk."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from difftune_control.data.dataset import TargetDataset, split_key
from difftune_control.utils import hint_to_float

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"

LATENTS_NOTE = (
    "latent_mean = (posterior mean - shift_factor) * scaling_factor, latent_std = posterior std * scaling_factor; "
    "a sample is latent_mean + latent_std * N(0, I)"
)


def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` of a cache folder, or `None` when absent or unreadable (logged)."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("latent cache %s: unreadable manifest (%s); rebuilding", cache_dir, err)
        return None


class CachedTargetDataset(Dataset):
    """A `TargetDataset` served from a complete latent cache.

    Items are ``{"latents": [4,r,r], "encoder_hidden_states": [L,D], "conditioning_pixel_values":
    [3,R,R] in [0,1], "caption": str, "index": int}`` (float32), plus the added conditioning the cache
    was built with (SDXL: ``text_embeds`` [P], ``time_ids`` [6]). Latents are a draw from the stored
    posterior, or its mean with ``sample_latents=False``; the draw's noise comes from the key's seed
    (``dataset[(index, seed)]``, see `split_key`), so one key always gives the same latents. Hints come from the
    cache (extracted, or decoded from their files once when the cache was built), else (a cache built
    before hint files were stored, or rows without hints) from the hint files with the crop stored per row.

    Args:
        cache_dir (`str` or `Path`): a folder completed by `build_latent_cache`.
        dataset (`TargetDataset`): the dataset it was built from (captions, hint files).
        sample_latents (`bool`, defaults to `True`): sample the posterior instead of returning its mean.

    Attributes:
        compact_hints (`bool`): hints stored in the cache are returned as they are stored, uint8 [3,R,R]
            in [0, 255] (a quarter of the float bytes through the loader's workers and the host-to-device
            copy; the trainer divides by 255 on the device, the same float32 values). Set by the training
            run for its loader; ``False`` (float in [0,1]) everywhere else.
    """

    compact_hints: bool = False

    def __init__(self, cache_dir: str | Path, dataset: TargetDataset, *, sample_latents: bool = True) -> None:
        self.cache_dir = Path(cache_dir)
        manifest = read_manifest(self.cache_dir)
        if manifest is None or not manifest.get("complete"):
            raise FileNotFoundError(
                f"no complete latent cache in {self.cache_dir}; build it with build_latent_cache"
            )
        if manifest["key"]["dataset_fingerprint"] != dataset.fingerprint or manifest["key"][
            "num_rows"
        ] != len(dataset):
            raise ValueError(
                f"latent cache {self.cache_dir} was built for another version of {dataset.source.description} "
                f"(dataset fingerprint {manifest['key']['dataset_fingerprint']} != {dataset.fingerprint}); rebuild it"
            )
        self.manifest, self.dataset, self.sample_latents = manifest, dataset, sample_latents
        self.shard_size = int(manifest["key"]["shard_size"])
        self.build_stats: dict[str, Any] = manifest.get("build_stats", {})
        from safetensors.torch import load_file

        self.added_keys: tuple[str, ...] = tuple(manifest.get("added_conditioning", ()))
        empty = load_file(str(self.cache_dir / EMPTY_PROMPT))
        self.empty_prompt_embedding: torch.Tensor = empty["embedding"][
            0
        ].float()  # [L,D], the embedding of ""
        self.empty_prompt_added: dict[str, torch.Tensor] = {k: empty[k][0].float() for k in self.added_keys}
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # safetensors handles stay in the process that opened them
        return state

    def _shard(self, k: int) -> Any:
        from safetensors import safe_open

        if k not in self._handles:
            self._handles[k] = safe_open(
                str(self.cache_dir / self.manifest["shards"][k]["file"]), framework="pt"
            )
        return self._handles[k]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = split_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} rows")
        shard, j = self._shard(index // self.shard_size), index % self.shard_size
        mean = shard.get_slice("latent_mean")[j : j + 1][0].float()
        latents = mean
        if self.sample_latents:
            eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))  # not the global RNG
            latents = mean + shard.get_slice("latent_std")[j : j + 1][0].float() * eps
        if "hints" in shard.keys():
            hint = shard.get_slice("hints")[j : j + 1][0]
            hint = hint if self.compact_hints else hint_to_float(hint)
        else:
            top, left = shard.get_slice("crop_top_left")[j : j + 1][0].tolist()
            flip = bool(shard.get_slice("flip")[j : j + 1][0])
            sample = self.dataset.load_sample(index, offsets=(top, left), flip=flip, with_image=False)
            hint = sample.conditioning_pixel_values
        return {
            "latents": latents,
            "encoder_hidden_states": shard.get_slice("encoder_hidden_states")[j : j + 1][0].float(),
            **{k: shard.get_slice(k)[j : j + 1][0].float() for k in self.added_keys},
            "conditioning_pixel_values": hint,
            "caption": self.dataset.captions[index],
            "index": index,
        }
