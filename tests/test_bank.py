"""Memory bank: build, reuse, resume, mismatch, on-manifold latents, loading (tiny real models)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_text_encoder, tiny_unet, tiny_vae

from difftune_control import bank as bank_mod
from difftune_control.bank import (
    BankDataset,
    bank_manifest,
    bank_sample_prompts,
    default_bank_dir,
    ensure_bank,
    load_bank,
    manifest_hash,
    read_prompts_file,
    sample_seed,
)
from difftune_control.config import BankConfig
from difftune_control.training.runtime import BaseModel
from difftune_control.utils import weights_fingerprint
from difftune_control.validation import (
    decode_latents,
    encode_images,
    encode_posterior,
    encode_prompts,
    sample_images,
)

RES = 16  # pixels; the tiny VAE downsamples x2 -> latents 4x8x8
PROMPTS = ["a red ball", "a blue box", "a green cone"]
EXTRACTOR_ID = {"condition": "edges", "backend": "torch", "params": {"scale": 1.0}}
SHARD = 2  # 5 samples -> shards of 2, 2, 1


def edges(x: torch.Tensor) -> torch.Tensor:
    """A small pure-torch extractor: gradient magnitude of the grey image, 3 channels, in [0, 1]."""
    g = x.mean(1, keepdim=True)
    dx = F.pad((g[..., :, 1:] - g[..., :, :-1]).abs(), (0, 1, 0, 0))
    dy = F.pad((g[..., 1:, :] - g[..., :-1, :]).abs(), (0, 0, 0, 1))
    return (4 * (dx + dy)).clamp(0, 1).expand(-1, 3, -1, -1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not oversubscribe a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_models(folder: Path) -> BaseModel:
    """A tiny real SD base model (same weights on every call); the tokenizer's files go to ``folder``."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=12)
    torch.manual_seed(0)
    text_encoder = tiny_text_encoder(len(vocab), max_positions=12, layers=2)
    unet = tiny_unet()
    vae = tiny_vae(RES)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler, model_id="tiny-sd", is_toy=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("tokenizer"))


def make_config(bank_dir: Path | None = None, **kw) -> BankConfig:
    base = dict(
        bank_size=5,
        bank_num_inference_steps=2,
        bank_guidance_scale=3.0,
        bank_sampler="ddim",
        bank_seed=7,
        bank_batch_size=2,
        bank_dir=None if bank_dir is None else str(bank_dir),
        bank_hint="extracted",
    )
    base.update(kw)
    return BankConfig(**base)


def build(models: BaseModel, config: BankConfig, extractor=edges, **kw) -> Path:
    return ensure_bank(
        models,
        config=config,
        prompts=PROMPTS,
        extractor=extractor,
        extractor_id=EXTRACTOR_ID,
        resolution=RES,
        show_progress=False,
        shard_size=SHARD,
        **kw,
    )


@contextlib.contextmanager
def count_unet_calls(unet):
    calls = []
    handle = unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def clean_bank(models, tmp_path_factory) -> Path:
    """A bank built in one go; tests copy it before changing anything."""
    return build(models, make_config(tmp_path_factory.mktemp("banks") / "clean"))


