"""Toy-world classes as ADE20K segmentation hints, and annotator outputs as ControlNet hints."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .palette import class_ids_to_colors
from .world import TOY_CLASS_NAMES, normal_to_rgb

if TYPE_CHECKING:
    from .models import ToyAnnotator

TOY_TO_ADE20K: dict[int, int] = {
    0: 2,  # background -> "sky": the background is a sky gradient above the horizon
    1: 3,  # floor -> "floor"
    2: 119,  # sphere -> "ball"
    3: 41,  # box -> "box"
    4: 42,  # cylinder -> "column" (ADE's "column, pillar": an upright cylinder)
    5: 114,  # cone -> "tent": ADE20K has no cone class; a tent (teepee) is its conical object
}
"""Toy class id -> 0-based ADE20K class index (row of ``ADE20K_PALETTE``)."""

if sorted(TOY_TO_ADE20K) != list(range(len(TOY_CLASS_NAMES))):
    raise RuntimeError("TOY_TO_ADE20K must map every toy class")


def classes_to_ade_rgb(classes: torch.Tensor) -> torch.Tensor:
    """Draw a toy class map with the ADE20K palette (what ControlNet's segmentation model reads).

    Args:
        classes (`torch.Tensor`): int64 ``[N, H, W]`` toy class ids (0 background ... 5 cone).

    Returns:
        `torch.Tensor`: float32 ``[N, 3, H, W]`` in [0, 1].
    """
    if classes.ndim != 3:
        raise ValueError(f"classes must be [N, H, W], got shape {tuple(classes.shape)}")
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= len(TOY_CLASS_NAMES)):
        raise ValueError(
            f"toy class ids must lie in [0, {len(TOY_CLASS_NAMES)}) ({', '.join(TOY_CLASS_NAMES)}), "
            f"got range [{int(classes.min())}, {int(classes.max())}]"
        )
    lut = torch.tensor([TOY_TO_ADE20K[i] for i in range(len(TOY_CLASS_NAMES))], device=classes.device)
    return class_ids_to_colors(lut[classes.long()])


@torch.no_grad()
def annotate_hint(model: ToyAnnotator, images: torch.Tensor) -> torch.Tensor:
    """Run a toy annotator and draw its output as a ControlNet hint.

    Args:
        model ([`ToyAnnotator`]): from :func:`load_annotator`.
        images (`torch.Tensor`): float ``[B, 3, H, W]`` RGB in [0, 1] (H, W multiples of 8).

    Returns:
        `torch.Tensor`: float32 ``[B, 3, H, W]`` in [0, 1]: depth as grey (near = bright),
        normals in the ControlNet 1.1 colours (:func:`normal_to_rgb`), classes in ADE20K colours.
    """
    param = next(model.parameters())
    out = model(images.to(param.device, param.dtype)).float()
    kind = model.config.kind
    if kind == "depth":
        return out.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    if kind == "normal":
        return normal_to_rgb(out)
    return classes_to_ade_rgb(out.argmax(dim=1))
