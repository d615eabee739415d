"""Dissimilarity metrics against hand-computed values and their extremes."""

from __future__ import annotations

import math

import pytest
import torch

from difftune_control.extractors import class_ids_to_colors, get_extractor
from difftune_control.extractors.metrics import (
    canny_dissimilarity,
    depth_dissimilarity,
    edge_f1,
    normal_angular_error,
    normal_dissimilarity,
    segmentation_dissimilarity,
    sketch_dissimilarity,
    ssim,
)


def edges(points: list[tuple[int, int]], size: int = 24) -> torch.Tensor:
    """A [1,3,size,size] edge hint with white pixels at (row, col) points."""
    hint = torch.zeros(1, 3, size, size)
    for row, col in points:
        hint[0, :, row, col] = 1.0
    return hint


def test_edge_f1_tolerance_is_two_pixels_euclidean():
    gt = edges([(10, 10)])
    assert float(canny_dissimilarity(gt, edges([(10, 12)]))) == 0.0  # 2 px away: matched
    assert float(canny_dissimilarity(gt, edges([(11, 11)]))) == 0.0  # sqrt(2) px
    assert float(canny_dissimilarity(gt, edges([(11, 12)]))) == 1.0  # sqrt(5) > 2 px
    assert float(canny_dissimilarity(gt, edges([(10, 13)]))) == 1.0  # 3 px


def test_edge_f1_hand_computed_precision_recall():
    line = [(r, 5) for r in range(20)]
    shifted = [(r, 7) for r in range(20)]
    far = [(r, 20) for r in range(20)]
    # 40 predicted pixels, 20 of them within 2 px of the 20 target pixels, all targets recalled:
    # precision 0.5, recall 1, F1 = 2 * 0.5 / 1.5 = 2/3.
    d = canny_dissimilarity(edges(line), edges(shifted + far))
    assert float(d) == pytest.approx(1.0 - 2.0 / 3.0, abs=1e-6)
    # Rows 0-9 predicted, no false positives: precision 1; target rows 0-11 lie within 2 px of a
    # prediction: recall 12/20 = 0.6; F1 = 2 * 0.6 / 1.6 = 0.75.
    d = canny_dissimilarity(edges(line), edges(line[:10]))
    assert float(d) == pytest.approx(0.25, abs=1e-6)


def test_edge_f1_empty_maps():
    empty = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    some = empty.clone()
    some[0, 0, 3, 3] = True
    assert float(edge_f1(empty, empty)) == 1.0
    assert float(edge_f1(some, empty)) == 0.0 and float(edge_f1(empty, some)) == 0.0


def test_ssim_of_constant_images_matches_the_formula():
    a, b = 0.2, 0.6
    c1 = 0.01**2
    # Constant images: no variance, no covariance, so SSIM = (2ab + c1) / (a^2 + b^2 + c1).
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    value = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert float(value) == pytest.approx(expected, rel=1e-5)
    assert float(sketch_dissimilarity(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))) == (
        pytest.approx(1 - expected, rel=1e-4)
    )


def test_ssim_extremes():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(sketch_dissimilarity(x, x), torch.zeros(2), atol=1e-6)
    inverted = sketch_dissimilarity(x, 1.0 - x)
    assert bool((inverted > 1.0).all()), "an inverted drawing is anti-correlated: SSIM < 0"
    blurred = sketch_dissimilarity(x, torch.nn.functional.avg_pool2d(x, 3, 1, 1))
    assert bool((blurred > 0.05).all()) and bool((blurred < inverted).all())


def test_depth_metric_is_invariant_to_scale_and_shift_of_the_other():
    torch.manual_seed(0)
    hint = torch.rand(3, 1, 16, 16).expand(-1, 3, -1, -1)
    assert torch.allclose(depth_dissimilarity(hint, hint), torch.zeros(3), atol=1e-6)
    assert torch.allclose(depth_dissimilarity(hint, 0.25 * hint + 0.6), torch.zeros(3), atol=1e-6)
    assert torch.allclose(depth_dissimilarity(hint, 1.0 - hint), torch.zeros(3), atol=1e-6)


