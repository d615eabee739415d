"""Sketch / line-drawing hints: white lines on black, as ControlNet's scribble/HED/lineart models use.

Backends:

- `xdog` (default, weight-free, any device): an XDoG-style line drawing (Winnemoeller et al.,
  "XDoG: An eXtended difference-of-Gaussians compendium", 2012). The difference of two Gaussian
  blurs marks pixels darker than their surroundings (strokes, the dark side of edges; per RGB
  channel and on the luma, the strongest wins), a soft
  threshold `tanh(phi * (D - eps))` turns it into ink, and a ridge non-maximum suppression along
  the Hessian's across-line direction thins each stroke to about one pixel.
- `pidinet`, `hed`, `lineart`: the controlnet-aux annotators (PiDiNet, ControlNet's HED, the
  "informative drawings" lineart model), run batched on `device`; they need their weights in a
  local folder (`model = "path/to/Annotators"` holding `table5_pidinet.pth`, `ControlNetHED.pth`,
  or `sk_model.pth` + `sk_model2.pth`) or a hub id such as `lllyasviel/Annotators`.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from .annotators import ControlNetAuxExtractor
from .base import ConditionExtractor, Resolution
from .metrics import gaussian_blur, sketch_dissimilarity, to_gray
from .registry import register_extractor

if TYPE_CHECKING:
    import torch


class SketchExtractor(ConditionExtractor):
    """Base of the sketch backends; its metric is 1 - SSIM on grayscale."""

    name = "sketch"

    def _dissimilarity(self, hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return sketch_dissimilarity(hint, other)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = x[..., i + dy, j + dx] with edge replication (|dy|, |dx| <= 1)."""
    import torch.nn.functional as F

    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def ridge_nms(response: torch.Tensor) -> torch.Tensor:
    """Keep pixels that are a maximum of `response` across the local line direction.

    The across-line direction is the eigenvector of the Hessian with the most negative eigenvalue
    (a ridge curves down across the line), quantised to 0/45/90/135 degrees as in Canny's NMS.

    Args:
        response (`torch.Tensor`): [B,1,H,W] line strength.

    Returns:
        `torch.Tensor`: bool [B,1,H,W], True on ridge centres.
    """
    import torch

    r = response
    dxx = _shift(r, 0, 1) - 2 * r + _shift(r, 0, -1)
    dyy = _shift(r, 1, 0) - 2 * r + _shift(r, -1, 0)
    dxy = (_shift(r, 1, 1) - _shift(r, 1, -1) - _shift(r, -1, 1) + _shift(r, -1, -1)) / 4.0
    # Angle (x right, y down) of the eigenvector of the largest eigenvalue; the ridge's across
    # direction is perpendicular to it.
    across = 0.5 * torch.atan2(2.0 * dxy, dxx - dyy) + math.pi / 2
    bins = torch.remainder(torch.round(across / (math.pi / 4)), 4).long()  # 0: x, 1: 45, 2: y, 3: 135
    # A ridge curves down across the line: the smaller Hessian eigenvalue must be negative
    # (this drops flat plateaus, where ">= both neighbours" holds trivially).
    curved = (dxx + dyy) / 2 - torch.sqrt(((dxx - dyy) / 2) ** 2 + dxy**2) < 0
    keep = torch.zeros_like(r, dtype=torch.bool)
    for index, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        is_max = (r >= _shift(r, dy, dx)) & (r >= _shift(r, -dy, -dx))
        keep |= (bins == index) & is_max
    return keep & curved


