"""Model backends with tiny randomly initialised real models saved locally (no downloads).

transformers backends (DPT, UperNet, OneFormer) load tiny configs through `from_pretrained`;
controlnet-aux backends (PiDiNet, HED, lineart) load random weights saved in the file layout the
real annotators use, and are checked against controlnet-aux's own detectors.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftune_control.extractors import ADE20K_PALETTE, get_extractor
from difftune_control.extractors.models import normalize_per_image
from difftune_control.extractors.normal import normals_from_depth


def image_np(height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="module")
def dpt_dir(tmp_path_factory) -> Path:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    folder = tmp_path_factory.mktemp("tiny-dpt")
    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        reassemble_factors=[4, 2, 1, 0.5],
        initializer_range=0.3,  # the default 0.02 makes a random head output ~1e-10 everywhere
    )
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def upernet_dir(tmp_path_factory) -> Path:
    from transformers import (
        ConvNextConfig,
        SegformerImageProcessor,
        UperNetConfig,
        UperNetForSemanticSegmentation,
    )

    folder = tmp_path_factory.mktemp("tiny-upernet")
    torch.manual_seed(0)
    backbone = ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 1, 1],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=150, use_auxiliary_head=False)
    UperNetForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def oneformer_dir(tmp_path_factory) -> Path:
    from transformers import (
        CLIPTokenizer,
        OneFormerConfig,
        OneFormerForUniversalSegmentation,
        OneFormerImageProcessor,
        OneFormerProcessor,
        SwinConfig,
    )

    folder = tmp_path_factory.mktemp("tiny-oneformer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt")
    )  # positional: transformers 5
    torch.manual_seed(0)
    swin = SwinConfig(
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        image_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = OneFormerConfig(
        backbone_config=swin,
        num_queries=8,
        hidden_dim=32,
        conv_dim=32,
        mask_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        dim_feedforward=32,
        num_attention_heads=2,
        query_dec_layers=1,
        text_encoder_width=32,
        text_encoder_num_layers=1,
        text_encoder_vocab_size=len(tokenizer),
        text_encoder_context_length=16,
        text_encoder_n_ctx=4,
        task_seq_len=16,
        id2label={i: f"class{i}" for i in range(150)},
        label2id={f"class{i}": i for i in range(150)},
    )
    OneFormerForUniversalSegmentation(config).save_pretrained(folder)
    processor = OneFormerProcessor(
        image_processor=OneFormerImageProcessor(
            size={"shortest_edge": 64, "longest_edge": 96}, num_labels=150
        ),
        tokenizer=tokenizer,
        max_seq_length=16,
        task_seq_length=16,
    )
    processor.save_pretrained(folder)
    return folder


def check_contract(ext, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Shape, dtype, range, determinism and input-type independence; returns the hint."""
    hint = ext(image)
    assert hint.shape == (3, *size) and hint.dtype == torch.float32 and hint.device.type == "cpu"
    assert float(hint.min()) >= 0.0 and float(hint.max()) <= 1.0
    # Same input tensor whatever the input type; CPU kernels of convolutions may still reorder
    # float sums between calls (and normalising small normal vectors magnifies that), hence 1e-4.
    torch.testing.assert_close(ext(Image.fromarray(image)), hint, rtol=0, atol=1e-4)
    torch.testing.assert_close(
        ext(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0), hint, rtol=0, atol=1e-4
    )
    batch = ext(torch.stack([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0] * 3))
    assert batch.shape == (3, 3, *size)
    torch.testing.assert_close(batch[1], hint, rtol=0, atol=1e-4)
    return hint


