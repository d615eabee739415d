"""Real-size controlnet-aux depth/normal annotators with random weights, against their detectors.

Opt-in (`pytest -m slow`): each builds a network of 70-345 M parameters on the CPU.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftune_control.extractors import get_extractor

pytestmark = pytest.mark.slow


def photo(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((size, size), Image.BICUBIC))


def test_midas_backend_matches_the_midas_detector(tmp_path: Path):
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    torch.manual_seed(0)
    model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    torch.save(model.state_dict(), tmp_path / "dpt_hybrid-midas-501f0c75.pt")
    ext = get_extractor("depth", "midas", model=str(tmp_path), device="cpu", detect_resolution=64)
    image = photo(64)
    hint = ext(image)
    assert hint.shape == (3, 64, 64) and float(hint.max()) == 1.0 and float(hint.min()) == 0.0
    reference = MidasDetector.from_pretrained(str(tmp_path))(
        image, detect_resolution=64, image_resolution=64, output_type="np"
    )
    np.testing.assert_allclose(hint[0].numpy(), reference[..., 0] / 255.0, atol=1.5 / 255)


def test_normalbae_backend_matches_the_normalbae_detector(tmp_path: Path):
    from controlnet_aux.normalbae import NormalBaeDetector
    from controlnet_aux.normalbae.nets.NNET import NNET

    torch.manual_seed(0)
    args = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )
    torch.save({"model": NNET(args).state_dict()}, tmp_path / "scannet.pt")
    ext = get_extractor("normal", "normalbae", model=str(tmp_path), device="cpu", detect_resolution=64)
    image = photo(64)
    hint = ext(image)
    assert hint.shape == (3, 64, 64)
    reference = NormalBaeDetector.from_pretrained(str(tmp_path))(
        image, detect_resolution=64, image_resolution=64, output_type="np"
    )
    np.testing.assert_allclose(hint.permute(1, 2, 0).numpy(), reference / 255.0, atol=1.5 / 255)


def test_zoe_backend_matches_the_zoe_detector(tmp_path: Path):
    from controlnet_aux.zoe import ZoeDetector
    from controlnet_aux.zoe.zoedepth.models.zoedepth import ZoeDepth
    from controlnet_aux.zoe.zoedepth.utils.config import get_config

    torch.manual_seed(0)
    model = ZoeDepth.build_from_config(get_config("zoedepth", "infer"))
    torch.save({"model": model.state_dict()}, tmp_path / "ZoeD_M12_N.pt")
    ext = get_extractor("depth", "zoe", model=str(tmp_path), device="cpu", detect_resolution=64)
    image = photo(64)
    hint = ext(image)
    assert hint.shape == (3, 64, 64) and torch.equal(hint[0], hint[2])
    reference = ZoeDetector.from_pretrained(str(tmp_path))(
        image, detect_resolution=64, image_resolution=64, output_type="np"
    )
    # controlnet-aux quantises before its percentile step; compare on average.
    assert float(np.abs(hint[0].numpy() - reference[..., 0] / 255.0).mean()) < 0.02