class XDoGSketch(SketchExtractor):
    """Weight-free line drawing: difference of Gaussians, soft threshold, ridge thinning.

    Args:
        resolution (`int`, `tuple[int, int]` or `None`): output size, see `ConditionExtractor`.
        device (`str`, *optional*): where to compute; `None` keeps each batch on its own device.
        sigma (`float`, defaults to 1.0): scale of the fine Gaussian in pixels (line width ~ sigma).
        k (`float`, defaults to 1.6): ratio of the coarse to the fine Gaussian (> 1).
        eps (`float`, defaults to 0.01): darkness below which nothing is drawn (ignores faint texture).
        phi (`float`, defaults to 60.0): sharpness of the ink response `tanh(phi * (D - eps))`.
        thin (`bool`, defaults to `True`): thin strokes to their ridge (about one pixel wide).
        colour (`bool`, defaults to `True`): also draw edges between colours of similar brightness
            (the DoG of each RGB channel and of the luma; the strongest counts).
    """

    backend = "xdog"

    def __init__(
        self,
        resolution: Resolution = None,
        device: str | None = None,
        sigma: float = 1.0,
        k: float = 1.6,
        eps: float = 0.01,
        phi: float = 60.0,
        thin: bool = True,
        colour: bool = True,
    ) -> None:
        super().__init__(resolution=resolution, device=device)
        problems = []
        if not sigma > 0:
            problems.append(f"sigma must be > 0, got {sigma}")
        if not k > 1:
            problems.append(f"k must be > 1, got {k}")
        if not phi > 0:
            problems.append(f"phi must be > 0, got {phi}")
        if not 0 <= eps < 1:
            problems.append(f"eps must be in [0, 1), got {eps}")
        if problems:
            raise ValueError("xdog sketch extractor: " + "; ".join(problems))
        self.sigma, self.k, self.eps, self.phi, self.thin, self.colour = sigma, k, eps, phi, thin, colour

    def _extract_batch(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        x = x.float()
        # Per channel, then the strongest: a red cone on a grey wall of the same luma still gets
        # its outline (as Canny, which takes the channel with the largest gradient).
        channels = torch.cat([to_gray(x), x], dim=1) if self.colour else to_gray(x)
        darkness = gaussian_blur(channels, self.k * self.sigma) - gaussian_blur(channels, self.sigma)
        darkness = darkness.amax(dim=1, keepdim=True)
        # Quantise before the comparisons of the ridge NMS: convolutions round differently with the
        # batch size and the device, and 1e-7 noise must not decide ties on symmetric strokes.
        darkness = torch.round(darkness * 1e4) / 1e4
        ink = torch.tanh(self.phi * torch.relu(darkness - self.eps))
        if self.thin:
            ink = ink * ridge_nms(darkness)
        return ink.expand(-1, 3, -1, -1)


class ControlNetAuxSketch(SketchExtractor, ControlNetAuxExtractor):
    """Shared code of the controlnet-aux line annotators (batched; see the module docstring).

    Subclasses name the detector's networks in `_networks` and implement `_lines`.

    Args:
        resolution, device, dtype, batch_size: see `ModelExtractor`.
        model (`str`, defaults to `"lllyasviel/Annotators"`): folder holding the weights, or a hub id.
        detect_resolution (`int`, defaults to 512): shorter side the network sees (sides rounded to
            multiples of 64, as controlnet-aux does); the result is resized back.
    """

    _min_detect_resolution = 64
    _networks: ClassVar[tuple[str, ...]] = ()
    """Attributes of the detector holding its networks (cast to `dtype`, eval mode)."""

    def _place(self, detector: Any) -> Any:
        detector = detector.to(self.device)
        for attribute in self._networks:
            getattr(detector, attribute).to(self.dtype).eval()
        return detector

    def _infer(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        return self._lines(model, x.to(self.dtype))

    def _to_hint(self, out: torch.Tensor) -> torch.Tensor:
        return out.clamp(0, 1).expand(-1, 3, -1, -1)

    @abstractmethod
    def _lines(self, detector: Any, x: torch.Tensor) -> torch.Tensor:
        """The detector's line strength [b,1,h,w] (white lines on black; clamped to [0,1] after) for
        [b,3,h,w] in [0,1], already in `dtype`."""


class PiDiNetSketch(ControlNetAuxSketch):
    """PiDiNet soft edges (controlnet-aux `PidiNetDetector`, file `table5_pidinet.pth`)."""

    backend = "pidinet"
    default_dtype = "float32"  # its pixel-difference convolutions mix in float32 buffers
    _detector = "pidi:PidiNetDetector"
    _files = ("table5_pidinet.pth",)
    _networks = ("netNetwork",)

    def _lines(self, detector: Any, x: torch.Tensor) -> torch.Tensor:
        return detector.netNetwork(x.flip(1))[-1]  # the network was trained on BGR input


class HEDSketch(ControlNetAuxSketch):
    """ControlNet's HED soft edges (controlnet-aux `HEDdetector`, file `ControlNetHED.pth`)."""

    backend = "hed"
    _detector = "hed:HEDdetector"
    _files = ("ControlNetHED.pth",)
    _networks = ("netNetwork",)

    def _lines(self, detector: Any, x: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        projections = detector.netNetwork(x * 255.0)  # five side outputs at decreasing scales
        ups = [
            F.interpolate(p.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
            for p in projections
        ]
        return torch.sigmoid(torch.stack(ups, dim=0).mean(dim=0))


class LineartSketch(ControlNetAuxSketch):
    """ "Informative drawings" line art (controlnet-aux `LineartDetector`, `sk_model.pth`, `sk_model2.pth`).

    Args:
        coarse (`bool`, defaults to `False`): use the coarse model (`lineart_coarse`).
        **kwargs: see `ControlNetAuxSketch`.
    """

    backend = "lineart"
    _detector = "lineart:LineartDetector"
    _files = ("sk_model.pth", "sk_model2.pth")
    _networks = ("model", "model_coarse")

    def __init__(
        self,
        resolution: Resolution = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 16,
        model: str = "lllyasviel/Annotators",
        detect_resolution: int = 512,
        coarse: bool = False,
    ) -> None:
        super().__init__(resolution, device, dtype, batch_size, model, detect_resolution)
        self.coarse = coarse

    def _lines(self, detector: Any, x: torch.Tensor) -> torch.Tensor:
        network = detector.model_coarse if self.coarse else detector.model
        return 1.0 - network(x)[:, :1]  # the network draws dark lines on white


register_extractor("sketch", "xdog", XDoGSketch, default=True)
register_extractor("sketch", "pidinet", PiDiNetSketch)
register_extractor("sketch", "hed", HEDSketch)
register_extractor("sketch", "lineart", LineartSketch)
