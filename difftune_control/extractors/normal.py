"""Surface-normal hints, in the two colour conventions ControlNet models were trained on.

Each backend stores a unit vector n as colour (n + 1) / 2; they differ in the frame:

- `from_depth` (ControlNet 1.0, `control_sd15_normal`): normals from the depth map's gradient.
  On the normalised inverse depth d: x = Sobel_x(d), y = Sobel_y(d) (OpenCV 3x3 kernels, x right,
  y down, scaled by `depth_scale`), z = a = 2 pi; background pixels (d < `bg_th`) get x = y = 0;
  the vector is normalised. The hint's RGB channels hold (z, y, x) -- ControlNet 1.0 fed the model
  the annotator's BGR-reversed array, and controlnet-aux's MiDaS normal output does the same. A
  surface facing the camera is (1, 0.5, 0.5) (pink); a depth that grows to the right (the surface
  comes nearer) raises blue, one that grows downwards raises green. Works on any depth backend.
- `normalbae` (ControlNet 1.1, `control_v11p_sd15_normalbae`): NormalBae's ScanNet convention,
  RGB = (n + 1) / 2 with red = left, green = up, blue = towards the camera; a surface facing the
  camera is (0.5, 0.5, 1) (lilac blue).
- `toyworld`: the toy world's annotator, unit camera-space normals mapped to the ControlNet 1.1
  convention by `difftune_control.toyworld.normal_to_rgb`.

The metric (mean angular error / 180) decodes v = 2 * rgb - 1; the angle between two maps of one
convention does not depend on which axis sits in which channel, so it serves all three.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .annotators import ControlNetAuxExtractor, ToyWorldExtractor
from .base import ConditionExtractor, Resolution
from .metrics import channel_norm, normal_dissimilarity
from .registry import get_extractor, register_extractor

if TYPE_CHECKING:
    import torch


class NormalExtractor(ConditionExtractor):
    """Base of the normal backends; its metric is the mean angular error in degrees / 180."""

    name = "normal"

    def _dissimilarity(self, hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return normal_dissimilarity(hint, other)


def sobel(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's 3x3 Sobel derivatives (x right, y down) of [B,1,H,W], reflect-101 borders as cv2."""
    import torch
    import torch.nn.functional as F

    batch, _, height, width = depth.shape
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=depth.device)
    kernels = torch.stack([kx, kx.T])[:, None].to(depth.dtype).repeat(batch, 1, 1, 1)  # [2B,1,3,3]
    # Images folded into the channels of one grouped convolution (much faster on the CPU).
    padded = F.pad(depth.reshape(1, batch, height, width), (1, 1, 1, 1), mode="reflect")
    grads = F.conv2d(padded, kernels, groups=batch).view(batch, 2, height, width)
    return grads[:, :1], grads[:, 1:]


def normals_from_depth(
    depth: torch.Tensor, a: float = 2.0 * math.pi, bg_th: float = 0.4, depth_scale: float = 10000.0
) -> torch.Tensor:
    """ControlNet 1.0's normal map from a normalised inverse-depth map (see the module docstring).

    Args:
        depth (`torch.Tensor`): [B,1,H,W] normalised inverse depth in [0,1] (1 = near).
        a (`float`, defaults to 2 pi): the constant z component; larger = flatter normals.
        bg_th (`float`, defaults to 0.4): pixels with depth below it are background (flat).
        depth_scale (`float`, defaults to 10000): range the normalised depth is stretched to before
            the Sobel at 512 px (scaled by max(H, W) / 512 so the look does not depend on
            resolution). ControlNet 1.0 differentiated MiDaS' raw disparity, whose range is of
            the order of 1e4.

    Returns:
        `torch.Tensor`: [B,3,H,W] hint in [0,1], channels (z, y, x) as ControlNet 1.0 fed them.
    """
    import torch

    scale = depth_scale * max(depth.shape[-2:]) / 512.0
    gx, gy = sobel(depth.float() * scale)
    background = depth < bg_th
    gx = gx.masked_fill(background, 0.0)
    gy = gy.masked_fill(background, 0.0)
    normal = torch.cat([gx, gy, torch.full_like(gx, a)], dim=1)
    normal = normal / channel_norm(normal)
    return (normal.flip(1) * 0.5 + 0.5).clamp(0, 1)


