"""Canny edges (backend `opencv`): white edges on black, as ControlNet's canny model expects.

ControlNet runs `cv2.Canny(image, 100, 200)` on the uint8 RGB image (OpenCV takes, per pixel, the
channel with the largest gradient) and replicates the edge map over three channels. So do we.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ConditionExtractor, Resolution
from .metrics import canny_dissimilarity
from .registry import register_extractor

if TYPE_CHECKING:
    import torch


class CannyExtractor(ConditionExtractor):
    """Base of the canny backends; its metric is 1 - F1 of edge maps with a 2 px tolerance."""

    name = "canny"

    def _dissimilarity(self, hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return canny_dissimilarity(hint, other, tolerance=2)


class OpenCVCanny(CannyExtractor):
    """Canny edge detector of OpenCV (weight-free, CPU).

    Args:
        resolution (`int`, `tuple[int, int]` or `None`): output size, see `ConditionExtractor`.
        device (`str`, *optional*): ignored for the computation (OpenCV runs on the CPU); batch
            tensors still come back on their own device.
        low_threshold (`int`, defaults to 100): hysteresis low threshold (ControlNet's default).
        high_threshold (`int`, defaults to 200): hysteresis high threshold (ControlNet's default).
        aperture_size (`int`, defaults to 3): Sobel aperture (3, 5 or 7).
        l2_gradient (`bool`, defaults to `False`): use the exact L2 gradient norm instead of L1.
    """

    backend = "opencv"

    def __init__(
        self,
        resolution: Resolution = None,
        device: str | None = None,
        low_threshold: int = 100,
        high_threshold: int = 200,
        aperture_size: int = 3,
        l2_gradient: bool = False,
    ) -> None:
        super().__init__(resolution=resolution, device=None)
        problems = []
        if not 0 <= low_threshold <= high_threshold:
            problems.append(
                f"low_threshold/high_threshold must satisfy 0 <= low <= high, got {low_threshold}/{high_threshold}"
            )
        if aperture_size not in (3, 5, 7):
            problems.append(f"aperture_size must be 3, 5 or 7, got {aperture_size}")
        if problems:
            raise ValueError("canny extractor: " + "; ".join(problems))
        self.low_threshold = low_threshold
        self.high_threshold = high_threshold
        self.aperture_size = aperture_size
        self.l2_gradient = l2_gradient

    def _extract_batch(self, x: torch.Tensor) -> torch.Tensor:
        import cv2
        import numpy as np
        import torch

        images = (x.detach().cpu() * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B,H,W,3]
        edges = np.stack(
            [
                cv2.Canny(
                    np.ascontiguousarray(image),
                    self.low_threshold,
                    self.high_threshold,
                    apertureSize=self.aperture_size,
                    L2gradient=self.l2_gradient,
                )
                for image in images
            ]
        )  # [B,H,W] uint8 in {0, 255}
        out = torch.from_numpy(edges).to(x.device).float().div_(255.0)
        return out[:, None].expand(-1, 3, -1, -1)


register_extractor("canny", "opencv", OpenCVCanny, default=True)
