"""`TargetDataset`: rows checked up front, then image + hint transformed identically per sample.

Hints come from the conditioning column when the row has one; otherwise (the column is absent
or the row's cell is empty) they are extracted by ``hint_fn`` from the *already resized and
cropped* target image, so they are pixel-aligned by construction. Extraction runs on every
access; `difftune_control.data.cache.build_latent_cache` memoises extracted hints on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from difftune_control.data.columns import BadRowError, resolve_columns
from difftune_control.data.formats import open_source
from difftune_control.data.rows import RowChecker, check_aspect
from difftune_control.data.spec import FLAGS, DatasetSpec
from difftune_control.data.transforms import (
    Geometry,
    apply_geometry,
    check_hint_output,
    hint_to_tensor,
    image_size,
    image_to_tensor,
    open_image,
    plan_geometry,
    transform_pair,
)
from difftune_control.utils import derive_seed

HintFn = Callable[[Any], "torch.Tensor"]
"""Any callable RGB PIL image -> float tensor [3,H,W] in [0,1] (e.g. a `ConditionExtractor`)."""


def split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """``(index, draw seed)`` of a dataset key.

    The training loop's sampler gives ``(index, seed)`` with the seed derived from (run seed, epoch,
    index) (`difftune_control.training.runtime.IndexStream.keys`); a plain index draws from a seed derived from
    the index alone. Either way an item never touches torch's global random generator.
    """
    if isinstance(key, (tuple, list)):
        index, seed = key
        return int(index), int(seed)
    return int(key), derive_seed("item", int(key))


@dataclass
class Sample:
    """One prepared sample; tensors are None when not asked for."""

    index: int
    caption: str
    geometry: Geometry
    pixel_values: torch.Tensor | None  # [3,R,R] in [-1,1]
    conditioning_pixel_values: torch.Tensor | None  # [3,R,R] in [0,1]


class TargetDataset(Dataset):
    """The user's ControlNet dataset, checked up front and transformed on access.

    Items are ``{"pixel_values": float [3,R,R] in [-1,1], "conditioning_pixel_values": float
    [3,R,R] in [0,1], "caption": str, "index": int}``, where ``index`` is the position in this
    dataset and ``row_ids[index]`` the source row.

    Construction checks every row in one pass, without decoding an image
    (:class:`~difftune_control.data.rows.RowChecker`): columns exist, rows are not empty, captions are
    strings and not all empty, files exist inside the dataset folder, every image and hint header is
    readable and of a safe size, image and hint have the same aspect ratio. It raises one error listing
    every bad row (row, file line, column); with ``spec.skip_bad_rows`` it skips them instead, logging a
    count and the first reasons.

    Args:
        spec (`DatasetSpec`): where the data lives and how samples are prepared.
        hint_fn (`Callable`, *optional*): RGB PIL image -> float [3,H,W] in [0,1]; extracts the hint
            of every row without one, from the cropped target image.
        require_hints (`bool`, defaults to `True`): `False` keeps rows without a hint even when no
            ``hint_fn`` is given (to inspect captions or compute fingerprints); their items then fail.
    """

    def __init__(
        self, spec: DatasetSpec, hint_fn: HintFn | None = None, *, require_hints: bool = True
    ) -> None:
        if not isinstance(spec, DatasetSpec):
            raise TypeError(f"spec must be a DatasetSpec, got {type(spec).__name__}")
        if hint_fn is not None and not callable(hint_fn):
            raise TypeError(
                f"hint_fn must be callable (image -> float [3,H,W] in [0,1]), got {type(hint_fn).__name__}"
            )
        self.spec, self.hint_fn, self.require_hints = spec, hint_fn, require_hints
        self.source = open_source(spec)
        if len(self.source) == 0:
            raise ValueError(
                f"{self.source.description} has no rows; {FLAGS['source']} must point at a non-empty dataset"
            )
        self.columns = resolve_columns(
            self.source, spec, hints_optional=hint_fn is not None or not require_hints
        )
        checker = RowChecker(self.source, self.columns, spec, hint_fn, require_hints and hint_fn is None)
        rows = checker.check()  # every bad row reported at once (or skipped), before any decoding
        self.row_ids, self.captions, self.extracted = rows.row_ids, rows.captions, rows.extracted
        self.skipped, self.fingerprint = rows.skipped, rows.fingerprint

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def extracts_hints(self) -> bool:
        """Whether any row's hint comes from ``hint_fn``."""
        return any(self.extracted)

    @property
    def hints_for_every_row(self) -> bool:
        """Whether every row has a hint: from its file (the hint column, checked for every row) or extracted."""
        return self.hint_fn is not None or (self.columns.hint is not None and self.require_hints)

    def row_label(self, index: int) -> str:
        """How messages name item ``index``: its source row, file and line."""
        return self.source.row_label(self.row_ids[index])

    def load_sample(
        self,
        index: int,
        *,
        offsets: tuple[int, int] | None = None,
        flip: bool | None = None,
        with_image: bool = True,
        with_hint: bool = True,
        generator: torch.Generator | None = None,
    ) -> Sample:
        """Prepare item ``index`` with an optional fixed crop (as stored with cached latents).

        Args:
            index (`int`): position in this dataset.
            offsets (`tuple[int, int]`, *optional*): crop (top, left) in the resized image; default:
                centered or random per ``spec.center_crop``.
            flip (`bool`, *optional*): horizontal flip; default: random when ``spec.random_flip``.
            with_image (`bool`): return ``pixel_values`` (the image is decoded anyway if the hint is extracted).
            with_hint (`bool`): return ``conditioning_pixel_values``.
            generator (`torch.Generator`, *optional*): random source of a random crop and flip
                (default: torch's global RNG, which a DataLoader seeds per worker).

        Returns:
            `Sample`
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} rows")
        spec, cols, base = self.spec, self.columns, self.source.base_dir
        label = self.row_label(index)
        cells = self.source.row(self.row_ids[index])
        extract = self.extracted[index]
        need_image = with_image or (with_hint and extract)
        where = f"{label}, column '{cols.image}'"
        # transparent target pixels over white (as viewers show them), transparent hint pixels over black
        image = open_image(cells.get(cols.image), base, where, (255, 255, 255)) if need_image else None
        size = image.size if image is not None else image_size(cells.get(cols.image), base, where)
        hint = None
        if with_hint and not extract:
            hint = open_image(cells.get(cols.hint), base, f"{label}, column '{cols.hint}'")
            try:
                check_aspect(size, hint.size)
            except BadRowError as err:
                raise ValueError(f"{label}: {err}") from None
        if flip is None:
            flip = spec.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        geometry = plan_geometry(
            size,
            spec.resolution,
            center_crop=spec.center_crop,
            offsets=offsets,
            flip=flip,
            generator=generator,
        )
        if image is not None:
            image, hint = transform_pair(image, hint, geometry, spec.resolution, spec.hint_interpolation)
        elif hint is not None:
            hint = apply_geometry(hint, geometry, spec.resolution, spec.hint_interpolation)
        conditioning = None
        if with_hint and extract:
            if self.hint_fn is None:
                raise ValueError(f"{label}: no conditioning image and no hint function to extract one")
            try:
                out = self.hint_fn(image)
            except Exception as err:
                if hasattr(err, "add_note"):
                    err.add_note(f"while extracting the hint of {label}")
                raise
            conditioning = check_hint_output(out, spec.resolution, f"{label}, hint function {self.hint_fn!r}")
        elif hint is not None:
            conditioning = hint_to_tensor(hint)
        return Sample(
            index=index,
            caption=self.captions[index],
            geometry=geometry,
            pixel_values=image_to_tensor(image) if with_image else None,
            conditioning_pixel_values=conditioning,
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = split_key(key)
        sample = self.load_sample(index, generator=torch.Generator().manual_seed(seed))
        return {
            "pixel_values": sample.pixel_values,
            "conditioning_pixel_values": sample.conditioning_pixel_values,
            "caption": sample.caption,
            "index": index,
        }


def load_target_dataset(spec: DatasetSpec, hint_fn: HintFn | None = None) -> TargetDataset:
    """Open and check a target dataset in any supported layout.

    Args:
        spec (`DatasetSpec`): source, column names, resolution and crop mode.
        hint_fn (`Callable`, *optional*): any callable RGB PIL image -> float tensor [3,H,W] in [0,1]
            (e.g. a `ConditionExtractor`). It is called for rows without a conditioning image (the
            column is absent or the cell empty), on the image *after* resize and crop, so the hint is
            aligned with the target by construction. It runs on every access; `build_latent_cache`
            stores the extracted hints so they are computed once.

    Returns:
        `TargetDataset`

    Raises:
        FileNotFoundError: a missing dataset path or (without ``skip_bad_rows``) a missing image file.
        ValueError: unknown columns (the message lists the dataset's columns), an empty dataset, an
            empty caption column, or a bad row (named by row, file line and column).
    """
    return TargetDataset(spec, hint_fn)


def dataset_fingerprint(spec: DatasetSpec) -> str:
    """A short hash that changes when the dataset's rows or files change.

    It covers the metadata file's bytes (or the saved/parquet files' sizes and mtimes, or a hub
    dataset's fingerprint), the size and mtime of every image and hint file the kept rows refer to,
    which rows are kept, and the column choice. Rewriting any image changes it.

    Args:
        spec (`DatasetSpec`): the dataset.

    Returns:
        `str`: 32 hex digits; equals ``load_target_dataset(spec, hint_fn).fingerprint``.
    """
    return TargetDataset(spec, require_hints=False).fingerprint