def test_dpt_depth_contract_lazy_load_and_reference(dpt_dir):
    from transformers import AutoImageProcessor, DPTForDepthEstimation

    ext = get_extractor("depth", "dpt", model=str(dpt_dir), device="cpu")
    assert ext._model is None, "weights load on first use"
    image = image_np()
    hint = check_contract(ext, image, (40, 56))
    assert ext._model is not None
    assert torch.equal(hint[0], hint[1]) and float(hint.max()) == 1.0 and float(hint.min()) == 0.0

    # Reference: transformers' own PIL path and post-processing, normalised as ControlNet does.
    processor = AutoImageProcessor.from_pretrained(dpt_dir)
    model = DPTForDepthEstimation.from_pretrained(dpt_dir).eval()
    with torch.no_grad():
        outputs = model(**processor(images=Image.fromarray(image), return_tensors="pt"))
    depth = processor.post_process_depth_estimation(outputs, target_sizes=[(40, 56)])[0]["predicted_depth"]
    expected = normalize_per_image(depth[None, None].float())[0, 0]
    assert float((hint[0] - expected).abs().mean()) < 0.02

    micro = get_extractor("depth", "dpt", model=str(dpt_dir), device="cpu", batch_size=1)
    batch = torch.rand(3, 3, 24, 24)
    torch.testing.assert_close(micro(batch), ext(batch), rtol=0, atol=1e-4)


def test_depth_metric_on_dpt_hints_is_zero_for_itself(dpt_dir):
    ext = get_extractor("depth", "dpt", model=str(dpt_dir), device="cpu", resolution=32)
    hints = ext(torch.rand(2, 3, 48, 48))
    assert torch.allclose(ext.dissimilarity(hints, hints), torch.zeros(2), atol=1e-6)
    assert bool((ext.dissimilarity(hints, hints.flip(0)) > 0).all())


def test_normal_from_depth_on_a_dpt_backend(dpt_dir):
    ext = get_extractor(
        "normal",
        "from_depth",
        depth_backend="dpt",
        depth_params={"model": str(dpt_dir)},
        device="cpu",
        resolution=32,
    )
    image = image_np()
    hint = check_contract(ext, image, (32, 32))
    depth = get_extractor("depth", "dpt", model=str(dpt_dir), device="cpu", resolution=32)(image)
    torch.testing.assert_close(hint, normals_from_depth(depth[None, :1])[0], rtol=0, atol=1e-6)
    norms = (hint * 2 - 1).norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4), "colours encode unit vectors"


def test_missing_weights_explain_the_offline_route(tmp_path):
    missing = get_extractor("depth", "dpt", model=str(tmp_path / "no-such-folder"), device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist.*Point `model` at a folder"):
        missing(image_np())
    (tmp_path / "empty").mkdir()
    empty = get_extractor("segmentation", "upernet", model=str(tmp_path / "empty"), device="cpu")
    with pytest.raises(FileNotFoundError, match=r"lacks config\.json"):
        empty(image_np())
    uncached = get_extractor("depth", "dpt", model="Intel/dpt-hybrid-midas-not-cached", local_files_only=True)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download Intel/dpt-hybrid-midas-not-cached"):
        uncached(image_np())
    aux = get_extractor("sketch", "hed", model=str(tmp_path / "empty"), device="cpu")
    with pytest.raises(FileNotFoundError, match=r"lacks ControlNetHED\.pth"):
        aux(image_np())


def palette_only(hint: torch.Tensor) -> bool:
    colours = {tuple(c) for c in (hint.permute(1, 2, 0).reshape(-1, 3) * 255).round().int().tolist()}
    return colours <= {tuple(c) for c in ADE20K_PALETTE.tolist()}


def test_upernet_segmentation_matches_the_reference_path(upernet_dir):
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    ext = get_extractor("segmentation", "upernet", model=str(upernet_dir), device="cpu")
    image = image_np()
    hint = check_contract(ext, image, (40, 56))
    assert palette_only(hint)
    processor = AutoImageProcessor.from_pretrained(upernet_dir)
    model = UperNetForSemanticSegmentation.from_pretrained(upernet_dir).eval()
    with torch.no_grad():
        logits = model(**processor(images=Image.fromarray(image), return_tensors="pt")).logits
    ids = torch.nn.functional.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False).argmax(
        1
    )
    expected = torch.from_numpy(ADE20K_PALETTE[ids[0].numpy()]).permute(2, 0, 1).float() / 255.0
    agree = (hint == expected).all(dim=0).float().mean()
    assert float(agree) > 0.9
    assert float(ext.dissimilarity(hint, hint)) == 0.0


