"""Toy-world target datasets on disk: a ``metadata.jsonl`` image folder with ground-truth hints.

Layout written by :func:`build_dataset` (paths in ``metadata.jsonl`` are relative to it)::

    images/000000.png        the render (RGB)
    depth/000000.png         normalised inverse depth, grey as RGB (near = bright)
    normal/000000.png        normals in the ControlNet 1.1 colours (blue = facing the camera)
    segmentation/000000.png  classes in ADE20K colours
    metadata.jsonl           {"image", "text", "depth", "normal", "segmentation"} per line
    dataset_info.json        what was rendered (n, seed, split, domain, resolution, renderer version)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..utils import atomic_dir, cache_root
from .domains import get_domain
from .labels import classes_to_ade_rgb
from .scene import split_seed
from .world import normal_to_rgb, render_scenes

RENDER_VERSION = 1
"""Bumped whenever the renderer's output changes, so cached datasets are rebuilt."""

DEFAULT_SIZES = {"train": 10_000, "validation": 256}
"""Scenes in the default datasets (:func:`default_dataset_dir`)."""

HINT_COLUMNS = ("depth", "normal", "segmentation")


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [0, 1] -> uint8 ``[N, H, W, 3]``."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _info(n: int, seed: int, resolution: int, split: str, domain: str) -> dict:
    return {
        "n": n,
        "seed": seed,
        "resolution": resolution,
        "split": split,
        "domain": domain,
        "render_version": RENDER_VERSION,
    }


def _is_complete(folder: Path, info: dict) -> bool:
    """True if ``folder`` holds a finished dataset rendered with ``info``; error if it holds another."""
    info_file = folder / "dataset_info.json"
    if not info_file.is_file():
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} exists and is not a toy-world dataset (no dataset_info.json); "
                "choose an empty or new out_dir"
            )
        return False
    found = json.loads(info_file.read_text())
    found.setdefault("domain", "default")  # written before domains existed
    if found != info:
        if found.get("render_version") != RENDER_VERSION:
            return False  # an older renderer's cache: rebuild it in place
        raise FileExistsError(
            f"{folder} holds another toy-world dataset ({found}); asked for {info}. "
            "Choose another out_dir or delete that folder"
        )
    lines = (
        (folder / "metadata.jsonl").read_text().splitlines() if (folder / "metadata.jsonl").is_file() else []
    )
    return len(lines) == info["n"]