def read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def copy_bank(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_bank_items_preview_and_manifest(models, clean_bank):
    ds = load_bank(clean_bank)
    assert len(ds) == 5
    assert sorted(p.name for p in clean_bank.glob("[!.]*")) == [
        "manifest.json",
        "preview.png",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    item = ds[4]
    assert set(item) == {"latents", "encoder_hidden_states", "conditioning_pixel_values", "caption", "index"}
    assert item["latents"].shape == (4, 8, 8) and item["latents"].dtype == torch.float32
    assert item["encoder_hidden_states"].shape == (12, 16)
    assert item["encoder_hidden_states"].dtype == torch.float32
    hint = item["conditioning_pixel_values"]
    assert hint.shape == (3, RES, RES) and hint.dtype == torch.float32
    assert 0.0 <= hint.min() and hint.max() <= 1.0 and hint.max() > 0
    assert item["index"] == 4
    assert [ds[i]["caption"] for i in range(5)] == bank_sample_prompts(PROMPTS, 5, 7)
    assert ds.seeds.tolist() == [sample_seed(7, i) for i in range(5)]
    assert ds.encoder_hidden_states.dtype == torch.float16  # stored in half precision
    assert ds.manifest["num_inference_steps"] == 2 and ds.manifest["extractor"] == EXTRACTOR_ID
    assert ds.contents["latent_shape"] == [4, 8, 8]
    # Stored embeddings are those of the captions (up to fp16 rounding).
    expected = encode_prompts(models.text_encoder, models.tokenizer, [ds.prompts[0]])[0]
    torch.testing.assert_close(item_emb := ds[0]["encoder_hidden_states"], expected, atol=2e-3, rtol=2e-3)
    assert item_emb.abs().sum() > 0
    from PIL import Image

    # 5 samples, 8 columns: one image row over one hint row.
    assert Image.open(clean_bank / "preview.png").size == (8 * RES, 2 * RES)
    images = ds.images(models.vae, n=3)
    assert images.shape == (3, 3, RES, RES) and 0 <= images.min() and images.max() <= 1


def test_latents_are_reencoded_images_and_hints_extracted(models, clean_bank):
    ds = load_bank(clean_bank)
    neg = encode_prompts(models.text_encoder, models.tokenizer, [""])
    emb = encode_prompts(models.text_encoder, models.tokenizer, ds.prompts[:2])
    images, raw = sample_images(
        unet=models.unet,
        vae=models.vae,
        scheduler_config=models.scheduler_config,
        prompt_embeds=emb,
        negative_prompt_embeds=neg,
        seeds=[sample_seed(7, i) for i in range(2)],
        resolution=RES,
        num_inference_steps=2,
        guidance_scale=3.0,
        sampler="ddim",
        return_latents=True,
    )
    reencoded = encode_images(models.vae, decode_latents(models.vae, raw))
    torch.testing.assert_close(ds.latents[:2], reencoded, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the posterior spread of the same images (tolerance: stored in fp16)
        _, std = encode_posterior(models.vae, decode_latents(models.vae, raw))
    torch.testing.assert_close(ds.latent_std[:2].float(), std.float(), rtol=2e-3, atol=1e-5)
    assert (ds.latents[:2] - raw).abs().max() > 0.1  # not the sampler's raw latents
    expected_hints = (edges(images) * 255).round().to(torch.uint8)
    assert (ds.hints[:2].int() - expected_hints.int()).abs().max() <= 1


def test_reuse_does_no_sampling(models, clean_bank, tmp_path):
    # An explicit folder with the same key, and the default cache folder after a first build.
    with count_unet_calls(models.unet) as calls:
        assert build(models, make_config(clean_bank)) == clean_bank
        # The generation batch size is not part of the key.
        assert build(models, make_config(clean_bank, bank_batch_size=5)) == clean_bank
    assert calls == []
    path = build(models, make_config(), cache_dir=tmp_path)
    key = load_bank(path).manifest
    assert path == default_bank_dir(key, tmp_path) == tmp_path / "banks" / manifest_hash(key)
    with count_unet_calls(models.unet) as calls:
        assert build(models, make_config(), cache_dir=tmp_path) == path
    assert calls == []
    # Another model id is another key, hence another default folder.
    other = dataclasses.replace(models, model_id="other")
    assert build(other, make_config(), cache_dir=tmp_path) != path


def test_resume_regenerates_only_missing_shard_bit_identical(models, clean_bank, tmp_path):
    bank_dir = copy_bank(clean_bank, tmp_path / "bank")
    original = read_shard(bank_dir / "shard-00001.safetensors")
    others = {
        n: (bank_dir / n).stat().st_mtime_ns for n in ("shard-00000.safetensors", "shard-00002.safetensors")
    }
    (bank_dir / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks shards"):
        load_bank(bank_dir)
    with count_unet_calls(models.unet) as calls:
        build(models, make_config(bank_dir))
    assert len(calls) == 2  # one batch of 2 (CFG in one call) x 2 steps: only that shard
    regenerated = read_shard(bank_dir / "shard-00001.safetensors")
    assert regenerated[1] == original[1]  # metadata: prompts, key hash
    assert regenerated[0].keys() == original[0].keys()
    for name, tensor in original[0].items():  # bit-identical tensors
        assert regenerated[0][name].dtype == tensor.dtype and torch.equal(regenerated[0][name], tensor), name
    assert {n: (bank_dir / n).stat().st_mtime_ns for n in others} == others
    assert len(load_bank(bank_dir)) == 5


def test_resume_after_interruption(models, clean_bank, tmp_path):
    bank_dir = tmp_path / "bank"
    seen = []

    def crashing(x):
        seen.append(1)
        if len(seen) > 1:
            raise RuntimeError("interrupted")
        return edges(x)

    with pytest.raises(RuntimeError, match="interrupted"):
        build(models, make_config(bank_dir), extractor=crashing)
    assert (bank_dir / "progress.json").exists() and not (bank_dir / "manifest.json").exists()
    assert [p.name for p in bank_dir.glob("shard-*")] == ["shard-00000.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"incomplete \(1 of 3 shards\)"):
        load_bank(bank_dir)
    with count_unet_calls(models.unet) as calls:
        build(models, make_config(bank_dir))
    assert len(calls) == 2 * 2  # shards 1 and 2, one batch each, 2 steps
    assert not (bank_dir / "progress.json").exists()
    resumed, clean = load_bank(bank_dir), load_bank(clean_bank)
    assert torch.equal(resumed.latents, clean.latents)
    assert torch.equal(resumed.hints, clean.hints)
    assert torch.equal(resumed.encoder_hidden_states, clean.encoder_hidden_states)
    assert resumed.prompts == clean.prompts


def test_mismatch_error_then_rebuild(models, clean_bank, tmp_path):
    bank_dir = copy_bank(clean_bank, tmp_path / "bank")
    before = (bank_dir / "shard-00000.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"num_inference_steps: 2 -> 3") as err:
        build(models, make_config(bank_dir, bank_num_inference_steps=3, bank_on_mismatch="error"))
    assert "--bank_on_mismatch rebuild" in str(err.value) and "extractor" not in str(err.value)
    assert (bank_dir / "shard-00000.safetensors").read_bytes() == before  # refused: nothing touched
    with count_unet_calls(models.unet) as calls:
        build(models, make_config(bank_dir, bank_num_inference_steps=3))
    assert len(calls) == 3 * 3  # 3 shards x 3 steps
    rebuilt = load_bank(bank_dir)
    assert rebuilt.manifest["num_inference_steps"] == 3
    assert not torch.equal(rebuilt.latents, load_bank(clean_bank).latents)
    # A shard of another bank dropped into the folder is refused on load and regenerated alone.
    shutil.copy(clean_bank / "shard-00001.safetensors", bank_dir / "shard-00001.safetensors")
    with pytest.raises(ValueError, match=r"shards \['shard-00001.safetensors'\] belong to another bank"):
        load_bank(bank_dir)
    with count_unet_calls(models.unet) as calls:
        build(models, make_config(bank_dir, bank_num_inference_steps=3))
    assert len(calls) == 3
    assert torch.equal(load_bank(bank_dir).latents, rebuilt.latents)
    # Extractor params are part of the key too.
    other = {**EXTRACTOR_ID, "params": {"scale": 2.0}}
    with pytest.raises(ValueError, match=r"extractor\.params\.scale: 1\.0 -> 2\.0"):
        ensure_bank(
            models,
            config=make_config(bank_dir, bank_num_inference_steps=3, bank_on_mismatch="error"),
            prompts=PROMPTS,
            extractor=edges,
            extractor_id=other,
            resolution=RES,
            show_progress=False,
            shard_size=SHARD,
        )


def test_shard_tensors_of_an_extra_need_its_registered_reader(clean_bank, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from difftune_control.bank import interfaces

    bank_dir = copy_bank(clean_bank, tmp_path / "extra")
    for shard in sorted(bank_dir.glob("shard-*.safetensors")):
        tensors, meta = read_shard(shard)
        tensors["probe_value"] = tensors["indices"] * 10  # a package's own per-sample tensor
        save_file(tensors, str(shard), metadata=meta)
    with pytest.raises(
        ValueError, match=r"shards hold \['probe_value'\], which no registered bank extra reads"
    ):
        load_bank(bank_dir)

    monkeypatch.setattr(interfaces, "_SHARD_READERS", dict(interfaces._SHARD_READERS))
    seen = []

    def read(shards, key):
        seen.append(key)
        return torch.cat([s["probe_value"] for s in shards]) if "probe_value" in shards[0] else None

    interfaces.register_bank_extra("probe", "probe_", read)
    ds = load_bank(bank_dir)
    assert ds.extras["probe"].tolist() == [0, 10, 20, 30, 40] and seen == [ds.manifest]
    assert "probe" not in load_bank(clean_bank).extras  # None from the reader: absent
    for name, prefix, match in [
        ("probe", "other_", "already registered"),
        ("Probe2", "other_", "lowercase"),
        ("probe2", "probe_v", "overlaps"),
        ("probe3", "", "empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            interfaces.register_bank_extra(name, prefix, read)


def test_zero_hints_do_not_call_the_extractor(models, tmp_path):
    def forbidden(x):
        raise AssertionError("the extractor must not run for bank_hint=zero")

    path = build(models, make_config(tmp_path / "zero", bank_hint="zero"), extractor=forbidden)
    ds = load_bank(path)
    assert ds.hints.shape == (5, 3, RES, RES) and int(ds.hints.abs().sum()) == 0
    assert ds.manifest["bank_hint"] == "zero" and ds.manifest["extractor"] is None
    assert ds.latents.abs().sum() > 0


def test_accelerate_single_process(models, clean_bank, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        accelerator = Accelerator(cpu=True)
        path = build(models, make_config(tmp_path / "acc"), accelerator=accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert torch.equal(load_bank(path).latents, load_bank(clean_bank).latents)


def test_refuses_foreign_folder_and_bad_settings(models, tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "metadata.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="not empty and holds no memory bank"):
        build(models, make_config(foreign))
    assert [p.name for p in foreign.iterdir() if not p.name.startswith(".")] == ["metadata.jsonl"]
    with pytest.raises(ValueError) as err:
        build(models, make_config(tmp_path / "x", bank_batch_size=None), extractor=None)
    assert "--bank_batch_size" in str(err.value) and "--bank_hint extracted" in str(err.value)
    with pytest.raises(ValueError, match="--bank_size"):
        build(models, make_config(tmp_path / "x", bank_size=None))
    with pytest.raises(FileNotFoundError, match="holds no memory bank"):
        load_bank(tmp_path)
    with pytest.raises(ValueError, match="at least one prompt"):
        bank_manifest(
            config=make_config(),
            prompts=[],
            model_id="m",
            resolution=RES,
            extractor_id={},
            scaling_factor=1.0,
        )


def test_manifest_key_and_prompt_order(tmp_path):
    config = make_config()
    key = bank_manifest(
        config=config,
        prompts=PROMPTS,
        model_id="m",
        resolution=RES,
        extractor_id={"condition": "canny", "params": {"thresholds": (100, 200)}},
        scaling_factor=0.18215,
        revision="main",
    )
    assert key["extractor"]["params"]["thresholds"] == [100, 200]  # JSON-normalised
    assert key["model"] == {"id": "m", "revision": "main", "variant": None, "fingerprint": None}
    assert json.loads(json.dumps(key)) == key
    for field, value in [
        ("bank_seed", 8),
        ("bank_size", 6),
        ("bank_guidance_scale", 5.0),
        ("bank_sampler", "unipc"),
    ]:
        changed = bank_manifest(
            config=dataclasses.replace(config, **{field: value}),
            prompts=PROMPTS,
            model_id="m",
            resolution=RES,
            extractor_id={"condition": "canny", "params": {"thresholds": (100, 200)}},
            scaling_factor=0.18215,
            revision="main",
        )
        assert manifest_hash(changed) != manifest_hash(key), field
    order = bank_sample_prompts(PROMPTS, 7, seed=3)
    assert order == bank_sample_prompts(PROMPTS, 7, seed=3)
    assert sorted(order[:3]) == sorted(PROMPTS) and order[3:6] == order[:3]  # balanced cycles
    assert len(set(bank_sample_prompts([str(i) for i in range(50)], 50, seed=0))) == 50
    (tmp_path / "p.txt").write_text("one\n\n  two  \n")
    assert read_prompts_file(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="--bank_prompts"):
        read_prompts_file(tmp_path / "missing.txt")


def test_local_weights_fingerprint_is_part_of_the_key(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"a" * 3_000_000)
    (model / "model_index.json").write_text("{}")

    def key():
        return bank_manifest(
            config=make_config(), prompts=PROMPTS, model_id=str(model), resolution=RES, extractor_id={},
            scaling_factor=1.0,
        )  # fmt: skip

    first = key()
    assert first["model"]["fingerprint"] is not None and key() == first
    (model / "model_index.json").write_text('{"changed": 1}')  # not a weights file
    assert key() == first
    weights.write_bytes(b"a" * 2_999_999 + b"b")  # retrained weights at the same path
    assert key()["model"]["fingerprint"] != first["model"]["fingerprint"]
    assert weights_fingerprint("org/not-a-local-path") is None


DISTRIBUTED_SCRIPT = """
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import test_bank as tb

accelerator = Accelerator(cpu=True)
models = tb.make_models(Path(sys.argv[2]) / f"tokenizer-{{accelerator.process_index}}")
calls = []
models.unet.register_forward_hook(lambda *args: calls.append(1))
tb.build(models, tb.make_config(Path(sys.argv[1])), accelerator=accelerator)
print(f"rank {{accelerator.process_index}} of {{accelerator.num_processes}}: {{len(calls)}} unet calls", flush=True)
"""


@pytest.mark.slow
def test_two_processes_split_the_shards_and_match_one_process(clean_bank, tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "build_bank.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    out = subprocess.run(
        [*cmd, str(tmp_path / "bank"), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # Shards 0 and 2 on process 0, shard 1 on process 1; 2 steps each.
    assert "rank 0 of 2: 4 unet calls" in out.stdout and "rank 1 of 2: 2 unet calls" in out.stdout
    two, one = load_bank(tmp_path / "bank"), load_bank(clean_bank)
    for name in ("latents", "encoder_hidden_states", "hints", "seeds", "indices"):
        assert torch.equal(getattr(two, name), getattr(one, name)), name
    assert two.prompts == one.prompts and two.manifest == one.manifest


def test_dataset_class_is_what_load_bank_returns(clean_bank):
    assert isinstance(load_bank(clean_bank), BankDataset)
    assert bank_mod.SHARD_SIZE == 256


def test_batch_equals_stacked_items(models, clean_bank):
    ds = load_bank(clean_bank)
    idx = torch.tensor([4, 0, 4, 2])
    batch = ds.batch(idx)
    for key in ("latents", "encoder_hidden_states", "conditioning_pixel_values"):
        assert torch.equal(batch[key], torch.stack([ds[int(i)][key] for i in idx])), key


def test_posterior_draws_are_mean_plus_std_noise(models, clean_bank):
    ds = load_bank(clean_bank)
    assert ds.latent_std.shape == ds.latents.shape and bool((ds.latent_std > 0).all())
    idx = torch.tensor([1, 3])
    a = ds.batch(idx, posterior_generator=torch.Generator().manual_seed(5))["latents"]
    b = ds.batch(idx, posterior_generator=torch.Generator().manual_seed(5))["latents"]
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # seeded: exact resume draws the same latents
    torch.testing.assert_close(a, ds.latents[idx] + ds.latent_std[idx].float() * noise)
    assert not torch.equal(a, ds.batch(idx)["latents"])  # without a generator: the mean


def test_out_of_gpu_memory_halves_the_batch_and_keeps_every_image(
    models, clean_bank, tmp_path, monkeypatch, caplog
):
    """A generation batch that runs out of GPU memory is retried at half the size: the same images, in order."""
    from difftune_control import validation

    real = validation.sample_images
    sizes = []

    def tight(**kw):  # a GPU that holds one image a batch
        sizes.append(len(kw["seeds"]))
        if len(kw["seeds"]) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(**kw)

    monkeypatch.setattr(validation, "sample_images", tight)
    with caplog.at_level(logging.WARNING, logger="difftune_control"):
        bank_dir = build(models, make_config(tmp_path / "bank"))
    assert sizes[0] == 2 and set(sizes[1:]) <= {1, 2} and "out of GPU memory at batch 2" in caplog.text
    ours, reference = load_bank(bank_dir), load_bank(clean_bank)
    assert len(ours) == len(reference) == 5
    for i in range(5):
        a, b = ours[i], reference[i]
        torch.testing.assert_close(a["latents"].float(), b["latents"].float(), rtol=1e-3, atol=1e-3)


def test_vae_calls_are_split_by_pixels_and_agree_with_one_call(monkeypatch):
    """A 1024 px batch is decoded one image per VAE call (the peak of one image, not of the batch); the
    split gives what one call gives."""
    from conftest import tiny_vae

    import difftune_control.validation as v

    vae = tiny_vae(16)
    torch.manual_seed(0)
    latents, images = torch.randn(5, 4, 8, 8), torch.rand(5, 3, 16, 16)
    whole = (decode_latents(vae, latents), *encode_posterior(vae, images), encode_images(vae, images))
    calls = []
    monkeypatch.setattr(v, "VAE_PIXELS", 2 * 16 * 16)  # two 16 px images per call
    monkeypatch.setattr(vae, "decode", lambda z, f=vae.decode: calls.append(len(z)) or f(z))
    split = (decode_latents(vae, latents), *encode_posterior(vae, images), encode_images(vae, images))
    assert calls == [2, 2, 1]
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_mode_keeps_no_half_copy_of_trainable_weights():
    """Under sampling_mode an fp32 trainable layer's bf16 weight lives only while the layer runs."""
    from types import SimpleNamespace

    from difftune_control.validation import sampling_mode

    layer = torch.nn.Linear(8192, 8192, device="cuda")  # 256 MiB fp32, 128 MiB as a bf16 copy
    x = torch.randn(4, 8192, device="cuda")
    unet = SimpleNamespace(device=x.device, dtype=torch.bfloat16)
    with torch.no_grad(), sampling_mode(unet):
        layer(x)
        held = torch.cuda.memory_allocated()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # the default: the copy is cached
        layer(x)
        cached = torch.cuda.memory_allocated()
    assert cached - held >= 120 * 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_frees_the_half_copies_cached_by_a_prepared_controlnet():
    """accelerate's bf16 preparation runs the ControlNet's forward in an autocast with the weight cache on;
    sample_images must not hold those bf16 copies from one denoising step to the next (nor into the decode)."""
    from accelerate import Accelerator
    from diffusers import ControlNetModel

    from difftune_control.validation import sample_images, sampling_mode

    unet = tiny_unet(
        block_out_channels=(320, 640), cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32
    ).to("cuda")  # wide enough that a bf16 copy of its ControlNet's weights is tens of MB
    net = Accelerator(mixed_precision="bf16").prepare_model(
        ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    )
    unet.to(torch.bfloat16).requires_grad_(False)
    vae = tiny_vae(64).to("cuda")
    half_copy = 2 * sum(p.numel() for p in net.parameters())
    held = []
    before = torch.cuda.memory_allocated()
    with torch.no_grad(), sampling_mode(unet):
        sample_images(
            unet=unet,
            vae=vae,
            scheduler_config=dict(num_train_timesteps=1000),
            prompt_embeds=torch.randn(2, 4, 64),
            negative_prompt_embeds=torch.zeros(1, 4, 64),
            seeds=[0, 1],
            resolution=64,
            controlnet=net,
            hints=torch.rand(2, 3, 64, 64),
            num_inference_steps=3,
            on_step=lambda *a: held.append(torch.cuda.memory_allocated() - before),
        )
    assert half_copy > 30 * 2**20
    assert len(held) == 3 and max(held) < 0.05 * half_copy, (held, half_copy)


def test_a_compiled_bank_matches_the_eager_one_and_leaves_the_models_eager(
    models, clean_bank, tmp_path, monkeypatch
):
    """``--bank_torch_compile`` (the ``aot_eager`` backend: dynamo's capture and AOT autograd without a C
    compiler): the same images as the eager build, the same cache key, and afterwards every block of the UNet
    and VAE runs eagerly again with contiguous weights, so training does not inherit the bank's setting."""
    from difftune_control.bank.speed import compiled_for_generation
    from difftune_control.compiler import BACKEND_ENV
    from difftune_control.training.compilation import COMPILED_BLOCKS

    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    blocks = [
        m for net in (models.unet, models.vae) for m in net.modules() if type(m).__name__ in COMPILED_BLOCKS
    ]
    seen = []
    with compiled_for_generation(models.unet, models.vae, enabled=False) as n:
        seen.append(n)
    compiled = build(models, make_config(tmp_path / "compiled", bank_torch_compile=True))
    with compiled_for_generation(models.unet, models.vae, enabled=True) as n:
        seen.append((n, all(m._compiled_call_impl is not None for m in blocks)))
    assert seen == [0, (len(blocks), True)] and len(blocks) > 0
    assert all(m._compiled_call_impl is None for m in blocks)
    assert all(p.is_contiguous() for net in (models.unet, models.vae) for p in net.parameters())
    eager, other = load_bank(clean_bank), load_bank(compiled)
    assert (
        json.loads((compiled / "manifest.json").read_text())["key"]
        == json.loads((clean_bank / "manifest.json").read_text())["key"]
    )
    for i in range(len(eager)):
        a, b = eager[i], other[i]
        torch.testing.assert_close(b["latents"], a["latents"], atol=1e-4, rtol=1e-4)
        assert (b["conditioning_pixel_values"] - a["conditioning_pixel_values"]).abs().max() < 0.02


def test_the_bank_compile_flag_reaches_the_bank_config():
    from difftune_control.cli import _config, build_parser

    parser = build_parser()
    for command in ("bank", "train"):
        assert _config(parser.parse_args([command])).bank.bank_torch_compile is False
        assert _config(parser.parse_args([command, "--bank_torch_compile"])).bank.bank_torch_compile is True


def test_a_failed_bank_compile_warns_and_generates_eagerly(models, clean_bank, tmp_path, monkeypatch, caplog):
    """A compiler that fails (here a backend that raises, as inductor does without a C compiler) costs one
    warning, not the bank: it is generated eagerly, the same as the clean one, and the blocks are eager after."""
    from difftune_control import compiler
    from difftune_control.training.compilation import COMPILED_BLOCKS

    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    monkeypatch.setattr(compiler, "compile_backend", lambda: broken)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with caplog.at_level(logging.WARNING, logger="difftune_control"):
        folder = build(models, make_config(tmp_path / "fallback", bank_torch_compile=True))
    torch._dynamo.reset()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "--bank_torch_compile: compiling failed" in w and "no C compiler here" in w for w in warnings
    ), warnings
    blocks = [
        m for net in (models.unet, models.vae) for m in net.modules() if type(m).__name__ in COMPILED_BLOCKS
    ]
    assert blocks and all(m._compiled_call_impl is None for m in blocks)
    eager, other = load_bank(clean_bank), load_bank(folder)
    for i in range(len(eager)):
        torch.testing.assert_close(other[i]["latents"], eager[i]["latents"])
