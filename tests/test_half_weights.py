"""``--bf16_weights``: the ControlNet on a bf16 copy of its fp32 weights: the autocast step's numbers within bf16
rounding with far fewer casts, fp32 gradients accumulated across passes, fp32 weights saved, an exact resume."""

from __future__ import annotations

import pytest
import torch
from conftest import build_trainer, target_batch, tiny_config
from safetensors.torch import load_file

from difftune_control.training.half_weights import HalfWeights
from difftune_control.utils import read_jsonl


def test_gradients_fold_into_fp32_and_accumulate_until_cleared():
    """Two passes: the fp32 gradient is the sum of the bf16 copy's two (in fp32), the copy's own are cleared; after
    ``zero_grad(set_to_none=True)`` the next fold starts over; an optimizer step refreshes the copy."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    net[2].bias.requires_grad_(False)  # not trained: not copied, not folded
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    half = HalfWeights(net, opt)
    assert half.dtype == torch.bfloat16 and len(half.trained) == 3
    xs = [torch.randn(4, 6, dtype=torch.bfloat16) for _ in range(2)]
    trained = [half.masters[i] for i in half.trained]
    copies = [half.copies[i] for i in half.trained]
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in trained]
    for x in xs:
        half(x).float().square().sum().backward()
        for e, c in zip(expected, copies, strict=True):
            e += c.grad.float()
        half.fold()
        assert all(c.grad is None for c in copies)
    assert net[2].bias.grad is None
    for e, p in zip(expected, trained, strict=True):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, e)
    opt.step()
    for c, p in zip(half.copies, half.masters, strict=True):
        assert torch.equal(c.detach(), p.detach().to(torch.bfloat16))
    # a prepared model's instance forward (accelerate's autocast, outputs to fp32) is not the one the copy runs
    net.forward = lambda *a, **k: torch.nn.Sequential.forward(net, *a, **k).float()
    assert net(xs[0].float()).dtype == torch.float32 and half(xs[0]).dtype == torch.bfloat16
    opt.zero_grad(set_to_none=True)
    half(xs[0]).float().square().sum().backward()
    first = [c.grad.float() for c in copies]
    half.fold()
    for f, p in zip(first, trained, strict=True):
        assert torch.equal(p.grad, f)


def _step(trainer):
    plan = trainer.plan(4)
    trainer.generator.manual_seed(3)
    loss = trainer.training_step(target_batch(trainer), plan=plan)["loss"].item()
    net = trainer.accelerator.unwrap_model(trainer.controlnet)
    return loss, {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


def _casts(trainer) -> int:
    """``aten::_to_copy`` calls (dtype casts) in one training step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(trainer)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


GPU = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_bf16_weights_give_the_autocast_step_within_bf16_rounding_with_fewer_casts(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, device
):
    """One step of the same plan and noise under bf16 autocast (the default) and with ``--bf16_weights``: the loss
    and the ControlNet's fp32 gradients agree to bf16 rounding, and the step casts at least one tensor fewer per
    trained parameter (autocast casts every weight forward and its gradient back)."""
    results, casts = [], []
    for half in (False, True):
        cfg = tiny_config(
            tiny_pipeline_dir, tiny_dataset_dir, tmp_path / str(half), train__bf16_weights=half,
            train__device=device,
        )  # fmt: skip
        trainer, _ = build_trainer(cfg, mixed_precision="bf16")
        assert (trainer.half is not None) is half
        results.append(_step(trainer))
        casts.append(_casts(trainer))
        n_params = sum(1 for p in trainer.accelerator.unwrap_model(trainer.controlnet).parameters())
    (loss, grads), (half_loss, half_grads) = results
    assert half_loss == pytest.approx(loss, rel=2e-2)
    assert half_grads.keys() == grads.keys() and len(grads) > 10
    a = torch.cat([g.flatten() for g in grads.values()])
    b = torch.cat([half_grads[k].flatten() for k in grads])
    assert all(g.dtype == torch.float32 for g in half_grads.values())
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    assert (a - b).norm() < 0.05 * a.norm()
    assert casts[1] <= casts[0] - n_params, (casts, n_params)


