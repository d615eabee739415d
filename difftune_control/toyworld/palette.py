"""The ADE20K 150-class palette and class names used for segmentation hints.

ControlNet's segmentation model (``control_sd15_seg`` / ``control_v11p_sd15_seg``) was trained on
hints drawn with the palette of the ADE20K SceneParsing benchmark (150 classes, as in mmsegmentation's
``ADE20KDataset``, ControlNet's uniformer annotator, controlnet_aux and sd-webui-controlnet). Row
``i`` of :data:`ADE20K_PALETTE` is the RGB colour of class ``i`` of :data:`ADE20K_CLASSES`
(0-based, background/"other" excluded, i.e. ``reduce_zero_label`` ids).

Note: the palette is not injective: classes 6 ("road") and 48 ("skyscraper") share
``(140, 140, 140)``. Colour -> class decoding (:func:`colors_to_class_ids`) returns the lower id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# fmt: off
ADE20K_PALETTE: np.ndarray = np.array(
    [
        [120, 120, 120], [180, 120, 120], [  6, 230, 230], [ 80,  50,  50],  # 0-3
        [  4, 200,   3], [120, 120,  80], [140, 140, 140], [204,   5, 255],  # 4-7
        [230, 230, 230], [  4, 250,   7], [224,   5, 255], [235, 255,   7],  # 8-11
        [150,   5,  61], [120, 120,  70], [  8, 255,  51], [255,   6,  82],  # 12-15
        [143, 255, 140], [204, 255,   4], [255,  51,   7], [204,  70,   3],  # 16-19
        [  0, 102, 200], [ 61, 230, 250], [255,   6,  51], [ 11, 102, 255],  # 20-23
        [255,   7,  71], [255,   9, 224], [  9,   7, 230], [220, 220, 220],  # 24-27
        [255,   9,  92], [112,   9, 255], [  8, 255, 214], [  7, 255, 224],  # 28-31
        [255, 184,   6], [ 10, 255,  71], [255,  41,  10], [  7, 255, 255],  # 32-35
        [224, 255,   8], [102,   8, 255], [255,  61,   6], [255, 194,   7],  # 36-39
        [255, 122,   8], [  0, 255,  20], [255,   8,  41], [255,   5, 153],  # 40-43
        [  6,  51, 255], [235,  12, 255], [160, 150,  20], [  0, 163, 255],  # 44-47
        [140, 140, 140], [250,  10,  15], [ 20, 255,   0], [ 31, 255,   0],  # 48-51
        [255,  31,   0], [255, 224,   0], [153, 255,   0], [  0,   0, 255],  # 52-55
        [255,  71,   0], [  0, 235, 255], [  0, 173, 255], [ 31,   0, 255],  # 56-59
        [ 11, 200, 200], [255,  82,   0], [  0, 255, 245], [  0,  61, 255],  # 60-63
        [  0, 255, 112], [  0, 255, 133], [255,   0,   0], [255, 163,   0],  # 64-67
        [255, 102,   0], [194, 255,   0], [  0, 143, 255], [ 51, 255,   0],  # 68-71
        [  0,  82, 255], [  0, 255,  41], [  0, 255, 173], [ 10,   0, 255],  # 72-75
        [173, 255,   0], [  0, 255, 153], [255,  92,   0], [255,   0, 255],  # 76-79
        [255,   0, 245], [255,   0, 102], [255, 173,   0], [255,   0,  20],  # 80-83
        [255, 184, 184], [  0,  31, 255], [  0, 255,  61], [  0,  71, 255],  # 84-87
        [255,   0, 204], [  0, 255, 194], [  0, 255,  82], [  0,  10, 255],  # 88-91
        [  0, 112, 255], [ 51,   0, 255], [  0, 194, 255], [  0, 122, 255],  # 92-95
        [  0, 255, 163], [255, 153,   0], [  0, 255,  10], [255, 112,   0],  # 96-99
        [143, 255,   0], [ 82,   0, 255], [163, 255,   0], [255, 235,   0],  # 100-103
        [  8, 184, 170], [133,   0, 255], [  0, 255,  92], [184,   0, 255],  # 104-107
        [255,   0,  31], [  0, 184, 255], [  0, 214, 255], [255,   0, 112],  # 108-111
        [ 92, 255,   0], [  0, 224, 255], [112, 224, 255], [ 70, 184, 160],  # 112-115
        [163,   0, 255], [153,   0, 255], [ 71, 255,   0], [255,   0, 163],  # 116-119
        [255, 204,   0], [255,   0, 143], [  0, 255, 235], [133, 255,   0],  # 120-123
        [255,   0, 235], [245,   0, 255], [255,   0, 122], [255, 245,   0],  # 124-127
        [ 10, 190, 212], [214, 255,   0], [  0, 204, 255], [ 20,   0, 255],  # 128-131
        [255, 255,   0], [  0, 153, 255], [  0,  41, 255], [  0, 255, 204],  # 132-135
        [ 41,   0, 255], [ 41, 255,   0], [173,   0, 255], [  0, 245, 255],  # 136-139
        [ 71,   0, 255], [122,   0, 255], [  0, 255, 184], [  0,  92, 255],  # 140-143
        [184, 255,   0], [  0, 133, 255], [255, 214,   0], [ 25, 194, 194],  # 144-147
        [102, 255,   0], [ 92,   0, 255],  # 148-149
    ],
    dtype=np.uint8,
)
# fmt: on
"""RGB colour of each ADE20K class, shape ``[150, 3]``, ``uint8``."""
ADE20K_PALETTE.setflags(write=False)

ADE20K_CLASSES: tuple[str, ...] = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)
"""Names of the 150 ADE20K SceneParsing classes, in palette order."""


def palette_tensor(
    palette: np.ndarray | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Return a palette as a float32 tensor ``[N, 3]`` in [0, 1].

    Args:
        palette (`np.ndarray`, *optional*):
            ``uint8`` array ``[N, 3]``; defaults to :data:`ADE20K_PALETTE`.
        device (`torch.device` or `str`, *optional*):
            Device of the returned tensor (CPU when omitted).

    Returns:
        `torch.Tensor`: float32 ``[N, 3]``.
    """
    import torch

    palette = ADE20K_PALETTE if palette is None else palette
    return torch.as_tensor(np.asarray(palette, dtype=np.float32) / 255.0, device=device)