def test_depth_metric_hand_computed():
    # hint [0,0,0,1], other [0,0,1,1]: s = cov/var = 0.125/0.25 = 0.5, t = 0.25 - 0.5 * 0.5 = 0,
    # aligned [0,0,0.5,0.5], residual [0,0,0.5,-0.5], RMSE = sqrt(0.5 / 4).
    hint = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    other = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert float(depth_dissimilarity(hint, other)) == pytest.approx(math.sqrt(0.125), abs=1e-6)
    # A constant prediction aligns to the mean: RMSE = std of the hint = 0.5 for a half/half map.
    half = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert float(depth_dissimilarity(half, torch.full_like(half, 0.3))) == pytest.approx(0.5, abs=1e-6)


def colour(rgb: tuple[float, float, float], size: int = 4) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_normal_metric_hand_computed_angles():
    front = colour((0.5, 0.5, 1.0))
    right = colour((1.0, 0.5, 0.5))
    back = colour((0.5, 0.5, 0.0))
    assert float(normal_dissimilarity(front, front)) == pytest.approx(0.0, abs=1e-3)
    assert float(normal_angular_error(front, right)) == pytest.approx(90.0, abs=1e-3)
    assert float(normal_dissimilarity(front, right)) == pytest.approx(0.5, abs=1e-5)
    assert float(normal_dissimilarity(front, back)) == pytest.approx(1.0, abs=1e-5)
    half = front.clone()
    half[..., :, :2] = right[..., :, :2]
    assert float(normal_angular_error(front, half)) == pytest.approx(45.0, abs=1e-3)
    # Swapping channels in both maps (another colour convention) leaves the angle unchanged.
    assert float(normal_angular_error(front.flip(1), half.flip(1))) == pytest.approx(45.0, abs=1e-3)


def test_segmentation_metric_hand_computed_miou():
    ids = torch.zeros(1, 4, 4, dtype=torch.long)
    ids[..., 2:] = 12  # left half wall (0), right half person (12)
    hint = class_ids_to_colors(ids)
    all_wall = class_ids_to_colors(torch.zeros(1, 4, 4, dtype=torch.long))
    # wall: IoU 8/16, person: IoU 0 -> mIoU 0.25 over the two classes present.
    assert float(segmentation_dissimilarity(hint, all_wall)) == pytest.approx(0.75, abs=1e-6)
    assert float(segmentation_dissimilarity(hint, hint)) == 0.0
    swapped = class_ids_to_colors(torch.where(ids == 0, 12, 0))
    assert float(segmentation_dissimilarity(hint, swapped)) == 1.0
    quantised = (hint * 255).round() / 255 + 1.0 / 255 * (torch.rand_like(hint) - 0.5)
    assert float(segmentation_dissimilarity(hint, quantised.clamp(0, 1))) == 0.0


def test_metrics_are_per_sample():
    line = edges([(r, 5) for r in range(20)])
    batch_hint = torch.cat([line, line])
    batch_other = torch.cat([line, torch.zeros_like(line)])
    assert canny_dissimilarity(batch_hint, batch_other).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("name", ["canny", "sketch", "depth", "normal", "segmentation"])
def test_every_extractor_scores_identical_hints_zero(name):
    torch.manual_seed(0)
    backend = {
        "canny": "opencv",
        "sketch": "xdog",
        "depth": "dpt",
        "normal": "normalbae",
        "segmentation": "upernet",
    }
    ext = get_extractor(name, backend[name], device="cpu")  # model backends never load for a metric
    if name == "segmentation":
        hint = class_ids_to_colors(torch.randint(0, 150, (2, 8, 8)))
    elif name == "canny":
        hint = (torch.rand(2, 1, 8, 8) > 0.7).float().expand(-1, 3, -1, -1)
    else:
        hint = torch.rand(2, 3, 8, 8)
    d = ext.dissimilarity(hint, hint)
    assert d.shape == (2,) and d.dtype == torch.float32
    assert torch.allclose(d, torch.zeros(2), atol=1e-3)
