"""The ADE20K palette and class names of segmentation hints (defined in ``toyworld.palette``).

The palette lives with the toy world, the lowest layer that draws segmentation hints, so that
the toy world never imports from the extractors above it; this module keeps the public names.
"""

from difftune_control.toyworld.palette import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    class_ids_to_colors,
    colors_to_class_ids,
    palette_tensor,
)

__all__ = ["ADE20K_CLASSES", "ADE20K_PALETTE", "class_ids_to_colors", "colors_to_class_ids", "palette_tensor"]
