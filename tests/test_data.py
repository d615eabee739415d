"""Target datasets: the three layouts, aligned transforms, fingerprints, and every bad-input message."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftune_control.data import DatasetSpec, dataset_fingerprint, load_target_dataset

W, H, R = 96, 64, 32  # source images are 3:2; R x R crops of the shorter side resized to R


def marker_image(x: int, y: int, seed: int = 0, size: tuple[int, int] = (W, H)) -> Image.Image:
    """Dark noise with one bright 4x4 marker whose top-left pixel is (x, y)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    a[y : y + 4, x : x + 4] = 255
    return Image.fromarray(a)


def edges(image: Image.Image) -> Image.Image:
    """A hint made from the image: its bright pixels (the marker) as white on black."""
    a = np.asarray(image.convert("L")) > 128
    return Image.fromarray(np.repeat((a * 255).astype(np.uint8)[:, :, None], 3, axis=2))


def write_imagefolder(root: Path, n: int = 4, image_key: str = "image", **overrides: dict) -> Path:
    """diffusers' layout: images/, hints/, metadata.jsonl; ``overrides[i]`` edits row i."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "hints").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        image = marker_image(30 + 4 * i, 20 + 2 * i, seed=i)
        image.save(root / "images" / f"{i}.png")
        edges(image).save(root / "hints" / f"{i}.png")
        rows.append(
            {image_key: f"images/{i}.png", "conditioning_image": f"hints/{i}.png", "text": f"caption {i}"}
        )
        rows[-1].update(overrides.get(f"row{i}", {}))
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def marker_at(t: torch.Tensor) -> tuple[int, int]:
    """(y, x) of the top-left bright pixel of a [3,H,W] tensor."""
    ys, xs = torch.nonzero(t.mean(0) > t.mean(0).max() * 0.7, as_tuple=True)
    return int(ys.min()), int(xs.min())


# -- the three layouts ------------------------------------------------------------------------------


def test_imagefolder_loads_items_with_documented_shapes_and_ranges(tmp_path):
    write_imagefolder(tmp_path)
    ds = load_target_dataset(DatasetSpec(str(tmp_path), resolution=R))
    assert len(ds) == 4
    item = ds[2]
    assert set(item) == {"pixel_values", "conditioning_pixel_values", "caption", "index"}
    assert item["pixel_values"].shape == (3, R, R) and item["pixel_values"].dtype == torch.float32
    assert item["conditioning_pixel_values"].shape == (3, R, R)
    assert -1.0 <= item["pixel_values"].min() < -0.5 and 0.5 < item["pixel_values"].max() <= 1.0  # the marker
    assert (
        item["conditioning_pixel_values"].min() == 0.0
        and 0.5 < item["conditioning_pixel_values"].max() <= 1.0
    )
    assert item["caption"] == "caption 2" and item["index"] == 2


def test_imagefolder_accepts_file_name_column_the_jsonl_path_and_renamed_columns(tmp_path):
    write_imagefolder(tmp_path / "a", image_key="file_name")
    by_folder = load_target_dataset(DatasetSpec(str(tmp_path / "a"), resolution=R))
    by_file = load_target_dataset(DatasetSpec(str(tmp_path / "a" / "metadata.jsonl"), resolution=R))
    assert by_folder.columns.image == "file_name"
    assert torch.equal(by_folder[1]["pixel_values"], by_file[1]["pixel_values"])

    root = write_imagefolder(tmp_path / "b")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    renamed = [{"target": r["image"], "hint": r["conditioning_image"], "prompt": r["text"]} for r in rows]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed))
    spec = DatasetSpec(
        str(root), image_column="target", conditioning_image_column="hint", caption_column="prompt"
    )
    assert load_target_dataset(spec)[3]["caption"] == "caption 3"


def test_prompt_json_fill50k_layout_matches_the_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    lines = [{"source": r["conditioning_image"], "target": r["image"], "prompt": r["text"]} for r in rows]
    (tmp_path / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    reference = load_target_dataset(DatasetSpec(str(root), resolution=R))
    (root / "metadata.jsonl").unlink()
    for source in (root, root / "prompt.json"):
        ds = load_target_dataset(DatasetSpec(str(source), resolution=R))
        assert ds.source.kind == "prompt.json" and len(ds) == 4
        assert (ds.columns.image, ds.columns.hint, ds.columns.caption) == ("target", "source", "prompt")
        assert ds[1]["caption"] == reference[1]["caption"] == "caption 1"
        assert torch.equal(ds[1]["pixel_values"], reference[1]["pixel_values"])
        assert torch.equal(ds[1]["conditioning_pixel_values"], reference[1]["conditioning_pixel_values"])


def _hf_dataset(root: Path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    images = [marker_image(30 + 4 * i, 20 + 2 * i, seed=i) for i in range(4)]
    features = Features(
        {"image": ImageFeature(), "conditioning_image": ImageFeature(), "text": Value("string")}
    )
    data = {
        "image": images,
        "conditioning_image": [edges(im) for im in images],
        "text": [f"caption {i}" for i in range(4)],
    }
    return Dataset.from_dict(data, features=features)


def test_hf_saved_dataset_dict_and_parquet_folder_match_the_imagefolder(tmp_path):
    from datasets import DatasetDict

    reference = load_target_dataset(DatasetSpec(str(write_imagefolder(tmp_path / "ref")), resolution=R))
    hf = _hf_dataset(tmp_path)
    hf.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": hf, "validation": hf.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    hf.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    for source, split, n in [("saved", "train", 4), ("dict", "validation", 2), ("pq", "train", 4)]:
        ds = load_target_dataset(DatasetSpec(str(tmp_path / source), resolution=R, split=split))
        assert ds.source.kind == "datasets" and len(ds) == n
        assert torch.equal(ds[1]["pixel_values"], reference[1]["pixel_values"])
        assert torch.equal(ds[1]["conditioning_pixel_values"], reference[1]["conditioning_pixel_values"])
    with pytest.raises(
        ValueError, match=r"--dataset_split: split 'test' not found .* available splits: train, validation"
    ):
        load_target_dataset(DatasetSpec(str(tmp_path / "dict"), split="test"))


def test_hf_dataset_with_path_strings_relative_to_its_folder(tmp_path):
    from datasets import Dataset

    root = write_imagefolder(tmp_path / "data")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    Dataset.from_list(rows).save_to_disk(str(root / "saved"))
    for r in rows:  # paths relative to the saved dataset's folder
        r["image"], r["conditioning_image"] = "../" + r["image"], "../" + r["conditioning_image"]
    Dataset.from_list(rows).save_to_disk(str(root / "saved"))
    with pytest.raises(ValueError, match=r"'\.\./images/0.png' resolves to .*outside the dataset folder"):
        load_target_dataset(DatasetSpec(str(root / "saved"), resolution=R))  # files outside: opt in
    ds = load_target_dataset(DatasetSpec(str(root / "saved"), resolution=R, allow_external_paths=True))
    reference = load_target_dataset(DatasetSpec(str(root), resolution=R))
    assert torch.equal(ds[0]["pixel_values"], reference[0]["pixel_values"])


def test_hf_rows_with_empty_hints_are_extracted_and_corrupt_bytes_are_skipped(tmp_path):
    hf = _hf_dataset(tmp_path)
    rows = hf.to_list()
    rows[1]["conditioning_image"] = None
    rows[2]["image"] = {"bytes": b"not an image", "path": None}
    hf.from_list(rows, features=hf.features).save_to_disk(str(tmp_path / "saved"))
    spec = DatasetSpec(str(tmp_path / "saved"), resolution=R)
    with pytest.raises(ValueError) as err:  # every bad row in one error, before any image is decoded
        load_target_dataset(spec)
    assert re.search(r"row 1 of saved dataset .*: no conditioning image .*no hint function", str(err.value))
    assert re.search(
        r"row 2 of saved dataset .*column 'image': cannot read image embedded image bytes", str(err.value)
    )
    extracted = []

    def hint_fn(image: Image.Image) -> torch.Tensor:
        extracted.append(image.size)
        return torch.zeros(3, *image.size)

    with pytest.raises(
        ValueError, match=r"row 2 of saved dataset .*column 'image': cannot read image embedded image bytes"
    ):
        load_target_dataset(spec, hint_fn=hint_fn)
    skipping = load_target_dataset(DatasetSpec(str(tmp_path / "saved"), skip_bad_rows=True), hint_fn=hint_fn)
    assert skipping.row_ids == [0, 1, 3]
    assert skipping.extracted == [False, True, False]
    assert skipping[1]["conditioning_pixel_values"].sum() == 0 and len(extracted) == 1


def test_unreachable_hub_name_says_it_is_neither_a_path_nor_a_dataset(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ValueError, match=r"'no-such-org/no-such-data' is not a local path and could not be loaded"
    ):
        load_target_dataset(DatasetSpec("no-such-org/no-such-data"))


# -- transforms keep image and hint aligned --------------------------------------------------------


def test_center_crop_puts_the_marker_on_the_same_pixel_of_image_and_half_size_hint(tmp_path):
    root = write_imagefolder(tmp_path, n=1)
    image = marker_image(40, 24)
    image.save(root / "images" / "0.png")
    edges(image).resize((W // 2, H // 2), Image.Resampling.NEAREST).save(
        root / "hints" / "0.png"
    )  # same aspect
    item = load_target_dataset(DatasetSpec(str(root), resolution=R, hint_interpolation="nearest"))[0]
    # 96x64 -> 48x32, centered 32x32 crop starts at x = 8: marker (40, 24) -> (20 - 8, 12)
    assert marker_at(item["pixel_values"]) == (12, 12)
    assert marker_at(item["conditioning_pixel_values"]) == (12, 12)


def test_random_crop_and_flip_move_image_and_hint_together(tmp_path):
    root = write_imagefolder(tmp_path, n=1)
    ds = load_target_dataset(DatasetSpec(str(root), resolution=R, center_crop=False, random_flip=True))
    seen = set()
    for seed in range(12):
        sample = ds.load_sample(0, generator=torch.Generator().manual_seed(seed))
        assert marker_at(sample.pixel_values) == marker_at(sample.conditioning_pixel_values)
        seen.add((sample.geometry.left, sample.geometry.flip))
    assert len({left for left, _ in seen}) > 3 and {flip for _, flip in seen} == {False, True}


def test_extracted_hints_are_computed_after_the_crop(tmp_path):
    root = write_imagefolder(tmp_path, n=2)
    for line in [root / "metadata.jsonl"]:
        rows = [json.loads(x) for x in line.read_text().splitlines()]
        line.write_text("".join(json.dumps({"image": r["image"], "text": r["text"]}) + "\n" for r in rows))
    sizes = []

    def hint_fn(image: Image.Image) -> torch.Tensor:
        sizes.append(image.size)
        return torch.from_numpy(np.asarray(edges(image), dtype=np.float32) / 255.0).permute(2, 0, 1)

    ds = load_target_dataset(DatasetSpec(str(root), resolution=R, center_crop=False), hint_fn=hint_fn)
    assert ds.columns.hint is None and ds.extracts_hints
    item = ds[1]
    assert sizes == [(R, R)]
    assert marker_at(item["pixel_values"]) == marker_at(item["conditioning_pixel_values"])


def test_a_real_extractor_works_as_hint_function_and_its_edges_sit_on_the_marker(tmp_path):
    from difftune_control.extractors import get_extractor

    root = write_imagefolder(tmp_path, n=2)
    (root / "metadata.jsonl").write_text('{"image": "images/1.png", "text": "a"}\n')
    canny = get_extractor("canny", resolution=R)
    item = load_target_dataset(DatasetSpec(str(root), resolution=R), hint_fn=canny)[0]
    (y, x), (hy, hx) = marker_at(item["pixel_values"]), marker_at(item["conditioning_pixel_values"])
    assert abs(y - hy) <= 1 and abs(x - hx) <= 1


def test_hint_interpolation_nearest_keeps_palette_colours(tmp_path):
    root = write_imagefolder(tmp_path, n=1)
    palette = np.array([[120, 120, 120], [180, 120, 120], [6, 230, 230]], dtype=np.uint8)
    labels = np.random.default_rng(0).integers(0, 3, (H, W))
    Image.fromarray(palette[labels]).save(root / "hints" / "0.png")
    colours = {}
    for mode in ("nearest", "bilinear"):
        hint = load_target_dataset(DatasetSpec(str(root), resolution=R, hint_interpolation=mode))[0]
        pixels = (
            (hint["conditioning_pixel_values"] * 255).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3)
        )
        colours[mode] = {tuple(p) for p in pixels.tolist()}
    assert colours["nearest"] <= {tuple(p) for p in palette.tolist()}
    assert len(colours["bilinear"]) > 3


# -- fingerprints ----------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_changes_with_images_and_captions(tmp_path):
    root = write_imagefolder(tmp_path)
    spec = DatasetSpec(str(root), resolution=R)
    first = dataset_fingerprint(spec)
    assert dataset_fingerprint(spec) == first == load_target_dataset(spec).fingerprint
    marker_image(10, 10, seed=9).save(root / "images" / "2.png")
    second = dataset_fingerprint(spec)
    assert second != first
    (root / "metadata.jsonl").write_text((root / "metadata.jsonl").read_text().replace("caption 3", "other"))
    assert dataset_fingerprint(spec) not in (first, second)
    assert dataset_fingerprint(DatasetSpec(str(root), max_samples=2)) != dataset_fingerprint(spec)


# -- bad input: each case names the file / row / column / flag -------------------------------------


def test_spec_reports_every_bad_field_at_once():
    with pytest.raises(ValueError) as err:
        DatasetSpec("x", resolution=0, max_samples=0, hint_interpolation="cubic")
    message = str(err.value)
    assert "--resolution" in message and "--max_train_samples" in message
    assert "'cubic'; valid choices: bilinear, nearest" in message


def test_missing_source_and_unknown_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_data_dir/--dataset_name: no such file or folder"):
        load_target_dataset(DatasetSpec(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds none of: metadata.jsonl .*prompt.json"):
        load_target_dataset(DatasetSpec(str(tmp_path / "empty")))


def test_unknown_columns_are_all_listed_with_the_available_ones(tmp_path):
    root = write_imagefolder(tmp_path)
    spec = DatasetSpec(str(root), image_column="img", caption_column="caption")
    with pytest.raises(ValueError) as err:
        load_target_dataset(spec)
    message = str(err.value)
    assert "--image_column value 'img' not found" in message
    assert "--caption_column value 'caption' not found" in message
    assert "dataset columns are: image, conditioning_image, text" in message


def test_missing_hint_column_needs_a_hint_function(tmp_path):
    root = write_imagefolder(tmp_path)
    (root / "metadata.jsonl").write_text('{"image": "images/0.png", "text": "a"}\n')
    with pytest.raises(
        ValueError, match=r"--conditioning_image_column value 'conditioning_image' not found.*extract"
    ):
        load_target_dataset(DatasetSpec(str(root)))
    with pytest.raises(ValueError, match="--conditioning_image_column value 'depth' not found"):
        load_target_dataset(
            DatasetSpec(str(root), conditioning_image_column="depth"), hint_fn=lambda im: None
        )


def test_empty_dataset_and_invalid_json_line(tmp_path):
    root = write_imagefolder(tmp_path)
    (root / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl has no rows"):
        load_target_dataset(DatasetSpec(str(root)))
    (root / "metadata.jsonl").write_text('{"image": "images/0.png", "text": "a"}\n{"image": oops}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_target_dataset(DatasetSpec(str(root)))


def test_missing_image_file_names_row_line_column_and_path(tmp_path):
    root = write_imagefolder(tmp_path, row2={"conditioning_image": "hints/missing.png"})
    with pytest.raises(FileNotFoundError) as err:
        load_target_dataset(DatasetSpec(str(root)))
    assert "row 2 (metadata.jsonl line 3)" in str(err.value)
    assert "column 'conditioning_image'" in str(err.value) and "hints/missing.png" in str(err.value)


def test_corrupt_image_fails_up_front_naming_row_and_file(tmp_path):
    root = write_imagefolder(tmp_path)
    (root / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(
        ValueError, match=r"row 1 \(metadata.jsonl line 2\): column 'image': cannot read image .*1.png"
    ):
        load_target_dataset(DatasetSpec(str(root), resolution=R))


def test_hint_with_another_aspect_ratio_is_refused_up_front(tmp_path):
    root = write_imagefolder(tmp_path)
    Image.new("RGB", (64, 64)).save(root / "hints" / "3.png")
    with pytest.raises(
        ValueError, match=r"row 3 .*96x64 but conditioning image is 64x64: different aspect ratios"
    ):
        load_target_dataset(DatasetSpec(str(root), resolution=R))


def test_captions_empty_in_every_row_missing_in_one_row_and_empty_in_one_row(tmp_path):
    root = write_imagefolder(
        tmp_path, row0={"text": ""}, row1={"text": ""}, row2={"text": ""}, row3={"text": ""}
    )
    with pytest.raises(ValueError, match=r"caption column 'text' is empty in all 4 rows .*--caption_column"):
        load_target_dataset(DatasetSpec(str(root)))
    root = write_imagefolder(tmp_path / "b", row1={"text": ""})
    assert load_target_dataset(DatasetSpec(str(root)))[1]["caption"] == ""  # one empty caption is allowed
    rows = (root / "metadata.jsonl").read_text().splitlines()
    rows[2] = json.dumps({k: v for k, v in json.loads(rows[2]).items() if k != "text"})
    (root / "metadata.jsonl").write_text("\n".join(rows))
    with pytest.raises(ValueError, match=r"row 2 \(metadata.jsonl line 3\): no caption \(column 'text'"):
        load_target_dataset(DatasetSpec(str(root)))


def test_hint_function_with_wrong_output_shape_is_named(tmp_path):
    root = write_imagefolder(tmp_path)
    (root / "metadata.jsonl").write_text('{"image": "images/0.png", "text": "a"}\n')

    def small_hints(image: Image.Image) -> torch.Tensor:
        return torch.zeros(3, 16, 16)

    ds = load_target_dataset(DatasetSpec(str(root), resolution=R), hint_fn=small_hints)
    with pytest.raises(
        ValueError,
        match=r"hint function .*small_hints.* returned shape \(3, 16, 16\), expected \(3, 32, 32\)",
    ):
        ds[0]


def test_skip_bad_rows_skips_and_logs_a_count_with_reasons(tmp_path, caplog):
    root = write_imagefolder(tmp_path, n=7, row1={"image": "images/missing.png"}, row4={"text": None})
    (root / "images" / "2.png").write_bytes(b"garbage")
    Image.new("RGB", (64, 64)).save(root / "hints" / "5.png")
    with caplog.at_level(logging.WARNING, logger="difftune_control.data"):
        ds = load_target_dataset(DatasetSpec(str(root), resolution=R, skip_bad_rows=True))
    assert ds.row_ids == [0, 3, 6] and len(ds) == 3
    assert [row for row, _ in ds.skipped] == [1, 2, 4, 5]
    log = caplog.text
    assert "skipped 4 of 7 rows" in log and "--skip_bad_rows" in log
    assert "images/missing.png" in log and "cannot read image" in log and "different aspect ratios" in log
    assert ds[1]["caption"] == "caption 3" and ds[1]["index"] == 1
    limited = load_target_dataset(DatasetSpec(str(root), skip_bad_rows=True, max_samples=2))
    assert limited.row_ids == [0, 3]


def test_skip_bad_rows_with_every_row_bad_is_an_error(tmp_path):
    root = write_imagefolder(tmp_path, n=2, row0={"image": "x.png"}, row1={"image": "y.png"})
    with pytest.raises(ValueError, match=r"all 2 rows .* are bad .*\n  - row 0 .*x.png"):
        load_target_dataset(DatasetSpec(str(root), skip_bad_rows=True))


def test_max_samples_keeps_the_first_rows(tmp_path):
    root = write_imagefolder(tmp_path)
    ds = load_target_dataset(DatasetSpec(str(root), max_samples=2))
    assert len(ds) == 2 and ds.captions == ["caption 0", "caption 1"]
