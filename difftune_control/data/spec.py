"""`DatasetSpec`: where the target data lives and how samples are prepared.

The spec is a plain dataclass filled from the command line or a saved config. Its fields map
onto the flags of diffusers' ``examples/controlnet/train_controlnet.py`` where the meaning is
the same; `FLAGS` gives the flag each field is reported as in error messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

HintInterpolation = Literal["bilinear", "nearest"]
HINT_INTERPOLATIONS: tuple[str, ...] = ("bilinear", "nearest")

FLAGS: dict[str, str] = {
    "source": "--train_data_dir/--dataset_name",
    "image_column": "--image_column",
    "conditioning_image_column": "--conditioning_image_column",
    "caption_column": "--caption_column",
    "resolution": "--resolution",
    "center_crop": "--center_crop",
    "max_samples": "--max_train_samples",
    "skip_bad_rows": "--skip_bad_rows",
    "split": "--dataset_split",
    "dataset_config_name": "--dataset_config_name",
    "hint_interpolation": "--hint_interpolation",
    "random_flip": "--random_flip",
    "allow_external_paths": "--allow_external_paths",
}
"""Command-line flag of each `DatasetSpec` field, as named in error messages."""


@dataclass
class DatasetSpec:
    """Where a target dataset lives and how its samples are prepared.

    Args:
        source (`str`, *optional*):
            One of: a folder with ``metadata.jsonl`` (diffusers' imagefolder layout); a
            ``metadata.jsonl`` file; a ControlNet ``prompt.json`` file or its folder (fill50k
            layout); a local folder written by ``datasets.Dataset.save_to_disk``; a folder of
            parquet files (or one ``.parquet`` file); or a HF `datasets` name (``org/name``).
            `None` has no meaning here: the caller substitutes its default dataset first.
        image_column (`str`, defaults to `"image"`):
            Column with the target images. ``file_name`` is accepted in its place (HF imagefolder);
            for ``prompt.json`` the default maps to ``target``.
        conditioning_image_column (`str`, defaults to `"conditioning_image"`):
            Column with the hint images (``source`` in ``prompt.json``). If the dataset lacks it, or
            a row's value is empty, hints are extracted by the ``hint_fn`` given to
            `load_target_dataset`.
        caption_column (`str`, defaults to `"text"`):
            Column with the captions (``prompt`` in ``prompt.json``). A row may have an empty
            caption; a column that is empty in every row is an error.
        resolution (`int`, defaults to 512):
            Square training resolution R: the shorter side is resized to R, then an R x R crop.
        center_crop (`bool`, defaults to `True`):
            Center crop; `False` draws a random crop, with the same offsets for image and hint.
        max_samples (`int`, *optional*):
            Keep only the first N usable rows (in file order, after bad rows are skipped).
        skip_bad_rows (`bool`, defaults to `False`):
            Every row is checked up front (files, file headers, aspect ratios, captions, paths); skip
            the bad ones and log how many were skipped with the first reasons, instead of failing with
            the list of every bad row.
        split (`str`, defaults to `"train"`):
            Split of a HF / saved / parquet dataset.
        dataset_config_name (`str`, *optional*):
            Config name of a HF dataset.
        hint_interpolation (`"bilinear"` or `"nearest"`, defaults to `"bilinear"`):
            Resampling of given hints when resized (target images always use bicubic). ``nearest``
            keeps segmentation palettes exact; ``bilinear`` is what diffusers' example uses.
        random_flip (`bool`, defaults to `False`):
            Flip image and hint together horizontally with probability 0.5. Off by default: hints
            such as surface normals change meaning under a flip.
        allow_external_paths (`bool`, defaults to `False`):
            Accept image and hint paths that resolve (symlinks followed) outside the dataset folder:
            absolute paths, ``../`` and links out. Off by default, so a dataset reads only its own files.
    """

    source: str | None
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    resolution: int = 512
    center_crop: bool = True
    max_samples: int | None = None
    skip_bad_rows: bool = False
    split: str = "train"
    dataset_config_name: str | None = None
    hint_interpolation: HintInterpolation = "bilinear"
    random_flip: bool = False
    allow_external_paths: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid dataset settings:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with the field values, one message per problem (empty when valid)."""
        problems: list[str] = []
        if self.source is not None and (not isinstance(self.source, str) or not self.source.strip()):
            problems.append(f"{FLAGS['source']}: expected a path or dataset name, got {self.source!r}")
        for name in ("image_column", "conditioning_image_column", "caption_column", "split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                problems.append(f"{FLAGS[name]}: expected a non-empty string, got {value!r}")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 8:
            problems.append(f"{FLAGS['resolution']}: expected an int >= 8, got {self.resolution!r}")
        if self.max_samples is not None and (
            isinstance(self.max_samples, bool)
            or not isinstance(self.max_samples, int)
            or self.max_samples < 1
        ):
            problems.append(f"{FLAGS['max_samples']}: expected None or an int >= 1, got {self.max_samples!r}")
        if self.hint_interpolation not in HINT_INTERPOLATIONS:
            problems.append(
                f"{FLAGS['hint_interpolation']}: got {self.hint_interpolation!r}; "
                f"valid choices: {', '.join(HINT_INTERPOLATIONS)}"
            )
        return problems
