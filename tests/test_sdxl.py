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
from difftune_control.sdxl import add_time_ids, detect_model_kind, kind_from_unet_config
from difftune_control.training.runtime import load_base_model


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

    from difftune_control.training.setup import resolve_config

    cfg = tiny_config(tiny_sdxl_pipeline_dir, tmp_path, tmp_path)
    cfg.data.resolution = None
    assert resolve_config(cfg)[0].data.resolution == 1024  # SDXL's default, as diffusers' SDXL example
    cfg.model.pretrained_model_name_or_path = str(tiny_pipeline_dir)
    assert resolve_config(cfg)[0].data.resolution == 512


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


def test_sdxl_vae_stays_float32_under_fp16_unless_a_separate_vae_is_given(tiny_sdxl_pipeline_dir, tmp_path):
    from difftune_control.config import ConfigError, RunConfig

    cfg = ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl_pipeline_dir))
    base = load_base_model(cfg, torch.device("cpu"), torch.float16)
    assert base.unet.dtype == torch.float16 and base.text_encoder_2.dtype == torch.float16
    assert base.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16
    cfg.pretrained_vae_model_name_or_path = str(tiny_sdxl_pipeline_dir / "vae")  # "an fp16-safe VAE"
    assert load_base_model(cfg, torch.device("cpu"), torch.float16).vae.dtype == torch.float16
    assert load_base_model(cfg, torch.device("cpu"), torch.bfloat16).vae.dtype == torch.bfloat16
    cfg.pretrained_vae_model_name_or_path = str(tmp_path / "no-vae")
    with pytest.raises(FileNotFoundError, match="--pretrained_vae_model_name_or_path"):
        load_base_model(cfg, torch.device("cpu"), torch.float16)

    run = RunConfig()
    run.data.crops_coords_top_left_h, run.data.crops_coords_top_left_w = -1, -2
    with pytest.raises(ConfigError, match=r"(?s)crops_coords_top_left_h must be >= 0.*_w must be >= 0"):
        run.validate()


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