def class_ids_to_colors(class_ids: torch.Tensor, palette: np.ndarray | None = None) -> torch.Tensor:
    """Colour a map of class ids with a palette.

    Args:
        class_ids (`torch.Tensor`):
            Integer tensor ``[B, H, W]`` (or ``[H, W]``) of ids in ``[0, N)``.
        palette (`np.ndarray`, *optional*):
            ``uint8`` ``[N, 3]`` palette; defaults to :data:`ADE20K_PALETTE`.

    Returns:
        `torch.Tensor`: float32 ``[B, 3, H, W]`` (or ``[3, H, W]``) in [0, 1], on the ids' device.
    """
    colors = palette_tensor(palette, device=class_ids.device)  # [N, 3]
    if class_ids.min() < 0 or class_ids.max() >= colors.shape[0]:
        raise ValueError(
            f"class ids must lie in [0, {colors.shape[0]}), got range "
            f"[{int(class_ids.min())}, {int(class_ids.max())}]"
        )
    rgb = colors[class_ids.long()]  # [..., H, W, 3]
    return rgb.movedim(-1, -3).contiguous()


def colors_to_class_ids(rgb: torch.Tensor, palette: np.ndarray | None = None) -> torch.Tensor:
    """Decode a colour-coded segmentation map to class ids by nearest palette colour.

    Colours that are not exactly in the palette (resized, compressed or generated maps) go to the
    palette entry nearest in RGB (Euclidean); ties and duplicated palette colours go to the lower id.

    Args:
        rgb (`torch.Tensor`):
            float ``[B, 3, H, W]`` (or ``[3, H, W]``) in [0, 1].
        palette (`np.ndarray`, *optional*):
            ``uint8`` ``[N, 3]`` palette; defaults to :data:`ADE20K_PALETTE`.

    Returns:
        `torch.Tensor`: int64 ``[B, H, W]`` (or ``[H, W]``) class ids.
    """
    import torch

    palette = ADE20K_PALETTE if palette is None else np.asarray(palette, dtype=np.uint8)
    colors = palette_tensor(palette, device=rgb.device)  # [N, 3]
    pixels = rgb.movedim(-3, -1).reshape(-1, 3).float()  # [P, 3]
    # Fast path: pixels whose 8-bit colour is exactly a palette colour (most of any hint) are
    # looked up by their 24-bit code; only the others go through the nearest-colour search.
    quantised = (pixels * 255.0).round().clamp(0, 255).long()
    exact = (quantised - pixels * 255.0).abs().amax(dim=1) < 1e-3
    codes = (quantised[:, 0] << 16) | (quantised[:, 1] << 8) | quantised[:, 2]
    table = torch.as_tensor(palette.astype(np.int64), device=rgb.device)
    table_codes = (table[:, 0] << 16) | (table[:, 1] << 8) | table[:, 2]
    sorted_codes, order = torch.sort(table_codes, stable=True)  # duplicates: lower id first
    slot = torch.searchsorted(sorted_codes, codes).clamp(max=len(sorted_codes) - 1)
    exact &= sorted_codes[slot] == codes
    ids = order[slot]
    rest = (~exact).nonzero().squeeze(1)
    norms = (colors * colors).sum(dim=1)[None, :]  # [1, N]
    chunk = 1 << 18  # bounds the [chunk, N] score matrix to ~150 MB
    for start in range(0, rest.numel(), chunk):
        index = rest[start : start + chunk]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every c, so drop it.
        ids[index] = (norms - 2.0 * pixels[index] @ colors.T).argmin(dim=1)
    return ids.reshape(rgb.shape[:-3] + rgb.shape[-2:])
