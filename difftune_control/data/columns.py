"""Column resolution and per-row caption rules shared by every dataset layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from difftune_control.data.formats import MISSING, RowSource
from difftune_control.data.spec import FLAGS, DatasetSpec


class BadRowError(ValueError):
    """A row that cannot be used; ``missing_file`` tells a missing file from unreadable content."""

    def __init__(self, message: str, missing_file: bool = False) -> None:
        super().__init__(message)
        self.missing_file = missing_file


@dataclass
class Columns:
    """The columns in use after resolving `DatasetSpec` names against a source; ``hint`` None = extract."""

    image: str
    hint: str | None
    caption: str


def resolve_columns(source: RowSource, spec: DatasetSpec, *, hints_optional: bool) -> Columns:
    """Map the spec's column names onto the source's columns; report every unknown name at once.

    A field left at its default may fall back to the source's alias (``file_name`` for images in
    an imagefolder, ``target`` / ``source`` / ``prompt`` in ``prompt.json``). A missing default
    conditioning column means "extract the hints" when ``hints_optional``.
    """
    problems, found = [], {}
    for field in ("image_column", "conditioning_image_column", "caption_column"):
        wanted = getattr(spec, field)
        candidates = [wanted]
        if wanted == DatasetSpec.__dataclass_fields__[field].default:
            candidates += list(source.aliases.get(field, ()))
        found[field] = next((c for c in candidates if c in source.columns), None)
        if found[field] is not None:
            continue
        is_default_hint = (
            field == "conditioning_image_column" and wanted == DatasetSpec.__dataclass_fields__[field].default
        )
        if is_default_hint and hints_optional:
            continue
        tried = " / ".join(repr(c) for c in candidates)
        extra = (
            "; without it hints must be extracted: pass a condition (hint function) to extract them"
            if is_default_hint
            else ""
        )
        problems.append(f"{FLAGS[field]} value {tried} not found{extra}")
    if problems:
        raise ValueError(
            f"unknown column name(s) in {source.description}:\n  - "
            + "\n  - ".join(problems)
            + f"\ndataset columns are: {', '.join(source.columns) or '(none)'}"
        )
    return Columns(found["image_column"], found["conditioning_image_column"], found["caption_column"])


def caption_of(value: Any, column: str) -> str:
    """A row's caption: a string (may be empty), or the first of a list of strings; else `BadRowError`."""
    if value is MISSING or value is None:
        raise BadRowError(f"no caption (column '{column}' is missing or null; use \"\" for an empty caption)")
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[0]  # several captions per image: the first, so cached text embeddings are deterministic
    if not isinstance(value, str):
        raise BadRowError(
            f"caption in column '{column}' must be a string, got {type(value).__name__} {value!r}"
        )
    return value


def long_captions(captions: list[str], tokenizer: Any) -> list[tuple[int, int]]:
    """``(position, token count)`` of every caption longer than the text encoder reads.

    Counted with the run's tokenizer, special tokens included, against its ``model_max_length``
    (77 for SD): the text encoder sees only the first tokens of a longer caption.
    """
    limit = int(tokenizer.model_max_length)
    lengths = [len(ids) for ids in tokenizer(list(captions), truncation=False)["input_ids"]]
    return [(i, n) for i, n in enumerate(lengths) if n > limit]
