"""The trainer on a tiny real pipeline: what trains, one code path, overfitting, exact resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_trainer, target_batch, tiny_config

from difftune_control.config import ConfigError
from difftune_control.methods.forgetting import vanilla_plan
from difftune_control.utils import read_jsonl


def test_only_controlnet_parameters_change(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    trainer, opt = build_trainer(tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path))
    base = trainer.base
    frozen = {
        name: {k: v.clone() for k, v in m.state_dict().items()}
        for name, m in (("unet", base.unet), ("vae", base.vae), ("text_encoder", base.text_encoder))
    }
    before = {k: v.clone() for k, v in trainer.controlnet.state_dict().items()}
    for _ in range(3):
        trainer.training_step(target_batch(trainer))
        opt.step()
        opt.zero_grad()
    for name, m in (("unet", base.unet), ("vae", base.vae), ("text_encoder", base.text_encoder)):
        for k, v in m.state_dict().items():
            assert torch.equal(v, frozen[name][k]), f"{name}.{k} changed"
    changed = [k for k, v in trainer.controlnet.state_dict().items() if not torch.equal(v, before[k])]
    assert any("controlnet_down_blocks" in k for k in changed), "zero convolutions did not train"


def test_difftuning_with_vanilla_plan_equals_vanilla_step(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    grads = []
    for method in ("vanilla", "difftuning"):
        cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / method, method__method=method)
        trainer, _ = build_trainer(cfg)
        plan = vanilla_plan(4, generator=torch.Generator().manual_seed(5))
        trainer.generator.manual_seed(7)
        parts = trainer.training_step(target_batch(trainer), plan=plan)
        grads.append(
            (parts["loss"], [p.grad.clone() for p in trainer.controlnet.parameters() if p.grad is not None])
        )
    (l1, g1), (l2, g2) = grads
    assert torch.equal(l1, l2)
    assert len(g1) == len(g2) > 0 and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_difftuning_fixed_step_uses_bank(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    trainer, _ = build_trainer(
        tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, method__bank_share=0.25)
    )
    parts = trainer.training_step(target_batch(trainer))
    assert parts["bank_share"] == 0.25 and parts["loss_bank"] is not None and parts["loss_target"] is not None


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_loss_decreases_when_overfitting_onetarget_batch(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, optimizer
):
    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__method="vanilla",
        data__proportion_empty_prompts=0.0,
        train__learning_rate=1e-2,
        train__optimizer=optimizer,
    )
    trainer, opt = build_trainer(cfg)
    assert type(opt.optimizer).__name__ == {"adamw": "AdamW", "adafactor": "Adafactor"}[optimizer]
    batch = target_batch(trainer)
    losses = []
    for _ in range(40):
        plan = vanilla_plan(4, generator=torch.Generator().manual_seed(0))  # same t every step
        trainer.generator.manual_seed(1)  # same noise every step
        losses.append(trainer.training_step(batch, plan=plan)["loss"].item())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.7 * losses[0], losses


def test_channels_last_gives_the_same_loss_and_gradients(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    results = []
    for channels_last in (False, True):
        cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, train__channels_last=channels_last)
        trainer, _ = build_trainer(cfg)
        conv = trainer.controlnet.controlnet_cond_embedding.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        plan = trainer.plan(4)
        trainer.generator.manual_seed(5)
        loss = trainer.training_step(target_batch(trainer), plan=plan)["loss"].item()
        results.append((loss, conv.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_frozen_unet_runs_outside_autocast_controlnet_inside(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """bf16 mixed precision: the ControlNet (fp32 master weights) under autocast, the bf16 UNet in its own
    precision (autocast would run its norms in fp32 on CUDA)."""
    trainer, _ = build_trainer(tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path), "bf16")
    assert trainer.base.unet.dtype == torch.bfloat16
    assert next(trainer.controlnet.parameters()).dtype == torch.float32
    seen = {}

    def hook(name):
        def record(module, args):
            seen.setdefault(name, torch.is_autocast_enabled("cpu"))

        return record

    trainer.base.unet.register_forward_pre_hook(hook("unet"))
    trainer.accelerator.unwrap_model(trainer.controlnet).register_forward_pre_hook(hook("controlnet"))
    parts = trainer.training_step(target_batch(trainer))
    assert seen == {"controlnet": True, "unet": False}
    assert torch.isfinite(parts["loss"])
    grad = trainer.accelerator.unwrap_model(trainer.controlnet).controlnet_mid_block.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_adafactor_state_is_a_fraction_of_adamw(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    sizes = {}
    for optimizer in ("adamw", "adafactor"):
        cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, train__optimizer=optimizer)
        trainer, opt = build_trainer(cfg)
        trainer.training_step(target_batch(trainer))
        opt.step()
        params = sum(p.numel() for p in trainer.controlnet.parameters())
        state = sum(
            v.numel()
            for st in opt.optimizer.state.values()
            for v in st.values()
            if torch.is_tensor(v) and v.dim()
        )
        sizes[optimizer] = state / params
    assert sizes["adamw"] == pytest.approx(2.0)
    assert sizes["adafactor"] < 0.7, sizes


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]


def test_train_writes_run_and_resume_is_exact(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    from difftune_control.training.loop import run_training

    full = run_training(
        tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "a", train__max_train_steps=6)
    )
    assert (full / "config.json").is_file() and (full / "controlnet" / "config.json").is_file()
    assert sorted(p.name for p in full.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    records = read_jsonl(full / "metrics.jsonl")
    types = {r["type"] for r in records}
    assert {"train", "convergence_eval", "checkpoint", "end"} <= types
    assert [r["step"] for r in records if r["type"] == "convergence_eval"] == [0, 2, 4, 6]
    saved = json.loads((full / "config.json").read_text())
    assert saved["train"]["max_train_steps"] == 6 and saved["method"]["method"] == "difftuning"

    # stopped at step 3, then resumed: the loss curve equals the uninterrupted run's; the detector also
    # evaluates the last step, off its every-2 grid, so the progress curve reaches the end of the run
    part = run_training(
        tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "b", train__max_train_steps=3)
    )

    def evals(run: Path) -> list[int]:
        return [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "convergence_eval"]

    assert evals(part) == [0, 2, 3]
    resumed = run_training(
        tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path / "b",
            train__max_train_steps=6,
            train__resume_from_checkpoint="latest",
        )
    )
    assert resumed == part
    assert _losses(resumed) == _losses(full) and evals(resumed) == [0, 2, 3, 4, 6]
    from safetensors.torch import load_file

    wa = load_file(full / "controlnet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(resumed / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("fused", [False, True])
def test_adafactor_run_resumes_exactly(fused, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """Also with the optimizer stepping inside the backward pass (--fused_backward_pass)."""
    from safetensors.torch import load_file

    from difftune_control.training.loop import run_training

    def cfg(folder, steps, **kw):
        return tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path / folder,
            train__optimizer="adafactor",
            train__fused_backward_pass=fused,
            train__max_train_steps=steps,
            detector__detect_convergence=False,
            **kw,
        )

    full = run_training(cfg("a", 4))
    run_training(cfg("b", 2))
    resumed = run_training(cfg("b", 4, train__resume_from_checkpoint="latest"))
    assert _losses(resumed) == _losses(full)
    wa = load_file(full / "controlnet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(resumed / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_without_resume_is_refused(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    from difftune_control.training.loop import run_training

    cfg = tiny_config(
        tiny_pipeline_dir, tiny_dataset_dir, tmp_path, train__max_train_steps=2, method__method="vanilla"
    )
    run_training(cfg)
    with pytest.raises(ValueError, match="resume_from_checkpoint latest"):
        run_training(cfg)


def test_bad_flags_are_reported_together(tiny_pipeline_dir, tmp_path):
    from difftune_control.training.loop import run_training

    cfg = tiny_config(
        tiny_pipeline_dir, tmp_path / "missing", tmp_path, train__train_batch_size=0, method__bank_share=1.5
    )
    with pytest.raises(ConfigError) as err:
        run_training(cfg)
    msg = str(err.value)
    assert "--train_batch_size" in msg and "--bank_share" in msg and "--train_data_dir" in msg


def test_bad_model_path_and_condition(tiny_dataset_dir, tmp_path):
    from difftune_control.training.loop import run_training

    cfg = tiny_config(tmp_path / "nope", tiny_dataset_dir, tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path"):
        run_training(cfg)
    cfg = tiny_config(tmp_path / "nope", tiny_dataset_dir, tmp_path, data__condition="depthh")
    with pytest.raises(ValueError, match="canny"):
        run_training(cfg)


def tiny_flags(pipeline, data, out, run_name: str) -> list[str]:
    """Command-line flags of a tiny CPU run (the subprocess twin of ``tiny_config``)."""
    return [
        "--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(data), "--condition", "canny",
        "--resolution", "16", "--conditioning_embedding_out_channels", "8", "16", "--output_dir", str(out),
        "--run_name", run_name, "--report_to", "none", "--logging_steps", "1", "--device", "cpu",
    ]  # fmt: skip


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine (gloo): both ranks train.

    (`accelerate launch --cpu --num_processes N` starts a single process unless MPI is used.)
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "scripts/train_controlnet.py",
        *tiny_flags(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, "mp"),
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--bank_size",
        "8",
        "--bank_num_inference_steps",
        "2",
        "--convergence_every",
        "2",
        "--convergence_samples",
        "2",
        "--convergence_num_inference_steps",
        "2",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "mp"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert (run / "checkpoint-4" / "controlnet").is_dir()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_compute_loss_matches_diffusers_targets(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, prediction_type
):
    """Per-sample loss = MSE(UNet+ControlNet prediction, noise or scheduler.get_velocity)."""
    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__method="vanilla",
        model__prediction_type=prediction_type,
    )
    trainer, _ = build_trainer(cfg)
    plan = vanilla_plan(4, generator=torch.Generator().manual_seed(3))
    batch = trainer.assemble(target_batch(trainer), plan)
    loss = trainer.compute_loss(batch)
    sched = trainer.base.noise_scheduler
    latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
    noisy = sched.add_noise(latents, noise, t)
    down, mid = trainer.controlnet(
        noisy,
        t,
        encoder_hidden_states=batch["encoder_hidden_states"],
        controlnet_cond=batch["conditioning_pixel_values"],
        return_dict=False,
    )
    pred = trainer.base.unet(
        noisy,
        t,
        encoder_hidden_states=batch["encoder_hidden_states"],
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    expected = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected, atol=1e-5, rtol=1e-4)


def test_sigterm_saves_a_checkpoint_and_stops(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """SIGTERM mid-run: the step in flight finishes, a checkpoint is written, the log says why it ended."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "sig"
    cmd = [
        sys.executable,
        "-m",
        "difftune_control.cli",
        "train",
        *tiny_flags(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, "sig"),
        "--train_batch_size",
        "4",
        "--max_train_steps",
        "100000",
        "--checkpointing_steps",
        "100000",
        "--method",
        "vanilla",
        "--no-detect_convergence",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and '"train"' in (run / "metrics.jsonl").read_text():
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    records = read_jsonl(run / "metrics.jsonl")
    end = records[-1]
    assert end["type"] == "end" and end["reason"] == "signal"
    assert (run / f"checkpoint-{end['step']}" / "trainer_state.json").is_file()
    assert (run / "controlnet" / "config.json").is_file()


def test_nan_loss_stops_with_a_clear_message(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, method__method="vanilla")
    trainer, _ = build_trainer(cfg)
    with torch.no_grad():
        next(trainer.controlnet.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="resume_from_checkpoint latest"):
        trainer.training_step(target_batch(trainer))


def test_checkpoints_total_limit_keeps_the_newest(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    from difftune_control.training.loop import run_training

    run = run_training(
        tiny_config(
            tiny_pipeline_dir, tiny_dataset_dir, tmp_path, method__method="vanilla", train__max_train_steps=6,
            train__checkpoints_total_limit=2, detector__detect_convergence=False,
        )
    )  # fmt: skip
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_bank_command_builds_then_reuses(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, capsys):
    from difftune_control.bank import load_bank
    from difftune_control.cli import main

    argv = ["bank", *tiny_flags(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, "b"), "--bank_size", "6",
            "--bank_batch_size", "3", "--bank_num_inference_steps", "2", "--bank_dir", str(tmp_path / "bank")]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert first == str(tmp_path / "bank") and len(load_bank(first)) == 6
    stamp = (tmp_path / "bank" / "shard-00000.safetensors").stat().st_mtime_ns
    assert main(argv) == 0  # the manifest matches: reused, nothing regenerated
    assert (tmp_path / "bank" / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    assert main([*argv, "--method", "vanilla"]) == 2
    assert "uses no memory bank" in capsys.readouterr().err


def _bare_trainer():
    from difftune_control.methods.base import ControlNetTrainer

    trainer = ControlNetTrainer.__new__(ControlNetTrainer)
    trainer._pending = []
    return trainer


def test_non_finite_loss_on_cpu_raises_at_once():
    trainer = _bare_trainer()
    trainer._watch_finite(torch.tensor(1.0), torch.ones(2))
    with pytest.raises(FloatingPointError, match="per-sample: \\[nan, 1.0\\]"):
        trainer._watch_finite(torch.tensor(float("nan")), torch.tensor([float("nan"), 1.0]))
    assert trainer._pending == []


@pytest.mark.gpu
def test_non_finite_loss_on_cuda_is_reported_by_the_next_check():
    from difftune_control.utils import to_device

    trainer = _bare_trainer()
    trainer._watch_finite(torch.tensor(2.0, device="cuda"), torch.ones(2, device="cuda"))
    trainer.check_finite()  # finite: nothing raised
    bad = torch.tensor(float("inf"), device="cuda")
    trainer._watch_finite(bad, torch.full((2,), float("inf"), device="cuda"))  # queued, not raised
    assert len(trainer._pending) == 1
    with pytest.raises(FloatingPointError, match="not finite"):
        trainer.check_finite()
    x = torch.arange(6.0).view(2, 3)
    y = to_device(x, "cuda", torch.float16)
    assert y.device.type == "cuda" and y.dtype == torch.float16 and torch.equal(y.cpu().float(), x)


def test_precision_advice_only_for_fp32_on_a_gpu():
    from difftune_control.training.setup import precision_advice

    assert "--mixed_precision" in precision_advice("cuda", "no")
    assert precision_advice("cuda", "bf16") is None and precision_advice("cuda", "fp16") is None
    assert precision_advice("cpu", "no") is None


def test_offload_text_encoders_moves_both_and_counts_the_bytes(tiny_sdxl_pipeline_dir):
    from difftune_control.config import ModelConfig
    from difftune_control.training.runtime import load_base_model, offload_text_encoders

    base = load_base_model(
        ModelConfig(pretrained_model_name_or_path=str(tiny_sdxl_pipeline_dir)), "cpu", torch.float32
    )
    expected = sum(
        q.numel() * q.element_size() for m in (base.text_encoder, base.text_encoder_2) for q in m.parameters()
    )
    assert expected > 0 and offload_text_encoders(base, to="meta") == expected
    assert all(
        q.device.type == "meta" for m in (base.text_encoder, base.text_encoder_2) for q in m.parameters()
    )
    assert base.vae.device.type == "cpu" and base.unet.device.type == "cpu"  # the rest stays
    assert offload_text_encoders(base, to="meta") == 0  # nothing left to move


@pytest.mark.gpu
def test_a_cached_run_trains_with_its_text_encoders_on_the_cpu(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, train__device="cuda")
    trainer, opt = build_trainer(cfg)
    assert trainer.device.type == "cuda" and trainer.base.text_encoder.device.type == "cpu"
    trainer.training_step(target_batch(trainer))
    opt.step()
    trainer.check_finite()


def test_peak_memory_is_reported_on_cuda_only():
    from difftune_control.training.runtime import PeakMeter

    cpu = PeakMeter(torch.device("cpu"))
    with cpu.phase() as got:
        pass
    assert cpu.run() == {} and got == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_phase_has_its_own_peak_and_the_run_keeps_the_largest():
    from difftune_control.training.runtime import PeakMeter

    live = torch.cuda.memory_allocated() / 2**30  # what earlier tests left allocated counts in every peak
    meter = PeakMeter(torch.device("cuda"))
    x = torch.empty(2**29, dtype=torch.uint8, device="cuda")  # 0.5 GiB
    del x
    with meter.phase() as got:
        y = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 0.25 GiB
        del y
    assert 0.24 <= got["gpu_peak_gib"] - live < 0.5
    assert meter.run()["gpu_peak_gib"] - live >= 0.49


def test_a_hint_embedding_that_does_not_match_the_vae_is_named(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path)
    cfg.model.conditioning_embedding_out_channels = [16, 32, 96, 256]  # 8x; the tiny VAE shrinks 2x
    with pytest.raises(
        ValueError, match=r"--conditioning_embedding_out_channels 16 32 96 256: .* 8x .* 2x; give 2"
    ):
        build_trainer(cfg)


def test_the_progress_bar_shows_the_plain_mse_not_the_weighted_objective(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, capsys
):
    """Under inverse-SNR weights the objective reaches tens; the bar shows the target rows' epsilon MSE,
    the number diffusers' scripts show, and it matches the logged record."""
    from difftune_control.training.loop import run_training
    from difftune_control.utils import read_jsonl

    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, train__max_train_steps=2,
                      method__loss_weighting="inverse_snr", detector__detect_convergence=False)  # fmt: skip
    run = run_training(cfg)
    err = capsys.readouterr().err
    last = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"][-1]
    assert f"loss_target={last['loss_target']:.3g}" in err
    assert " loss=" not in err
