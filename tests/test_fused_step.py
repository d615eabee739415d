"""--fused_backward_pass: each parameter is updated inside backward and its gradient freed; without clipping
the weights equal those of the usual step, and a resumed fused run continues exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import build_trainer, target_batch, tiny_config
from safetensors.torch import load_file

from difftune_control.config import ConfigError
from difftune_control.training.fused_step import GradientSketch, OptimizerInBackward, param_groups


def _weights(run_dir):
    return load_file(run_dir / "controlnet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_fused_run_ends_with_the_usual_runs_weights(optimizer, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    from difftune_control.training.loop import run_training

    def cfg(folder, **kw):
        return tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path / folder,
            train__optimizer=optimizer,
            train__max_train_steps=3,
            train__max_grad_norm=0.0,  # clipping is per parameter when fused: compare without it
            train__lr_scheduler="linear",
            detector__detect_convergence=False,
            method__bank_weight=0.1,  # lambda measured through a sketch when fused: see the next test
            **kw,
        )

    usual = _weights(run_training(cfg("usual")))
    fused = _weights(run_training(cfg("fused", train__fused_backward_pass=True)))
    assert usual.keys() == fused.keys()
    for k in usual:
        torch.testing.assert_close(fused[k], usual[k], rtol=1e-6, atol=1e-7, msg=k)
    trainer, _ = build_trainer(cfg("start"))  # the same initial ControlNet: the runs did train
    start = {k: v.detach() for k, v in trainer.controlnet.state_dict().items()}
    assert sum(not torch.equal(start[k], usual[k]) for k in usual) > len(usual) // 2


def test_updates_happen_in_backward_and_no_gradient_is_kept(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__method="vanilla",
        train__fused_backward_pass=True,
    )
    trainer, optimizer = build_trainer(cfg)
    assert isinstance(optimizer, OptimizerInBackward) and trainer.optimizer_in_backward is optimizer
    before = [p.detach().clone() for p in trainer.controlnet.parameters()]
    alive = []
    hook = optimizer._step_param

    def counting(p):  # how many gradients exist when each one is complete
        alive.append(sum(q.grad is not None for q in trainer.controlnet.parameters()))
        hook(p)

    optimizer._step_param = counting
    optimizer.remove()
    optimizer._handles = [
        p.register_post_accumulate_grad_hook(counting) for p in trainer.controlnet.parameters()
    ]
    trainer.training_step(target_batch(trainer))
    params = list(trainer.controlnet.parameters())
    assert all(p.grad is None for p in params)
    assert len(alive) == len(params) and max(alive) == 1  # one gradient at a time
    changed = sum(not torch.equal(b, p) for b, p in zip(before, params))
    assert changed > len(params) // 2  # updated without optimizer.step()


def test_bank_pull_measures_without_updating_or_holding_gradients(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    from difftune_control.training.diagnostics import bank_pull

    usual, _ = build_trainer(tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "a"))
    cfg = tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "b", train__fused_backward_pass=True)
    trainer, _ = build_trainer(cfg)
    params = list(trainer.controlnet.parameters())
    before = [p.detach().clone() for p in params]
    alive = []
    folded = GradientSketch.fold

    def counting(self, p):  # how many gradients exist when each one is complete
        alive.append(sum(q.grad is not None for q in params))
        folded(self, p)

    GradientSketch.fold = counting
    try:
        check = bank_pull(trainer, target_batch(trainer))
    finally:
        GradientSketch.fold = folded
    assert all(torch.equal(b, p) for b, p in zip(before, params))  # no update
    assert alive and max(alive) == 1 and all(p.grad is None for p in params)  # one gradient at a time
    exact = bank_pull(usual, target_batch(usual))  # the same rows, summed in .grad
    assert check["plans"] == exact["plans"] > 1  # pooled over several backward passes
    for k in ("target_grad", "bank_grad"):
        assert check[k] == pytest.approx(exact[k], rel=0.01)


def test_gradient_sketch_estimates_the_norm_of_a_sum():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5_000, 30_000, 7)]
    grads = [[torch.randn(p.shape) for p in params] for _ in range(3)]
    sketch = GradientSketch(params, buckets=2**14)
    sketch.chunk = 4_096  # parameters larger than a chunk hash in parts, the same parts every time
    for pass_ in grads:
        for p, g in zip(params, pass_):
            p.grad = g
            sketch.fold(p)
    exact = torch.cat([sum(pass_[i] for pass_ in grads) for i in range(len(params))]).norm()
    assert sketch.norm() == pytest.approx(float(exact), rel=0.03)  # sd of the estimate ~1% at 2^14 cells
    assert GradientSketch(params).norm() == 0.0


def test_fused_pass_refuses_accumulation_and_fp16(tmp_path):
    from difftune_control.config import RunConfig

    for kw, flag in [
        ({"gradient_accumulation_steps": 2}, "--gradient_accumulation_steps"),
        ({"mixed_precision": "fp16"}, "fp16"),
    ]:
        cfg = RunConfig()
        cfg.train.fused_backward_pass = True
        for k, v in kw.items():
            setattr(cfg.train, k, v)
        with pytest.raises(ConfigError, match=flag):
            cfg.validate()


def test_param_groups_are_one_per_trainable_parameter():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    net[1].bias.requires_grad_(False)
    groups = param_groups(net)
    assert [len(g["params"]) for g in groups] == [1, 1, 1]
    with pytest.raises(ValueError, match="one parameter group per parameter"):
        OptimizerInBackward(torch.optim.SGD(net.parameters(), lr=0.1), net)


def test_a_finished_fused_run_frees_its_parameters():
    """The hooks must not keep the optimizer (and through it every parameter) alive after the run."""
    import gc
    import weakref

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    fused = OptimizerInBackward(torch.optim.SGD(param_groups(net), lr=0.1), net)
    before = net[0].weight.detach().clone()
    net(torch.randn(2, 4)).sum().backward()
    assert not torch.equal(net[0].weight, before) and net[0].weight.grad is None  # updated in backward
    refs = [weakref.ref(fused), weakref.ref(net[0].weight)]
    del net, fused
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_resuming_with_another_optimizer_layout_says_which_flags(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    from difftune_control.training.loop import run_training

    def cfg(steps, **kw):
        return tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path,
            train__max_train_steps=steps,
            detector__detect_convergence=False,
            **kw,
        )

    run_training(cfg(2))
    with pytest.raises(ValueError, match="checkpoint-2.*--fused_backward_pass it was saved with"):
        run_training(cfg(4, train__resume_from_checkpoint="latest", train__fused_backward_pass=True))


def test_fused_pass_under_several_processes_is_refused_before_loading(monkeypatch, capsys):
    from difftune_control.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--fused_backward_pass", "--condition", "depth"]) == 2
    assert "--fused_backward_pass runs on one process" in capsys.readouterr().err