# -- (3) the memory bank, Diff-Tuning's retention sources, the detector ----------------------------------
def test_bank_is_generated_with_the_pipelines_micro_conditioning(sdxl_base, tmp_path):
    from difftune_control.bank import bank_sample_prompts, ensure_bank, load_bank, sample_seed
    from difftune_control.config import BankConfig
    from difftune_control.validation import encode_images, sample_images

    prompts = ["a red circle", "a blue square", "a green circle on grey background"]
    config = BankConfig(
        bank_size=3, bank_num_inference_steps=3, bank_guidance_scale=3.0, bank_seed=5, bank_batch_size=2,
        bank_dir=str(tmp_path / "bank"), bank_hint="zero",
    )  # fmt: skip
    encoder = sdxl_base.prompt_encoder(16)  # what the bank encodes its prompts with
    path = ensure_bank(
        sdxl_base, config=config, prompts=prompts, resolution=16, extractor=None, extractor_id=None,
        show_progress=False,
    )  # fmt: skip
    bank = load_bank(path)
    assert bank.manifest["text"]["time_ids"] == [16, 16, 0, 0, 16, 16]
    assert bank.manifest["text"]["negative"] == "zeros"  # force_zeros_for_empty_prompt
    assert bank.added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 3
    rows = bank.batch(torch.tensor([2, 0]))
    assert rows["text_embeds"].shape == (2, SDXL_POOLED)

    # sample 1 again by hand: the SDXL pipeline's conditioning, its seed, re-encoded image
    prompt = bank_sample_prompts(prompts, 3, 5)[1]
    (ehs, added), (neg, neg_added) = encoder([prompt]), encoder.negative()
    image = sample_images(
        unet=sdxl_base.unet, vae=sdxl_base.vae, scheduler_config=sdxl_base.scheduler_config,
        prompt_embeds=ehs, negative_prompt_embeds=neg, added_cond=added, negative_added_cond=neg_added,
        seeds=[sample_seed(5, 1)], resolution=16, num_inference_steps=3, guidance_scale=3.0,
    )  # fmt: skip
    # tolerance: the bank sampled this image in a batch of 2 (summation order only)
    torch.testing.assert_close(bank.latents[1], encode_images(sdxl_base.vae, image)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bank.added["text_embeds"][1], added["text_embeds"][0], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("retention", ["trajectory", "snr"])
def test_recorded_retention_sources_carry_the_added_conditioning(
    retention, tiny_sdxl_pipeline_dir, tiny_dataset_dir, tmp_path
):
    cfg = sdxl_config(
        tiny_sdxl_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__retention=retention,
        bank__trajectory_states=2,
        bank__bank_num_inference_steps=4,
    )
    trainer, opt = build_trainer(cfg)
    states, bank = trainer.bank.extras["trajectory"], trainer.bank
    assert states is not None and states.latents.shape[2:] == (4, 8, 8)
    # a recorded prediction is the base's conditional prediction with the bank's own added conditioning
    row, k = 1, 0
    x, t = states.latents[row, k].float()[None], int(states.timesteps[k])
    added = {name: v[row : row + 1] for name, v in bank.added.items()}
    pred = trainer.base.unet(
        x, t, encoder_hidden_states=bank.encoder_hidden_states[row : row + 1].float(), added_cond_kwargs=added
    ).sample
    # tolerance: the bank stores fp16 states and the prompt embedding in fp16
    torch.testing.assert_close(states.predictions[row, k].float(), pred[0], atol=5e-3, rtol=5e-3)
    parts = trainer.training_step(target_batch(trainer))
    opt.step()
    assert torch.isfinite(parts["loss"]) and parts["loss_bank"] is not None


def test_teacher_controlnet_distils_with_sdxl_conditioning(
    sdxl_base, tiny_sdxl_pipeline_dir, tiny_dataset_dir, tmp_path
):
    from diffusers import ControlNetModel

    from difftune_control.methods.forgetting import BatchPlan

    torch.manual_seed(1)
    teacher = ControlNetModel.from_unet(sdxl_base.unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for p in teacher.parameters():  # a "trained" teacher: non-zero output convolutions
            p.add_(0.05 * torch.randn_like(p))
    teacher.save_pretrained(tmp_path / "teacher")
    cfg = sdxl_config(
        tiny_sdxl_pipeline_dir, tiny_dataset_dir, tmp_path,
        method__teacher_controlnet=str(tmp_path / "teacher"), method__teacher_condition="canny",
        method__teacher_train_data_dir=str(tiny_dataset_dir),
    )  # fmt: skip
    trainer, _ = build_trainer(cfg)
    plan = BatchPlan(
        is_bank=torch.tensor([False, True]), timesteps=torch.tensor([10, 500]),
        weights=torch.tensor([0.5, 0.5]), bank_weight=1.0,
    )  # fmt: skip
    out = trainer.assemble(target_batch(trainer, 1), plan)
    assert out["retention_mask"].tolist() == [False, True]
    slot, row = 1, int(out["bank_index"][0])
    added = {name: v[row : row + 1] for name, v in trainer.bank.added.items()}
    hint = trainer.bank.hints[row : row + 1].float() / 255
    x = out["retention_input"][slot : slot + 1]
    ehs = trainer.bank.encoder_hidden_states[row : row + 1].float()
    down, mid = trainer.teacher(
        x, 500, encoder_hidden_states=ehs, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False
    )
    pred = trainer.base.unet(
        x, 500, encoder_hidden_states=ehs, added_cond_kwargs=added,
        down_block_additional_residuals=down, mid_block_additional_residual=mid,
    ).sample  # fmt: skip
    torch.testing.assert_close(out["retention_target"][slot], pred[0], atol=1e-5, rtol=1e-5)


# -- (4) export: what the WebUIs' loaders see -------------------------------------------------------------
def webui_guess(keys) -> str:
    """The branch sd-webui-controlnet takes for a file with these keys.

    Reproduces ``build_model_by_guess`` in Mikubill/sd-webui-controlnet ``scripts/controlnet_model_guess.py``:
    ``control_model.`` is stripped; a file with ``input_hint_block.0.weight`` is a ControlNet; without
    ``label_emb.0.0.bias`` it gets ``controlnet_default_config`` (SD1.x/2.x), with it an SDXL config chosen
    by depth: ``input_blocks.8.1.transformer_blocks.9.norm3.weight`` -> full, ``...blocks.0...`` -> mid,
    else small.
    """
    keys = {k.replace("control_model.", "") for k in keys}
    if "input_hint_block.0.weight" not in keys:
        return "not a controlnet"
    if "label_emb.0.0.bias" not in keys:
        return "controlnet_default_config"
    if "input_blocks.8.1.transformer_blocks.9.norm3.weight" in keys:
        return "controlnet_sdxl_config"
    if "input_blocks.8.1.transformer_blocks.0.norm3.weight" in keys:
        return "controlnet_sdxl_mid_config"
    return "controlnet_sdxl_small_config"


COMFY_SDXL = {  # comfy/supported_models.py, class SDXL(...).unet_config
    "model_channels": 320,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "use_temporal_attention": False,
}


def comfy_unet_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The fields of ComfyUI's ``detect_unet_config`` that its SDXL model config is matched on.

    Reproduces ComfyUI ``comfy/controlnet.py`` ``load_controlnet`` (an LDM ControlNet is recognised by
    ``control_model.zero_convs.0.0.weight``, which sets the key prefix) and ``comfy/model_detection.py``
    ``detect_unet_config`` (``label_emb.0.0.weight`` -> ``num_classes="sequential"`` and
    ``adm_in_channels`` = its input width; ``model_channels`` from ``input_blocks.0.0.weight``; per
    ResBlock the number of ``transformer_blocks`` of its SpatialTransformer, 0 without one; the context
    width from the first ``attn2.to_k``; linear projections when ``proj_in.weight`` is 2-D).
    """
    prefix = "control_model." if "control_model.zero_convs.0.0.weight" in shapes else ""
    assert prefix or "zero_convs.0.0.weight" in shapes, "ComfyUI would try the T2I-Adapter loader"
    label = shapes.get(f"{prefix}label_emb.0.0.weight")
    config = {
        "num_classes": "sequential" if label else None,
        "adm_in_channels": label[1] if label else None,
        "model_channels": shapes[f"{prefix}input_blocks.0.0.weight"][0],
        "use_temporal_attention": False,
        "transformer_depth": [],
        "context_dim": None,
        "use_linear_in_transformer": False,
    }
    n = 0
    while any(k.startswith(f"{prefix}input_blocks.{n}.") for k in shapes):
        block = f"{prefix}input_blocks.{n}."
        if f"{block}0.in_layers.0.weight" in shapes:  # a ResBlock (downsamplers are skipped)
            depth = 0
            while f"{block}1.transformer_blocks.{depth}.attn2.to_k.weight" in shapes:
                depth += 1
            config["transformer_depth"].append(depth)
            if depth and config["context_dim"] is None:
                config["context_dim"] = shapes[f"{block}1.transformer_blocks.0.attn2.to_k.weight"][1]
                config["use_linear_in_transformer"] = len(shapes[f"{block}1.proj_in.weight"]) == 2
        n += 1
    return config


SDXL_CONTROLNET = dict(  # diffusers' SDXL ControlNet (ControlNetModel.from_unet of the SDXL base UNet)
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def test_full_size_sdxl_export_keys_are_classified_as_sdxl_and_import_without_a_config():
    """An SDXL-sized ControlNet on the meta device (shapes only): the keys the WebUI export writes."""
    from diffusers import ControlNetModel

    from difftune_control.export import LDM_PREFIX, diffusers_to_ldm, webui_filename
    from difftune_control.export.infer import infer_sd_config
    from difftune_control.export.verify import webui_layout_problems

    with torch.device("meta"):
        controlnet = ControlNetModel(**SDXL_CONTROLNET)
        sd15 = ControlNetModel(
            cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        )  # fmt: skip
    ldm = diffusers_to_ldm(controlnet.state_dict(), controlnet.config, prefix=LDM_PREFIX)
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert webui_layout_problems(list(ldm), controlnet.config) == []
    assert webui_filename("my-run", "depth", controlnet.config) == "control_my-run_xl_depth_fp16.safetensors"

    assert webui_guess(shapes) == "controlnet_sdxl_config"
    detected = comfy_unet_config(shapes)
    assert detected["num_classes"] == "sequential"
    assert {k: detected[k] for k in COMFY_SDXL} == COMFY_SDXL  # ComfyUI's SDXL model config matches
    sd15_shapes = {k: tuple(v.shape) for k, v in diffusers_to_ldm(sd15.state_dict(), sd15.config).items()}
    assert webui_guess(sd15_shapes) == "controlnet_default_config"
    assert comfy_unet_config(sd15_shapes)["adm_in_channels"] is None

    # A released SDXL file carries no config: the shapes and SDXL's 64-channel heads determine it.
    config = infer_sd_config({k.removeprefix(LDM_PREFIX): v for k, v in ldm.items()})
    for key, value in SDXL_CONTROLNET.items():
        assert tuple(config[key]) == value if isinstance(value, tuple) else config[key] == value, key
    with torch.device("meta"):
        rebuilt = ControlNetModel.from_config(config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in controlnet.state_dict().items()
    }


def test_sdxl_run_trains_reports_exports_and_continues(tiny_sdxl_pipeline_dir, tiny_dataset_dir, tmp_path):
    """End to end on the tiny SDXL pipeline: Diff-Tuning with the detector, report, both exports, import."""
    from diffusers import ControlNetModel
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from difftune_control.export import export_controlnet, load_controlnet
    from difftune_control.report import build_report
    from difftune_control.training.loop import run_training
    from difftune_control.utils import read_jsonl

    run = run_training(sdxl_config(tiny_sdxl_pipeline_dir, tiny_dataset_dir, tmp_path))
    saved = json.loads((run / "config.json").read_text())
    assert saved["base_model"]["kind"] == "sdxl" and saved["data"]["crops_coords_top_left_h"] == 0
    records = read_jsonl(run / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "convergence_eval"]
    assert len(evals) == 3 and all(r["d"] == r["d"] for r in evals)  # steps 0, 2, 4
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    report = build_report([run])
    assert (report / "report.html").is_file()

    trained = ControlNetModel.from_pretrained(run / "controlnet")
    path = export_controlnet(run, "webui", condition="canny")  # verified reload (fp16)
    assert path.name == "control_run_xl_canny_fp16.safetensors"
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - not a dict
        assert json.loads(f.metadata()["training_config"])["base_model"]["kind"] == "sdxl"
    assert dtypes == {"F16"} and all(k.startswith("control_model.") for k in shapes)
    assert shapes["control_model.label_emb.0.0.weight"][1] == 6 * 8 + SDXL_POOLED  # time ids + pooled
    assert webui_guess(shapes).startswith("controlnet_sdxl")  # the tiny net has the "small" SDXL layout
    detected = comfy_unet_config(shapes)
    assert detected["num_classes"] == "sequential" and detected["adm_in_channels"] == 6 * 8 + SDXL_POOLED

    # Round trip, bit-exact in fp16: our importer and diffusers' folder
    half = {k: v.half() for k, v in trained.state_dict().items()}
    reloaded = load_controlnet(path)
    assert all(torch.equal(v.half(), half[k]) for k, v in reloaded.state_dict().items())
    folder = export_controlnet(run, "diffusers", condition="canny")
    from_folder = ControlNetModel.from_pretrained(folder)
    assert from_folder.config.addition_embed_type == "text_time"
    assert all(torch.equal(v, half[k]) for k, v in from_folder.state_dict().items())

    # Continue training from the single file, stripped of our metadata as a released file would be:
    # the config comes from the SDXL base UNet.
    plain = tmp_path / "control_sdxl_canny.safetensors"
    save_file(load_file(str(path)), str(plain))
    cfg = sdxl_config(
        tiny_sdxl_pipeline_dir, tiny_dataset_dir, tmp_path / "continued",
        model__controlnet_model_name_or_path=str(plain), method__method="vanilla",
    )  # fmt: skip
    trainer, opt = build_trainer(cfg)
    start = trainer.controlnet.state_dict()
    assert all(torch.equal(v.half(), half[k]) for k, v in start.items())
    trainer.training_step(target_batch(trainer))
    opt.step()
