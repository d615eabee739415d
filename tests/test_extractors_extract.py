"""`difftune extract`: hints for a dataset, metadata.jsonl, resume, atomic writes, manifest checks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftune_control.extractors import get_extractor
from difftune_control.extractors.cli import add_cli
from difftune_control.extractors.extract_dataset import extract_dataset


def make_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        image = np.full((h, w, 3), 210, np.uint8)
        top, left = rng.integers(4, 12, 2)
        image[top : top + h // 2, left : left + w // 2] = rng.integers(0, 120, 3)
        sub = folder / ("sub" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def read_metadata(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_extracts_an_image_folder_and_resumes(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    make_images(data, [(48, 64), (40, 40), (64, 48)])
    args = parse(["extract", "--condition", "canny", "--input", str(data), "--output", str(out)])
    args.resolution, args.no_progress = 32, True
    assert args.func(args) == 0
    rows = read_metadata(out / "metadata.jsonl")
    assert [r["image"] for r in rows] == ["../data/img0.png", "../data/img2.png", "../data/sub/img1.png"]
    for row in rows:
        hint = np.asarray(Image.open(out / row["conditioning_image"]))
        source = np.asarray(Image.open(out / row["image"]))
        expected = (get_extractor("canny", resolution=32)(source)[0].numpy() * 255).round().astype(np.uint8)
        assert hint.shape == (32, 32, 3) and np.array_equal(hint[..., 0], expected)
    assert "3 hints extracted" in capsys.readouterr().out

    # A second run skips everything; a run over the written metadata.jsonl keeps the hint names.
    stamp = {p: p.stat().st_mtime_ns for p in (out / "conditioning_images").rglob("*.png")}
    assert args.func(args) == 0
    assert "0 hints extracted" in capsys.readouterr().out
    args.input = str(out / "metadata.jsonl")
    assert args.func(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "conditioning_images").rglob("*.png")} == stamp
    assert read_metadata(out / "metadata.jsonl") == rows
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"


def test_metadata_columns_are_kept_and_paths_rewritten(tmp_path):
    data = tmp_path / "data"
    paths = make_images(data, [(32, 32), (32, 32)])
    lines = [
        {"file_name": p.relative_to(data).as_posix(), "text": f"caption {i}", "extra": i}
        for i, p in enumerate(paths)
    ]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "nested" / "out"
    summary = extract_dataset(get_extractor("sketch"), data, out, batch_size=1, progress=False)
    assert (summary.total, summary.extracted, summary.skipped) == (2, 2, 0)
    rows = read_metadata(out / "metadata.jsonl")
    assert [r["text"] for r in rows] == ["caption 0", "caption 1"] and [r["extra"] for r in rows] == [0, 1]
    for row, path in zip(rows, paths):
        assert (out / row["file_name"]).resolve() == path.resolve()
        assert Image.open(out / row["conditioning_image"]).size == (32, 32)


def test_in_place_extraction_and_partial_resume(tmp_path):
    data = tmp_path / "data"
    make_images(data, [(32, 32)] * 4)
    ext = get_extractor("canny", resolution=32)
    first = extract_dataset(ext, data, data, progress=False)
    assert first.extracted == 4
    rows = read_metadata(data / "metadata.jsonl")
    assert rows[0]["image"] == "img0.png" and rows[0]["conditioning_image"] == "conditioning_images/img0.png"
    (data / rows[1]["conditioning_image"]).unlink()  # as if the run had been killed
    again = extract_dataset(ext, data / "metadata.jsonl", data, progress=False)
    assert (again.extracted, again.skipped) == (1, 3)
    assert read_metadata(data / "metadata.jsonl") == rows


def test_mixed_sizes_without_resolution_keep_each_size(tmp_path):
    data = tmp_path / "data"
    make_images(data, [(48, 64), (40, 40), (48, 64)])
    extract_dataset(get_extractor("canny"), data, tmp_path / "out", batch_size=3, progress=False)
    sizes = {Image.open(p).size for p in (tmp_path / "out" / "conditioning_images").rglob("*.png")}
    assert sizes == {(64, 48), (40, 40)}


def test_another_extractor_refuses_to_mix_hints(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_images(data, [(32, 32)])
    extract_dataset(get_extractor("canny", resolution=32), data, out, progress=False)
    with pytest.raises(ValueError, match="another extractor.*--overwrite"):
        extract_dataset(get_extractor("canny", resolution=16), data, out, progress=False)
    redone = extract_dataset(get_extractor("canny", resolution=16), data, out, overwrite=True, progress=False)
    assert redone.extracted == 1
    assert Image.open(out / "conditioning_images" / "img0.png").size == (16, 16)


def test_input_errors_name_the_flag(tmp_path):
    ext = get_extractor("canny")
    with pytest.raises(FileNotFoundError, match="--input"):
        extract_dataset(ext, tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        extract_dataset(ext, tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "m.jsonl").write_text(json.dumps({"picture": "a.png"}) + "\n")
    with pytest.raises(ValueError, match=r"--image_column.*columns: \['picture'\]"):
        extract_dataset(ext, tmp_path / "m.jsonl", tmp_path / "out", progress=False)
    (tmp_path / "n.jsonl").write_text(json.dumps({"image": "nope.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        extract_dataset(ext, tmp_path / "n.jsonl", tmp_path / "out", progress=False)


def test_cli_passes_extractor_params_and_toy_flag():
    args = parse(
        [
            "extract",
            "--condition",
            "canny",
            "--input",
            "x",
            "--output",
            "y",
            "--extractor_param",
            "low_threshold=30",
            "--extractor_param",
            "l2_gradient=true",
            "--toy",
        ]
    )
    assert args.extractor_param == [("low_threshold", 30), ("l2_gradient", True)]
    assert args.toy and args.batch_size == 16 and args.resolution is None


def test_extracted_hints_round_trip_through_png(tmp_path):
    data = tmp_path / "data"
    make_images(data, [(32, 32)])
    ext = get_extractor("sketch", resolution=32)
    extract_dataset(ext, data, tmp_path / "out", progress=False)
    saved = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / "conditioning_images" / "img0.png")))
    direct = ext(Image.open(data / "img0.png"))
    assert torch.allclose(saved.permute(2, 0, 1).float() / 255.0, direct, atol=0.5 / 255)
