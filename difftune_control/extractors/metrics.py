"""Controllability metrics: how far a re-extracted hint is from the hint a sample was conditioned on.

Pure functions on float tensors in [0, 1], batched, no I/O. They follow the way ControlNet++
(Li et al., "ControlNet++: Improving Conditional Controls with Efficient Consistency Feedback",
ECCV 2024) measures controllability, written as dissimilarities (0 = identical, larger = worse):

| condition | dissimilarity | range |
|---|---|---|
| canny | 1 - F1 of edge maps, 2 px matching tolerance (BSDS-style boundary F-measure) | [0, 1] |
| sketch | 1 - SSIM on grayscale (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5) | [0, 2] |
| depth | RMSE after per-image least-squares scale-and-shift alignment (Ranftl et al., MiDaS) | [0, 1] |
| normal | mean angular error in degrees / 180 | [0, 1] |
| segmentation | 1 - mIoU over the classes present in either map | [0, 1] |

Every `*_dissimilarity(hint, other)` takes two [B,C,H,W] batches, treats `hint` as the reference
and returns float32 [B].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (what `cv2.cvtColor(..., COLOR_RGB2GRAY)` and PIL's "L" use)."""


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] RGB (or [B,1,H,W]) -> [B,1,H,W] BT.601 luma."""
    if x.shape[1] == 1:
        return x
    r, g, b = LUMA_WEIGHTS
    return x[:, 0:1] * r + x[:, 1:2] * g + x[:, 2:3] * b  # written out: fast on NCHW


def _disk(radius: int, like: torch.Tensor) -> torch.Tensor:
    """Binary disk kernel [1,1,2r+1,2r+1] (pixels within Euclidean distance `radius`)."""
    import torch

    coords = torch.arange(-radius, radius + 1, device=like.device, dtype=torch.float32)
    inside = coords[:, None] ** 2 + coords[None, :] ** 2 <= radius**2 + 1e-6
    return inside.to(like.dtype)[None, None]


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate a binary mask [B,1,H,W] with a disk of `radius` pixels (Euclidean)."""
    import torch.nn.functional as F

    if radius <= 0:
        return mask
    batch, channels, height, width = mask.shape
    folded = mask.float().reshape(1, batch * channels, height, width)
    disk = _disk(radius, folded).expand(batch * channels, 1, -1, -1)
    hits = F.conv2d(folded, disk, padding=radius, groups=batch * channels)  # grouped: fast on CPU
    return hits.view(batch, channels, height, width) > 0.5


def edge_f1(pred: torch.Tensor, target: torch.Tensor, tolerance: int = 2) -> torch.Tensor:
    """F1 score of two binary edge maps with a matching tolerance (BSDS boundary F-measure).

    A predicted edge pixel counts as correct when a target edge lies within `tolerance` pixels
    (Euclidean) of it; a target pixel counts as recalled when a predicted edge lies that close.
    Two empty maps score 1; one empty map scores 0.

    Args:
        pred (`torch.Tensor`): bool [B,1,H,W] predicted edges.
        target (`torch.Tensor`): bool [B,1,H,W] reference edges.
        tolerance (`int`, defaults to 2): matching radius in pixels.

    Returns:
        `torch.Tensor`: float32 [B] F1 in [0, 1].
    """
    pred, target = pred.bool(), target.bool()
    n_pred = pred.flatten(1).sum(1).float()
    n_target = target.flatten(1).sum(1).float()
    matched_pred = (pred & dilate(target, tolerance)).flatten(1).sum(1).float()
    matched_target = (target & dilate(pred, tolerance)).flatten(1).sum(1).float()
    precision = matched_pred / n_pred.clamp(min=1)
    recall = matched_target / n_target.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    both_empty = (n_pred == 0) & (n_target == 0)
    return f1.masked_fill(both_empty, 1.0)


def canny_dissimilarity(
    hint: torch.Tensor, other: torch.Tensor, tolerance: int = 2, threshold: float = 0.5
) -> torch.Tensor:
    """1 - F1 of two edge hints (white edges on black) with a `tolerance`-pixel match radius.

    Args:
        hint (`torch.Tensor`): reference edge hints [B,C,H,W] in [0, 1].
        other (`torch.Tensor`): edge hints to score, same shape.
        tolerance (`int`, defaults to 2): matching radius in pixels.
        threshold (`float`, defaults to 0.5): a pixel is an edge when its channel mean exceeds it.

    Returns:
        `torch.Tensor`: float32 [B] in [0, 1].
    """
    target = hint.mean(dim=1, keepdim=True) > threshold
    pred = other.mean(dim=1, keepdim=True) > threshold
    return 1.0 - edge_f1(pred, target, tolerance)


