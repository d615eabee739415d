"""Extractor contract, registry and palette: weight-free backends on CPU, no downloads."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from difftune_control.extractors import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    ConditionExtractor,
    available_extractors,
    class_ids_to_colors,
    colors_to_class_ids,
    get_extractor,
    register_extractor,
    resize_batch,
)
from difftune_control.extractors.normal import normals_from_depth
from difftune_control.extractors.sketch import XDoGSketch


def scene(height: int = 96, width: int = 128) -> np.ndarray:
    """A uint8 RGB test image: grey background, a blue box, a red disc, a dark pen stroke, and a
    faint box (contrast 12) that only low Canny thresholds see."""
    image = np.full((height, width, 3), 200, np.uint8)
    image[4:16, 80:120] = 188
    image[20:60, 30:70] = (30, 60, 200)
    yy, xx = np.mgrid[:height, :width]
    image[(yy - 60) ** 2 + (xx - 95) ** 2 < 400] = (220, 40, 40)
    image[80:82, 10:120] = (20, 20, 20)
    return image


WEIGHT_FREE = [("canny", "opencv"), ("sketch", "xdog")]


@pytest.mark.parametrize(("name", "backend"), WEIGHT_FREE)
def test_contract_same_hint_for_every_input_type(name, backend):
    ext = get_extractor(name, backend, resolution=64)
    image = scene()
    from_pil = ext(Image.fromarray(image))
    from_array = ext(image)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    from_float = ext(chw.float() / 255.0)
    from_uint8 = ext(chw)
    from_batch = ext(torch.stack([chw.float() / 255.0] * 2))
    from_list = ext([Image.fromarray(image), image])

    assert from_pil.shape == (3, 64, 64) and from_pil.dtype == torch.float32
    assert from_batch.shape == (2, 3, 64, 64) and from_list.shape == (2, 3, 64, 64)
    assert 0.0 <= float(from_pil.min()) and float(from_pil.max()) <= 1.0
    assert float(from_pil.max()) > 0.5, "the test scene has edges/lines: the hint must not be blank"
    for other in (from_array, from_float, from_uint8, from_batch[0], from_batch[1], from_list[1]):
        torch.testing.assert_close(other, from_pil, rtol=0, atol=0)
    torch.testing.assert_close(ext(image), from_pil, rtol=0, atol=0)  # deterministic


@pytest.mark.parametrize(("name", "backend"), WEIGHT_FREE)
def test_resolution_none_keeps_size_and_pairs_resize(name, backend):
    image = scene(50, 70)
    assert get_extractor(name, backend)(image).shape == (3, 50, 70)
    assert get_extractor(name, backend, resolution=(40, 30))(image).shape == (3, 40, 30)


def test_resize_matches_diffusers_resize_then_center_crop():
    from torchvision import transforms

    image = Image.fromarray(scene(96, 128))
    ours = resize_batch(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0, 64)[0]
    reference = transforms.Compose(
        [
            transforms.ToTensor(),
            transforms.Resize(64, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(64),
        ]
    )(image)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_canny_matches_opencv_with_controlnet_thresholds():
    image = scene()
    hint = get_extractor("canny")(image)
    expected = cv2.Canny(image, 100, 200).astype(np.float32) / 255.0
    assert np.array_equal(hint[0].numpy(), expected)
    assert torch.equal(hint[0], hint[1]) and torch.equal(hint[1], hint[2])
    sensitive = get_extractor("canny", low_threshold=10, high_threshold=20)(image)
    assert sensitive.sum() > hint.sum()
    assert float(hint[0, 2:18, 78:122].sum()) == 0.0 and float(sensitive[0, 2:18, 78:122].sum()) > 0


def test_xdog_draws_thin_white_lines_on_black():
    image = np.full((64, 64, 3), 230, np.uint8)
    image[:, 30:33] = 10  # a dark vertical stroke, 3 px wide
    hint = get_extractor("sketch", "xdog")(image)[0]
    assert float(hint[:, :20].max()) == 0.0, "flat paper must stay black"
    inked = hint[10:54] > 0.5
    assert bool(inked.any(dim=1).all()), "every row crosses the stroke"
    assert int(inked.sum(dim=1).max()) <= 2, "thinning keeps the stroke about one pixel wide"
    thick = XDoGSketch(thin=False)(image)[0][10:54] > 0.5
    assert int(thick.sum(dim=1).min()) > int(inked.sum(dim=1).max())


def test_batch_tensor_stays_on_its_device_and_single_images_come_back_on_cpu():
    ext = get_extractor("sketch", "xdog", resolution=32)
    batch = torch.rand(3, 3, 40, 40)
    out = ext(batch)
    assert out.device == batch.device and out.shape == (3, 3, 32, 32)
    assert ext(scene()).device.type == "cpu"


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 5), np.uint8), "channels"),
        (torch.full((3, 8, 8), 2.0), r"\[0, 1\]"),
        (torch.zeros(2, 4, 8, 8), "channels-first RGB"),
        ("image.png", "expected a PIL image"),
    ],
)
def test_bad_inputs_raise_teaching_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        get_extractor("canny")(bad)


def test_dissimilarity_shapes_and_errors():
    ext = get_extractor("canny")
    hint = ext(scene())
    assert ext.dissimilarity(hint, hint).shape == (1,)
    assert float(ext.dissimilarity(hint, hint)) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        ext.dissimilarity(hint, hint[:, :10])


def test_registry_lists_every_condition_and_backend():
    available = available_extractors()
    assert available == {
        "canny": ["opencv"],
        "depth": ["dpt", "midas", "toyworld", "zoe"],
        "normal": ["from_depth", "normalbae", "toyworld"],
        "segmentation": ["upernet", "oneformer", "toyworld"],
        "sketch": ["xdog", "hed", "lineart", "pidinet"],
    }


def test_registry_errors_list_the_choices():
    with pytest.raises(ValueError, match="available: canny, depth, normal, segmentation, sketch"):
        get_extractor("edges")
    with pytest.raises(ValueError, match="available: xdog, hed, lineart, pidinet"):
        get_extractor("sketch", "crayon")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) treshold .*accepted: .*low_threshold"):
        get_extractor("canny", treshold=3)
    with pytest.raises(ValueError, match="low <= high"):
        get_extractor("canny", low_threshold=300, high_threshold=200)


def test_register_extractor_checks_names_uniqueness_and_abstractness(monkeypatch):
    from difftune_control.extractors import registry

    # Work on copies so the test's extractor does not leak into the process-wide registry.
    monkeypatch.setattr(registry, "_REGISTRY", {k: dict(v) for k, v in registry._REGISTRY.items()})
    monkeypatch.setattr(registry, "_DEFAULT_BACKEND", dict(registry._DEFAULT_BACKEND))

    class Gray(ConditionExtractor):
        name = "gray"
        backend = "mean"

        def _extract_batch(self, x):
            return x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)

        def _dissimilarity(self, hint, other):
            return (hint - other).abs().flatten(1).mean(1)

    with pytest.raises(ValueError, match="lowercase"):
        register_extractor("Gray", "mean", Gray)
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("canny", "opencv", Gray)

    class Abstract(ConditionExtractor):
        name = "abstract"

    with pytest.raises(ValueError, match="abstract"):
        register_extractor("abstract", "none", Abstract)

    register_extractor("gray_test", "mean", Gray)
    out = get_extractor("gray_test", resolution=16)(scene())
    assert out.shape == (3, 16, 16) and torch.equal(out[0], out[2])
    assert "gray_test" in available_extractors()


def test_params_record_constructor_arguments_with_defaults():
    ext = get_extractor("canny", resolution=64, low_threshold=50, high_threshold=120)
    assert ext.params == {
        "resolution": 64,
        "low_threshold": 50,
        "high_threshold": 120,
        "aperture_size": 3,
        "l2_gradient": False,
    }


def test_ade20k_palette_matches_the_published_table():
    assert ADE20K_PALETTE.shape == (150, 3) and ADE20K_PALETTE.dtype == np.uint8
    assert ADE20K_PALETTE[:4].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50]]
    assert ADE20K_PALETTE[-3:].tolist() == [[25, 194, 194], [102, 255, 0], [92, 0, 255]]
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"
    assert ADE20K_CLASSES[12] == "person" and ADE20K_PALETTE[12].tolist() == [150, 5, 61]
    assert not ADE20K_PALETTE.flags.writeable


def test_palette_round_trip_and_nearest_colour_decoding():
    ids = torch.arange(150).view(1, 10, 15)
    colors = class_ids_to_colors(ids)
    assert colors.shape == (1, 3, 10, 15)
    decoded = colors_to_class_ids(colors)
    expected = ids.clone()
    expected[ids == 48] = 6  # "skyscraper" shares (140, 140, 140) with "road"
    assert torch.equal(decoded, expected)
    # The closest two distinct palette colours are 7.07 / 255 apart: noise of at most 2.6 / 255
    # (Euclidean) must decode to the same class.
    noisy = (colors + torch.empty_like(colors).uniform_(-1.5 / 255, 1.5 / 255)).clamp(0, 1)
    assert torch.equal(colors_to_class_ids(noisy), expected)


def test_normals_from_depth_reproduce_controlnet_1_0_with_opencv():
    rng = np.random.default_rng(0)
    depth = cv2.GaussianBlur(rng.random((48, 64)).astype(np.float32), (0, 0), 3)
    depth = (depth - depth.min()) / (depth.max() - depth.min())
    a, bg_th, scale = 2 * np.pi, 0.4, 100.0
    # ControlNet 1.0 (annotator/midas), written out with OpenCV:
    x = cv2.Sobel(depth * scale, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth * scale, cv2.CV_32F, 0, 1, ksize=3)
    z = np.ones_like(x) * a
    x[depth < bg_th] = 0
    y[depth < bg_th] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sum(normal**2.0, axis=2, keepdims=True) ** 0.5
    expected = (normal * 0.5 + 0.5)[:, :, ::-1]  # the (z, y, x) channel order the model was fed
    ours = normals_from_depth(
        torch.from_numpy(depth)[None, None], a=a, bg_th=bg_th, depth_scale=scale * 512 / 64
    )
    np.testing.assert_allclose(ours[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    flat = normals_from_depth(torch.zeros(1, 1, 8, 8))
    assert torch.allclose(flat[0, :, 0, 0], torch.tensor([1.0, 0.5, 0.5]))


def test_hints_can_feed_a_trained_network():
    hint = get_extractor("sketch", resolution=16)(torch.rand(2, 3, 20, 20))
    conv = torch.nn.Conv2d(3, 4, 3)
    conv(hint).sum().backward()  # an inference-mode tensor would refuse to be saved for backward
    assert conv.weight.grad is not None and not hint.requires_grad
