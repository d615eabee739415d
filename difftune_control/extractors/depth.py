"""Depth hints: normalised inverse depth (near = white), replicated over RGB, as ControlNet expects.

ControlNet's depth model was trained on MiDaS output normalised per image (`d -= min; d /= max`):
relative inverse depth (disparity), 1 = nearest, 0 = farthest. Every backend here produces that.

Backends:

- `dpt` (default): a transformers depth model (`AutoModelForDepthEstimation`: DPT / MiDaS 3
  `Intel/dpt-hybrid-midas`, Depth Anything, ...) with its image processor, from a local folder or
  a hub id. Models that predict metric depth (e.g. ZoeDepth) need `invert=True`.
- `midas`, `zoe`: the controlnet-aux MiDaS (`dpt_hybrid-midas-501f0c75.pt`) and ZoeDepth
  (`ZoeD_M12_N.pt`) annotators, batched; weights from a local folder or hub id.
- `toyworld`: the toy world's small depth annotator (`difftune_control.toyworld`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .annotators import ControlNetAuxExtractor, ToyWorldExtractor
from .base import ConditionExtractor, Resolution
from .metrics import depth_dissimilarity
from .models import ModelExtractor, load_processor_and_model, normalize_per_image
from .registry import register_extractor

if TYPE_CHECKING:
    import torch


class DepthExtractor(ConditionExtractor):
    """Base of the depth backends; its metric is the RMSE after scale-and-shift alignment."""

    name = "depth"

    def _dissimilarity(self, hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return depth_dissimilarity(hint, other)


class TransformersDepth(DepthExtractor, ModelExtractor):
    """A transformers depth-estimation model (DPT, Depth Anything, ...) and its image processor.

    Args:
        resolution, device, dtype, batch_size: see `ModelExtractor`.
        model (`str`, defaults to `"Intel/dpt-hybrid-midas"`): local folder (with `config.json`,
            the weights and `preprocessor_config.json`) or hub id.
        invert (`bool`, defaults to `False`): the model predicts depth, not inverse depth (e.g.
            ZoeDepth); its output is inverted (1 / depth) before normalising.
        local_files_only (`bool`, defaults to `False`): never contact the hub.
    """

    backend = "dpt"

    def __init__(
        self,
        resolution: Resolution = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 16,
        model: str = "Intel/dpt-hybrid-midas",
        invert: bool = False,
        local_files_only: bool = False,
    ) -> None:
        ModelExtractor.__init__(
            self, resolution=resolution, device=device, dtype=dtype, batch_size=batch_size
        )
        self.model_source = model
        self.invert = invert
        self.local_files_only = local_files_only

    def _load(self) -> Any:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        return load_processor_and_model(
            AutoImageProcessor,
            AutoModelForDepthEstimation,
            self.model_source,
            "depth model (dpt)",
            self.device,
            self.dtype,
            self.local_files_only,
        )

    def _run(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        processor, network = model
        pixels = processor(images=list(x), do_rescale=False, return_tensors="pt")["pixel_values"]
        predicted = network(pixel_values=pixels.to(self.device, self.dtype)).predicted_depth  # [b,h,w]
        depth = F.interpolate(
            predicted[:, None].float(), size=x.shape[-2:], mode="bicubic", align_corners=False
        )
        if self.invert:
            depth = 1.0 / depth.clamp(min=1e-6)
        return normalize_per_image(depth).expand(-1, 3, -1, -1)


class ControlNetAuxMidas(DepthExtractor, ControlNetAuxExtractor):
    """controlnet-aux MiDaS (ControlNet 1.0/1.1's depth annotator), batched.

    Args:
        resolution, device, dtype, batch_size: see `ModelExtractor`.
        model (`str`, defaults to `"lllyasviel/Annotators"`): folder with `dpt_hybrid-midas-501f0c75.pt`,
            or a hub id.
        detect_resolution (`int`, defaults to 384): shorter side the network sees (multiples of 32).
    """

    backend = "midas"
    _detector = "midas:MidasDetector"
    _files = ("dpt_hybrid-midas-501f0c75.pt",)
    _detect_multiple = 32
    _upsample_mode = "bicubic"

    def __init__(
        self,
        resolution: Resolution = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 16,
        model: str = "lllyasviel/Annotators",
        detect_resolution: int = 384,
    ) -> None:
        super().__init__(resolution, device, dtype, batch_size, model, detect_resolution)

    def raw_depth(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        """The network's raw relative inverse depth [b,1,H,W] (before normalisation)."""
        return self._detect(model, x)

    def _infer(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        return model((x * 2.0 - 1.0).to(self.dtype))[:, None]  # [b,1,h,w]

    def _to_hint(self, out: torch.Tensor) -> torch.Tensor:
        return normalize_per_image(out).expand(-1, 3, -1, -1)


class ControlNetAuxZoe(DepthExtractor, ControlNetAuxExtractor):
    """controlnet-aux ZoeDepth (ControlNet 1.1's `depth_zoe` annotator), batched.

    Metric depth d is mapped as controlnet-aux does: 1 - (d - p2) / (p85 - p2) with the 2nd and
    85th percentiles of each image, clipped to [0, 1].

    Args:
        resolution, device, dtype, batch_size: see `ModelExtractor`.
        model (`str`, defaults to `"lllyasviel/Annotators"`): folder with `ZoeD_M12_N.pt`, or a hub id.
        detect_resolution (`int`, defaults to 512): shorter side the network sees (multiples of 32).
    """

    backend = "zoe"
    default_dtype = "float32"  # ZoeDepth's metric bins are not tested in half precision
    _detector = "zoe:ZoeDetector"
    _files = ("ZoeD_M12_N.pt",)
    _detect_multiple = 32

    def _place(self, detector: Any) -> Any:
        import torch

        model = detector.model.to(self.device)  # ZoeDepth's own .to() records the device
        return torch.nn.Module.to(model, dtype=self.dtype).eval()

    def _infer(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        return model.infer(x.to(self.dtype))  # [b,1,h,w] metric depth

    def _to_hint(self, out: torch.Tensor) -> torch.Tensor:
        import torch

        flat = out.flatten(1)
        low = torch.quantile(flat, 0.02, dim=1).view(-1, 1, 1, 1)
        high = torch.quantile(flat, 0.85, dim=1).view(-1, 1, 1, 1)
        near = 1.0 - (out - low) / (high - low).clamp(min=1e-6)
        return near.clamp(0, 1).expand(-1, 3, -1, -1)


class ToyWorldDepth(DepthExtractor, ToyWorldExtractor):
    """The toy world's depth annotator (normalised inverse depth, trained on exact renders).

    Args:
        resolution, device, dtype, batch_size, weights: see `ToyWorldExtractor`.
    """

    backend = "toyworld"

    def _to_hint(self, out: torch.Tensor) -> torch.Tensor:
        return out.clamp(0, 1).expand(-1, 3, -1, -1)  # [b,1,H,W] in [0,1]


register_extractor("depth", "dpt", TransformersDepth, default=True)
register_extractor("depth", "midas", ControlNetAuxMidas)
register_extractor("depth", "zoe", ControlNetAuxZoe)
register_extractor("depth", "toyworld", ToyWorldDepth)
