"""Readers for the three dataset layouts users have, behind one small `RowSource` interface.

1. diffusers' imagefolder layout: a folder with ``metadata.jsonl`` (one JSON object per line,
   columns ``image`` or ``file_name``, ``conditioning_image``, ``text``; paths relative to the file).
2. HF `datasets`: a hub name, a ``save_to_disk`` folder, or a folder of parquet files. Image
   columns may hold images (read undecoded, as bytes) or path strings (relative to the folder).
3. The original ControlNet ``prompt.json`` (fill50k): one object per line with ``source`` (hint
   path), ``target`` (image path) and ``prompt``, paths relative to the json's folder.

A `RowSource` only reads raw cells; checking, transforming and error context live in
`difftune_control.data.dataset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from difftune_control.data.spec import FLAGS, DatasetSpec

MISSING = object()
"""Cell value of a column a row does not have."""

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv")


class RowSource(ABC):
    """Raw rows of a dataset: a column list, cells by row, and a label per row for error messages."""

    kind: ClassVar[str] = ""
    aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Per `DatasetSpec` column field: column names accepted when the field is left at its default."""

    def __init__(self, description: str, base_dir: Path | None, columns: list[str]) -> None:
        self.description = description
        self.base_dir = base_dir
        self.columns = columns

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def row(self, index: int) -> dict[str, Any]:
        """The cells of row ``index`` (images undecoded: paths, bytes or Image-feature dicts)."""

    @abstractmethod
    def row_label(self, index: int) -> str:
        """How error messages name row ``index``, e.g. ``"row 3 (metadata.jsonl line 4)"``."""

    @abstractmethod
    def identity(self) -> list[str]:
        """Strings that change whenever the rows' content changes (file hashes, sizes, mtimes)."""

    def column_values(self, name: str) -> list[Any]:
        """All cells of one column (`MISSING` where a row lacks it); cheap for text columns."""
        return [self.row(i).get(name, MISSING) for i in range(len(self))]

    def column_is_text(self, name: str) -> bool:
        """Whether a column holds strings (paths or captions), so reading it whole is cheap."""
        return True


def decode_utf8(raw: bytes, path: Path) -> str:
    """A text file's bytes as UTF-8 (a leading BOM is dropped); lines that are not UTF-8 are named.

    Decoding with replacement characters would silently turn captions (and file names) into other
    strings, so any invalid byte is an error that lists every such line.
    """
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    bad = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.append(f"line {number} (byte 0x{line[err.start]:02x} at column {err.start + 1})")
    shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    raise ValueError(
        f"{path}: not UTF-8 text: {shown}; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


class JsonLinesSource(RowSource):
    """A JSON-lines file (``metadata.jsonl`` or ``prompt.json``); a JSON array of objects also works."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.raw = self.path.read_bytes()
        self.rows, self.lines = self._parse(decode_utf8(self.raw, self.path))
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        super().__init__(str(self.path), self.path.parent, list(columns))

    def _parse(self, text: str) -> tuple[list[dict[str, Any]], list[int]]:
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}: not valid JSON ({err})") from err
            lines = list(range(1, len(rows) + 1))
        else:
            rows, lines = [], []
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{self.path}: line {number} is not valid JSON ({err}); expected one JSON object per line"
                    ) from err
                lines.append(number)
        for row, number in zip(rows, lines):
            if not isinstance(row, dict):
                raise ValueError(
                    f"{self.path}: line {number} holds a {type(row).__name__}, expected a JSON object "
                    f"with the image, conditioning image and caption columns"
                )
        return rows, lines

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, index: int) -> dict[str, Any]:
        return self.rows[index]

    def row_label(self, index: int) -> str:
        return f"row {index} ({self.path.name} line {self.lines[index]})"

    def identity(self) -> list[str]:
        return [self.kind, str(self.path), hashlib.sha256(self.raw).hexdigest()]


class MetadataJsonlSource(JsonLinesSource):
    """diffusers' imagefolder layout: ``metadata.jsonl`` next to (or above) its images."""

    kind = "metadata.jsonl"
    aliases = {"image_column": ("file_name",)}


class PromptJsonSource(JsonLinesSource):
    """The original ControlNet layout (fill50k): ``prompt.json`` with source / target / prompt."""

    kind = "prompt.json"
    aliases = {
        "image_column": ("target",),
        "conditioning_image_column": ("source",),
        "caption_column": ("prompt",),
    }


class HFDatasetSource(RowSource):
    """A `datasets.Dataset`; Image-feature columns are read undecoded (bytes/path dicts)."""

    kind = "datasets"

    def __init__(self, dataset: Any, description: str, base_dir: Path | None, identity: list[str]) -> None:
        from datasets import Image

        for name, feature in dataset.features.items():
            if isinstance(feature, Image) and feature.decode:
                dataset = dataset.cast_column(name, Image(decode=False))
        self.dataset = dataset
        self._identity = identity
        super().__init__(description, base_dir, list(dataset.column_names))

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, index: int) -> dict[str, Any]:
        return self.dataset[index]

    def row_label(self, index: int) -> str:
        return f"row {index} of {self.description}"

    def identity(self) -> list[str]:
        return [self.kind, *self._identity]

    def column_values(self, name: str) -> list[Any]:
        if name not in self.dataset.column_names:
            return [MISSING] * len(self)
        return list(self.dataset[name])

    def column_is_text(self, name: str) -> bool:
        from datasets import Value

        feature = self.dataset.features.get(name)
        return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def folder_identity(folder: Path) -> list[str]:
    """(relative path, size, mtime) of every file under ``folder``: changes when any file changes."""
    parts = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            stat = path.stat()
            parts.append(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}")
    return parts


