"""Segmentation hints: per-pixel classes coloured with the ADE20K palette (what ControlNet's seg
models, `control_sd15_seg` / `control_v11p_sd15_seg`, were trained on).

Backends:

- `upernet` (default): transformers `UperNetForSemanticSegmentation` trained on ADE20K
  (e.g. `openmmlab/upernet-convnext-small`) with its image processor.
- `oneformer`: transformers `OneFormerForUniversalSegmentation` on ADE20K
  (e.g. `shi-labs/oneformer_ade20k_swin_large`), run in its "semantic" task, with its processor.
- `toyworld`: the toy world's segmentation annotator; its classes are mapped onto ADE20K ids by
  `difftune_control.toyworld.TOY_TO_ADE20K` and coloured with the same palette.

The metric decodes both hints to classes by nearest palette colour and returns 1 - mIoU over the
classes present in either map.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from .annotators import ToyWorldExtractor
from .base import ConditionExtractor, Resolution
from .metrics import segmentation_dissimilarity
from .models import ModelExtractor, load_processor_and_model
from .palette import ADE20K_CLASSES, class_ids_to_colors
from .registry import register_extractor

if TYPE_CHECKING:
    import torch


class SegmentationExtractor(ConditionExtractor):
    """Base of the segmentation backends; its metric is 1 - mIoU over the classes present."""

    name = "segmentation"

    def _dissimilarity(self, hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return segmentation_dissimilarity(hint, other)


def _check_ade20k(network: Any, source: str) -> None:
    num_labels = int(getattr(network.config, "num_labels", -1))
    if num_labels != len(ADE20K_CLASSES):
        raise ValueError(
            f"segmentation model {source!r} predicts {num_labels} classes, but hints use the "
            f"{len(ADE20K_CLASSES)}-class ADE20K palette; use a model trained on ADE20K "
            f"(e.g. openmmlab/upernet-convnext-small or shi-labs/oneformer_ade20k_swin_large)"
        )


class _TransformersSegmentation(SegmentationExtractor, ModelExtractor):
    """Shared constructor and loading of the transformers segmentation backends."""

    _default_model = ""

    def __init__(
        self,
        resolution: Resolution = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 8,
        model: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        ModelExtractor.__init__(
            self, resolution=resolution, device=device, dtype=dtype, batch_size=batch_size
        )
        self.model_source = model or self._default_model
        self.local_files_only = local_files_only

    def _load_checked(self, processor_cls: Any, model_cls: Any) -> tuple[Any, Any]:
        """Load the processor and the network (see `load_processor_and_model`) and check that the
        network predicts the ADE20K classes."""
        processor, network = load_processor_and_model(
            processor_cls,
            model_cls,
            self.model_source,
            f"segmentation model ({self.backend})",
            self.device,
            self.dtype,
            self.local_files_only,
        )
        _check_ade20k(network, self.model_source)
        return processor, network


class UperNetSegmentation(_TransformersSegmentation):
    """ADE20K semantic segmentation with transformers' UperNet and its image processor.

    Args:
        resolution, device, dtype, batch_size: see `ModelExtractor` (`batch_size` defaults to 8).
        model (`str`, defaults to `"openmmlab/upernet-convnext-small"`): local folder (config,
            weights, `preprocessor_config.json`) or hub id; must predict the 150 ADE20K classes.
        local_files_only (`bool`, defaults to `False`): never contact the hub.
    """

    backend = "upernet"
    _default_model = "openmmlab/upernet-convnext-small"

    def _load(self) -> Any:
        from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

        return self._load_checked(AutoImageProcessor, UperNetForSemanticSegmentation)

    def _run(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        processor, network = model
        pixels = processor(images=list(x), do_rescale=False, return_tensors="pt")["pixel_values"]
        logits = network(pixel_values=pixels.to(self.device, self.dtype)).logits  # [b,150,h,w]
        logits = F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return class_ids_to_colors(logits.argmax(dim=1))


class OneFormerSegmentation(_TransformersSegmentation):
    """ADE20K semantic segmentation with transformers' OneFormer ("semantic" task) and its processor.

    Args:
        resolution, device, dtype, batch_size: see `ModelExtractor` (`batch_size` defaults to 8).
        model (`str`, defaults to `"shi-labs/oneformer_ade20k_swin_large"`): local folder (config,
            weights, processor and tokenizer files) or hub id; must predict the 150 ADE20K classes.
        local_files_only (`bool`, defaults to `False`): never contact the hub.
    """

    backend = "oneformer"
    _default_model = "shi-labs/oneformer_ade20k_swin_large"

    def _load(self) -> Any:
        from transformers import OneFormerForUniversalSegmentation, OneFormerProcessor

        return self._load_checked(OneFormerProcessor, OneFormerForUniversalSegmentation)

    def _run(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        import torch

        processor, network = model
        inputs = processor(
            images=list(x), task_inputs=["semantic"] * x.shape[0], do_rescale=False, return_tensors="pt"
        )
        outputs = network(
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
            pixel_mask=inputs["pixel_mask"].to(self.device) if "pixel_mask" in inputs else None,
            task_inputs=inputs["task_inputs"].to(self.device),
        )
        outputs.class_queries_logits = outputs.class_queries_logits.float()
        outputs.masks_queries_logits = outputs.masks_queries_logits.float()
        maps = processor.post_process_semantic_segmentation(
            outputs, target_sizes=[tuple(x.shape[-2:])] * x.shape[0]
        )
        return class_ids_to_colors(torch.stack(list(maps)).to(x.device))


class ToyWorldSegmentation(SegmentationExtractor, ToyWorldExtractor):
    """The toy world's segmentation annotator, its classes drawn in their ADE20K colours.

    Args:
        resolution, device, dtype, batch_size, weights: see `ToyWorldExtractor`.
    """

    backend = "toyworld"

    @cached_property
    def _ade20k_ids(self) -> torch.Tensor:
        """The ADE20K class id of each toy class (`TOY_TO_ADE20K`), long [C_toy] on `self.device`."""
        import torch

        from difftune_control.toyworld import TOY_TO_ADE20K

        table = [int(TOY_TO_ADE20K[i]) for i in range(len(TOY_TO_ADE20K))]
        return torch.tensor(table, dtype=torch.long, device=self.device)

    def _to_hint(self, out: torch.Tensor) -> torch.Tensor:
        lookup = self._ade20k_ids
        if out.shape[1] != lookup.numel():  # out: [b,C_toy,H,W] logits
            raise RuntimeError(
                f"toy segmentation annotator predicts {out.shape[1]} classes but TOY_TO_ADE20K maps "
                f"{lookup.numel()}"
            )
        return class_ids_to_colors(lookup[out.argmax(dim=1)])


register_extractor("segmentation", "upernet", UperNetSegmentation, default=True)
register_extractor("segmentation", "oneformer", OneFormerSegmentation)
register_extractor("segmentation", "toyworld", ToyWorldSegmentation)