def test_segmentation_model_must_predict_ade20k(tmp_path, upernet_dir):
    from transformers import UperNetForSemanticSegmentation

    model = UperNetForSemanticSegmentation.from_pretrained(
        upernet_dir, num_labels=19, ignore_mismatched_sizes=True
    )
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text((upernet_dir / "preprocessor_config.json").read_text())
    with pytest.raises(ValueError, match="predicts 19 classes.*150-class ADE20K"):
        get_extractor("segmentation", "upernet", model=str(tmp_path), device="cpu")(image_np())


def test_oneformer_segmentation_matches_its_post_processing(oneformer_dir):
    from transformers import OneFormerForUniversalSegmentation, OneFormerProcessor

    ext = get_extractor("segmentation", "oneformer", model=str(oneformer_dir), device="cpu", resolution=48)
    image = image_np(48, 48)
    hint = check_contract(ext, image, (48, 48))
    assert palette_only(hint)
    processor = OneFormerProcessor.from_pretrained(oneformer_dir)
    model = OneFormerForUniversalSegmentation.from_pretrained(oneformer_dir).eval()
    with torch.no_grad():
        outputs = model(
            **processor(images=Image.fromarray(image), task_inputs=["semantic"], return_tensors="pt")
        )
    ids = processor.post_process_semantic_segmentation(outputs, target_sizes=[(48, 48)])[0]
    expected = torch.from_numpy(ADE20K_PALETTE[ids.numpy()]).permute(2, 0, 1).float() / 255.0
    assert float((hint == expected).all(dim=0).float().mean()) > 0.9


AUX_CASES = {
    "pidinet": ("pidi", "PidiNetDetector"),
    "hed": ("hed", "HEDdetector"),
    "lineart": ("lineart", "LineartDetector"),
}


def save_random_annotator(backend: str, folder: Path) -> None:
    """Random weights in the files and formats the real controlnet-aux checkpoints use."""
    torch.manual_seed(0)
    if backend == "pidinet":
        from controlnet_aux.pidi.model import pidinet

        state = {"module." + k: v for k, v in pidinet().state_dict().items()}
        torch.save({"state_dict": state}, folder / "table5_pidinet.pth")
    elif backend == "hed":
        from controlnet_aux.hed import ControlNetHED_Apache2

        torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    else:
        from controlnet_aux.lineart import Generator

        torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model.pth")
        torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model2.pth")


@pytest.mark.parametrize("backend", sorted(AUX_CASES))
def test_controlnet_aux_sketch_backends_match_the_detectors(backend, tmp_path):
    import importlib

    save_random_annotator(backend, tmp_path)
    ext = get_extractor(
        "sketch", backend, model=str(tmp_path), device="cpu", detect_resolution=64, resolution=64
    )
    image = image_np(64, 64)
    hint = check_contract(ext, image, (64, 64))
    module, cls = AUX_CASES[backend]
    detector = getattr(importlib.import_module(f"controlnet_aux.{module}"), cls).from_pretrained(
        str(tmp_path)
    )
    reference = detector(image, detect_resolution=64, image_resolution=64, output_type="np")
    np.testing.assert_allclose(hint[0].numpy(), reference[..., 0] / 255.0, atol=2.5 / 255)


def toyworld_missing() -> str | None:
    if importlib.util.find_spec("difftune_control.toyworld") is None:
        return "difftune_control.toyworld does not exist yet"
    toyworld = importlib.import_module("difftune_control.toyworld")
    missing = [
        n
        for n in ("load_annotator", "normal_to_rgb", "TOY_TO_ADE20K", "annotate_hint")
        if not hasattr(toyworld, n)
    ]
    return f"difftune_control.toyworld does not provide {', '.join(missing)} yet" if missing else None


