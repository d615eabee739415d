"""Distillation on tiny real models: recorded banks, retention targets, the teacher, the renoise default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import PUBLISHED, build_trainer, target_batch
from conftest import tiny_config as shared_tiny_config

from difftune_control.bank import bank_manifest, bank_sample_indices, ensure_bank, load_bank, sample_seed
from difftune_control.config import BankConfig, ConfigError, ModelConfig, RunConfig
from difftune_control.distill.bank_extras import BankDistillation
from difftune_control.distill.trajectory import trajectory_storage
from difftune_control.methods.forgetting import BatchPlan
from difftune_control.validation import encode_images, encode_prompts, sample_images

RES = 16  # tiny VAE: latents [4,8,8]
PROMPTS = ["a red circle", "a blue square", "a green circle on grey background"]
EXTRACTOR_ID = {"condition": "edges", "backend": "torch", "params": {}}


def edges(x: torch.Tensor) -> torch.Tensor:
    g = x.mean(1, keepdim=True)
    dx = torch.nn.functional.pad((g[..., :, 1:] - g[..., :, :-1]).abs(), (0, 1, 0, 0))
    return (4 * dx).clamp(0, 1).expand(-1, 3, -1, -1)


@pytest.fixture(scope="module")
def base(tiny_pipeline_dir):
    from difftune_control.training.runtime import load_base_model

    cfg = ModelConfig(pretrained_model_name_or_path=str(tiny_pipeline_dir))
    return load_base_model(cfg, torch.device("cpu"), torch.float32)


def build_bank(base, bank_dir: Path, distillation=None, **kw) -> Path:
    config = BankConfig(
        bank_size=5,
        bank_num_inference_steps=4,
        bank_guidance_scale=3.0,
        bank_seed=7,
        bank_batch_size=2,
        bank_hint="extracted",
        bank_dir=str(bank_dir),
        **kw,
    )
    return ensure_bank(
        base,
        config=config,
        prompts=PROMPTS,
        resolution=RES,
        extractor=edges,
        extractor_id=EXTRACTOR_ID,
        extras=distillation,
        show_progress=False,
        shard_size=2,
    )


def test_recorded_states_are_the_samplers_bounded_and_deterministic(base, tmp_path):
    path = build_bank(base, tmp_path / "a", BankDistillation(trajectory_states=2))
    ds = load_bank(path)
    states = ds.extras["trajectory"]
    assert states.latents.shape == states.predictions.shape == (5, 2, 4, 8, 8)
    assert states.latents.dtype == torch.float16 and states.nbytes == 5 * 2 * 2 * 256 * 2
    entry = ds.manifest["distillation"]["trajectory"]
    assert entry["states"] == 2 and entry["target"] == "conditional"
    assert states.timesteps.tolist() == entry["timesteps"]
    assert ds.contents["trajectory"] == trajectory_storage(2, (4, 8, 8), 5)

    # The states are the sampler's own latents at those steps; the predictions the conditional ones.
    seen: dict[int, torch.Tensor] = {}
    emb = encode_prompts(base.text_encoder, base.tokenizer, ds.prompts[:2])
    images = sample_images(
        unet=base.unet,
        vae=base.vae,
        scheduler_config=base.scheduler_config,
        prompt_embeds=emb,
        negative_prompt_embeds=encode_prompts(base.text_encoder, base.tokenizer, [""]),
        seeds=[sample_seed(7, i) for i in range(2)],
        resolution=RES,
        num_inference_steps=4,
        guidance_scale=3.0,
        on_step=lambda i, t, x, out, chunk: seen.setdefault(i, x.clone()),
    )
    torch.testing.assert_close(ds.latents[:2], encode_images(base.vae, images), atol=1e-5, rtol=1e-5)
    for k, i in enumerate(entry["step_indices"]):
        assert torch.equal(states.latents[:2, k], seen[i].half())
        t = states.timesteps[k]
        cond = base.unet(seen[i], t, encoder_hidden_states=emb).sample
        torch.testing.assert_close(states.predictions[:2, k].float(), cond, atol=4e-3, rtol=4e-3)

    # Deterministic: another build gives the same states bit for bit; so does resuming a lost shard.
    again = load_bank(build_bank(base, tmp_path / "b", BankDistillation(trajectory_states=2)))
    assert torch.equal(again.extras["trajectory"].latents, states.latents)
    assert torch.equal(again.extras["trajectory"].predictions, states.predictions)
    (path / "shard-00001.safetensors").unlink()
    resumed = load_bank(build_bank(base, tmp_path / "a", BankDistillation(trajectory_states=2)))
    assert torch.equal(resumed.extras["trajectory"].latents, states.latents)
    # Sampling is unchanged by recording: same images as a bank without states.
    plain = load_bank(build_bank(base, tmp_path / "plain"))
    assert plain.extras.get("trajectory") is None and "distillation" not in plain.manifest
    assert torch.equal(plain.latents, ds.latents) and torch.equal(plain.hints, ds.hints)


def test_inactive_distillation_keeps_the_bank_key():
    config = BankConfig(bank_size=5, bank_batch_size=2, bank_hint="extracted")
    kw = dict(
        config=config, prompts=PROMPTS, model_id="m", resolution=RES, extractor_id={}, scaling_factor=1.0
    )
    inactive = BankDistillation().manifest_entry({}, "ddim", 25)
    assert inactive == {} and bank_manifest(**kw, distillation=inactive) == bank_manifest(**kw)


# -- training -----------------------------------------------------------------------------------------
def tiny_config(pipeline: Path, data: Path, out: Path, **overrides) -> RunConfig:
    """The shared tiny run, with a private cache, 2 steps and banks that record 2 states."""
    settings = {
        "data__resolution": RES,
        "data__cache_dir": str(out / "cache"),
        "train__max_train_steps": 2,
        "train__checkpointing_steps": 500,
        "bank__bank_num_inference_steps": 4,
        "bank__trajectory_states": 2,
        **PUBLISHED,  # the mechanics of distillation on Diff-Tuning as published
        **overrides,
    }
    return shared_tiny_config(pipeline, data, out, **settings)


def bank_plan(timesteps: list[int], n_target: int = 1) -> BatchPlan:
    n = n_target + len(timesteps)
    return BatchPlan(
        is_bank=torch.tensor([False] * n_target + [True] * len(timesteps)),
        timesteps=torch.tensor([500] * n_target + timesteps),
        weights=torch.full((n,), 1.0 / n),
        bank_weight=0.1,
    )


def test_renoise_default_is_plain_difftuning(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    from difftune_control.methods.difftuning import DiffTuningTrainer

    trainer, _ = build_trainer(tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path))
    assert type(trainer) is DiffTuningTrainer
    assert trainer.bank.extras.get("trajectory") is None and "distillation" not in trainer.bank.manifest
    out = trainer.assemble(target_batch(trainer, 2), bank_plan([100, 900]))
    assert "retention_mask" not in out


def test_snr_switch_in_the_batch_and_targets_are_the_recorded_predictions(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    from difftune_control.distill.trainer import DistillationTrainer
    from difftune_control.methods.difftuning import DiffTuningTrainer
    from difftune_control.methods.forgetting import snr

    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, method__retention="snr")
    trainer, _ = build_trainer(cfg)
    assert isinstance(trainer, DistillationTrainer)
    states = trainer.bank.extras["trajectory"]
    recorded = states.timesteps.tolist()
    ratio = snr(trainer.alphas_cumprod.cpu())
    assert all(ratio[t] < 1.0 for t in recorded)  # snr banks record only where they are used
    assert ratio[100] > 1.0 > ratio[400]
    trainer.generator.manual_seed(3)
    out = trainer.assemble(target_batch(trainer, 1), bank_plan([100, 900, 400]))
    assert out["retention_mask"].tolist() == [False, False, True, True]
    rows = out["bank_index"]
    # t=100: high SNR -> re-noised bank image, timestep kept, true noise as target (compute_loss as before)
    assert int(out["timesteps"][1]) == 100
    # t=900 and t=400 (SNR < 1): the nearest recorded state; its x_t and its recorded prediction
    for slot, t in ((2, 900), (3, 400)):
        k = min(range(len(recorded)), key=lambda j: (abs(recorded[j] - t), recorded[j]))
        row = int(rows[slot - 1])
        assert int(out["timesteps"][slot]) == recorded[k]
        assert torch.equal(out["retention_input"][slot], states.latents[row, k].float())
        assert torch.equal(out["retention_target"][slot], states.predictions[row, k].float())
        # ... which is the base model's conditional prediction there, computed independently
        x = states.latents[row, k].float()[None]
        emb = encode_prompts(trainer.base.text_encoder, trainer.base.tokenizer, [trainer.bank.prompts[row]])
        pred = trainer.base.unet(x, recorded[k], encoder_hidden_states=emb).sample[0]
        torch.testing.assert_close(out["retention_target"][slot], pred, atol=5e-3, rtol=5e-3)

    # When every bank slot is at high SNR the step equals plain Diff-Tuning's, bit for bit.
    plan = bank_plan([10, 50, 200])
    plain = DiffTuningTrainer(cfg, trainer.accelerator, trainer.base, trainer.controlnet, trainer.target,
                              trainer.empty, trainer.bank)  # fmt: skip
    losses, batch = [], target_batch(trainer, 1)  # (cached latents are drawn from the posterior)
    for tr in (trainer, plain):
        tr.generator.manual_seed(11)
        losses.append(tr.training_step(batch, plan=plan)["loss"])
    assert torch.equal(losses[0], losses[1])


def make_teacher(base, folder: Path) -> Path:
    from diffusers import ControlNetModel

    torch.manual_seed(1)
    teacher = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for p in teacher.parameters():  # a "trained" teacher: non-zero output convolutions
            p.add_(0.05 * torch.randn_like(p))
    teacher.save_pretrained(folder)
    return folder


def test_teacher_targets_bank_and_frozen_weights(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, base):
    from difftune_control.data import DatasetSpec, load_target_dataset

    teacher_dir = make_teacher(base, tmp_path / "teacher")
    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__teacher_controlnet=str(teacher_dir),
        method__teacher_condition="canny",
        method__teacher_train_data_dir=str(tiny_dataset_dir),
    )
    trainer, opt = build_trainer(cfg)
    teacher, bank = trainer.teacher, trainer.bank
    assert not any(p.requires_grad for p in teacher.parameters())
    assert bank.manifest["distillation"]["teacher"]["condition"] == "canny"

    # The bank holds A's hints, paired with A's captions, and images the teacher generated from them.
    a = load_target_dataset(DatasetSpec(source=str(tiny_dataset_dir), resolution=RES, max_samples=8))
    a_hints = torch.stack([a[i]["conditioning_pixel_values"] for i in range(len(a))])
    order = bank_sample_indices(len(a), 8, seed=0)  # the bank's seeded shuffle of A's pairs
    assert sorted(order) == list(range(8))
    assert bank.prompts == [a.captions[j] for j in order]
    torch.testing.assert_close(bank.hints.float() / 255, a_hints[order], atol=1 / 255, rtol=0)
    emb = encode_prompts(base.text_encoder, base.tokenizer, bank.prompts[:1])
    images = sample_images(
        unet=trainer.base.unet,
        vae=trainer.base.vae,
        scheduler_config=trainer.base.scheduler_config,
        prompt_embeds=emb,
        negative_prompt_embeds=encode_prompts(base.text_encoder, base.tokenizer, [""]),
        seeds=[sample_seed(0, 0)],
        resolution=RES,
        controlnet=teacher,
        hints=bank.hints[:1].float() / 255,
        num_inference_steps=4,
        guidance_scale=7.5,
    )
    torch.testing.assert_close(bank.latents[:1], encode_images(base.vae, images), atol=1e-5, rtol=1e-5)

    # Bank-slot targets are the teacher's predictions at the same x_t, hint A and prompt.
    out = trainer.assemble(target_batch(trainer, 2), bank_plan([30, 700], n_target=2))
    assert out["retention_mask"].tolist() == [False, False, True, True]
    t = out["timesteps"][2:]
    ac = trainer.alphas_cumprod[t].view(-1, 1, 1, 1)
    x = ac.sqrt() * out["latents"][2:] + (1 - ac).sqrt() * out["noise"][2:]
    assert torch.equal(out["retention_input"][2:], x)
    ehs, hint = out["encoder_hidden_states"][2:], out["conditioning_pixel_values"][2:]
    with torch.no_grad():
        down, mid = teacher(x, t, encoder_hidden_states=ehs, controlnet_cond=hint, return_dict=False)
        expected = trainer.base.unet(
            x,
            t,
            encoder_hidden_states=ehs,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
    torch.testing.assert_close(out["retention_target"][2:], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected, out["noise"][2:], atol=0.1)  # not the true noise

    # Training steps change the student only; the teacher stays bit-identical.
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = {k: v.clone() for k, v in trainer.controlnet.state_dict().items()}
    for _ in range(3):
        trainer.training_step(target_batch(trainer))
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, student[k]) for k, v in trainer.controlnet.state_dict().items())


def test_distill_weight_replaces_lambda(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__retention="trajectory",
        method__distill_weight=0.5,
    )
    trainer, _ = build_trainer(cfg)
    plan = trainer.plan(8)
    bank = plan.is_bank
    assert plan.num_bank == 2 and torch.allclose(plan.weights[bank], torch.full((2,), 0.25))
    assert torch.allclose(plan.weights[~bank], torch.full((6,), 1 / 6))
    # trajectory: every bank slot takes a recorded state
    out = trainer.assemble(target_batch(trainer, 6), plan)
    assert out["retention_mask"].tolist() == bank.tolist()
    assert set(out["timesteps"][bank].tolist()) <= set(trainer.bank.extras["trajectory"].timesteps.tolist())


def test_train_end_to_end_with_snr_retention(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    import json

    from difftune_control.training.loop import run_training
    from difftune_control.utils import read_jsonl

    run = run_training(tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, method__retention="snr"))
    saved = json.loads((run / "config.json").read_text())
    assert saved["method"]["retention"] == "snr" and saved["bank"]["trajectory_states"] == 2
    bank = load_bank(saved["bank_dir"])
    assert bank.manifest["distillation"]["trajectory"]["max_snr"] == 1.0
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]
    assert len(losses) == 2 and all(x == x for x in losses)


def test_config_rules(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__method="vanilla",
        method__retention="trajectory",
        method__snr_threshold=0.0,
        method__teacher_condition="depth",
        bank__trajectory_states=9,
    )
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    msg = str(err.value)
    assert "--retention trajectory distils in the memory bank's slots" in msg
    assert "--snr_threshold must be > 0" in msg
    assert "--trajectory_states 9 exceeds" in msg
    assert "--teacher_condition is used only with --teacher_controlnet" in msg
    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__teacher_controlnet=str(tmp_path),
        bank__bank_hint="zero",
        method__teacher_train_data_dir=str(tmp_path / "missing"),
    )
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert "--bank_hint zero does not apply" in str(err.value)
    assert "--teacher_train_data_dir: no such file" in str(err.value)


def test_teacher_data_defaults_come_from_the_teacher_run(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, base):
    import json

    from difftune_control.distill.teacher import teacher_data_spec

    run = tmp_path / "depth-run"
    make_teacher(base, run / "controlnet")
    data = {
        "condition": "sketch",
        "train_data_dir": str(tiny_dataset_dir),
        "conditioning_image_column": "hint",
    }
    (run / "config.json").write_text(json.dumps({"data": data}))
    cfg = tiny_config(
        tiny_pipeline_dir, tmp_path / "other-data", tmp_path, method__teacher_controlnet=str(run)
    )
    recipe, source, spec = teacher_data_spec(cfg, toy=False)
    assert recipe.name == "sketch" and source == str(tiny_dataset_dir)
    assert spec.conditioning_image_column == "hint" and spec.max_samples == cfg.bank.bank_size
    # flags win over the run's config; without either, the condition must be named
    cfg.method.teacher_condition = "canny"
    assert teacher_data_spec(cfg, toy=False)[0].name == "canny"
    (run / "config.json").write_text("{}")
    cfg.method.teacher_condition = None
    with pytest.raises(ValueError, match="--teacher_condition"):
        teacher_data_spec(cfg, toy=False)


@pytest.mark.gpu
def test_cuda_bf16_teacher_and_snr_retention(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, base):
    """The whole path on a GPU in bf16: teacher bank with recorded states, then distilling steps."""
    import json
    import math

    from accelerate.state import AcceleratorState

    from difftune_control.training.loop import run_training
    from difftune_control.utils import read_jsonl

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests set it up in fp32
    teacher_dir = make_teacher(base, tmp_path / "teacher")
    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__retention="snr",
        method__teacher_controlnet=str(teacher_dir),
        method__teacher_condition="canny",
        method__teacher_train_data_dir=str(tiny_dataset_dir),
        train__device="cuda",
        train__mixed_precision="bf16",
        train__max_train_steps=3,
    )
    run = run_training(cfg)
    bank = load_bank(json.loads((run / "config.json").read_text())["bank_dir"])
    assert set(bank.manifest["distillation"]) == {"teacher", "trajectory"}
    assert (
        bank.extras["trajectory"].latents.shape[:2] == (8, 2)
        and torch.isfinite(bank.extras["trajectory"].predictions).all()
    )
    records = read_jsonl(run / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any(r["type"] == "end" for r in records)


def test_the_teacher_is_loaded_once_for_the_bank_and_the_trainer(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, base, monkeypatch
):
    import difftune_control.distill.teacher as teacher_module

    real, loaded = teacher_module.load_teacher_controlnet, []

    def counting(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(teacher_module, "load_teacher_controlnet", counting)
    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__teacher_controlnet=str(make_teacher(base, tmp_path / "teacher")),
        method__teacher_condition="canny",
        method__teacher_train_data_dir=str(tiny_dataset_dir),
    )
    trainer, _ = build_trainer(cfg)
    assert len(loaded) == 1 and trainer.teacher is loaded[0]
