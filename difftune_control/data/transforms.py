"""Image/hint transforms: open, resize the shorter side, crop (same offsets for both), to tensors.

One geometric rule for the pair keeps them pixel-aligned: the resize size and crop offsets are
computed from the *target image* only, and a given hint (any size with the same aspect ratio)
is resized straight to the image's resized size, then cropped with the same offsets and flipped
with the same flag. Hints extracted on the fly are computed from the already cropped image, so
they are aligned by construction.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from difftune_control.data.spec import HintInterpolation
from difftune_control.utils import hint_to_float

if TYPE_CHECKING:
    import torch
    from PIL import Image

ASPECT_TOLERANCE = 0.01
"""Largest relative difference of width/height between an image and its hint."""


def is_empty(value: Any) -> bool:
    """Whether a cell holds no image: `None`, an empty string, or an Image-feature dict with neither bytes nor path."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, dict):
        return not value.get("bytes") and not value.get("path")
    return False


def resolve_path(value: str | os.PathLike, base_dir: Path | None) -> Path:
    """A cell's path, relative paths taken from ``base_dir`` (the metadata file's folder)."""
    path = Path(os.path.expanduser(str(value)))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def cell_path(value: Any, base_dir: Path | None) -> Path | None:
    """The file a cell refers to, or `None` when the cell holds the image itself (bytes, PIL, array)."""
    if isinstance(value, (str, os.PathLike)):
        return resolve_path(value, base_dir)
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        return resolve_path(value["path"], base_dir)
    return None


def open_image(
    value: Any, base_dir: Path | None, where: str, background: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """Open and decode the image a dataset cell refers to, as 8-bit RGB (see `to_rgb`).

    Args:
        value: a path (relative to ``base_dir``), raw bytes, a HF Image-feature dict
            (``{"bytes", "path"}``), a PIL image or a uint8 HWC array.
        base_dir: folder that relative paths start from.
        where: names the row and column in error messages, e.g. ``"row 3 (metadata.jsonl line 4), column 'image'"``.
        background: what transparent pixels are composited over.

    Returns:
        `PIL.Image.Image` in RGB mode.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file or bytes are not a readable image, or too large to decode safely.
    """
    return _read(value, base_dir, where, header_only=False, background=background)


def image_size(value: Any, base_dir: Path | None, where: str) -> tuple[int, int]:
    """(width, height) of the image a cell refers to, as `open_image` returns it (EXIF orientation
    applied), from the file header only (no decoding).

    Raises the same errors as `open_image` for missing files, unidentifiable content and images too
    large to decode safely.
    """
    return _read(value, base_dir, where, header_only=True)


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied (orientations 5-8 swap the sides)."""
    width, height = image.size
    if image.format == "PNG" and "exif" not in image.info:
        return width, height  # PIL's getexif would decode a PNG to look for an eXIf chunk after the pixels
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block: decoding decides, as exif_transpose would ignore it
        orientation = None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Any PIL image as 8-bit RGB, upright: EXIF orientation applied, every mode and bit depth scaled right.

    16-bit greyscale (``I;16*``, and ``I`` from a PNG or above 255) is scaled by 255/65535 instead of
    clipped (PIL's ``convert`` would turn a 16-bit depth map almost binary); float images (``F``) in
    [0, 1] are scaled to [0, 255]; alpha (RGBA, LA, PA, transparent palettes) is composited over
    ``background``; palette, grey, CMYK and the rest go through ``convert("RGB")``.
    """
    from PIL import Image, ImageOps

    fmt = image.format  # the transposed copy below has none
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max()) if array.size else 0.0
        if mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        elif mode.startswith("I;16") or fmt == "PNG" or top > 255:
            scale = 255.0 / 65535.0
        else:
            scale = 1.0
        grey = np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _read(
    value: Any,
    base_dir: Path | None,
    where: str,
    header_only: bool,
    background: tuple[int, int, int] = (0, 0, 0),
) -> Any:
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3):
            raise ValueError(f"{where}: arrays must be uint8 HW or HWC, got {value.dtype} {value.shape}")
        value = Image.fromarray(value)
    if isinstance(value, Image.Image):
        return oriented_size(value) if header_only else to_rgb(value, background)
    path = cell_path(value, base_dir)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file not found: {path} (cell value {_short(value)!r})")
        fp: Any = path
        label = str(path)
    elif isinstance(value, dict) and value.get("bytes"):
        fp, label = io.BytesIO(value["bytes"]), "embedded image bytes"
    elif isinstance(value, (bytes, bytearray)):
        fp, label = io.BytesIO(bytes(value)), "embedded image bytes"
    else:
        raise ValueError(
            f"{where}: expected an image path, image bytes or a PIL image, got {type(value).__name__} {_short(value)!r}"
        )
    try:
        with Image.open(fp) as image:
            return oriented_size(image) if header_only else to_rgb(image, background)
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"{where}: {label} is too large to decode safely ({err}); downscale it (PIL's limit is "
            f"PIL.Image.MAX_IMAGE_PIXELS, {Image.MAX_IMAGE_PIXELS} pixels, twice that is refused)"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{where}: cannot read image {label}: {err}") from err