def save_random_toy_annotator(kind: str, path: Path) -> Path:
    """A randomly initialised toy annotator in the shipped file format (safetensors + metadata)."""
    from safetensors.torch import save_file

    from difftune_control.toyworld import AnnotatorConfig, ToyAnnotator

    torch.manual_seed(0)
    config = AnnotatorConfig(kind=kind, channels=(8, 16, 16, 16))
    state = {k: v.contiguous() for k, v in ToyAnnotator(config).state_dict().items()}
    save_file(
        state, str(path), metadata={"format": "pt", "kind": kind, "config": json.dumps(config.to_dict())}
    )
    return path


@pytest.mark.parametrize("condition", ["depth", "normal", "segmentation"])
def test_toyworld_backends_draw_what_the_toy_world_draws(condition, tmp_path):
    reason = toyworld_missing()
    if reason:
        pytest.skip(reason)
    from difftune_control.toyworld import annotate_hint, load_annotator

    weights = save_random_toy_annotator(condition, tmp_path / f"{condition}.safetensors")
    ext = get_extractor(condition, "toyworld", device="cpu", resolution=64, weights=str(weights))
    image = image_np(64, 64)
    hint = check_contract(ext, image, (64, 64))
    model = load_annotator(condition, "cpu", torch.float32, path=weights)
    expected = annotate_hint(model, torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0)[0]
    torch.testing.assert_close(hint, expected, rtol=0, atol=1e-4)
    if condition == "segmentation":
        assert palette_only(hint)
    assert torch.allclose(ext.dissimilarity(hint, hint), torch.zeros(1), atol=1e-3)
    # Sizes that are not multiples of 8 are resized for the network and back.
    assert ext(image_np(60, 60)).shape == (3, 64, 64)
    assert get_extractor(condition, "toyworld", device="cpu", weights=str(weights))(
        image_np(44, 52)
    ).shape == (
        3,
        44,
        52,
    )


@pytest.mark.parametrize("condition", ["depth", "normal", "segmentation"])
def test_toyworld_backends_with_the_shipped_weights(condition):
    reason = toyworld_missing()
    if reason:
        pytest.skip(reason)
    from difftune_control.toyworld import annotator_path

    if not annotator_path(condition).is_file():
        pytest.skip(
            f"the shipped toy-world {condition} annotator ({annotator_path(condition)}) is not built yet"
        )
    ext = get_extractor(condition, "toyworld", device="cpu", resolution=64)
    hint = check_contract(ext, image_np(64, 64), (64, 64))
    assert torch.allclose(ext.dissimilarity(hint, hint), torch.zeros(1), atol=1e-3)


@pytest.mark.gpu
def test_model_backend_runs_batched_on_the_gpu_and_agrees_with_the_cpu(dpt_dir, upernet_dir):
    batch = torch.rand(4, 3, 48, 48, device="cuda")
    for condition, backend, folder in (("depth", "dpt", dpt_dir), ("segmentation", "upernet", upernet_dir)):
        default = get_extractor(condition, backend, model=str(folder), resolution=32)
        assert default.device.type == "cuda" and default.dtype == torch.float16
        # float32 for the comparison: the tiny random DPT's raw outputs overflow float16.
        gpu = get_extractor(condition, backend, model=str(folder), resolution=32, dtype="float32")
        cpu = get_extractor(condition, backend, model=str(folder), resolution=32, device="cpu")
        out = gpu(batch)
        assert out.device.type == "cuda" and out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
        assert gpu(batch[0].cpu()).device.type == "cpu"
        reference = cpu(batch.cpu())
        if condition == "depth":
            assert float((out.cpu() - reference).abs().mean()) < 0.05
        else:  # GPU kernels may flip near-tied classes of a random model, but not many
            assert float((out.cpu() == reference).all(dim=1).float().mean()) > 0.8
