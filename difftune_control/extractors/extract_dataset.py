"""Precompute hints for a dataset: `difftune extract --condition depth --input DIR --output DIR`.

Input: a folder of images, a folder with a `metadata.jsonl` (diffusers' imagefolder layout), or
a `metadata.jsonl` file. Output: `<output>/conditioning_images/<image path>.png` (one hint per
image, written atomically), and `<output>/metadata.jsonl` with every input column kept, image
paths rewritten relative to the output file, and a `conditioning_image` column added. Hints that
already exist are skipped, so an interrupted run resumes where it stopped; `extract_manifest.json`
records the extractor, so a run with another condition, backend, parameters or resolution
refuses to mix its hints with the old ones (pass `overwrite=True` to redo them).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import ConditionExtractor, to_batch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
HINT_DIR = "conditioning_images"
MANIFEST = "extract_manifest.json"


@dataclass(frozen=True)
class ExtractSummary:
    """What `extract_dataset` did."""

    metadata: Path
    """The metadata.jsonl written."""
    total: int
    """Images in the dataset."""
    extracted: int
    """Hints computed by this call."""
    skipped: int
    """Hints that already existed."""
    seconds: float
    """Wall time of the extraction loop."""

    @property
    def images_per_second(self) -> float:
        """Throughput of this call over the images it extracted."""
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


def read_rows(input_path: Path, image_column: str | None) -> tuple[list[dict[str, Any]], Path, str]:
    """Rows of the dataset, the folder its relative paths start from, and the image column.

    Args:
        input_path (`Path`): an image folder, a folder with metadata.jsonl, or a .jsonl file.
        image_column (`str`, *optional*): column holding image paths (default: `image`, else `file_name`).

    Returns:
        `tuple[list[dict], Path, str]`
    """
    if input_path.is_dir() and (input_path / "metadata.jsonl").is_file():
        input_path = input_path / "metadata.jsonl"
    if input_path.is_dir():
        column = image_column or "image"
        files = sorted(
            p for p in input_path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and HINT_DIR not in p.parts
        )
        if not files:
            raise FileNotFoundError(
                f"--input: no images ({', '.join(IMAGE_SUFFIXES)}) and no metadata.jsonl in {str(input_path)!r}"
            )
        return [{column: p.relative_to(input_path).as_posix()} for p in files], input_path, column
    if not input_path.is_file():
        raise FileNotFoundError(
            f"--input: {str(input_path)!r} does not exist (expected a folder or a metadata.jsonl)"
        )
    rows = []
    for number, line in enumerate(input_path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"--input: {input_path}:{number} is not valid JSON: {err}") from err
    if not rows:
        raise ValueError(f"--input: {str(input_path)!r} has no rows")
    columns = set().union(*rows)
    column = image_column or next((c for c in ("image", "file_name") if c in columns), None)
    if column is None or column not in columns:
        raise ValueError(
            f"--image_column: column {column or 'image/file_name'!r} not in {str(input_path)!r}; "
            f"columns: {sorted(columns)}"
        )
    missing = [i for i, row in enumerate(rows) if not isinstance(row.get(column), str)]
    if missing:
        raise ValueError(
            f"--image_column: {len(missing)} row(s) of {str(input_path)!r} have no path in {column!r} "
            f"(first: line {missing[0] + 1})"
        )
    return rows, input_path.parent, column


def _hint_name(image_rel: str) -> str:
    """Hint file for an image path: same relative path, `.png` (absolute paths keep their tail)."""
    path = Path(image_rel)
    parts = path.parts[1:] if path.is_absolute() else path.parts
    parts = tuple(p for p in parts if p not in ("..", "."))
    return Path(HINT_DIR, *parts).with_suffix(".png").as_posix()


def _existing_hint(row: dict[str, Any], base: Path, output: Path) -> Path | None:
    """The row's `conditioning_image` when it already points into this output's hint folder
    (re-running on a metadata.jsonl this function wrote keeps its hint names)."""
    value = row.get("conditioning_image")
    if not isinstance(value, str):
        return None
    path = (base / value).resolve()
    hint_root = (output / HINT_DIR).resolve()
    return path if path.is_relative_to(hint_root) else None


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _check_manifest(output: Path, identity: dict[str, Any], overwrite: bool) -> None:
    from difftune_control.utils import atomic_write_text

    manifest = output / MANIFEST
    if manifest.is_file() and not overwrite:
        previous = json.loads(manifest.read_text(encoding="utf-8"))
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise ValueError(
                f"--output: {str(output)!r} holds hints made with another extractor (differs in "
                f"{', '.join(changed)}: {[previous.get(k) for k in changed]} -> {[identity.get(k) for k in changed]}); "
                f"choose another --output folder or pass --overwrite to recompute every hint"
            )
    atomic_write_text(manifest, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def _load_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _load_batch(batch: list[tuple[int, Path]]) -> list[Any]:
    return [_load_image(path) for _, path in batch]


def _batches(items: list[tuple[int, Path]], batch_size: int) -> Iterator[list[tuple[int, Path]]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _save_png(hint: Any, path: Path) -> None:
    from PIL import Image

    from difftune_control.utils import atomic_path

    array = (hint.permute(1, 2, 0).cpu().numpy() * 255.0).round().astype("uint8")
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def extract_dataset(
    extractor: ConditionExtractor,
    input_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    batch_size: int = 16,
    image_column: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    identity: dict[str, Any] | None = None,
) -> ExtractSummary:
    """Compute a hint for every image of a dataset and write an imagefolder `metadata.jsonl`.

    Args:
        extractor (`ConditionExtractor`): makes the hints (its `resolution` sets their size).
        input_path (`str` or `os.PathLike`): image folder, folder with metadata.jsonl, or metadata.jsonl.
        output_dir (`str` or `os.PathLike`): where hints and the new metadata.jsonl go (may be the
            input folder).
        batch_size (`int`, defaults to 16): images per extractor call.
        image_column (`str`, *optional*): column with image paths (default `image`, else `file_name`).
        overwrite (`bool`, defaults to `False`): recompute hints that already exist.
        progress (`bool`, defaults to `True`): show a tqdm bar with images/s.
        identity (`dict`, *optional*): what identifies the extractor in the manifest (default: its
            name, backend and `params`).

    Returns:
        `ExtractSummary`: counts, timing and the metadata path.
    """
    from tqdm.auto import tqdm

    from difftune_control.utils import atomic_write_text

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch_size must be a positive int, got {batch_size!r}")
    rows, base, column = read_rows(Path(input_path), image_column)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    identity = identity or {
        "condition": extractor.name,
        "backend": extractor.backend,
        "params": {k: repr(v) for k, v in sorted(extractor.params.items())},
    }
    _check_manifest(output, identity, overwrite)

    todo: list[tuple[int, Path]] = []
    hint_paths: list[Path] = []
    seen: dict[Path, int] = {}
    for index, row in enumerate(rows):
        source = base / row[column]
        if not source.is_file():
            raise FileNotFoundError(f"--input: row {index + 1}: image {str(source)!r} does not exist")
        hint_path = _existing_hint(row, base, output) or output / _hint_name(row[column])
        if hint_path in seen:
            raise ValueError(
                f"--input: rows {seen[hint_path] + 1} and {index + 1} would share the hint file "
                f"{str(hint_path)!r}; give the images distinct paths"
            )
        seen[hint_path] = index
        hint_paths.append(hint_path)
        if overwrite or not hint_path.is_file():
            todo.append((index, source))

    start = time.perf_counter()
    bar = tqdm(
        total=len(todo),
        unit="img",
        desc=f"extract {extractor.name}/{extractor.backend}",
        disable=not progress,
    )
    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = list(_batches(todo, batch_size))
        future = pool.submit(_load_batch, batches[0]) if batches else None
        for number, batch in enumerate(batches):
            images = future.result()
            if number + 1 < len(batches):  # decode the next batch while this one runs
                future = pool.submit(_load_batch, batches[number + 1])
            hints = _extract_grouped(extractor, images)
            writes = [
                pool.submit(_save_png, hint, hint_paths[index]) for (index, _), hint in zip(batch, hints)
            ]
            for write in writes:
                write.result()
            bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start

    metadata = output / "metadata.jsonl"
    lines = []
    for row, hint_path in zip(rows, hint_paths):
        new = dict(row)
        new[column] = _relative(base / row[column], output)
        new["conditioning_image"] = _relative(hint_path, output)
        lines.append(json.dumps(new, ensure_ascii=False))
    atomic_write_text(metadata, "\n".join(lines) + "\n")
    return ExtractSummary(metadata, len(rows), len(todo), len(rows) - len(todo), seconds)


def _extract_grouped(extractor: ConditionExtractor, images: list[Any]) -> list[Any]:
    """Run the extractor on images that may differ in size: one batch per size, input order kept."""
    import torch

    tensors = [to_batch(image, extractor.resolution)[0] for image in images]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape[-2:]), []).append(i)
    out: list[Any] = [None] * len(images)
    for indices in groups.values():
        hints = extractor(torch.cat([tensors[i] for i in indices], dim=0))
        for i, hint in zip(indices, hints):
            out[i] = hint
    return out
