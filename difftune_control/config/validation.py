"""Checks of a whole run config: every field's type and the cross-field rules, all problems at once."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Literal

from difftune_control.config.sections import SECTIONS, DataConfig, _unwrap_optional, field_types


def config_problems(cfg: Any) -> list[str]:  # cfg: a RunConfig (run.py imports this module)
    """Every problem of a :class:`~difftune_control.config.run.RunConfig`: field types and cross-field rules."""
    problems: list[str] = []
    for name in SECTIONS:
        problems += _check_types(getattr(cfg, name))
    m, t, b, d, data = cfg.method, cfg.train, cfg.bank, cfg.detector, cfg.data
    if not 0.0 < m.bank_share < 1.0:
        problems.append(f"--bank_share must be in (0, 1), got {m.bank_share}")
    if m.bank_weight != "auto" and not (
        isinstance(m.bank_weight, (int, float)) and (m.bank_weight >= 0 or math.isnan(m.bank_weight))
    ):  # (nan is reported as not finite above)
        problems.append(f"--bank_weight must be a number >= 0 or auto, got {m.bank_weight!r}")
    if not m.bank_pull > 0:
        problems.append(f"--bank_pull must be > 0, got {m.bank_pull}")
    if m.bank_pull_rows < 1:
        problems.append(f"--bank_pull_rows must be >= 1, got {m.bank_pull_rows}")
    if m.bank_pull_every < 0:
        problems.append(f"--bank_pull_every must be >= 0 (0 = at step 0 only), got {m.bank_pull_every}")
    if not m.snr_gamma > 0:
        problems.append(f"--snr_gamma must be > 0, got {m.snr_gamma}")
    if m.loss_weight_max is not None and not m.loss_weight_max > 0:
        problems.append(f"--loss_weight_max must be > 0, got {m.loss_weight_max}")
    if m.psi_power < 0:
        problems.append(f"--psi_power must be >= 0 (0: uniform t, no skew), got {m.psi_power}")
    problems += _distill_problems(cfg)
    if not 0.0 <= data.proportion_empty_prompts <= 1.0:
        problems.append(f"--proportion_empty_prompts must be in [0, 1], got {data.proportion_empty_prompts}")
    for flag in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
        if isinstance(getattr(data, flag), int) and getattr(data, flag) < 0:
            problems.append(f"--{flag} must be >= 0, got {getattr(data, flag)}")
    if data.train_data_dir and data.dataset_name:
        problems.append("give either --train_data_dir or --dataset_name, not both")
    problems += _toy_domain_problems(data)
    for flag, value in [
        ("--train_batch_size", t.train_batch_size),
        ("--max_train_steps", t.max_train_steps),
        ("--gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("--checkpointing_steps", t.checkpointing_steps),
        ("--logging_steps", t.logging_steps),
        ("--resolution", data.resolution),
        ("--bank_size", b.bank_size),
        ("--bank_batch_size", b.bank_batch_size),
        ("--bank_num_inference_steps", b.bank_num_inference_steps),
        ("--convergence_every", d.convergence_every),
        ("--convergence_samples", d.convergence_samples),
        ("--convergence_num_inference_steps", d.convergence_num_inference_steps),
        ("--convergence_patience", d.convergence_patience),
        ("--validation_steps", t.validation_steps),
    ]:
        if value is not None and not isinstance(value, bool) and isinstance(value, int) and value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if t.max_grad_norm < 0:
        problems.append(f"--max_grad_norm must be >= 0 (0: no clipping), got {t.max_grad_norm}")
    if t.fused_backward_pass and t.gradient_accumulation_steps != 1:
        problems.append("--fused_backward_pass updates in backward: it needs --gradient_accumulation_steps 1")
    if t.fused_backward_pass and t.mixed_precision == "fp16":
        problems.append(
            "--fused_backward_pass cannot unscale fp16 gradients: use --mixed_precision bf16 or no"
        )
    others = {
        "--fused_backward_pass": t.fused_backward_pass,
        "--gradient_checkpointing": t.gradient_checkpointing,
        "--channels_last": t.channels_last,
        f"--mixed_precision {t.mixed_precision}": t.mixed_precision not in (None, "bf16"),
    }
    clash = [flag for flag, on in others.items() if on]
    if t.bf16_weights and clash:
        problems.append(f"--bf16_weights does not go with {', '.join(clash)} (not built for them yet)")
    if t.torch_compile not in (True, False, "auto"):
        problems.append(f"--torch_compile must be true, false or auto, got {t.torch_compile!r}")
    if isinstance(t.ddp_bucket_cap_mb, (int, float)) and not t.ddp_bucket_cap_mb > 0:
        problems.append(f"--ddp_bucket_cap_mb must be > 0, got {t.ddp_bucket_cap_mb}")
    if t.learning_rate is not None and t.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {t.learning_rate}")
    if data.resolution is not None and data.resolution % 8 != 0:
        problems.append(
            f"--resolution must be a multiple of 8 (the VAE downsamples by 8 for SD), got {data.resolution}"
        )
    if d.convergence_threshold is not None and not 0.0 < d.convergence_threshold < 1.0:
        problems.append(f"--convergence_threshold must be in (0, 1), got {d.convergence_threshold}")
    if d.stop_after_convergence is not None and d.stop_after_convergence < 0:
        problems.append(f"--stop_after_convergence must be >= 0, got {d.stop_after_convergence}")
    if d.stop_after_convergence is not None and not d.detect_convergence:
        problems.append("--stop_after_convergence needs the detector; drop --no-detect_convergence")
    if t.checkpoints_total_limit is not None and t.checkpoints_total_limit < 1:
        problems.append(f"--checkpoints_total_limit must be >= 1, got {t.checkpoints_total_limit}")
    if b.bank_prompts is not None and not Path(b.bank_prompts).is_file():
        problems.append(f"--bank_prompts: file not found: {b.bank_prompts}")
    for flag, p in [
        ("--train_data_dir", data.train_data_dir),
        ("--validation_data_dir", data.validation_data_dir),
    ]:
        if p is not None and not Path(p).exists():
            problems.append(f"{flag}: no such file or folder: {p}")
    from difftune_control.utils import unwritable_dir

    output_problem = unwritable_dir(t.output_dir)
    if output_problem:
        problems.append(f"--output_dir {t.output_dir}: {output_problem}")
    rc = t.resume_from_checkpoint
    if rc is not None and rc != "latest" and not Path(rc).is_dir():
        problems.append(
            f"--resume_from_checkpoint: expected 'latest' or a checkpoint-N folder, got {rc!r} (not found)"
        )
    return problems


def _toy_domain_problems(data: DataConfig) -> list[str]:
    """--toy_domain names a registered toy-world domain and selects the toy world's own datasets."""
    if data.toy_domain == "default":
        return []
    from difftune_control.toyworld.domains import domain_names

    problems = []
    if data.toy_domain not in domain_names():
        problems.append(
            f"--toy_domain: unknown domain {data.toy_domain!r}; choose from {', '.join(domain_names())}"
        )
    if data.train_data_dir or data.dataset_name:
        problems.append(
            f"--toy_domain {data.toy_domain} selects a toy-world dataset; drop it with --train_data_dir/--dataset_name"
        )
    return problems