def build_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    resolution: int = 64,
    split: str = "train",
    domain: str = "default",
) -> Path:
    """Render ``n`` toy-world scenes and write them as a ``metadata.jsonl`` image folder.

    Scenes come from the seed stream of ``split`` (:func:`scene.split_seed`), so ``train`` and
    ``validation`` never share a scene. The folder appears atomically (rendered into a temporary
    sibling, then renamed); an existing complete folder with the same parameters returns at once.

    Args:
        out_dir (`str` or `os.PathLike`): the dataset folder.
        n (`int`): number of scenes.
        seed (`int`): scene stream.
        resolution (`int`, defaults to 64): image size.
        split (`str`, defaults to `"train"`): which seed stream, e.g. ``"train"`` or ``"validation"``.
        domain (`str`, defaults to `"default"`): the toy-world domain (:func:`~.domains.domain_names`).

    Returns:
        `pathlib.Path`: ``out_dir``.

    Raises:
        ValueError: for a bad ``n``, ``resolution``, ``split`` or ``domain``.
        FileExistsError: if ``out_dir`` holds something else (another dataset or other files).
    """
    from PIL import Image

    problems = []
    if not isinstance(n, int) or n < 1:
        problems.append(f"n must be a positive int, got {n!r}")
    if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        problems.append(f"resolution must be a positive multiple of 8 (e.g. 64 or 128), got {resolution!r}")
    if not isinstance(split, str) or not split.isidentifier():
        problems.append(f"split must be a name such as 'train' or 'validation', got {split!r}")
    try:
        get_domain(domain)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ValueError("build_dataset: " + "; ".join(problems))
    folder = Path(out_dir)
    info = _info(n, int(seed), resolution, split, domain)
    if _is_complete(folder, info):
        return folder
    stream = split_seed(int(seed), split)
    with atomic_dir(folder, keep=lambda done: _is_complete(done, info)) as tmp:
        for sub in ("images", *HINT_COLUMNS):
            (tmp / sub).mkdir()
        lines = []
        chunk = max(1, 256 * 4096 // (resolution * resolution))
        device = "cuda" if torch.cuda.is_available() else None  # one renderer: same scenes on either device
        from tqdm.auto import tqdm

        what = f"{split} set" if domain == "default" else f"{domain} {split} set"
        bar = tqdm(total=n, desc=f"rendering toy-world {what}", unit="scene")
        for lo in range(0, n, chunk):
            out = render_scenes(
                min(chunk, n - lo), stream, resolution, start=lo, device=device, domain=domain
            )
            arrays = {
                "images": _to_uint8(out["rgb"]),
                "depth": _to_uint8(out["inv_depth"].expand(-1, 3, -1, -1)),
                "normal": _to_uint8(normal_to_rgb(out["normal"])),
                "segmentation": _to_uint8(classes_to_ade_rgb(out["classes"])),
            }
            for j, caption in enumerate(out["captions"]):
                name = f"{lo + j:06d}.png"
                for sub, arr in arrays.items():
                    Image.fromarray(arr[j]).save(tmp / sub / name, compress_level=1)
                record = {"image": f"images/{name}", "text": caption}
                record.update({col: f"{col}/{name}" for col in HINT_COLUMNS})
                lines.append(json.dumps(record))
            bar.update(len(out["captions"]))
        bar.close()
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def _folder_name(split: str, n: int, resolution: int, domain: str) -> str:
    """The cache folder of a dataset; the default domain keeps the name it had before domains existed."""
    name = f"{split}-n{n}-{resolution}px-seed0-v{RENDER_VERSION}"
    return name if domain == "default" else f"{domain}-{name}"


def _cached_dataset(root: Path, split: str, n: int, resolution: int, domain: str = "default") -> Path | None:
    """The smallest complete cached dataset of ``split`` (and ``domain``) with at least ``n`` scenes, or None.

    Scene i of a split is the same whatever the dataset's size (one seed stream, rendered by index), so the
    first ``n`` rows of a larger set are the ``n``-scene set.
    """
    found = []
    for folder in root.glob(_folder_name(split, 0, resolution, domain).replace("-n0-", "-n*-")):
        size = folder.name.rsplit(f"{split}-n", 1)[1].split("-", 1)[0]
        if not size.isdigit() or int(size) < n:
            continue
        try:
            if _is_complete(folder, _info(int(size), 0, resolution, split, domain)):
                found.append((int(size), folder))
        except FileExistsError:
            continue
    return min(found)[1] if found else None


def default_dataset_dir(
    split: str = "train", n: int | None = None, resolution: int = 64, domain: str = "default"
) -> Path:
    """The default target dataset: rendered into the user cache on first use, then reused.

    Lives in ``$DIFFTUNE_CACHE/toyworld/`` (else ``~/.cache/difftune_control/toyworld/``), seed 0.

    Args:
        split (`str`, defaults to `"train"`): ``"train"`` (10,000 scenes by default) or
            ``"validation"`` (256 by default, held out: another seed stream).
        n (`int`, *optional*): at least this many scenes instead of the default size: a cached set of
            ``n`` or more scenes is reused as it is (its first ``n`` scenes are the same), else exactly
            ``n`` are rendered.
        resolution (`int`, defaults to 64): image size.
        domain (`str`, defaults to `"default"`): the toy-world domain (:func:`~.domains.domain_names`);
            each domain has its own folder.

    Returns:
        `pathlib.Path`: the dataset folder (see :func:`build_dataset`).
    """
    root = cache_root() / "toyworld"
    if n is None:
        if split not in DEFAULT_SIZES:
            raise ValueError(
                f"no default size for split {split!r}; pass n or use one of {sorted(DEFAULT_SIZES)}"
            )
        n = DEFAULT_SIZES[split]
    elif (cached := _cached_dataset(root, split, n, resolution, get_domain(domain).name)) is not None:
        return cached
    get_domain(domain)  # an unknown name fails here, before a folder is named after it
    return build_dataset(
        root / _folder_name(split, n, resolution, domain),
        n=n,
        seed=0,
        resolution=resolution,
        split=split,
        domain=domain,
    )