def gaussian_kernel1d(sigma: float, like: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian of standard deviation `sigma` (radius defaults to ceil(3 sigma))."""
    import torch

    radius = max(1, int(math.ceil(3.0 * sigma))) if radius is None else radius
    coords = torch.arange(-radius, radius + 1, device=like.device, dtype=torch.float64)
    kernel = torch.exp(-(coords**2) / (2.0 * sigma**2)).to(like.dtype)
    return kernel / kernel.sum()  # normalised in the working dtype: sums to 1 there


def separable_filter(
    x: torch.Tensor, kernel: torch.Tensor, padding_mode: str | None = "reflect"
) -> torch.Tensor:
    """Filter every channel of [B,C,H,W] with the outer product of a 1-D `kernel` with itself.

    Channels of all images are folded into one depthwise (grouped) convolution, which on the CPU
    is several times faster than a single-channel convolution over the batch.

    Args:
        x (`torch.Tensor`): [B,C,H,W].
        kernel (`torch.Tensor`): 1-D kernel of odd length 2r+1, same dtype and device as `x`.
        padding_mode (`str` or `None`, defaults to `"reflect"`): how to pad r pixels per side so
            the size is kept; `None` computes the valid part only ([B,C,H-2r,W-2r]).

    Returns:
        `torch.Tensor`: the filtered tensor.
    """
    import torch.nn.functional as F

    batch, channels, height, width = x.shape
    radius = kernel.numel() // 2
    folded = x.reshape(1, batch * channels, height, width)
    if padding_mode is not None:
        mode = padding_mode if min(height, width) > radius else "replicate"
        folded = F.pad(folded, (radius, radius, radius, radius), mode=mode)
    groups = batch * channels
    folded = F.conv2d(folded, kernel.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    folded = F.conv2d(folded, kernel.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
    return folded.view(batch, channels, folded.shape[-2], folded.shape[-1])


def gaussian_blur(x: torch.Tensor, sigma: float, padding_mode: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur of [B,C,H,W] keeping the size (reflect padding by default)."""
    return separable_filter(x, gaussian_kernel1d(sigma, x), padding_mode)


def ssim(
    x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Mean structural similarity of two batches on grayscale (Wang, Bovik, Sheikh, Simoncelli 2004).

    Gaussian window (`window_size`, `sigma`), constants K1 = 0.01, K2 = 0.03, statistics over the
    valid part of the image only (no padding), as in the paper's reference implementation. Images
    smaller than the window use a window as large as the image.

    Args:
        x (`torch.Tensor`): [B,C,H,W] in [0, data_range]; RGB is converted to BT.601 luma.
        y (`torch.Tensor`): same shape.
        window_size (`int`, defaults to 11): window side in pixels (odd).
        sigma (`float`, defaults to 1.5): standard deviation of the window.
        data_range (`float`, defaults to 1.0): dynamic range of the inputs.

    Returns:
        `torch.Tensor`: float32 [B] SSIM in [-1, 1] (1 for identical inputs).
    """
    import torch

    x, y = to_gray(x.float()), to_gray(y.float())
    size = min(window_size, x.shape[-2], x.shape[-1])
    size = size if size % 2 == 1 else size - 1
    kernel1d = gaussian_kernel1d(sigma, x, radius=size // 2)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    # Variances and the covariance do not change when each image is shifted by a constant; taking
    # them from mean-centred images keeps E[x^2] - E[x]^2 from cancelling badly in float32.
    mean_x = x.mean(dim=(1, 2, 3), keepdim=True)
    mean_y = y.mean(dim=(1, 2, 3), keepdim=True)
    xc, yc = x - mean_x, y - mean_y
    stack = torch.cat([xc, yc, xc * xc, yc * yc, xc * yc], dim=1)  # [B,5,H,W]
    # The Gaussian window is separable: two 1-D passes equal the 2-D window, valid part only.
    m_x, m_y, e_xx, e_yy, e_xy = separable_filter(stack, kernel1d, padding_mode=None).unbind(dim=1)
    var_x, var_y, cov = e_xx - m_x**2, e_yy - m_y**2, e_xy - m_x * m_y
    mu_x, mu_y = m_x + mean_x[:, 0], m_y + mean_y[:, 0]
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def sketch_dissimilarity(hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """1 - SSIM of two line-drawing hints on grayscale (see `ssim`).

    Returns:
        `torch.Tensor`: float32 [B] in [0, 2] (0 for identical inputs).
    """
    return 1.0 - ssim(hint, other)


def align_scale_shift(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Least-squares scale-and-shift alignment of `source` onto `target`, per image.

    Solves min_{s,t} ||s * source + t - target||^2 in closed form (the alignment MiDaS uses to
    evaluate relative depth, Ranftl et al. 2020). A constant source gets s = 0, t = mean(target).

    Args:
        target (`torch.Tensor`): [B,N] reference values.
        source (`torch.Tensor`): [B,N] values to align.

    Returns:
        `torch.Tensor`: [B,N] aligned source.
    """
    mean_s = source.mean(dim=1, keepdim=True)
    mean_t = target.mean(dim=1, keepdim=True)
    centred = source - mean_s
    var = (centred**2).mean(dim=1, keepdim=True)
    cov = (centred * (target - mean_t)).mean(dim=1, keepdim=True)
    scale = cov / var.clamp(min=1e-12)
    scale = scale.masked_fill(var <= 1e-12, 0.0)
    return scale * centred + mean_t


def depth_dissimilarity(hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """RMSE between two depth hints after aligning `other` onto `hint` by scale and shift.

    Uses the first channel (depth hints repeat one normalised inverse-depth map over RGB). The
    alignment makes the score invariant to any affine change of `other`'s depth values
    (a positive or negative scale and any shift), which is what relative depth allows.

    Args:
        hint (`torch.Tensor`): reference depth hints [B,C,H,W] in [0, 1].
        other (`torch.Tensor`): depth hints to score, same shape.

    Returns:
        `torch.Tensor`: float32 [B] in [0, 1] (0 when `other` is an affine copy of `hint`).
    """
    target = hint[:, 0].flatten(1).double()
    source = other[:, 0].flatten(1).double()
    residual = align_scale_shift(target, source) - target
    return residual.pow(2).mean(dim=1).sqrt().float()


def decode_normals(rgb: torch.Tensor) -> torch.Tensor:
    """Map normal-map colours [B,3,H,W] in [0,1] to unit vectors: v = 2 * rgb - 1, normalised.

    Both ControlNet conventions store a unit vector as (v + 1) / 2 per channel and differ only in
    which axis goes to which channel and its sign (see `extractors.normal`); angles between two
    maps of one convention do not depend on it. A mid-grey pixel (zero vector) stays zero.
    """
    vectors = rgb.float() * 2.0 - 1.0
    return vectors / channel_norm(vectors).clamp(min=1e-6)


def channel_norm(v: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the 3 channels of [B,3,H,W] -> [B,1,H,W] (written out: `Tensor.norm`
    over dim 1 of an NCHW tensor is ~20x slower on the CPU)."""
    return (v[:, 0:1] * v[:, 0:1] + v[:, 1:2] * v[:, 1:2] + v[:, 2:3] * v[:, 2:3]).sqrt()


def normal_angular_error(hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel angle in degrees between two normal maps of one colour convention.

    Args:
        hint (`torch.Tensor`): reference normal hints [B,3,H,W] in [0, 1].
        other (`torch.Tensor`): normal hints to score, same shape and convention.

    Returns:
        `torch.Tensor`: float32 [B] mean angular error in degrees, in [0, 180].
    """
    import torch

    a, b = decode_normals(hint), decode_normals(other)
    cos = (a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).flatten(1).mean(1)


def normal_dissimilarity(hint: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean angular error between two normal hints in degrees, divided by 180 (range [0, 1])."""
    return normal_angular_error(hint, other) / 180.0


def mean_iou(target_ids: torch.Tensor, pred_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image mean IoU over the classes present in either map.

    Args:
        target_ids (`torch.Tensor`): int [B,H,W] reference class ids in [0, num_classes).
        pred_ids (`torch.Tensor`): int [B,H,W] predicted class ids.
        num_classes (`int`): number of classes.

    Returns:
        `torch.Tensor`: float32 [B] mIoU in [0, 1].
    """
    import torch

    batch = target_ids.shape[0]
    offsets = (torch.arange(batch, device=target_ids.device) * num_classes)[:, None]
    t = target_ids.flatten(1).long() + offsets  # [B, P], class id made unique per image
    p = pred_ids.flatten(1).long() + offsets
    size = batch * num_classes
    area_t = torch.bincount(t.flatten(), minlength=size).view(batch, num_classes)
    area_p = torch.bincount(p.flatten(), minlength=size).view(batch, num_classes)
    agree = t == p
    inter = torch.bincount(t[agree], minlength=size).view(batch, num_classes)
    union = area_t + area_p - inter
    present = union > 0
    iou = inter.float() / union.clamp(min=1).float()
    return (iou * present).sum(1) / present.sum(1).clamp(min=1)


def segmentation_dissimilarity(
    hint: torch.Tensor, other: torch.Tensor, palette: np.ndarray | None = None
) -> torch.Tensor:
    """1 - mIoU of two colour-coded segmentation hints over the classes present in either.

    Each pixel is decoded to the class of the nearest palette colour (`palette.colors_to_class_ids`),
    so slightly blurred or re-encoded hints still decode to the right classes.

    Args:
        hint (`torch.Tensor`): reference segmentation hints [B,3,H,W] in [0, 1].
        other (`torch.Tensor`): segmentation hints to score, same shape.
        palette (`np.ndarray`, *optional*): uint8 [N,3] palette; ADE20K when omitted.

    Returns:
        `torch.Tensor`: float32 [B] in [0, 1].
    """
    from .palette import ADE20K_PALETTE, colors_to_class_ids

    palette = ADE20K_PALETTE if palette is None else palette
    target_ids = colors_to_class_ids(hint, palette)
    pred_ids = colors_to_class_ids(other, palette)
    return 1.0 - mean_iou(target_ids, pred_ids, num_classes=len(palette))