class NormalFromDepth(NormalExtractor):
    """ControlNet 1.0 normals from any registered depth backend (see `normals_from_depth`).

    Args:
        resolution (`int`, `tuple[int, int]` or `None`): output size, see `ConditionExtractor`.
        device (`str`, *optional*): passed to the depth backend (where its model runs).
        depth_backend (`str`, defaults to `"dpt"`): a depth backend (`available_extractors()["depth"]`).
        depth_params (`dict`, *optional*): parameters of the depth backend (e.g. `{"model": "path"}`).
        a (`float`, defaults to 2 pi), bg_th (`float`, defaults to 0.4), depth_scale (`float`,
            defaults to 10000): see `normals_from_depth`.
    """

    backend = "from_depth"

    def __init__(
        self,
        resolution: Resolution = None,
        device: str | None = None,
        depth_backend: str = "dpt",
        depth_params: dict[str, Any] | None = None,
        a: float = 2.0 * math.pi,
        bg_th: float = 0.4,
        depth_scale: float = 10000.0,
    ) -> None:
        super().__init__(resolution=resolution, device=None)
        problems = []
        if not a > 0:
            problems.append(f"a must be > 0, got {a}")
        if not 0 <= bg_th <= 1:
            problems.append(f"bg_th must be in [0, 1], got {bg_th}")
        if not depth_scale > 0:
            problems.append(f"depth_scale must be > 0, got {depth_scale}")
        if problems:
            raise ValueError("normal from_depth extractor: " + "; ".join(problems))
        params = dict(depth_params or {})
        if device is not None:
            params.setdefault("device", device)
        self.depth = get_extractor("depth", depth_backend, **params)
        self.a, self.bg_th, self.depth_scale = a, bg_th, depth_scale

    def _extract_batch(self, x: torch.Tensor) -> torch.Tensor:
        depth = self.depth(x)[:, :1]  # [B,1,H,W] on x's device
        return normals_from_depth(depth, a=self.a, bg_th=self.bg_th, depth_scale=self.depth_scale)


class NormalBae(NormalExtractor, ControlNetAuxExtractor):
    """controlnet-aux NormalBae (ControlNet 1.1's normal annotator, ScanNet convention), batched.

    Args:
        resolution, device, dtype, batch_size: see `ModelExtractor`.
        model (`str`, defaults to `"lllyasviel/Annotators"`): folder with `scannet.pt`, or a hub id.
        detect_resolution (`int`, defaults to 512): shorter side the network sees (multiples of 64).
    """

    backend = "normalbae"
    _detector = "normalbae:NormalBaeDetector"
    _files = ("scannet.pt",)

    def _infer(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return model(((x - mean) / std).to(self.dtype))[0][-1][:, :3]  # last refinement

    def _to_hint(self, out: torch.Tensor) -> torch.Tensor:
        return ((out + 1.0) * 0.5).clamp(0, 1)


class ToyWorldNormal(NormalExtractor, ToyWorldExtractor):
    """The toy world's normal annotator, coloured in the ControlNet 1.1 convention.

    Args:
        resolution, device, dtype, batch_size, weights: see `ToyWorldExtractor`.
    """

    backend = "toyworld"

    def _to_hint(self, out: torch.Tensor) -> torch.Tensor:
        from difftune_control.toyworld import normal_to_rgb

        normal = out / channel_norm(out).clamp(min=1e-6)  # [b,3,H,W] camera-space, unit after any resize
        return normal_to_rgb(normal).float().clamp(0, 1)


register_extractor("normal", "from_depth", NormalFromDepth, default=True)
register_extractor("normal", "normalbae", NormalBae)
register_extractor("normal", "toyworld", ToyWorldNormal)
