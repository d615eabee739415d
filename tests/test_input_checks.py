"""Every bad input caught up front, in one pass, each problem named with its row, file, line or flag."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from difftune_control.config import ConfigError, RunConfig, resolve_defaults
from difftune_control.data import DatasetSpec, load_target_dataset

R = 16


def _folder(root: Path, rows: list[dict], name: str = "metadata.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _rgb(root: Path, name: str, size=(R, R), color=(200, 30, 30)) -> str:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(root / name)
    return name


def _one_row(root: Path, hint: Image.Image, suffix: str = ".png", **save) -> DatasetSpec:
    hint.save(root / f"hint{suffix}", **save)
    _folder(root, [{"image": _rgb(root, "img.png"), "conditioning_image": f"hint{suffix}", "text": "a"}])
    return DatasetSpec(str(root), resolution=R)


# -- images of any mode and bit depth ------------------------------------------------------------


def test_a_16_bit_png_hint_keeps_its_grey_levels(tmp_path):
    ramp = np.linspace(0, 65535, R * R).round().astype(np.uint16).reshape(R, R)  # a 16-bit depth map
    spec = _one_row(tmp_path, Image.fromarray(ramp))
    hint = load_target_dataset(spec)[0]["conditioning_pixel_values"]  # [3,R,R] in [0,1]
    # 8-bit rounding of a 16-bit ramp: at most half a grey level off (PIL's convert clips: almost binary)
    assert (hint[0] - torch.from_numpy(ramp / 65535.0).float()).abs().max() <= 0.5 / 255 + 1e-6
    assert len(hint[0].unique()) > 100


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("LA", (0, 0, 0)),  # grey + alpha: transparent pixels over black (hints)
        ("RGBA", (0, 0, 0)),
        ("P", (0, 0, 0)),  # palette with a transparent colour
        ("L", (77, 77, 77)),  # plain grey
    ],
)
def test_hints_of_every_mode_decode_to_their_rgb(tmp_path, mode, expected):
    if mode == "P":
        image = Image.new("P", (R, R), 1)
        image.putpalette([255, 255, 255, 40, 200, 40] + [0] * 762)
        image.info["transparency"] = 1
        save = {"transparency": 1}
    else:
        image = Image.new(mode, (R, R), {"LA": (120, 0), "RGBA": (10, 200, 10, 0), "L": 77}[mode])
        save = {}
    spec = _one_row(tmp_path, image, **save)
    hint = load_target_dataset(spec)[0]["conditioning_pixel_values"]
    assert tuple(round(float(v) * 255) for v in hint[:, 3, 3]) == expected


def test_exif_orientation_is_applied_to_the_size_and_the_pixels(tmp_path):
    from difftune_control.data.transforms import image_size, open_image

    image = Image.new("RGB", (24, 12), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 12, 12))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to show
    image.save(tmp_path / "side.jpg", exif=exif, quality=95)
    assert image_size("side.jpg", tmp_path, "x") == (12, 24)
    upright = np.asarray(open_image("side.jpg", tmp_path, "x"))
    assert upright.shape == (24, 12, 3) and upright[2, 6].mean() > 200 and upright[21, 6].mean() < 50
    # a hint stored upright next to it: same aspect ratio once the orientation is applied
    _rgb(tmp_path, "hint.png", (12, 24))
    _folder(tmp_path, [{"image": "side.jpg", "conditioning_image": "hint.png", "text": "a"}])
    assert load_target_dataset(DatasetSpec(str(tmp_path), resolution=R)).row_ids == [0]


def test_a_decompression_bomb_is_refused_up_front_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 16x16 image is then a "bomb" (over 2x100)
    _folder(tmp_path, [{"image": _rgb(tmp_path, "big.png"), "text": "a"}])
    with pytest.raises(ValueError, match=r"row 0 .*big.png is too large to decode safely .*downscale it"):
        load_target_dataset(DatasetSpec(str(tmp_path), resolution=R), hint_fn=lambda im: None)


# -- metadata ------------------------------------------------------------------------------------


def test_non_utf8_metadata_is_refused_naming_the_line(tmp_path):
    rows = [
        {"image": _rgb(tmp_path, f"{i}.png"), "conditioning_image": f"{i}.png", "text": "x"} for i in range(3)
    ]
    lines = [json.dumps(r).encode() for r in rows]
    lines[2] = lines[2].replace(b'"x"', '"caf\u00e9"'.encode("latin-1"))  # a Latin-1 caption
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(
        ValueError, match=r"metadata.jsonl: not UTF-8 text: line 3 \(byte 0xe9 at column \d+\)"
    ):
        load_target_dataset(DatasetSpec(str(tmp_path), resolution=R))
    (tmp_path / "metadata.jsonl").write_bytes(
        b"\xef\xbb\xbf" + b"\n".join(lines[:2]) + b"\n"
    )  # a BOM is fine
    assert len(load_target_dataset(DatasetSpec(str(tmp_path), resolution=R))) == 2


def test_a_non_utf8_bank_prompts_file_names_the_line(tmp_path):
    from difftune_control.bank import read_prompts_file

    (tmp_path / "prompts.txt").write_bytes(b"a red sphere\nun caf\xe9\n")
    with pytest.raises(ValueError, match=r"prompts.txt: not UTF-8 text: line 2 \(byte 0xe9 at column 7\)"):
        read_prompts_file(tmp_path / "prompts.txt")


def test_a_prompt_json_row_without_its_hint_is_named(tmp_path, caplog):
    rows = [
        {"source": _rgb(tmp_path, f"s{i}.png"), "target": _rgb(tmp_path, f"t{i}.png"), "prompt": "a"}
        for i in range(3)
    ]
    del rows[1]["source"]
    _folder(tmp_path, rows, "prompt.json")
    spec = DatasetSpec(str(tmp_path), resolution=R)
    with pytest.raises(
        ValueError, match=r"row 1 \(prompt.json line 2\): no conditioning image: the row has no 'source'"
    ):
        load_target_dataset(spec, hint_fn=lambda im: torch.zeros(3, R, R))
    rows[1]["source"] = ""  # an explicit empty hint: extracted, and said so
    _folder(tmp_path, rows, "prompt.json")
    with caplog.at_level(logging.WARNING):
        ds = load_target_dataset(spec, hint_fn=lambda im: torch.zeros(3, R, R))
    assert ds.extracted == [False, True, False]
    assert "1 of 3 rows of" in caplog.text and "have an empty 'source'" in caplog.text


def test_every_bad_row_is_reported_in_one_error_and_skip_bad_rows_says_what_it_skipped(tmp_path, caplog):
    rows = [
        {"image": _rgb(tmp_path, f"{i}.png"), "conditioning_image": _rgb(tmp_path, f"h{i}.png"), "text": "a"}
        for i in range(20)
    ]
    rows[3]["conditioning_image"] = _rgb(tmp_path, "wide.png", (2 * R, R))  # another aspect ratio
    rows[9]["image"] = "missing.png"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[16]["conditioning_image"] = "broken.png"
    _folder(tmp_path, rows)
    with pytest.raises(ValueError) as err:
        load_target_dataset(DatasetSpec(str(tmp_path), resolution=R))
    message = str(err.value)
    assert message.startswith("3 bad row(s) in ")
    assert "row 3 (metadata.jsonl line 4): target image is 16x16 but conditioning image is 32x16" in message
    assert "row 9 (metadata.jsonl line 10): column 'image': image file not found" in message
    assert "row 16 (metadata.jsonl line 17): column 'conditioning_image': cannot read image" in message
    with caplog.at_level(logging.WARNING):
        ds = load_target_dataset(DatasetSpec(str(tmp_path), resolution=R, skip_bad_rows=True))
    assert [row for row, _ in ds.skipped] == [3, 9, 16] and len(ds) == 17
    assert "skipped 3 of 20 rows" in caplog.text


# -- paths stay inside the dataset folder ----------------------------------------------------------


def test_paths_outside_the_dataset_folder_need_allow_external_paths(tmp_path):
    outside = tmp_path / "elsewhere"
    _rgb(outside, "secret.png")
    root = tmp_path / "data"
    _rgb(root, "ok.png")
    os.symlink(outside / "secret.png", root / "link.png")
    rows = [
        {"image": "ok.png", "text": "fine"},
        {"image": str(outside / "secret.png"), "text": "absolute"},
        {"image": "../elsewhere/secret.png", "text": "dot-dot"},
        {"image": "link.png", "text": "symlink out"},
        {"image": str(root / "ok.png"), "text": "absolute but inside"},
    ]
    _folder(root, rows)
    hint_fn = lambda im: torch.zeros(3, R, R)  # noqa: E731
    with pytest.raises(ValueError) as err:
        load_target_dataset(DatasetSpec(str(root), resolution=R), hint_fn=hint_fn)
    message = str(err.value)
    assert message.startswith("3 bad row(s)") and "--allow_external_paths" in message
    for row in (1, 2, 3):
        assert f"row {row} (metadata.jsonl line {row + 1}): column 'image':" in message
    assert "outside the dataset folder" in message
    allowed = load_target_dataset(
        DatasetSpec(str(root), resolution=R, allow_external_paths=True), hint_fn=hint_fn
    )
    assert len(allowed) == 5
    skipping = load_target_dataset(DatasetSpec(str(root), resolution=R, skip_bad_rows=True), hint_fn=hint_fn)
    assert skipping.captions == ["fine", "absolute but inside"]


# -- captions --------------------------------------------------------------------------------------


def test_long_captions_are_warned_once_with_their_count(tiny_pipeline_dir, tmp_path, caplog):
    from transformers import CLIPTokenizer

    from difftune_control.assembly import warn_long_captions

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline_dir / "tokenizer")  # model_max_length 8
    captions = ["a", "a " * 10, "a a", "a " * 20]  # the tiny vocabulary has no merges: one token per letter
    _folder(tmp_path, [{"image": _rgb(tmp_path, f"{i}.png"), "text": c} for i, c in enumerate(captions)])
    ds = load_target_dataset(DatasetSpec(str(tmp_path), resolution=R), hint_fn=lambda im: None)
    with caplog.at_level(logging.WARNING):
        warn_long_captions(ds, tokenizer)
    warnings = [r.getMessage() for r in caplog.records if "captions are longer" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("2 of 4 captions are longer than the text encoder's 8 tokens")
    assert (
        "row 1 (metadata.jsonl line 2)" in warnings[0]
        and "row 3 (metadata.jsonl line 4) (22 tokens)" in warnings[0]
    )


# -- flags -----------------------------------------------------------------------------------------


def test_nan_and_inf_numbers_and_an_unusable_output_dir_are_refused_together(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    from difftune_control.training.loop import run_training

    (tmp_path / "a_file").write_text("")
    cfg = tiny_config(
        tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "a_file", train__learning_rate=float("nan"),
        method__bank_weight=float("inf"),
    )  # fmt: skip
    with pytest.raises(ConfigError) as err:
        run_training(cfg)
    problems = err.value.problems
    assert "--learning_rate: expected a finite number, got nan" in problems
    assert "--bank_weight: expected a finite number, got inf" in problems
    assert f"--output_dir {tmp_path / 'a_file'}: exists and is not a folder" in problems
    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "a_file" / "runs")
    with pytest.raises(ConfigError, match=r"--output_dir .*cannot be created: .*a_file is a file"):
        run_training(cfg)


def test_cli_rejects_nan_learning_rate_before_loading_anything(tmp_path, capsys):
    from difftune_control.cli import main

    # a missing data folder too, so that no version of this check can start a real run
    argv = ["train", "--learning_rate", "nan", "--train_data_dir", str(tmp_path / "nope")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--learning_rate: expected a finite number, got nan" in err and "--train_data_dir" in err


# -- default conditioning column -------------------------------------------------------------------


def test_default_conditioning_column_is_the_toy_column_only_for_toy_data(tmp_path):
    from difftune_control.extractors import load_recipe

    recipe = load_recipe("depth")
    toy = resolve_defaults(RunConfig(), toy=True, recipe=recipe)
    assert toy.data.conditioning_image_column == recipe.toy_hint_column == "depth"
    mine = RunConfig()
    mine.data.train_data_dir = str(tmp_path)
    assert (
        resolve_defaults(mine, toy=True, recipe=recipe).data.conditioning_image_column == "conditioning_image"
    )
    mine.data.conditioning_image_column = "depth_map"  # what the user says wins
    assert resolve_defaults(mine, toy=True, recipe=recipe).data.conditioning_image_column == "depth_map"


def test_the_shipped_toy_base_named_explicitly_gets_the_toy_defaults(tiny_pipeline_dir):
    """``--pretrained_model_name_or_path`` at the shipped toy base (or a folder inside the toy world's package
    folder) resolves as the toy world does, not with SD's 512 px and hub extractors; any other folder does not."""
    from difftune_control.toyworld import default_base_model_path
    from difftune_control.training.runtime import is_toy_model
    from difftune_control.training.setup import resolve_config

    assert is_toy_model(None) and is_toy_model(str(default_base_model_path()))
    assert not is_toy_model(str(tiny_pipeline_dir))
    cfg = RunConfig()
    cfg.model.pretrained_model_name_or_path = str(default_base_model_path())
    resolved, toy, _ = resolve_config(cfg)
    assert toy and resolved.data.resolution == 64
