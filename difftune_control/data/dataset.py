"""`TargetDataset`: rows checked up front, then image + hint transformed identically per sample.

Hints come from the conditioning column when the row has one; otherwise (the column is absent
or the row's cell is empty) they are extracted by ``hint_fn`` from the *already resized and
cropped* target image, so they are pixel-aligned by construction. Extraction runs on every
access; `difftune_control.data.cache.build_latent_cache` memoises extracted hints on disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from difftune_control.data.columns import BadRowError, caption_of, resolve_columns
from difftune_control.data.formats import MISSING, open_source
from difftune_control.data.spec import FLAGS, DatasetSpec
from difftune_control.data.transforms import (
    Geometry,
    apply_geometry,
    cell_path,
    check_hint_output,
    hint_to_tensor,
    image_size,
    image_to_tensor,
    is_empty,
    open_image,
    plan_geometry,
    same_aspect,
    transform_pair,
)
from difftune_control.utils import derive_seed

logger = logging.getLogger(__name__)

HintFn = Callable[[Any], "torch.Tensor"]
"""Any callable RGB PIL image -> float tensor [3,H,W] in [0,1] (e.g. a `ConditionExtractor`)."""

_SHOWN_REASONS = 5


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

    Construction checks every row in one pass, without decoding an image: columns exist, rows are
    not empty, captions are strings and not all empty, files exist inside the dataset folder, every
    image and hint header is readable and of a safe size, image and hint have the same aspect ratio.
    It raises one error listing every bad row (row, file line, column); with ``spec.skip_bad_rows``
    it skips them instead, logging a count and the first reasons.

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
        self.spec, self.hint_fn = spec, hint_fn
        self.source = open_source(spec)
        if len(self.source) == 0:
            raise ValueError(
                f"{self.source.description} has no rows; {FLAGS['source']} must point at a non-empty dataset"
            )
        self.columns = resolve_columns(
            self.source, spec, hints_optional=hint_fn is not None or not require_hints
        )
        self._require_hints = require_hints and hint_fn is None
        self.row_ids: list[int] = []
        self.captions: list[str] = []
        self.extracted: list[bool] = []
        self.skipped: list[tuple[int, str]] = []
        self._select_rows()
        self.fingerprint = self._fingerprint()

    # -- construction -----------------------------------------------------------------------
    def _select_rows(self) -> None:
        """One pass over the rows before any expensive work: every problem is found, then reported at once."""
        src, cols, spec = self.source, self.columns, self.spec
        captions = src.column_values(cols.caption)
        image_cells = self._cells(cols.image)
        hint_cells = self._cells(cols.hint) if cols.hint is not None else None
        self._stats: list[str] = []
        self._empty_hints: list[int] = []
        self._inside: str | None = None  # the dataset folder, symlinks resolved
        problems: list[BadRowError] = []
        limit = spec.max_samples or len(src)
        for row in range(len(src)):
            if len(self.row_ids) >= limit:
                break
            try:
                caption = caption_of(captions[row], cols.caption)
                extract = self._check_row(
                    row, image_cells[row], None if hint_cells is None else hint_cells[row]
                )
            except BadRowError as err:
                labelled = BadRowError(f"{src.row_label(row)}: {err}", err.missing_file)
                if spec.skip_bad_rows:
                    self.skipped.append((row, str(labelled)))
                else:
                    problems.append(labelled)
                continue
            self.row_ids.append(row)
            self.captions.append(caption)
            self.extracted.append(extract)
        if problems:
            raise _all_problems(problems, src.description)
        checked = len(self.row_ids) + len(self.skipped)
        reasons = "".join(f"\n  - {reason}" for _, reason in self.skipped[:_SHOWN_REASONS])
        if not self.row_ids:
            raise ValueError(
                f"all {checked} rows of {src.description} are bad ({FLAGS['skip_bad_rows']}); first reasons:{reasons}"
            )
        if self.skipped:
            logger.warning(
                "skipped %d of %d rows of %s (%s); first reasons:%s",
                len(self.skipped), checked, src.description, FLAGS["skip_bad_rows"], reasons,
            )  # fmt: skip
        if self._empty_hints and self.hint_fn is not None:
            shown = ", ".join(src.row_label(r) for r in self._empty_hints[:_SHOWN_REASONS])
            logger.warning(
                "%d of %d rows of %s have an empty '%s': their hints are extracted by %s (first: %s)",
                len(self._empty_hints), len(self.row_ids), src.description, cols.hint,
                getattr(self.hint_fn, "name", None) or type(self.hint_fn).__name__, shown,
            )  # fmt: skip
        if not any(c.strip() for c in self.captions):
            raise ValueError(
                f"caption column '{cols.caption}' is empty in all {len(self.captions)} rows of {src.description}; "
                f"choose the caption column with {FLAGS['caption_column']} (dataset columns: {', '.join(src.columns)})"
            )

    def _cells(self, column: str) -> list[Any]:
        """A column's cells when they are text (paths); for undecoded image columns, `True` where empty."""
        if self.source.column_is_text(column):
            return self.source.column_values(column)
        import pyarrow.compute as pc

        values = self.source.dataset.with_format("arrow")[column]  # type: ignore[attr-defined]
        values = values.combine_chunks() if hasattr(values, "combine_chunks") else values
        empty = pc.is_null(values)
        if hasattr(values, "field"):  # Image feature: struct<bytes, path>
            no_bytes = pc.fill_null(pc.equal(pc.binary_length(values.field("bytes")), 0), True)
            no_path = pc.fill_null(pc.equal(pc.utf8_length(values.field("path")), 0), True)
            empty = pc.or_(empty, pc.and_(no_bytes, no_path))
        return [bool(e) for e in empty.to_pylist()]

    @staticmethod
    def _is_empty_cell(cell: Any) -> bool:
        return cell is True if isinstance(cell, bool) else cell is MISSING or is_empty(cell)

    def _check_row(self, row: int, image: Any, hint: Any) -> bool:
        """Check one row from its cells and file headers (no decoding); return whether its hint is extracted.

        Image and hint must exist, stay inside the dataset folder (unless ``allow_external_paths``),
        have readable headers of a safe size and the same aspect ratio. A row without the hint column
        while others have it is an error; an empty hint cell means "extract" (counted in a warning).
        """
        cols = self.columns
        if self._is_empty_cell(image):
            raise BadRowError(f"no target image (column '{cols.image}' is empty)")
        if cols.hint is not None and hint is MISSING:
            raise BadRowError(
                f"no conditioning image: the row has no '{cols.hint}' while other rows do; give its path, or an "
                'empty value ("") to extract its hint with the condition\'s extractor'
            )
        extract = cols.hint is None or self._is_empty_cell(hint)
        if extract and self._require_hints:
            raise BadRowError(
                f"no conditioning image (column '{cols.hint}' is empty) and no hint function to extract one"
            )
        text_cells = isinstance(image, str) and (extract or isinstance(hint, str))
        cells = {cols.image: image, cols.hint: hint} if text_cells else self.source.row(row)
        size = self._header(cells.get(cols.image), cols.image)
        if not extract:
            self._check_aspect(size, self._header(cells.get(cols.hint), cols.hint))
        elif cols.hint is not None:
            self._empty_hints.append(row)
        return extract

    def _header(self, value: Any, column: str) -> tuple[int, int]:
        """(width, height) of a cell's image from its header; the file must lie inside the dataset folder."""
        base = self.source.base_dir
        path = cell_path(value, base)
        if path is not None and base is not None and not self.spec.allow_external_paths:
            if self._inside is None:
                self._inside = os.path.realpath(base)
            real = os.path.realpath(path)  # symlinks followed
            if not real.startswith(self._inside.rstrip(os.sep) + os.sep):
                raise BadRowError(
                    f"column '{column}': {_short_value(value)!r} resolves to {real}, outside the dataset "
                    f"folder {self._inside}; move the file into it, or pass {FLAGS['allow_external_paths']} to "
                    "read images from anywhere"
                )
        self._stat(path, column)
        try:
            return image_size(value, base, f"column '{column}'")
        except FileNotFoundError as err:
            raise BadRowError(str(err), missing_file=True) from None
        except ValueError as err:
            raise BadRowError(str(err)) from None

    def _stat(self, path: Any, column: str) -> None:
        if path is None:
            return
        try:
            stat = path.stat()
        except OSError:
            raise BadRowError(f"column '{column}': image file not found: {path}", missing_file=True) from None
        self._stats.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")

    def _check_aspect(self, size: tuple[int, int], hint_size: tuple[int, int]) -> None:
        if not same_aspect(size, hint_size):
            raise BadRowError(
                f"target image is {size[0]}x{size[1]} but conditioning image is {hint_size[0]}x{hint_size[1]}: "
                f"different aspect ratios ({size[0] / size[1]:.3f} vs {hint_size[0] / hint_size[1]:.3f}) would "
                f"misalign image and hint after resizing"
            )

    def _fingerprint(self) -> str:
        spec = self.spec
        h = hashlib.sha256()
        for part in [
            *self.source.identity(),
            repr((self.columns.image, self.columns.hint, self.columns.caption)),
            repr((spec.split, spec.dataset_config_name, spec.max_samples, spec.skip_bad_rows)),
            repr(self.row_ids),
            *self._stats,
        ]:
            h.update(part.encode() + b"\0")
        del self._stats
        return h.hexdigest()[:32]

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def extracts_hints(self) -> bool:
        """Whether any row's hint comes from ``hint_fn``."""
        return any(self.extracted)

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
                self._check_aspect(size, hint.size)
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


_SHOWN_PROBLEMS = 20


def _short_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _all_problems(problems: list[BadRowError], description: str) -> Exception:
    """One error for every bad row: FileNotFoundError when all of them are missing files."""
    shown = "".join(f"\n  - {p}" for p in problems[:_SHOWN_PROBLEMS])
    more = f"\n  ... and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
    message = (
        f"{len(problems)} bad row(s) in {description}:{shown}{more}\n"
        f"fix them, or pass {FLAGS['skip_bad_rows']} to train without them"
    )
    if len(problems) == 1:
        message = f"{problems[0]} (fix it, or pass {FLAGS['skip_bad_rows']} to train without it)"
    return FileNotFoundError(message) if all(p.missing_file for p in problems) else ValueError(message)


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
