"""Target datasets for ControlNet training: three layouts, aligned transforms, on-disk caches.

```python
spec = DatasetSpec(source="data/fill50k", resolution=512)
dataset = load_target_dataset(spec, hint_fn=extractor)  # items: pixel_values, conditioning_pixel_values, caption, index
cached = build_latent_cache(dataset, vae=vae, text_encoder=te, tokenizer=tok, cache_dir=d, model_id=mid)
```
"""

from difftune_control.data.cache import build_latent_cache, cache_key, cache_slot, hint_fn_key
from difftune_control.data.cached import CachedTargetDataset
from difftune_control.data.dataset import (
    Sample,
    TargetDataset,
    dataset_fingerprint,
    load_target_dataset,
    resolve_columns,
)
from difftune_control.data.formats import RowSource, open_source
from difftune_control.data.spec import FLAGS, DatasetSpec, HintInterpolation
from difftune_control.data.transforms import Geometry, plan_geometry, same_aspect, transform_pair

__all__ = [
    "FLAGS",
    "CachedTargetDataset",
    "DatasetSpec",
    "Geometry",
    "HintInterpolation",
    "RowSource",
    "Sample",
    "TargetDataset",
    "build_latent_cache",
    "cache_key",
    "cache_slot",
    "dataset_fingerprint",
    "hint_fn_key",
    "load_target_dataset",
    "open_source",
    "plan_geometry",
    "resolve_columns",
    "same_aspect",
    "transform_pair",
]