def _pick_split(dataset: Any, spec: DatasetSpec, description: str) -> Any:
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if spec.split not in dataset:
            raise ValueError(
                f"{FLAGS['split']}: split {spec.split!r} not found in {description}; "
                f"available splits: {', '.join(dataset)}"
            )
        return dataset[spec.split]
    return dataset


def _load_hf(spec: DatasetSpec, path: Path | None) -> HFDatasetSource:
    import datasets

    source = str(spec.source)
    if path is not None and (
        (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    ):
        description = f"saved dataset {path}"
        dataset = _pick_split(datasets.load_from_disk(str(path)), spec, description)
        return HFDatasetSource(dataset, description, path, ["saved", *folder_identity(path)])
    if path is not None:
        if path.is_file():
            if spec.split != "train":
                raise ValueError(
                    f"{FLAGS['split']}: a single parquet file has only the split 'train', got {spec.split!r}"
                )
            identity = [f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}"]
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
            return HFDatasetSource(dataset, f"parquet file {path}", path.parent, identity)
        description = f"parquet dataset {path}"
        try:
            dataset = datasets.load_dataset(str(path), spec.dataset_config_name, split=spec.split)
        except ValueError as err:
            raise ValueError(f"{FLAGS['split']}={spec.split!r}: cannot load {description}: {err}") from err
        return HFDatasetSource(dataset, description, path, ["parquet", *folder_identity(path)])
    description = f"HF dataset '{source}'"
    try:
        dataset = datasets.load_dataset(source, spec.dataset_config_name, split=spec.split)
    except Exception as err:  # hub, network and builder errors come in many types
        raise ValueError(
            f"{FLAGS['source']}: {source!r} is not a local path and could not be loaded as a HF dataset "
            f"(config={spec.dataset_config_name!r}, split={spec.split!r}): {type(err).__name__}: {err}"
        ) from err
    return HFDatasetSource(dataset, description, None, ["hub", source, str(dataset._fingerprint)])


def open_source(spec: DatasetSpec) -> RowSource:
    """Open the rows of ``spec.source``, whichever of the supported layouts it is.

    Args:
        spec (`DatasetSpec`): only ``source``, ``split`` and ``dataset_config_name`` are used here.

    Returns:
        `RowSource`

    Raises:
        FileNotFoundError: a path that does not exist, or a folder holding no known layout.
        ValueError: a malformed metadata file, an unknown split, or a dataset that cannot be loaded.
    """
    if spec.source is None:
        raise ValueError(
            f"{FLAGS['source']}: no dataset given; pass a metadata.jsonl folder, a prompt.json, "
            f"a saved/parquet dataset folder or a HF dataset name"
        )
    source = spec.source
    path = Path(os.path.expanduser(source))
    if not path.exists():
        if _HUB_NAME.match(source) and not source.endswith(_FILE_SUFFIXES):
            return _load_hf(spec, None)
        raise FileNotFoundError(f"{FLAGS['source']}: no such file or folder: {source}")
    if path.is_file():
        if path.suffix == ".jsonl":
            return MetadataJsonlSource(path)
        if path.suffix == ".json":
            return PromptJsonSource(path)
        if path.suffix == ".parquet":
            return _load_hf(spec, path)
        raise ValueError(
            f"{FLAGS['source']}: cannot read {path}: expected a metadata .jsonl file, a prompt.json, "
            f"a .parquet file or a folder"
        )
    if (path / "metadata.jsonl").is_file():
        return MetadataJsonlSource(path / "metadata.jsonl")
    if (path / "prompt.json").is_file():
        return PromptJsonSource(path / "prompt.json")
    if (
        any(path.rglob("*.parquet"))
        or (path / "dataset_info.json").is_file()
        or (path / "dataset_dict.json").is_file()
    ):
        return _load_hf(spec, path)
    raise FileNotFoundError(
        f"{FLAGS['source']}: folder {path} holds none of: metadata.jsonl (imagefolder layout), prompt.json "
        f"(ControlNet fill50k layout), a dataset written by save_to_disk (dataset_info.json / "
        f"dataset_dict.json), or parquet files"
    )
