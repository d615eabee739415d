"""The toy world: procedural 3D scenes with exact depth, normals, classes and captions, and the
small models pretrained on them (a tiny Stable-Diffusion-architecture base and annotators).

```python
from difftune_control.toyworld import render_scenes, default_base_model_path, load_annotator

out = render_scenes(16, seed=0)  # rgb, depth, inv_depth, normal, classes, captions ...
dusk = render_scenes(16, seed=0, domain="dusk")  # a shifted domain (domain_names() lists them)
pipe = StableDiffusionPipeline.from_pretrained(default_base_model_path())  # offline
depth = load_annotator("depth")(out["rgb"])  # [16, 1, 64, 64] normalised inverse depth
```
"""

import importlib
from typing import Any

# Names load their module on first use (PEP 562), so importing one light module of the toy world (the
# palette, the scene vocabulary) does not import torch and the renderer with it.
_EXPORTS: dict[str, str] = {
    "build_dataset": ".dataset",
    "default_dataset_dir": ".dataset",
    "domain_names": ".domains",
    "get_domain": ".domains",
    "register_domain": ".domains",
    "TOY_TO_ADE20K": ".labels",
    "annotate_hint": ".labels",
    "classes_to_ade_rgb": ".labels",
    "ANNOTATOR_KINDS": ".models",
    "AnnotatorConfig": ".models",
    "ToyAnnotator": ".models",
    "BACKGROUND_DEPTH": ".render",
    "COLOURS": ".scene",
    "FLOOR_COLOURS": ".scene",
    "SHAPES": ".scene",
    "Domain": ".scene",
    "split_seed": ".scene",
    "vocabulary": ".scene",
    "WEIGHTS_DIR": ".weights",
    "annotator_path": ".weights",
    "default_base_model_path": ".weights",
    "load_annotator": ".weights",
    "TOY_CLASS_NAMES": ".world",
    "normal_to_rgb": ".world",
    "normalised_inverse_depth": ".world",
    "render_scenes": ".world",
    "rgb_to_normal": ".world",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ANNOTATOR_KINDS",
    "BACKGROUND_DEPTH",
    "COLOURS",
    "FLOOR_COLOURS",
    "SHAPES",
    "TOY_CLASS_NAMES",
    "TOY_TO_ADE20K",
    "WEIGHTS_DIR",
    "AnnotatorConfig",
    "Domain",
    "ToyAnnotator",
    "annotate_hint",
    "annotator_path",
    "build_dataset",
    "classes_to_ade_rgb",
    "default_base_model_path",
    "default_dataset_dir",
    "domain_names",
    "get_domain",
    "load_annotator",
    "normal_to_rgb",
    "normalised_inverse_depth",
    "register_domain",
    "render_scenes",
    "rgb_to_normal",
    "split_seed",
    "vocabulary",
]