def test_a_bf16_weights_run_saves_fp32_weights_and_resumes_exactly(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    """A run of 4 steps then resumed to 6 logs the losses of an uninterrupted 6-step run; its checkpoints hold the
    fp32 weights (each tensor its own, as safetensors needs)."""
    from difftune_control.training.loop import run_training

    def cfg(out, steps, **kw):
        return tiny_config(
            tiny_pipeline_dir, tiny_dataset_dir, out, method__method="vanilla", detector__detect_convergence=False,
            train__max_train_steps=steps, train__bf16_weights=True, train__mixed_precision="bf16", **kw,
        )  # fmt: skip

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]

    whole = run_training(cfg(tmp_path / "whole", 6))
    run = run_training(cfg(tmp_path / "parts", 4))
    run_training(cfg(tmp_path / "parts", 6, train__resume_from_checkpoint="latest"))
    assert losses(run) == losses(whole) and len(losses(run)) == 6
    saved = load_file(str(run / "checkpoint-6" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    final = load_file(str(whole / "checkpoint-6" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    for k, v in final.items():
        assert torch.equal(saved[k], v), k


def test_the_default_method_measures_its_bank_pull_through_the_bf16_copy(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    """Diff-Tuning's ``--bank_weight auto`` measures both pulls on the ControlNet's gradients: with ``--bf16_weights``
    they arrive through the copy (folded), so lambda is measured, not the fallback, and close to autocast's."""
    from difftune_control.training.loop import run_training

    checks = []
    for half in (False, True):
        cfg = tiny_config(
            tiny_pipeline_dir, tiny_dataset_dir, tmp_path / str(half), detector__detect_convergence=False,
            train__max_train_steps=2, train__bf16_weights=half, train__mixed_precision="bf16",
        )  # fmt: skip
        run = run_training(cfg)
        checks.append([r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "bank_check"][0])
    assert checks[1]["bank_grad"] > 0 and checks[1]["target_grad"] > 0
    assert checks[1]["bank_weight"] == pytest.approx(checks[0]["bank_weight"], rel=0.05)


def test_compiled_blocks_run_on_the_bf16_copy_and_give_its_eager_steps(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, clean_env
):
    """``--bf16_weights --torch_compile`` (the ``aot_eager`` backend: dynamo's capture and AOT autograd, no C
    compiler): two steps with an update between give the eager copy's losses and gradients, the update reaches the
    compiled blocks through the refreshed copy without a recompile, and the copy is a static input of the graphs."""
    from torch._dynamo.utils import counters

    from difftune_control.compiler import BACKEND_ENV

    clean_env.setenv(BACKEND_ENV, "aot_eager")
    runs = []
    for compiled in (False, True):
        cfg = tiny_config(
            tiny_pipeline_dir, tiny_dataset_dir, tmp_path / str(compiled), train__bf16_weights=True,
            train__torch_compile=compiled,
        )  # fmt: skip
        trainer, optimizer = build_trainer(cfg, mixed_precision="bf16")
        net = trainer.accelerator.unwrap_model(trainer.controlnet)
        assert any(getattr(m, "_compiled_call_impl", None) for m in net.modules()) is compiled
        first = _step(trainer)
        graphs = counters["stats"]["unique_graphs"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runs.append((first, _step(trainer)))
        assert counters["stats"]["unique_graphs"] == graphs  # the second step: no new graph
    torch._dynamo.reset()
    assert all(getattr(c, "_dynamo_static_input_type", None) for c in trainer.half.copies)
    for (loss, grads), (compiled_loss, compiled_grads) in zip(*runs, strict=True):
        assert compiled_loss == pytest.approx(loss, rel=1e-3) and compiled_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(compiled_grads[name], g, rtol=1e-2, atol=1e-4, msg=name)
    assert runs[0][1][0] != runs[0][0][0]  # the update changed the second step's loss


def test_bf16_weights_refuse_the_settings_they_were_not_built_for(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    from difftune_control.config.validation import config_problems

    cfg = tiny_config(
        tiny_pipeline_dir, tiny_dataset_dir, tmp_path, train__bf16_weights=True,
        train__gradient_checkpointing=True, train__mixed_precision="fp16", train__torch_compile=True,
    )  # fmt: skip
    said = [p for p in config_problems(cfg) if "--bf16_weights" in p]
    assert len(said) == 1 and "--gradient_checkpointing" in said[0] and "--mixed_precision fp16" in said[0]
    assert "--torch_compile" not in said[0]  # compiled: built (the test above)
    cfg.train.gradient_checkpointing, cfg.train.mixed_precision = False, "bf16"
    assert not [p for p in config_problems(cfg) if "--bf16_weights" in p]
    # the precision may come from accelerate's config: checked where the accelerator is made, before any model
    from accelerate.state import AcceleratorState

    from difftune_control.training.setup import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg.train.mixed_precision = "no"
    with pytest.raises(ValueError, match="--bf16_weights needs --mixed_precision bf16 .* got no and 1"):
        make_accelerator(cfg)
    AcceleratorState._reset_state(reset_partial_state=True)