def _distill_problems(cfg: Any) -> list[str]:
    """Cross-field rules of generative distillation (--retention, --teacher_controlnet)."""
    m, b = cfg.method, cfg.bank
    problems = []
    if cfg.distills and not cfg.uses_bank:
        what = f"--retention {m.retention}" if m.retention != "renoise" else "--teacher_controlnet"
        problems.append(
            f"{what} distils in the memory bank's slots; it needs --method difftuning with --split fixed or "
            f"mixture (got --method {m.method} --split {m.split})"
        )
    if m.snr_threshold <= 0:
        problems.append(f"--snr_threshold must be > 0, got {m.snr_threshold}")
    if m.distill_weight is not None and m.distill_weight < 0:
        problems.append(f"--distill_weight must be >= 0, got {m.distill_weight}")
    if m.retention != "renoise" and b.trajectory_states < 1:
        problems.append(
            f"--retention {m.retention} needs --trajectory_states >= 1, got {b.trajectory_states}"
        )
    if m.retention != "renoise" and b.trajectory_states > b.bank_num_inference_steps:
        problems.append(
            f"--trajectory_states {b.trajectory_states} exceeds the sampler's --bank_num_inference_steps "
            f"{b.bank_num_inference_steps}"
        )
    if m.teacher_controlnet is None:
        given = [f for f in ("teacher_condition", "teacher_train_data_dir") if getattr(m, f) is not None]
        if given:
            problems.append(f"--{given[0]} is used only with --teacher_controlnet PATH")
    else:
        if b.bank_hint == "zero":
            problems.append(
                "--teacher_controlnet stores the teacher's hints in the bank; --bank_hint zero does not apply"
            )
        if b.bank_prompts is not None:
            problems.append(
                "--teacher_controlnet prompts the bank with the teacher data's captions (paired with its hints); "
                "drop --bank_prompts"
            )
        if m.teacher_train_data_dir is not None and not Path(m.teacher_train_data_dir).exists():
            problems.append(f"--teacher_train_data_dir: no such file or folder: {m.teacher_train_data_dir}")
    return problems


def _check_types(section: Any) -> list[str]:
    """Every field of one config section against its type: choices, numbers, finiteness, not empty."""
    problems = []
    hints = field_types(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        tp, optional = _unwrap_optional(hints[f.name])
        if value is None:
            if not optional:
                problems.append(f"--{f.name} must not be empty")
            continue
        if typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                problems.append(f"--{f.name}: got {value!r}; choose one of {list(choices)}")
        elif tp is float and not isinstance(value, (int, float)) or tp is int and not isinstance(value, int):
            problems.append(f"--{f.name}: expected {tp.__name__}, got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):  # float fields, and FLOAT|auto
            problems.append(f"--{f.name}: expected a finite number, got {value!r}")
    return problems
