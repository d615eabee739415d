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

from .dataset import build_dataset, default_dataset_dir
from .domains import domain_names, get_domain, register_domain
from .labels import TOY_TO_ADE20K, annotate_hint, classes_to_ade_rgb
from .models import ANNOTATOR_KINDS, AnnotatorConfig, ToyAnnotator
from .render import BACKGROUND_DEPTH
from .scene import COLOURS, FLOOR_COLOURS, SHAPES, Domain, split_seed, vocabulary
from .weights import WEIGHTS_DIR, annotator_path, default_base_model_path, load_annotator
from .world import TOY_CLASS_NAMES, normal_to_rgb, normalised_inverse_depth, render_scenes, rgb_to_normal

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
