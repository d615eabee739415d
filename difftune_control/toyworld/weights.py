"""Where the shipped toy-world weights live, and loaders for them (all offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .models import ANNOTATOR_KINDS, AnnotatorConfig, AnnotatorKind, ToyAnnotator

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Folder of the shipped weights: ``base/`` (diffusers pipeline) and ``<kind>.safetensors``."""

_PIPELINE_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def default_base_model_path() -> Path:
    """Return the shipped toy-world base model: a ``StableDiffusionPipeline`` folder (fp16 safetensors).

    It loads offline with ``StableDiffusionPipeline.from_pretrained(path)`` and per part with
    ``UNet2DConditionModel.from_pretrained(path, subfolder="unet")`` etc.

    Returns:
        `pathlib.Path`: the folder.

    Raises:
        FileNotFoundError: if the folder or one of its parts is missing (e.g. a checkout without
        the committed weights); the message says how to restore or rebuild them.
    """
    path = WEIGHTS_DIR / "base"
    missing = [p for p in _PIPELINE_PARTS if not (path / p).exists()]
    if missing:
        raise FileNotFoundError(
            f"the toy-world base model at {path} is incomplete (missing: {', '.join(missing)}); "
            "restore difftune_control/toyworld/weights from git (git lfs is not used) or rebuild it with "
            "`python scripts/pretrain_toyworld.py --stage all` on a GPU machine"
        )
    return path


def annotator_path(kind: AnnotatorKind) -> Path:
    """Path of the shipped annotator weights of ``kind`` (``depth``, ``normal`` or ``segmentation``)."""
    if kind not in ANNOTATOR_KINDS:
        raise ValueError(f"annotator kind must be one of {', '.join(ANNOTATOR_KINDS)}; got {kind!r}")
    return WEIGHTS_DIR / f"{kind}.safetensors"


def load_annotator(
    kind: AnnotatorKind,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
) -> ToyAnnotator:
    """Load a toy-world annotator (eval mode, no gradients needed).

    Args:
        kind (`str`): ``"depth"`` (-> ``[B, 1, H, W]`` normalised inverse depth in [0, 1]),
            ``"normal"`` (-> ``[B, 3, H, W]`` unit normals, OpenGL camera space as
            :func:`render_scenes`) or ``"segmentation"`` (-> logits ``[B, 6, H, W]``).
        device (`str` or `torch.device`, *optional*): CPU when omitted.
        dtype (`torch.dtype`, defaults to `torch.float32`): parameter dtype.
        path (`str` or `os.PathLike`, *optional*): a weights file to load instead of the shipped one.

    Returns:
        [`ToyAnnotator`]: forward takes float ``[B, 3, H, W]`` RGB in [0, 1], H and W multiples of 8.

    Raises:
        FileNotFoundError: if the weights file does not exist.
        ValueError: if ``kind`` is unknown or the file holds another kind of annotator.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(path) if path is not None else annotator_path(kind)
    if kind not in ANNOTATOR_KINDS:
        raise ValueError(f"annotator kind must be one of {', '.join(ANNOTATOR_KINDS)}; got {kind!r}")
    if not file.is_file():
        raise FileNotFoundError(
            f"toy-world {kind} annotator weights not found at {file}; restore difftune_control/toyworld/weights "
            f"from git or rebuild them with `python scripts/pretrain_toyworld.py --stage {kind}`"
        )
    with safe_open(str(file), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("kind") != kind:
        raise ValueError(f"{file} holds a {meta.get('kind')!r} annotator, not {kind!r}")
    config = AnnotatorConfig(**json.loads(meta["config"]))
    model = ToyAnnotator(config)
    model.load_state_dict(load_file(str(file)))
    return model.to(device=device or "cpu", dtype=dtype).eval().requires_grad_(False)
