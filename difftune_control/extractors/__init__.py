"""Condition extractors: image -> ControlNet hint, and the dissimilarity metric of each condition.

```python
from difftune_control.extractors import available_extractors, get_extractor

ext = get_extractor("canny", resolution=512)
hint = ext(image)  # float32 [3, 512, 512] in [0, 1]
d = ext.dissimilarity(hint[None], ext(generated)[None])  # float32 [1]
```

Importing this package registers the built-in backends; model weights load only on first use.
"""

# Importing the condition modules registers their backends (heavy imports stay inside them).
from . import canny, depth, normal, segmentation, sketch  # noqa: F401
from .base import ConditionExtractor, ImageInput, resize_batch, to_batch
from .palette import ADE20K_CLASSES, ADE20K_PALETTE, class_ids_to_colors, colors_to_class_ids
from .recipes import ConditionRecipe, available_recipes, build_extractor, load_recipe
from .registry import (
    available_extractors,
    default_backend,
    get_extractor,
    get_extractor_class,
    register_extractor,
)

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "ConditionExtractor",
    "ConditionRecipe",
    "ImageInput",
    "available_extractors",
    "available_recipes",
    "build_extractor",
    "class_ids_to_colors",
    "colors_to_class_ids",
    "default_backend",
    "get_extractor",
    "get_extractor_class",
    "load_recipe",
    "register_extractor",
    "resize_batch",
    "to_batch",
]
