"""Toy world: renderer determinism and consistency, captions, labels, tokenizer, datasets."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from difftune_control.extractors.palette import ADE20K_PALETTE
from difftune_control.toyworld import (
    BACKGROUND_DEPTH,
    COLOURS,
    SHAPES,
    TOY_CLASS_NAMES,
    TOY_TO_ADE20K,
    build_dataset,
    classes_to_ade_rgb,
    default_dataset_dir,
    normal_to_rgb,
    render_scenes,
    rgb_to_normal,
    split_seed,
    vocabulary,
)
from difftune_control.toyworld.dataset import RENDER_VERSION
from difftune_control.toyworld.scene import hash_uniform, sample_scenes
from difftune_control.toyworld.tokenizer import build_tokenizer, train_bpe
from difftune_control.toyworld.world import VISIBLE_FRACTION


@pytest.fixture(scope="module")
def scenes() -> dict:
    return render_scenes(24, seed=7)


def test_render_contract_shapes_and_ranges(scenes):
    n = 24
    assert scenes["rgb"].shape == (n, 3, 64, 64) and scenes["rgb"].dtype == torch.float32
    assert 0.0 <= scenes["rgb"].min() and scenes["rgb"].max() <= 1.0
    assert scenes["depth"].shape == (n, 1, 64, 64)
    assert scenes["inv_depth"].shape == (n, 1, 64, 64)
    assert scenes["normal"].shape == (n, 3, 64, 64)
    assert scenes["classes"].shape == (n, 64, 64) and scenes["classes"].dtype == torch.long
    assert len(scenes["captions"]) == n and all(isinstance(c, str) for c in scenes["captions"])
    assert torch.allclose(scenes["normal"].norm(dim=1), torch.ones(n, 64, 64), atol=1e-4)
    assert set(scenes["classes"].unique().tolist()) <= set(range(len(TOY_CLASS_NAMES)))
    # Every image shows the floor and at least one object.
    for i in range(n):
        present = set(scenes["classes"][i].unique().tolist())
        assert 1 in present and present & {2, 3, 4, 5}


def test_render_is_deterministic_per_scene_index():
    a = render_scenes(10, seed=3)
    b = render_scenes(10, seed=3, chunk=3)
    single = render_scenes(1, seed=3, start=6)
    assert torch.equal(a["classes"], b["classes"]) and a["captions"] == b["captions"]
    assert torch.allclose(a["rgb"], b["rgb"], atol=1e-6)
    assert torch.equal(a["classes"][6:7], single["classes"])
    assert torch.allclose(a["rgb"][6:7], single["rgb"], atol=1e-6)
    assert torch.allclose(a["depth"][6:7], single["depth"], atol=1e-5)
    assert a["captions"][6] == single["captions"][0]
    other = render_scenes(10, seed=4)
    assert not torch.equal(a["classes"], other["classes"])


def test_hash_uniform_is_a_pure_function_in_range():
    idx = torch.arange(1000)
    u = hash_uniform(5, idx, 3)
    assert torch.equal(u, hash_uniform(5, idx, 3))
    assert 0.0 <= u.min() and u.max() < 1.0
    assert 0.45 < u.mean() < 0.55
    assert not torch.equal(u, hash_uniform(5, idx, 4)) and not torch.equal(u, hash_uniform(6, idx, 3))
    assert torch.equal(hash_uniform(5, idx[500:], 3), u[500:])


def test_splits_use_disjoint_seed_streams():
    assert split_seed(0, "train") == 0
    assert split_seed(0, "validation") != split_seed(0, "train")
    assert split_seed(0, "validation") != split_seed(1, "validation")
    train = render_scenes(4, split_seed(0, "train"))
    val = render_scenes(4, split_seed(0, "validation"))
    assert not torch.allclose(train["rgb"], val["rgb"])


def _camera_points(depth: torch.Tensor, tan_half_fov: torch.Tensor) -> torch.Tensor:
    """Back-project z-depth to OpenGL camera-space points [N, 3, H, W]."""
    n, _, h, w = depth.shape
    u = (2 * (torch.arange(w) + 0.5) / w - 1)[None, None, :].expand(n, h, w) * tan_half_fov[:, None, None]
    v = (1 - 2 * (torch.arange(h) + 0.5) / h)[None, :, None].expand(n, h, w) * tan_half_fov[:, None, None]
    d = depth[:, 0].double()
    return torch.stack([u * d, v * d, -d], dim=1)


def test_normals_agree_with_depth_gradients():
    n, seed = 16, 11
    out = render_scenes(n, seed=seed, resolution=128)
    tan = sample_scenes(seed, torch.arange(n)).tan_half_fov.double()
    p = _camera_points(out["depth"], tan)
    dx = p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]
    dy = p[:, :, :-2, 1:-1] - p[:, :, 2:, 1:-1]  # image rows grow downwards, camera y upwards
    est = torch.nn.functional.normalize(torch.linalg.cross(dx, dy, dim=1), dim=1)
    cls = out["classes"]
    centre = cls[:, 1:-1, 1:-1]
    # Interior pixels: the 3x3 neighbourhood shows one surface class and no depth jump.
    same = torch.ones_like(centre, dtype=torch.bool)
    for oy in (0, 1, 2):
        for ox in (0, 1, 2):
            same &= cls[:, oy : oy + 126, ox : ox + 126] == centre
    d = out["depth"][:, 0]
    jump = (d[:, 1:-1, 2:] - d[:, 1:-1, :-2]).abs() + (d[:, 2:, 1:-1] - d[:, :-2, 1:-1]).abs()
    mask = same & (centre >= 1) & (jump < 0.05 * d[:, 1:-1, 1:-1])
    rendered = out["normal"][:, :, 1:-1, 1:-1].double()
    cos = (est * rendered).sum(dim=1)[mask]
    angle = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))
    assert mask.sum() > 50_000
    assert angle.median() < 1.0
    assert (angle < 10).float().mean() > 0.97
    # Per class too: objects' normals (curved and flat) agree as well as the floor's.
    for c in (1, 2, 3, 4, 5):
        sel = centre[mask] == c
        if sel.sum() > 100:
            assert angle[sel].median() < 3.0, (TOY_CLASS_NAMES[c], float(angle[sel].median()))


def test_depth_conventions(scenes):
    sky = scenes["classes"] == 0
    assert torch.all(scenes["depth"][:, 0][sky] == BACKGROUND_DEPTH)
    assert torch.all(scenes["depth"][:, 0][~sky] < 100)
    inv = scenes["inv_depth"]
    assert inv.min() >= 0 and inv.max() <= 1
    assert torch.allclose(inv.amax(dim=(1, 2, 3)), torch.ones(len(inv)))
    if sky.any():
        assert torch.all(inv[:, 0][sky] == 0)
    # Near = bright: the bottom row (floor nearest the camera) is brighter than the floor further up.
    assert torch.all(inv[:, 0, -1, :].mean(dim=1) > inv[:, 0, 40, :].mean(dim=1))


def test_normal_hint_colours_follow_controlnet_convention(scenes):
    floor = scenes["classes"] == 1
    rgb = normal_to_rgb(scenes["normal"])
    # The floor faces up (green > 0.5) and towards the camera a little (blue > 0.5).
    assert rgb[:, 1][floor].mean() > 0.75 and rgb[:, 2][floor].mean() > 0.5
    assert torch.allclose(rgb_to_normal(rgb), scenes["normal"], atol=1e-5)
    # Red = facing left: a normal pointing along -x is red.
    left = torch.tensor([-1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    assert torch.allclose(normal_to_rgb(left).flatten(), torch.tensor([1.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match="N, 3, H, W"):
        normal_to_rgb(torch.zeros(3, 4, 4))


_OBJ = re.compile(r"an? (\w+) (sphere|box|cylinder|cone)")


def test_class_map_agrees_with_caption(scenes):
    thr = VISIBLE_FRACTION * 64 * 64
    for i, caption in enumerate(scenes["captions"]):
        named = _OBJ.findall(caption)
        assert named, caption
        assert caption.endswith("floor")
        counts = torch.bincount(scenes["classes"][i].flatten(), minlength=6)
        for colour, shape in named:
            assert colour in COLOURS
            assert counts[SHAPES.index(shape) + 2] >= thr, (caption, counts.tolist())
        shapes_named = {s for _, s in named}
        for k, shape in enumerate(SHAPES):
            if counts[k + 2] >= 4 * thr:
                assert shape in shapes_named, (caption, counts.tolist())
        # Left/right relations agree with where the classes lie (when shapes identify objects).
        m = re.match(r"an? \w+ (\w+) to the (left|right) of an? \w+ (\w+) on", caption)
        if m and m.group(1) != m.group(3) and sum(1 for _, s in named if s in (m.group(1), m.group(3))) == 2:
            xs = torch.arange(64.0)
            cx = [
                float((scenes["classes"][i] == SHAPES.index(s) + 2).float().mean(0) @ xs)
                for s in (m[1], m[3])
            ]
            assert (cx[0] < cx[1]) == (m.group(2) == "left"), caption


def test_captions_use_the_vocabulary_only(scenes):
    words = set(vocabulary())
    for caption in scenes["captions"]:
        assert set(caption.replace(",", " ,").split()) <= words, caption


def test_classes_to_ade_rgb_uses_the_ade20k_palette():
    classes = torch.arange(6).reshape(1, 2, 3)
    rgb = classes_to_ade_rgb(classes)
    assert rgb.shape == (1, 3, 2, 3)
    for c in range(6):
        expect = torch.tensor(ADE20K_PALETTE[TOY_TO_ADE20K[c]] / 255.0, dtype=torch.float32)
        assert torch.allclose(rgb[0, :, c // 3, c % 3], expect)
    assert len({tuple(ADE20K_PALETTE[v]) for v in TOY_TO_ADE20K.values()}) == 6
    with pytest.raises(ValueError, match="toy class ids"):
        classes_to_ade_rgb(torch.full((1, 2, 2), 6))


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resolution"):
        render_scenes(2, seed=0, resolution=60)
    with pytest.raises(ValueError, match="n must be"):
        render_scenes(-1, seed=0)


def test_bpe_makes_every_vocabulary_word_one_token():
    tok = build_tokenizer()
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    merges = train_bpe(["red", "green", "reed"])
    assert ("r", "e") in merges


def test_tokenizer_handles_unknown_words():
    tok = build_tokenizer()
    enc = tok("a zebra on the Moon, 42 ÆØ!", padding="max_length", max_length=tok.model_max_length)
    assert len(enc.input_ids) == 77
    assert enc.input_ids[0] == tok.bos_token_id
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    assert "z" in tokens and "a</w>" in tokens and "on</w>" in tokens  # known words stay whole
    assert tok.model_max_length == 77 and tok.pad_token_id == tok.eos_token_id


def test_build_dataset_writes_an_imagefolder_atomically(tmp_path):
    from PIL import Image

    out = build_dataset(tmp_path / "ds", n=5, seed=0)
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    assert lines[0] == {
        "image": "images/000000.png",
        "text": lines[0]["text"],
        "depth": "depth/000000.png",
        "normal": "normal/000000.png",
        "segmentation": "segmentation/000000.png",
    }
    ref = render_scenes(5, split_seed(0, "train"))
    assert [x["text"] for x in lines] == ref["captions"]
    img = np.asarray(Image.open(out / lines[3]["image"]))
    assert img.shape == (64, 64, 3)
    assert np.abs(img / 255.0 - ref["rgb"][3].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    seg = np.asarray(Image.open(out / lines[3]["segmentation"]))
    palette_rows = {tuple(ADE20K_PALETTE[v]) for v in TOY_TO_ADE20K.values()}
    assert {tuple(p) for p in seg.reshape(-1, 3)} <= palette_rows
    stamp = (out / "metadata.jsonl").stat().st_mtime_ns
    assert build_dataset(tmp_path / "ds", n=5, seed=0) == out  # complete: returns at once
    assert (out / "metadata.jsonl").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    with pytest.raises(FileExistsError, match="another toy-world dataset"):
        build_dataset(tmp_path / "ds", n=6, seed=0)
    val = build_dataset(tmp_path / "val", n=5, seed=0, split="validation")
    val_text = [json.loads(x)["text"] for x in (val / "metadata.jsonl").read_text().splitlines()]
    val_img = np.asarray(Image.open(val / "images/000003.png"))
    assert not np.array_equal(val_img, img) or val_text != [x["text"] for x in lines]


def test_default_dataset_dir_renders_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path))
    path = default_dataset_dir("validation", n=3)
    assert path.parent == tmp_path / "toyworld"
    assert len((path / "metadata.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="no default size"):
        default_dataset_dir("test")


def test_toyworld_imports_nothing_from_the_packages_above_it():
    """The toy world sits below the extractors and the trainer in the data flow: no arrow runs back up."""
    import ast
    from pathlib import Path

    import difftune_control.toyworld as tw

    allowed = {"difftune_control.toyworld", "difftune_control.utils", "difftune_control.compiler"}
    found = []
    for path in Path(tw.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 or (
                    node.level == 0 and not (node.module or "").startswith("difftune_control")
                ):
                    continue
                target = "difftune_control." + (node.module or "") if node.level == 2 else node.module
                if not any(target == a or target.startswith(a + ".") for a in allowed):
                    found.append(f"{path.name}: {target}")
    assert found == []


def test_default_dataset_renders_only_the_scenes_asked_for_and_reuses_a_larger_set(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path))
    five = default_dataset_dir("validation", n=5)
    assert five.name.startswith("validation-n5-")
    assert default_dataset_dir("validation", n=3) == five  # the first 3 of 5 are the 3-scene set: no render
    three = build_dataset(tmp_path / "three", n=3, seed=0, split="validation")
    for i in range(3):
        name = f"images/{i:06d}.png"
        assert np.array_equal(np.asarray(Image.open(five / name)), np.asarray(Image.open(three / name)))
    assert default_dataset_dir("validation", n=8).name.startswith("validation-n8-")  # larger: rendered
    assert sorted(p.name for p in (tmp_path / "toyworld").iterdir()) == [
        f"validation-n{n}-64px-seed0-v{RENDER_VERSION}" for n in (5, 8)
    ]