def _short(value: Any) -> Any:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def same_aspect(
    image_size: tuple[int, int], hint_size: tuple[int, int], tolerance: float = ASPECT_TOLERANCE
) -> bool:
    """Whether two (width, height) sizes have the same aspect ratio within ``tolerance`` (relative)."""
    ratio, hint_ratio = image_size[0] / image_size[1], hint_size[0] / hint_size[1]
    return abs(ratio - hint_ratio) <= tolerance * max(ratio, hint_ratio)


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side of ``size`` to ``resolution``."""
    w, h = size
    if w <= h:
        return resolution, max(resolution, round(h * resolution / w))
    return max(resolution, round(w * resolution / h)), resolution


def center_offsets(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(top, left) of the centered ``resolution`` square in a resized image of (width, height) ``size``."""
    w, h = size
    return int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))


def random_offsets(
    size: tuple[int, int], resolution: int, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """Uniform (top, left) of a ``resolution`` square in a resized image of (width, height) ``size``."""
    import torch

    w, h = size
    top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    return top, left


@dataclass
class Geometry:
    """Where a sample's crop comes from: resized (width, height), crop (top, left), horizontal flip."""

    size: tuple[int, int]
    top: int
    left: int
    flip: bool


def plan_geometry(
    image_size: tuple[int, int],
    resolution: int,
    *,
    center_crop: bool = True,
    offsets: tuple[int, int] | None = None,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> Geometry:
    """Resize size and crop offsets for an image of (width, height) ``image_size``.

    Args:
        image_size: the target image's (width, height).
        resolution: the square crop size R; the shorter side is resized to R.
        center_crop: center crop; `False` draws uniform offsets from ``generator``.
        offsets: explicit (top, left), e.g. stored with cached latents; overrides ``center_crop``.
        flip: flip horizontally after the crop.
        generator: random source for random crops (default: torch's global RNG, seeded per worker).

    Returns:
        `Geometry`
    """
    size = resized_size(image_size, resolution)
    if offsets is not None:
        top, left = int(offsets[0]), int(offsets[1])
        if not (0 <= top <= size[1] - resolution and 0 <= left <= size[0] - resolution):
            raise ValueError(
                f"crop offsets (top={top}, left={left}) fall outside the resized image {size} at resolution {resolution}"
            )
    elif center_crop:
        top, left = center_offsets(size, resolution)
    else:
        top, left = random_offsets(size, resolution, generator)
    return Geometry(size=size, top=top, left=left, flip=bool(flip))


def apply_geometry(
    image: Image.Image, geometry: Geometry, resolution: int, resample: str = "bicubic"
) -> Image.Image:
    """Resize ``image`` to ``geometry.size`` with ``resample``, crop the R x R square, flip if asked."""
    from PIL import Image

    filters = {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
    }
    if resample not in filters:
        raise ValueError(f"resample: got {resample!r}; valid choices: {', '.join(filters)}")
    if image.size != geometry.size:
        image = image.resize(geometry.size, filters[resample])
    top, left = geometry.top, geometry.left
    image = image.crop((left, top, left + resolution, top + resolution))
    if geometry.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def transform_pair(
    image: Image.Image,
    hint: Image.Image | None,
    geometry: Geometry,
    resolution: int,
    hint_interpolation: HintInterpolation = "bilinear",
) -> tuple[Image.Image, Image.Image | None]:
    """Apply one `Geometry` to an image (bicubic) and its hint (``hint_interpolation``).

    The hint is resized straight to the image's resized size, whatever its own size, so both
    end up on the same pixel grid. The caller checks beforehand that their aspect ratios agree.
    """
    out_image = apply_geometry(image, geometry, resolution, "bicubic")
    out_hint = None if hint is None else apply_geometry(hint, geometry, resolution, hint_interpolation)
    return out_image, out_hint


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3,H,W] in [-1, 1] (what the VAE encodes)."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H,W,3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def hint_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL hint -> float32 [3,H,W] in [0, 1] (what a ControlNet takes)."""
    import torch

    array = np.array(image.convert("RGB"), dtype=np.uint8)  # [H,W,3], writable
    return hint_to_float(torch.from_numpy(array).permute(2, 0, 1).contiguous())


def check_hint_output(hint: Any, resolution: int, where: str) -> torch.Tensor:
    """Check a hint function's output: a float tensor [3,R,R] in [0, 1]; returned as float32 on the CPU."""
    import torch

    if not isinstance(hint, torch.Tensor) or not hint.is_floating_point():
        raise ValueError(
            f"{where}: the hint function must return a float tensor [3,H,W] in [0,1], "
            f"got {type(hint).__name__}{'' if not isinstance(hint, torch.Tensor) else ' of dtype ' + str(hint.dtype)}"
        )
    if tuple(hint.shape) != (3, resolution, resolution):
        raise ValueError(
            f"{where}: the hint function returned shape {tuple(hint.shape)}, expected (3, {resolution}, {resolution}) "
            f"(the size of the cropped image it was given; an extractor built with another resolution resizes)"
        )
    hint = hint.detach().float().cpu()
    lo, hi = float(hint.min()), float(hint.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3 or hint.isnan().any():
        raise ValueError(
            f"{where}: the hint function returned values in [{lo:.3g}, {hi:.3g}], expected [0, 1]"
        )
    return hint.clamp(0.0, 1.0)
