"""SDXL on a tiny SDXL-architecture pipeline: detection, prompt encoding, training step, caches, bank, sampling.

The pipeline (``tiny_sdxl_pipeline_dir``, conftest) is built from the real diffusers/transformers
classes at tiny sizes; where diffusers has a reference (``StableDiffusionXLPipeline.encode_prompt``,
its sampling loop) the test compares against it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SDXL_POOLED, SDXL_TEXT_WIDTHS, build_trainer, target_batch, tiny_config

from difftune_control.config import ModelConfig
from difftune_control.runtime import load_base_model
from difftune_control.sdxl import add_time_ids, detect_model_kind, kind_from_unet_config


@pytest.fixture(scope="module")
def sdxl_base(tiny_sdxl_pipeline_dir):
    cfg = ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl_pipeline_dir))
    return load_base_model(cfg, torch.device("cpu"), torch.float32)


def sdxl_config(pipeline, data, out, **overrides):
    return tiny_config(pipeline, data, out, **overrides)


# -- (1) the model kind ---------------------------------------------------------------------------------
def test_model_kind_is_read_from_the_folder(tiny_pipeline_dir, tiny_sdxl_pipeline_dir, tmp_path):
    assert detect_model_kind(str(tiny_sdxl_pipeline_dir)) == "sdxl"
    assert detect_model_kind(str(tiny_pipeline_dir)) == "sd1"
    # SD2.x: OpenCLIP ViT-H's 1024-wide context (pure function of the UNet config)
    assert kind_from_unet_config({"cross_attention_dim": 1024, "use_linear_projection": True}) == "sd2"
    assert kind_from_unet_config({"cross_attention_dim": 768}) == "sd1"
    assert kind_from_unet_config({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}) == "sdxl"
    with pytest.raises(FileNotFoundError, match="--pretrained_model_name_or_path"):
        detect_model_kind(str(tmp_path / "missing"))


def test_sdxl_folder_loads_both_text_encoders(sdxl_base, tiny_sdxl_pipeline_dir, tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    assert sdxl_base.kind == "sdxl" and sdxl_base.force_zeros_negative
    assert type(sdxl_base.text_encoder) is CLIPTextModel
    assert type(sdxl_base.text_encoder_2) is CLIPTextModelWithProjection
    assert not any(p.requires_grad for p in sdxl_base.text_encoder_2.parameters())

    import shutil

    broken = tmp_path / "no-te2"
    shutil.copytree(tiny_sdxl_pipeline_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=r"SDXL pipeline.*\['text_encoder_2', 'tokenizer_2'\]"):
        load_base_model(
            ModelConfig(pretrained_model_name_or_path=str(broken)), torch.device("cpu"), torch.float32
        )


def test_prompt_encoding_and_time_ids_match_the_diffusers_sdxl_pipeline(sdxl_base, tiny_sdxl_pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_pipeline_dir))
    prompts = ["a red circle on grey background", "blue square"]
    ehs, added = sdxl_base.prompt_encoder(16, crop=(3, 5))(prompts)
    ref, ref_neg, ref_pooled, ref_neg_pooled = pipe.encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=True
    )
    assert ehs.shape == (2, 8, sum(SDXL_TEXT_WIDTHS)) and added["text_embeds"].shape == (2, SDXL_POOLED)
    assert torch.equal(ehs, ref) and torch.equal(added["text_embeds"], ref_pooled)
    neg, neg_added = sdxl_base.prompt_encoder(16).negative()  # force_zeros_for_empty_prompt
    assert torch.equal(neg, ref_neg[:1]) and torch.equal(neg_added["text_embeds"], ref_neg_pooled[:1])
    ref_ids = pipe._get_add_time_ids(
        (16, 16), (3, 5), (16, 16), torch.float32, text_encoder_projection_dim=SDXL_POOLED
    )
    assert torch.equal(added["time_ids"], ref_ids.expand(2, 6))
    assert add_time_ids((1024, 1024), (0, 0), (1024, 1024)).tolist() == [1024, 1024, 0, 0, 1024, 1024]


def test_sampling_reproduces_the_diffusers_sdxl_pipeline(sdxl_base, tiny_sdxl_pipeline_dir):
    """The bank's and the detector's sampler with SDXL micro-conditioning and CFG = the SDXL pipeline."""
    from diffusers import StableDiffusionXLPipeline

    from difftune_control.validation import initial_noise, sample_images

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_pipeline_dir))
    prompts, seeds = ["a green square", "a red circle"], [3, 4]
    encoder = sdxl_base.prompt_encoder(16)
    (ehs, added), (neg, neg_added) = encoder(prompts), encoder.negative()
    ours, latents = sample_images(
        unet=sdxl_base.unet, vae=sdxl_base.vae, scheduler_config=sdxl_base.scheduler_config,
        prompt_embeds=ehs, negative_prompt_embeds=neg, added_cond=added, negative_added_cond=neg_added,
        seeds=seeds, resolution=16, num_inference_steps=4, guidance_scale=5.0, sampler="euler",
        return_latents=True,
    )  # fmt: skip
    noise = initial_noise(seeds, (4, 8, 8), "cpu")
    reference = pipe(
        prompts, height=16, width=16, num_inference_steps=4, guidance_scale=5.0, latents=noise,
        output_type="latent",
    ).images  # fmt: skip
    # tolerance: the same float32 operations; only CFG's batch layout may change summation order
    torch.testing.assert_close(latents, reference, atol=1e-5, rtol=1e-5)
    assert ours.shape == (2, 3, 16, 16)


# -- (2) training ---------------------------------------------------------------------------------------
def test_step_trains_only_controlnet_and_uses_the_added_conditioning(
    tiny_sdxl_pipeline_dir, tiny_dataset_dir, tmp_path
):
    cfg = sdxl_config(
        tiny_sdxl_pipeline_dir, tiny_dataset_dir, tmp_path,
        data__crops_coords_top_left_h=2, data__crops_coords_top_left_w=1,
    )  # fmt: skip
    trainer, opt = build_trainer(cfg)
    base = trainer.base
    modules = {n: getattr(base, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    frozen = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    assert trainer.controlnet.config.addition_embed_type == "text_time"
    before = {k: v.clone() for k, v in trainer.controlnet.state_dict().items()}

    batch = target_batch(trainer)
    assert batch["text_embeds"].shape == (4, SDXL_POOLED)
    assert batch["time_ids"][0].tolist() == [16, 16, 2, 1, 16, 16]  # --crops_coords_top_left_h/w
    out = trainer.assemble(batch, trainer.plan(4))
    assert {"text_embeds", "time_ids"} <= set(out)
    bank_rows = out["bank_slots"]
    assert out["time_ids"][bank_rows][0].tolist() == [16, 16, 0, 0, 16, 16]  # the bank's own
    loss = trainer.compute_loss(out)
    shifted = dict(out, time_ids=out["time_ids"] + 64.0)  # the UNet must see the micro-conditioning
    assert not torch.allclose(loss, trainer.compute_loss(shifted))

    for _ in range(3):
        parts = trainer.training_step(target_batch(trainer))
        opt.step()
        opt.zero_grad()
    assert parts["loss_bank"] is not None and torch.isfinite(parts["loss"])
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            assert torch.equal(v, frozen[name][k]), f"{name}.{k} changed"
    changed = [k for k, v in trainer.controlnet.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("controlnet_down_blocks") for k in changed)
    assert any(k.startswith("add_embedding") for k in changed)  # the ControlNet's own text_time embedding


def test_caption_dropout_replaces_the_pooled_embedding_too(
    tiny_sdxl_pipeline_dir, tiny_dataset_dir, tmp_path
):
    cfg = sdxl_config(
        tiny_sdxl_pipeline_dir, tiny_dataset_dir, tmp_path, data__proportion_empty_prompts=1.0,
        method__method="vanilla",
    )  # fmt: skip
    trainer, _ = build_trainer(cfg)
    out = trainer.assemble(target_batch(trainer), trainer.plan(4))
    ehs, added = trainer.base.prompt_encoder(16)([""])
    assert torch.equal(out["encoder_hidden_states"], ehs.expand(4, -1, -1))
    assert torch.equal(out["text_embeds"], added["text_embeds"].expand(4, -1))


def test_cache_round_trips_and_its_key_names_both_encoders(sdxl_base, tiny_dataset_dir, tmp_path):
    from difftune_control.data import DatasetSpec, build_latent_cache, load_target_dataset

    ds = load_target_dataset(DatasetSpec(source=str(tiny_dataset_dir), resolution=16))
    encoder = sdxl_base.prompt_encoder(16, crop=(4, 0))
    kw = dict(vae=sdxl_base.vae, cache_dir=tmp_path, model_id="tiny-sdxl", show_progress=False, shard_size=10)
    cached = build_latent_cache(ds, text_encoder=encoder, **kw)
    manifest = json.loads((cached.cache_dir / "manifest.json").read_text())
    key = manifest["key"]
    assert [e["class"] for e in key["text_encoders"]] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert key["time_ids"] == [16, 16, 4, 0, 16, 16]

    ehs, added = encoder(ds.captions[10:20])
    item = cached[13]  # in the second shard
    assert torch.equal(item["encoder_hidden_states"], ehs[3])  # the shard's rows, encoded as one batch
    assert torch.equal(item["text_embeds"], added["text_embeds"][3])
    assert torch.equal(item["time_ids"], added["time_ids"][3])
    empty, empty_added = encoder([""])  # encoded alone, as the cache does (a batch may round differently)
    assert torch.equal(cached.empty_prompt_embedding, empty[0])
    assert torch.equal(cached.empty_prompt_added["text_embeds"], empty_added["text_embeds"][0])

    again = build_latent_cache(ds, text_encoder=encoder, **kw)
    assert again.build_stats["computed_shards"] == 0  # reused as it is
    other = build_latent_cache(ds, text_encoder=sdxl_base.prompt_encoder(16), **kw)  # another crop
    assert "time_ids" in other.build_stats["rebuild_reason"] and other[13]["time_ids"][2] == 0
