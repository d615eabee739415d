"""Checking a target dataset's rows before any expensive work.

One pass over the cells and the files' headers, without decoding an image: columns exist, rows are
not empty, captions are strings and not all empty, files exist inside the dataset folder, every image
and hint header is readable and of a safe size, image and hint have the same aspect ratio. Every bad
row is reported in one error, or skipped and logged with ``skip_bad_rows``; the kept rows' fingerprint
covers the files they refer to.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from difftune_control.data.columns import BadRowError, Columns, caption_of
from difftune_control.data.formats import MISSING, RowSource
from difftune_control.data.spec import FLAGS, DatasetSpec
from difftune_control.data.transforms import cell_path, image_size, is_empty, same_aspect

logger = logging.getLogger(__name__)

_SHOWN_REASONS = 5


@dataclass
class CheckedRows:
    """The rows a `TargetDataset` keeps, in order, and what was found about them."""

    row_ids: list[int]  # source row of each kept item
    captions: list[str]
    extracted: list[bool]  # the item's hint comes from the hint function
    skipped: list[tuple[int, str]]  # (source row, reason) of each bad row skipped
    fingerprint: str  # 32 hex digits: rows, column choice, and every referred file's size and mtime


class RowChecker:
    """Checks the rows of ``source`` once (:meth:`check`); see the module docstring.

    Args:
        source (`RowSource`), columns (`Columns`), spec (`DatasetSpec`): the opened dataset.
        hint_fn: the hint function rows without a hint are extracted with (only its name is used here).
        require_hints (`bool`): a row without a hint is bad (no hint function is given).
    """

    def __init__(
        self, source: RowSource, columns: Columns, spec: DatasetSpec, hint_fn: Any, require_hints: bool
    ) -> None:
        self.source, self.columns, self.spec = source, columns, spec
        self.hint_fn, self._require_hints = hint_fn, require_hints

    def check(self) -> CheckedRows:
        """One pass over the rows before any expensive work: every problem is found, then reported at once."""
        src, cols, spec = self.source, self.columns, self.spec
        self.row_ids: list[int] = []
        self.captions: list[str] = []
        self.extracted: list[bool] = []
        self.skipped: list[tuple[int, str]] = []
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
        return CheckedRows(self.row_ids, self.captions, self.extracted, self.skipped, self._fingerprint())

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
            check_aspect(size, self._header(cells.get(cols.hint), cols.hint))
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
        return h.hexdigest()[:32]


def check_aspect(size: tuple[int, int], hint_size: tuple[int, int]) -> None:
    """A `BadRowError` when target image and hint sizes have different aspect ratios."""
    if not same_aspect(size, hint_size):
        raise BadRowError(
            f"target image is {size[0]}x{size[1]} but conditioning image is {hint_size[0]}x{hint_size[1]}: "
            f"different aspect ratios ({size[0] / size[1]:.3f} vs {hint_size[0] / hint_size[1]:.3f}) would "
            f"misalign image and hint after resizing"
        )


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
