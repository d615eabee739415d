"""Toy-world domains: each renders what it promises, deterministically, and --toy_domain reaches
the target and held-out sets."""

from __future__ import annotations

import json

import pytest
import torch

from difftune_control.toyworld import (
    COLOURS,
    FLOOR_COLOURS,
    Domain,
    build_dataset,
    default_dataset_dir,
    domain_names,
    get_domain,
    register_domain,
    render_scenes,
    split_seed,
    vocabulary,
)
from difftune_control.toyworld.evaluate import rgb_to_hsv
from difftune_control.toyworld.scene import sample_scenes

N = 48


@pytest.fixture(scope="module")
def renders() -> dict:
    """The same 48 scene indices (train stream) in every registered domain."""
    return {d: render_scenes(N, seed=3, domain=d) for d in ("default", "crowded", "dusk", "swapped")}


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    return 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def test_registry_lists_default_first_and_rejects_bad_names():
    names = domain_names()
    assert names[0] == "default" and {"crowded", "dusk", "swapped"} <= set(names)
    with pytest.raises(ValueError, match="unknown toy-world domain 'mars'.*default.*crowded.*dusk.*swapped"):
        get_domain("mars")
    with pytest.raises(ValueError, match="already registered"):
        register_domain(Domain(name="dusk"))
    with pytest.raises(ValueError) as err:  # every problem at once
        register_domain(
            Domain(name="Bad Name", n_object_probs=(0.5, 0.5, 0.5, 0.0), light_elevation=(80, 30))
        )
    msg = str(err.value)
    assert "name must be lowercase" in msg and "n_object_probs" in msg and "light_elevation" in msg
    assert "Bad Name" not in domain_names()
    with pytest.raises(ValueError, match="render_scenes: unknown toy-world domain 'mars'"):
        render_scenes(1, seed=0, domain="mars")


def test_every_domain_is_deterministic_per_scene_index():
    for name in domain_names():
        a = render_scenes(6, seed=11, domain=name)
        b = render_scenes(3, seed=11, start=3, domain=name, chunk=2)
        assert torch.equal(a["rgb"][3:], b["rgb"]) and a["captions"][3:] == b["captions"], name


def test_domains_keep_captions_in_the_vocabulary(renders):
    words = set(vocabulary())
    for name, out in renders.items():
        for caption in out["captions"]:
            assert set(caption.replace(",", " ,").split()) <= words, (name, caption)


def test_crowded_scenes_show_at_least_three_objects():
    for split in ("train", "validation"):
        out = render_scenes(64, seed=split_seed(0, split), domain="crowded")
        for objs, classes, caption in zip(out["objects"], out["classes"], out["captions"]):
            assert len(objs) >= 3, caption  # objects of >= 20 visible pixels in the instance map
            assert int((classes >= 2).sum()) >= sum(o["pixels"] for o in objs)
            assert " and " in caption
    default = render_scenes(64, seed=0)
    assert sum(len(o) < 3 for o in default["objects"]) > 20  # the default world is mostly 1-2 objects


def test_dusk_is_darker_warmer_and_lit_from_low(renders):
    day, dusk = renders["default"], renders["dusk"]
    # the geometry is the default world's; only the light changes
    assert torch.equal(day["classes"], dusk["classes"]) and torch.equal(day["depth"], dusk["depth"])
    assert day["captions"] == dusk["captions"]
    assert _luminance(dusk["rgb"]).mean() < 0.6 * _luminance(day["rgb"]).mean()
    warmth = lambda rgb: rgb[:, 0].mean() / rgb[:, 2].mean()  # noqa: E731
    assert warmth(dusk["rgb"]) > 1.5 * warmth(day["rgb"])
    idx = torch.arange(N)
    sin_elev = {d: sample_scenes(3, idx, get_domain(d)).light_dir[:, 1] for d in ("default", "dusk")}
    assert float(sin_elev["dusk"].max()) < torch.sin(torch.deg2rad(torch.tensor(15.0)))  # long shadows
    assert float(sin_elev["default"].min()) > torch.sin(torch.deg2rad(torch.tensor(34.0)))


