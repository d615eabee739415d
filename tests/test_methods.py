"""Method options of issue-level importance: loss weightings, the null-condition bank, the auto bank weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_trainer, target_batch, tiny_config
from diffusers import DDPMScheduler

from difftune_control.config import ConfigError, RunConfig
from difftune_control.methods.forgetting import BatchPlan, loss_weights, reweight, snr, weight_for_pull


@pytest.fixture(scope="module")
def alphas():
    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return s.alphas_cumprod


def test_inverse_snr_is_the_x0_loss_factor(alphas):
    # ||x0 - x0_hat||^2 = (1 - a) / a ||eps - eps_hat||^2 for x0_hat = (x_t - sqrt(1-a) eps_hat) / sqrt(a)
    t = torch.tensor([0, 250, 999])
    a = alphas[t].double()
    w = loss_weights("inverse_snr", alphas[t], "epsilon")
    torch.testing.assert_close(w, ((1 - a) / a).float())
    x0, eps, eps_hat = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    x_t = a.sqrt().float()[:, None] * x0 + (1 - a).sqrt().float()[:, None] * eps
    x0_hat = (x_t - (1 - a).sqrt().float()[:, None] * eps_hat) / a.sqrt().float()[:, None]
    # tolerance: float32 round-off of the reconstruction, scaled by the largest weight (~210)
    torch.testing.assert_close(
        ((x0 - x0_hat) ** 2).sum(1), w * ((eps - eps_hat) ** 2).sum(1), rtol=1e-4, atol=1e-3
    )
    assert float(w[2]) > 150 and float(w[0]) < 1e-3  # SD's schedule: ~210 at the last step
    # v-prediction: ||x0 - x0_hat||^2 = sigma^2 ||v - v_hat||^2 = ||v - v_hat||^2 / (SNR + 1)
    torch.testing.assert_close(loss_weights("inverse_snr", alphas[t], "v_prediction"), (1 - a).float())
    assert float(loss_weights("inverse_snr", alphas[t], "epsilon", max_weight=5.0).max()) == 5.0


def test_min_snr_gamma(alphas):
    t = torch.arange(0, 1000, 37)
    s = snr(alphas[t])
    w = loss_weights("min_snr", alphas[t], "epsilon", snr_gamma=5.0)
    torch.testing.assert_close(w, (s.clamp(max=5.0) / s).float())
    assert torch.all(w <= 1.0 + 1e-6) and float(w[-1]) == pytest.approx(1.0)  # high noise: SNR < gamma
    wv = loss_weights("min_snr", alphas[t], "v_prediction", snr_gamma=5.0)
    torch.testing.assert_close(wv, (s.clamp(max=5.0) / (s + 1)).float())
    with pytest.raises(ValueError, match="--loss_weighting"):
        loss_weights("bogus", alphas[t])


def test_reweight_touches_target_slots_only():
    plan = BatchPlan(
        is_bank=torch.tensor([False, False, True]),
        timesteps=torch.tensor([1, 2, 3]),
        weights=torch.tensor([0.5, 0.5, 0.1]),
        bank_weight=0.1,
    )
    out = reweight(plan, torch.tensor([2.0, 3.0, 4.0]))
    assert out.weights.tolist() == pytest.approx([1.0, 1.5, 0.1])
    assert reweight(plan, torch.tensor([2.0, 3.0, 4.0]), bank=True).weights.tolist() == pytest.approx(
        [1.0, 1.5, 0.4]
    )


def test_weight_for_pull_is_linear():
    assert weight_for_pull(bank_pull_at_unit_weight=4.0, target_pull=2.0, fraction=0.5) == 0.25
    with pytest.raises(ValueError):
        weight_for_pull(0.0, 1.0, 0.5)


def test_trainer_applies_the_loss_weighting_to_target_slots(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__method="vanilla",
        method__loss_weighting="min_snr",
    )
    trainer, _ = build_trainer(cfg)
    trainer.generator.manual_seed(3)
    s = snr(trainer.alphas_cumprod.cpu())
    # the plan never reads the device copy of the schedule (on a GPU that read waits for the queue to drain)
    trainer.alphas_cumprod = trainer.alphas_cumprod.to("meta")
    plan = trainer.plan(4)
    s = s[plan.timesteps]
    torch.testing.assert_close(plan.weights, (s.clamp(max=5.0) / s).float() / 4)


def test_null_bank_rows_drop_their_prompt(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    rows = {}
    for mode in ("keep", "drop"):
        cfg = tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path / mode,
            method__bank_share=0.5,
            method__bank_prompt=mode,
            bank__bank_hint="zero",
        )
        trainer, _ = build_trainer(cfg)
        trainer.generator.manual_seed(0)
        plan = trainer.plan(4)
        batch = trainer.assemble(target_batch(trainer), plan)
        slots = batch["bank_slots"]
        assert torch.count_nonzero(batch["conditioning_pixel_values"][slots]) == 0  # the null hint
        rows[mode] = batch["encoder_hidden_states"][slots]
        empty = trainer.empty.expand_as(rows[mode]).float()
    assert torch.equal(rows["drop"], empty)
    assert not torch.equal(rows["keep"], empty)


def test_auto_bank_weight_sets_the_pull_and_leaves_the_run_unchanged(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    from difftune_control.training.diagnostics import bank_pull

    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__bank_share=0.5,
        method__bank_weight="auto",
        method__bank_pull=0.5,
    )
    trainer, _ = build_trainer(cfg)
    assert trainer.bank_lambda is None
    batch = target_batch(trainer)
    gen = trainer.generator.get_state()
    trainer.training_step(batch)  # measures lambda first, on this batch and the generator's next plan
    lam = trainer.bank_lambda
    assert lam is not None and lam > 0
    for p in trainer.controlnet.parameters():
        p.grad = None
    trainer.generator.set_state(gen)
    check = bank_pull(trainer, batch)
    assert torch.equal(trainer.generator.get_state(), gen)
    assert check["bank_weight"] == pytest.approx(lam)
    assert check["ratio"] == pytest.approx(0.5, rel=0.05)  # the same batch and plan law: linear in lambda
    state = trainer.state_dict()
    assert state["bank_lambda"] == lam and state["micro_batches"] == 1


def test_bank_weight_flag_takes_auto_and_numbers(tmp_path):
    import argparse

    from difftune_control.config import config_from_args
    from difftune_control.flags import add_config_arguments

    p = argparse.ArgumentParser()
    add_config_arguments(p, ("method",))
    assert config_from_args(p.parse_args(["--bank_weight", "auto"])).method.bank_weight == "auto"
    assert config_from_args(p.parse_args(["--bank_weight", "0.05"])).method.bank_weight == 0.05
    cfg = RunConfig()
    cfg.method.bank_weight = "sometimes"
    cfg.method.loss_weighting = "inverse_snr"
    cfg.method.loss_weight_max = -1.0
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert "--bank_weight" in str(e.value) and "--loss_weight_max" in str(e.value)


def test_preset_published_sits_under_the_flags():
    from difftune_control.cli import _config, build_parser

    parser = build_parser()
    cfg = _config(parser.parse_args(["train", "--preset", "published", "--bank_weight", "0.2"]))
    assert (cfg.method.method, cfg.method.split, cfg.bank.bank_hint) == ("difftuning", "fixed", "extracted")
    assert cfg.method.bank_weight == 0.2  # the flag wins over the preset
    assert cfg.method.loss_weighting == "none" and cfg.method.retention == "renoise"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--preset", "nope"])


def test_bank_rows_draw_from_the_posterior_when_asked(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    rows = {}
    for mode in ("mean", "sample"):
        cfg = tiny_config(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            tmp_path / mode,
            method__bank_share=0.5,
            method__bank_latents=mode,
        )
        trainer, _ = build_trainer(cfg)
        trainer.generator.manual_seed(0)
        batch = trainer.assemble(target_batch(trainer), trainer.plan(4))
        rows[mode] = (batch["latents"][batch["bank_slots"]], trainer.bank.latents[batch["bank_index"]])
    assert torch.equal(rows["mean"][0], rows["mean"][1].float())
    assert not torch.equal(rows["sample"][0], rows["sample"][1].float())


def test_default_difftuning_is_the_rules_winner():
    """BENCHMARKS section 0: null-hint bank rows drawn from the posterior, lambda by the measured pull,
    inverse-SNR weight on the target rows; vanilla keeps the plain loss."""
    from difftune_control.cli import _config, build_parser
    from difftune_control.config import resolve_defaults

    parser = build_parser()
    cfg = resolve_defaults(_config(parser.parse_args(["train"])), toy=True)
    m = cfg.method
    assert (m.method, m.split, m.bank_weight, m.bank_pull) == ("difftuning", "fixed", "auto", 0.1)
    assert (m.loss_weighting, m.bank_latents, m.bank_prompt) == ("inverse_snr", "sample", "keep")
    assert cfg.bank.bank_hint == "zero"
    vanilla = resolve_defaults(_config(parser.parse_args(["train", "--method", "vanilla"])), toy=True)
    assert vanilla.method.loss_weighting == "none"


def test_a_registered_method_is_a_cli_choice_and_trains(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, monkeypatch, capsys
):
    """A method registered by user code: ``--method`` accepts it (and --help lists it), the run trains with
    its trainer and is named after it; an unknown name in a saved config fails before any model loads."""
    from difftune_control.cli import build_parser, main
    from difftune_control.methods import ControlNetTrainer, register_method, registry
    from difftune_control.utils import read_jsonl

    class DoubleLoss(ControlNetTrainer):
        """Vanilla with the per-sample loss doubled (a method that changes only the objective)."""

        def compute_loss(self, batch):
            return 2 * super().compute_loss(batch)

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # the registration ends with the test
    register_method("double", DoubleLoss)
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--method {difftuning,double,vanilla}" in train_help
    args = build_parser().parse_args(["train", "--method", "double"])
    assert getattr(args, "method.method") == "double"

    config = tmp_path / "config.json"
    tiny_config(
        tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "runs", train__max_train_steps=1, train__run_name=None,
        detector__detect_convergence=False,
    ).save(config)  # fmt: skip
    first_loss = {}
    for method in ("vanilla", "double"):
        assert main(["train", "--config", str(config), "--method", method]) == 0
        run = Path(capsys.readouterr().out.strip().splitlines()[-1])
        assert run.name.startswith(f"canny-{method}-")
        assert json.loads((run / "config.json").read_text())["method"]["method"] == method
        first_loss[method] = next(
            r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"
        )
    # step 1 runs before any update, on the same seeded batch: the doubled objective is 2x vanilla's
    # (x2 is exact in floating point; the tolerance only covers the logged value's rounding)
    assert first_loss["double"] == pytest.approx(2 * first_loss["vanilla"], rel=1e-6)

    tiny_config(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "runs", method__method="magic").save(config)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "--method: got 'magic'; choose one of ['difftuning', 'double', 'vanilla']" in err


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["vanilla", "difftuning"])
def test_a_training_step_never_waits_for_the_gpu(method, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """After the first step (which measures --bank_weight auto's lambda), a step queues its work and returns:
    no host read of a device value, no stream synchronisation (either would expose the host's dispatch)."""
    cfg = tiny_config(
        tiny_pipeline_dir, tiny_dataset_dir, tmp_path, method__method=method, train__device="cuda"
    )
    trainer, opt = build_trainer(cfg)
    assert trainer.device.type == "cuda"
    batch = target_batch(trainer)
    trainer.training_step(batch)
    opt.step()
    opt.zero_grad(set_to_none=True)
    trainer.check_finite()
    torch.cuda.synchronize()
    # the one intended wait, the previous step's finiteness flag behind its CUDA event, is checked after
    check = trainer.check_finite
    trainer.check_finite = lambda: None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            trainer.training_step(batch)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        trainer.check_finite = check
    trainer.check_finite()


def test_the_sd_default_bank_is_sized_to_the_run():
    """About one bank image per 4 bank rows the run draws (the toy benchmark's reuse), within 500-5000;
    the toy world keeps its 2,000 and a --bank_size given stays."""
    from difftune_control.config import resolve_defaults
    from difftune_control.config.presets import sd_bank_size

    assert sd_bank_size(10_000, 4, 1, 0.2) == 2000  # the SD defaults: 8,000 bank rows drawn
    assert sd_bank_size(10_000, 4, 2, 0.2) == 4000 and sd_bank_size(3_000, 1, 1, 0.2) == 500
    assert sd_bank_size(50_000, 32, 1, 0.2) == 5000
    assert sd_bank_size(10_000, 4, 1, 0.2, processes=2) == 4000  # two processes draw from one bank
    cfg = RunConfig()
    cfg.train.train_batch_size, cfg.train.max_train_steps = 8, 10_000
    assert resolve_defaults(cfg, toy=False).bank.bank_size == 4000
    assert resolve_defaults(cfg, toy=True).bank.bank_size == 2000
    cfg.bank.bank_size = 5000
    assert resolve_defaults(cfg, toy=False).bank.bank_size == 5000


def test_fixed_split_batch_of_one_keeps_the_bank_in_expectation():
    """A batch of one: a bank row w.p. r weighted lambda (1-r)/r, else a target row weighted 1."""
    from difftune_control.methods.forgetting import fixed_plan

    g = torch.Generator().manual_seed(0)
    plans = [fixed_plan(1, bank_share=0.2, bank_weight=0.1, generator=g) for _ in range(4000)]
    bank = torch.tensor([p.num_bank for p in plans]).double()
    assert abs(bank.mean() - 0.2) < 0.03  # binomial sd 0.0063
    w = torch.stack([p.weights[0] for p in plans]).double()
    assert torch.allclose(w[bank == 1], torch.tensor(0.1 * 0.8 / 0.2, dtype=torch.float64))
    assert torch.equal(w[bank == 0], torch.ones_like(w[bank == 0]))
    # expected bank mass / expected target mass = lambda, as in a batch of 10
    assert float((w * bank).mean() / (w * (1 - bank)).mean()) == pytest.approx(0.1, rel=0.2)
    t_bank = torch.cat([p.timesteps for p in plans if p.num_bank])
    t_target = torch.cat([p.timesteps for p in plans if not p.num_bank])
    assert t_bank.float().mean() < 400 < 600 < t_target.float().mean()  # (T-k) and (k+1) laws


def test_a_batch_of_one_trains_with_bank_rows_and_the_auto_weight(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    from difftune_control.training.loop import run_training
    from difftune_control.utils import read_jsonl

    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        train__train_batch_size=1,
        train__max_train_steps=12,
        train__checkpointing_steps=12,
        method__bank_weight="auto",
        method__bank_share=0.5,
    )
    records = read_jsonl(run_training(cfg) / "metrics.jsonl")
    check = next(r for r in records if r["type"] == "bank_check")
    assert check["bank_weight"] > 0 and check["ratio"] == pytest.approx(cfg.method.bank_pull, rel=0.05)
    train = [r for r in records if r["type"] == "train"]
    shares = [r["bank_share"] for r in train]
    assert len(train) == 12 and 0 < sum(shares) < 12  # some steps a bank row, some a target row
    assert all(r["loss_bank"] is not None for r in train if r["bank_share"] == 1)


def test_the_pull_is_pooled_over_plans_until_enough_bank_rows(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """Small batches pool plans (fresh target rows each) to --bank_pull_rows; re-measured less often."""
    from difftune_control.training.diagnostics import bank_pull

    cfg = tiny_config(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        tmp_path,
        method__bank_share=0.5,
        method__bank_weight="auto",
        method__bank_pull_rows=5,
        method__bank_pull_every=2,
    )
    trainer, _ = build_trainer(cfg)
    batch = target_batch(trainer)
    gen = trainer.generator.get_state()
    trainer.bank_lambda = 1.0
    check = bank_pull(trainer, batch)
    assert torch.equal(trainer.generator.get_state(), gen)
    assert check["plans"] == 3 and check["bank_slots"] == 6  # 2 bank rows a plan, pooled to >= 5
    assert bank_pull(trainer, batch) == check  # deterministic given the run's state
    trainer.cfg.method.bank_pull_rows = 1
    single = bank_pull(trainer, batch)
    assert single["plans"] == 1 and single["target_grad"] != check["target_grad"]

    trainer.cfg.method.bank_pull_rows = 5
    trainer.bank_lambda = None
    measured = []
    calibrate = trainer.calibrate_bank_weight
    trainer.calibrate_bank_weight = lambda b: measured.append(trainer.micro_batches) or calibrate(b)
    for _ in range(8):
        trainer.before_step(batch)
    assert measured == [1, 7]  # at step 0, then every 2 x 3 steps
    assert trainer.state_dict()["pull_plans"] == 3
