"""Latent + text-embedding cache: contents, reuse, invalidation, resume, memoised hints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftune_control.data import DatasetSpec, build_latent_cache, load_target_dataset

R = 16  # the tiny VAE downsamples x2: latents [4, 8, 8]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def models(tiny_pipeline_dir: Path):
    """Tiny real VAE, CLIP text encoder and tokenizer (from the session's saved pipeline), with call counters."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir / "vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_pipeline_dir / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline_dir / "tokenizer")
    calls = {"vae": 0, "vae_rows": 0}

    def count(module, args, output):
        calls["vae"] += 1
        calls["vae_rows"] += args[0].shape[0]

    vae.encoder.register_forward_hook(count)
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "calls": calls}


def write_dataset(root: Path, n: int = 10, hints: bool = True) -> Path:
    """A metadata.jsonl imagefolder of 24x20 noise images (non-square: crops matter)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        a = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / "images" / f"{i}.png")
        row = {"image": f"images/{i}.png", "text": ["a red circle", "a blue square", ""][i % 3]}
        if hints:
            Image.fromarray(255 - a).save(root / "images" / f"h{i}.png")
            row["conditioning_image"] = f"images/h{i}.png"
        rows.append(row)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def build(dataset, models, cache_dir: Path, **kw):
    kw = {"batch_size": 2, "shard_size": 4, "model_id": "tiny-sd", "show_progress": False, **kw}
    m = {k: models[k] for k in ("vae", "text_encoder", "tokenizer")}
    return build_latent_cache(dataset, cache_dir=cache_dir, **m, **kw)


@torch.no_grad()
def test_cache_holds_posterior_latents_text_embeddings_and_the_empty_prompt(tmp_path, models):
    from difftune_control.validation import encode_prompts

    ds = load_target_dataset(DatasetSpec(str(write_dataset(tmp_path / "data")), resolution=R))
    cached = build(ds, models, tmp_path / "cache", sample_latents=False)
    assert len(cached) == 10 and cached.build_stats["computed_shards"] == 3
    assert models["calls"]["vae_rows"] == 10
    item = cached[5]
    assert set(item) == {"latents", "encoder_hidden_states", "conditioning_pixel_values", "caption", "index"}
    assert item["caption"] == ds.captions[5] and item["index"] == 5
    vae = models["vae"]
    dist = vae.encode(ds[5]["pixel_values"][None]).latent_dist
    torch.testing.assert_close(item["latents"], dist.mean[0] * vae.config.scaling_factor)
    text = encode_prompts(models["text_encoder"], models["tokenizer"], [ds.captions[5], ""])
    torch.testing.assert_close(item["encoder_hidden_states"], text[0])
    torch.testing.assert_close(cached.empty_prompt_embedding, text[1])
    assert item["encoder_hidden_states"].shape == (8, 16)
    torch.testing.assert_close(item["conditioning_pixel_values"], ds[5]["conditioning_pixel_values"])
    # sample_latents draws mean + std * noise around the stored mean, the noise seeded by the key
    cached.sample_latents = True
    a, b = cached[(5, 1)]["latents"], cached[(5, 2)]["latents"]
    assert not torch.equal(a, b) and (a - item["latents"]).abs().max() < 1.0
    assert torch.equal(cached[(5, 1)]["latents"], a)


def test_second_build_reuses_every_shard_without_encoding(tmp_path, models):
    ds = load_target_dataset(DatasetSpec(str(write_dataset(tmp_path / "data")), resolution=R))
    first = build(ds, models, tmp_path / "cache", sample_latents=False)
    models["calls"]["vae"] = 0
    again = build(load_target_dataset(ds.spec), models, tmp_path / "cache", sample_latents=False)
    assert models["calls"]["vae"] == 0
    assert again.build_stats == {**again.build_stats, "reused_shards": 3, "computed_shards": 0}
    assert again.cache_dir == first.cache_dir
    torch.testing.assert_close(again[7]["latents"], first[7]["latents"], rtol=0, atol=0)


def test_changed_image_or_model_rebuilds_and_logs_why(tmp_path, models, caplog):
    root = write_dataset(tmp_path / "data")
    build(load_target_dataset(DatasetSpec(str(root), resolution=R)), models, tmp_path / "cache")
    Image.new("RGB", (24, 20), (255, 0, 0)).save(root / "images" / "3.png")
    models["calls"]["vae_rows"] = 0
    with caplog.at_level(logging.WARNING, logger="difftune_control.data"):
        rebuilt = build(load_target_dataset(DatasetSpec(str(root), resolution=R)), models, tmp_path / "cache")
    assert models["calls"]["vae_rows"] == 10 and rebuilt.build_stats["computed_shards"] == 3
    assert "dataset_fingerprint" in rebuilt.build_stats["rebuild_reason"]
    assert "does not match (dataset_fingerprint:" in caplog.text
    models["calls"]["vae_rows"] = 0
    ds = load_target_dataset(DatasetSpec(str(root), resolution=R))
    other = build(ds, models, tmp_path / "cache", dtype=torch.float64)
    assert "encoder_dtype: 'float32' -> 'float64'" in other.build_stats["rebuild_reason"]
    assert models["calls"]["vae_rows"] == 10
    # another base model gets its own folder: switching back and forth never rebuilds
    models["vae"].to(torch.float32), models["text_encoder"].to(torch.float32)
    elsewhere = build(ds, models, tmp_path / "cache", model_id="other-sd")
    assert elsewhere.cache_dir != other.cache_dir
    models["calls"]["vae_rows"] = 0
    assert build(ds, models, tmp_path / "cache", dtype=torch.float64).build_stats["computed_shards"] == 0
    # the same model id with retrained weights (here: the text encoder's, changed in place) rebuilds
    models["vae"].to(torch.float32), models["text_encoder"].to(torch.float32)
    with torch.no_grad():
        next(models["text_encoder"].parameters()).add_(0.01)
    retrained = build(ds, models, tmp_path / "cache")
    assert (
        retrained.build_stats["computed_shards"] == 3
        and "encoders:" in retrained.build_stats["rebuild_reason"]
    )


def test_deleted_shard_is_the_only_one_recomputed(tmp_path, models):
    ds = load_target_dataset(DatasetSpec(str(write_dataset(tmp_path / "data")), resolution=R))
    first = build(ds, models, tmp_path / "cache", sample_latents=False)
    before = first[5]["latents"].clone()
    (first.cache_dir / "shard-00001.safetensors").unlink()
    models["calls"]["vae_rows"] = 0
    again = build(ds, models, tmp_path / "cache", sample_latents=False)
    assert models["calls"]["vae_rows"] == 4  # rows 4..7
    assert again.build_stats["reused_shards"] == 2 and again.build_stats["computed_shards"] == 1
    torch.testing.assert_close(again[5]["latents"], before)


def test_interrupted_build_resumes_from_completed_shards(tmp_path, models):
    ds = load_target_dataset(DatasetSpec(str(write_dataset(tmp_path / "data")), resolution=R))

    def crash_on_fourth_batch(module, args, output):
        if models["calls"]["vae"] == 4:  # shards of 4 rows, batches of 2: crash inside the second shard
            raise KeyboardInterrupt("cut off")

    handle = models["vae"].encoder.register_forward_hook(crash_on_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        build(ds, models, tmp_path / "cache")
    handle.remove()
    folder = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no half-written files
    assert json.loads((folder / "manifest.json").read_text())["complete"] is False
    models["calls"]["vae_rows"] = 0
    resumed = build(ds, models, tmp_path / "cache")
    assert models["calls"]["vae_rows"] == 6 and resumed.build_stats["reused_shards"] == 1


def test_random_crops_are_frozen_per_row_and_hints_follow_them(tmp_path, models):
    root = write_dataset(tmp_path / "data", n=4)
    ds = load_target_dataset(DatasetSpec(str(root), resolution=R, center_crop=False, random_flip=True))
    cached = build(ds, models, tmp_path / "cache", sample_latents=False, seed=3)
    vae, tops, flips = models["vae"], set(), set()
    with torch.no_grad():
        for i in range(4):
            from safetensors import safe_open

            with safe_open(str(cached.cache_dir / "shard-00000.safetensors"), "pt") as f:
                top, left = f.get_tensor("crop_top_left")[i].tolist()
                flip = bool(f.get_tensor("flip")[i])
            sample = ds.load_sample(i, offsets=(top, left), flip=flip)
            mean = vae.encode(sample.pixel_values[None]).latent_dist.mean[0] * vae.config.scaling_factor
            torch.testing.assert_close(cached[i]["latents"], mean)
            torch.testing.assert_close(
                cached[i]["conditioning_pixel_values"], sample.conditioning_pixel_values
            )
            tops.add(left), flips.add(flip)
    assert len(tops) > 1 and flips == {False, True}


def test_hint_files_are_decoded_once_into_the_cache(tmp_path, models, monkeypatch):
    root = write_dataset(tmp_path / "data", n=5)
    ds = load_target_dataset(DatasetSpec(str(root), resolution=R))
    cached = build(ds, models, tmp_path / "cache")
    key = json.loads((cached.cache_dir / "manifest.json").read_text())["key"]
    assert key["hints"] == "files"
    direct = [ds[i]["conditioning_pixel_values"] for i in range(5)]

    def no_files(*args, **kwargs):
        raise AssertionError("a cached item must not decode its hint file")

    monkeypatch.setattr(ds, "load_sample", no_files)
    for i in range(5):  # the crop stored per row: the same pixels the files give
        assert torch.equal(cached[i]["conditioning_pixel_values"], direct[i])


def test_extracted_hints_are_memoised_in_the_cache(tmp_path, models):
    root = write_dataset(tmp_path / "data", n=5, hints=False)
    calls = []

    def invert(image: Image.Image) -> torch.Tensor:
        calls.append(image.size)
        return 1.0 - torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    ds = load_target_dataset(DatasetSpec(str(root), resolution=R), hint_fn=invert)
    cached = build(ds, models, tmp_path / "cache")
    assert len(calls) == 5
    direct = ds[2]["conditioning_pixel_values"]
    calls.clear()
    hint = cached[2]["conditioning_pixel_values"]
    assert calls == [] and hint.shape == (3, R, R)
    assert (hint - direct).abs().max() <= 0.5 / 255 + 1e-6  # stored as uint8
    key = json.loads((cached.cache_dir / "manifest.json").read_text())["key"]
    assert key["hints"].endswith("invert")
    # the training loader's compact hints: the stored uint8, the same float32 values once on the device
    from difftune_control.utils import hint_to_float

    cached.compact_hints = True
    compact = torch.utils.data.default_collate([cached[i] for i in range(3)])["conditioning_pixel_values"]
    cached.compact_hints = False
    full = torch.utils.data.default_collate([cached[i] for i in range(3)])["conditioning_pixel_values"]
    assert compact.dtype == torch.uint8 and full.dtype == torch.float32
    assert torch.equal(hint_to_float(compact), full)


def test_cache_refuses_a_dataset_it_was_not_built_for(tmp_path, models):
    from difftune_control.data import CachedTargetDataset

    root = write_dataset(tmp_path / "data")
    cached = build(load_target_dataset(DatasetSpec(str(root), resolution=R)), models, tmp_path / "cache")
    Image.new("RGB", (24, 20)).save(root / "images" / "0.png")
    with pytest.raises(ValueError, match="built for another version of .*metadata.jsonl.*rebuild it"):
        CachedTargetDataset(cached.cache_dir, load_target_dataset(DatasetSpec(str(root), resolution=R)))
    with pytest.raises(FileNotFoundError, match="no complete latent cache"):
        CachedTargetDataset(tmp_path / "nothing", cached.dataset)


def test_cache_slots_differ_by_hint_source(tmp_path):
    """Runs of two conditions on one dataset (another hint column, or an extractor) never share a cache."""
    import json as _json

    from conftest import build_tiny_dataset

    from difftune_control.data import DatasetSpec, load_target_dataset
    from difftune_control.data.cache import cache_slot

    data = build_tiny_dataset(tmp_path / "d", n=4)
    rows = [_json.loads(x) for x in (data / "metadata.jsonl").read_text().splitlines()]
    for r in rows:
        r["edges"] = r["conditioning_image"]
    (data / "metadata.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    a = load_target_dataset(DatasetSpec(source=str(data), resolution=16))
    b = load_target_dataset(DatasetSpec(source=str(data), resolution=16, conditioning_image_column="edges"))
    slots = {cache_slot(x, "m") for x in (a, b)}
    # no hint column: hints are extracted, and the extractor's settings name the slot
    (data / "metadata.jsonl").write_text(
        "".join(_json.dumps({k: r[k] for k in ("image", "text")}) + "\n" for r in rows)
    )

    class Hint:
        def __init__(self, level):
            self.params = {"level": level}

        def __call__(self, image):
            return __import__("torch").full((3, 16, 16), self.params["level"])

    c1 = load_target_dataset(DatasetSpec(source=str(data), resolution=16), hint_fn=Hint(0.0))
    c2 = load_target_dataset(DatasetSpec(source=str(data), resolution=16), hint_fn=Hint(1.0))
    slots |= {cache_slot(c1, "m"), cache_slot(c2, "m")}
    assert len(slots) == 4
    assert cache_slot(c1, "m") == cache_slot(
        load_target_dataset(DatasetSpec(source=str(data), resolution=16), hint_fn=Hint(0.0)), "m"
    )