def test_swapped_colours_appear_on_objects_and_floors(renders):
    day, swapped = renders["default"], renders["swapped"]
    assert torch.equal(day["classes"], swapped["classes"])
    object_colours = {o["colour"] for objs in swapped["objects"] for o in objs}
    assert object_colours == {"white", "grey", "black", "brown"}  # all four, none of the default's
    assert not object_colours & set(COLOURS) and set(swapped["floor"]) <= {"red", "yellow", "green", "blue"}
    assert not set(swapped["floor"]) & set(FLOOR_COLOURS)

    def saturation(out, cls):
        _, s, _ = rgb_to_hsv(out["rgb"])
        mask = out["classes"] >= 2 if cls == "objects" else out["classes"] == 1
        return float(s[mask].mean())

    assert saturation(day, "objects") > 0.6 and saturation(swapped, "objects") < 0.3
    assert saturation(day, "floor") < 0.2 and saturation(swapped, "floor") > 0.5


def test_datasets_are_keyed_by_domain(tmp_path, monkeypatch):
    out = build_dataset(tmp_path / "ds", n=3, seed=0, domain="crowded")
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["domain"] == "crowded"
    texts = [json.loads(x)["text"] for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert texts == render_scenes(3, split_seed(0, "train"), domain="crowded")["captions"]
    with pytest.raises(FileExistsError, match="another toy-world dataset"):
        build_dataset(tmp_path / "ds", n=3, seed=0, domain="dusk")
    with pytest.raises(ValueError, match="choose from: default"):
        build_dataset(tmp_path / "bad", n=3, seed=0, domain="mars")
    # a dataset written before domains existed is the default domain's
    old = build_dataset(tmp_path / "old", n=2, seed=0)
    info = json.loads((old / "dataset_info.json").read_text())
    del info["domain"]
    (old / "dataset_info.json").write_text(json.dumps(info))
    assert build_dataset(tmp_path / "old", n=2, seed=0) == old

    monkeypatch.setenv("DIFFTUNE_CACHE", str(tmp_path / "cache"))
    dirs = {d: default_dataset_dir("validation", n=2, domain=d) for d in ("default", "dusk")}
    assert (
        dirs["default"] != dirs["dusk"] and "dusk" in dirs["dusk"].name and "dusk" not in dirs["default"].name
    )
    with pytest.raises(ValueError, match="unknown toy-world domain"):
        default_dataset_dir("validation", n=2, domain="mars")


def test_bad_toy_domain_is_a_config_error_listing_the_choices(capsys, tmp_path):
    from difftune_control.cli import build_parser, main

    assert main(["train", "--toy_domain", "mars", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--toy_domain: unknown domain 'mars'; choose from default, crowded, dusk, swapped" in err
    assert main(["train", "--toy_domain", "dusk", "--train_data_dir", str(tmp_path)]) == 2
    assert "--toy_domain dusk selects a toy-world dataset" in capsys.readouterr().err
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--toy_domain NAME" in help_text


def test_toy_domain_reaches_the_target_and_held_out_sets(monkeypatch):
    from difftune_control import assembly
    from difftune_control.cli import build_parser
    from difftune_control.config import ModelConfig, config_from_args
    from difftune_control.toyworld import dataset
    from difftune_control.training.runtime import load_base_model

    monkeypatch.setitem(dataset.DEFAULT_SIZES, "train", 4)
    monkeypatch.setitem(dataset.DEFAULT_SIZES, "validation", 6)
    args = build_parser().parse_args(
        ["train", "--toy_domain", "crowded", "--conditioning_image_column", "depth"]
    )
    cfg = config_from_args(args)
    cfg.data.resolution = 64
    assert cfg.to_dict()["data"]["toy_domain"] == "crowded"  # what the run folder's config.json records

    source = assembly.train_source(cfg, toy=True)
    assert (
        json.loads((default_dataset_dir("train", domain="crowded") / "dataset_info.json").read_text())[
            "domain"
        ]
        == "crowded"
    )
    assert source == str(default_dataset_dir("train", domain="crowded"))

    base = load_base_model(ModelConfig(), torch.device("cpu"), torch.float32)
    held_out = assembly.load_validation(cfg, base, extractor=None, k=5)
    expect = render_scenes(5, split_seed(0, "validation"), domain="crowded")
    assert held_out.prompts == expect["captions"]
    assert (held_out.images - expect["rgb"]).abs().max() <= 0.5 / 255 + 1e-6  # PNG rounding


def test_eval_script_rejects_an_unknown_domain_with_the_choices():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]  # this checkout's package, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    script = root / "scripts" / "eval_toyworld.py"
    out = subprocess.run(
        [sys.executable, str(script), "--domains", "dusk", "mars"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 2
    assert "--domains: unknown ['mars']; choose from default, crowded, dusk, swapped" in out.stderr
