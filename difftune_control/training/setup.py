"""The pieces of a run, built from a config: ``setup(cfg) -> Run``, callable on its own.

:func:`setup` resolves the config's defaults, then builds, in this order and with the same seeds as a
training run: the accelerator, the frozen base model, the condition recipe and extractor, the target
dataset, the validation set, the memory bank, the ControlNet with its optimizer and schedule, the
trainer of the chosen method and the convergence monitor. :mod:`difftune_control.training.loop` trains
a :class:`Run`; tests, benchmarks and ``scripts/diagnose_bank.py`` use the same function.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import difftune_control.distill  # noqa: F401  (registers the distilling retention sources)
from difftune_control.config import RunConfig, resolve_defaults
from difftune_control.methods.registry import trainer_class
from difftune_control.training.compilation import (
    auto_compile,
    compile_for_training,
    compile_mode,
    compile_signature,
)
from difftune_control.training.distributed import ddp_kwargs
from difftune_control.training.fused_step import ONE_PROCESS, OptimizerInBackward, attach, param_groups
from difftune_control.training.runtime import (
    BaseModel,
    check_hint_embedding,
    is_toy_model,
    load_base_model,
    lr_lambda,
    make_controlnet,
    offload_text_encoders,
)
from difftune_control.utils import command_seconds

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training run holds, built by :func:`setup` (before its first optimizer step)."""

    cfg: RunConfig  # resolved: every default filled in, validated
    toy: bool  # the base model is the bundled toy world's
    accelerator: Any  # accelerate.Accelerator
    base: BaseModel  # the frozen UNet, VAE, text encoder(s) and scheduler config
    recipe: Any  # the condition recipe (--condition)
    extractor: Any  # the run's condition extractor, at training resolution
    target: Any  # the target dataset (latents + embeddings when --cache_latents)
    empty_prompt: torch.Tensor  # the empty caption's embedding (caption dropout)
    validation: Any  # assembly.ValidationSet: held-out triples for the detector and the grids
    bank: Any | None  # the loaded memory bank (None when the method uses none)
    bank_dir: Path | None  # its folder
    controlnet: torch.nn.Module  # prepared by the accelerator
    optimizer: torch.optim.Optimizer  # prepared by the accelerator
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    trainer: Any  # methods.base.ControlNetTrainer (the class --method and --retention choose)
    monitor: Any | None  # convergence.ConvergenceMonitor (None without --detect_convergence)
    # seconds this start spent preparing the data: the latent cache, the memory bank (building or
    # reusing them); a run's cost before its first step, beside the training time of its records
    setup_seconds: dict[str, float] = field(default_factory=dict)


def resolve_config(cfg: RunConfig) -> tuple[RunConfig, bool, Any]:
    """``cfg`` with its defaults resolved and validated; also whether the model is the toy world's, and the recipe."""
    from difftune_control.extractors import load_recipe

    toy = is_toy_model(cfg.model.pretrained_model_name_or_path)
    recipe = load_recipe(cfg.data.condition)
    cfg = resolve_defaults(cfg, toy=toy, recipe=recipe, kind=None if toy else _model_kind(cfg))
    cfg.validate()
    trainer_class(cfg)  # --method through the methods registry: an unknown name fails before any model loads
    return cfg, toy, recipe


def _model_kind(cfg: RunConfig) -> str | None:
    """The base model's family for its defaults; None when unreadable (loading it then says why)."""
    from difftune_control.sdxl import detect_model_kind

    try:
        return detect_model_kind(cfg.model.pretrained_model_name_or_path, cfg.model.revision)
    except FileNotFoundError:
        return None


def make_accelerator(cfg: RunConfig):
    """The run's ``accelerate.Accelerator`` (precision, device, gradient accumulation, the --ddp_* flags)."""
    from accelerate import Accelerator

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        cpu=cfg.train.device == "cpu",
        kwargs_handlers=[ddp_kwargs(cfg.train)],  # the --ddp_* flags, applied when DDP wraps the ControlNet
    )
    advice = precision_advice(accelerator.device.type, accelerator.mixed_precision)
    if advice and accelerator.is_main_process:
        logger.warning(advice)
    if cfg.train.bf16_weights and (accelerator.mixed_precision != "bf16" or accelerator.num_processes > 1):
        raise ValueError(  # before any model, cache or bank is made
            "--bf16_weights needs --mixed_precision bf16 (or bf16 in your accelerate config) and one process, got "
            f"{accelerator.mixed_precision} and {accelerator.num_processes}"
        )
    return accelerator


def precision_advice(device_type: str, mixed_precision: str) -> str | None:
    """A warning for a GPU run in full fp32 (neither --mixed_precision nor an accelerate config set it)."""
    if device_type != "cuda" or mixed_precision not in (None, "no"):
        return None
    return (
        "running in fp32 on the GPU (--mixed_precision no, accelerate's default): pass --mixed_precision "
        "bf16 (or fp16 on GPUs without bf16) or set it in your accelerate config; on an H200 an SD1.5 "
        "memory bank was built 3.9x faster in bf16 (BENCHMARKS.md section 5)"
    )


def weight_dtype(accelerator) -> torch.dtype:
    """The frozen models' dtype: the accelerator's mixed precision (fp32 without one)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def setup(cfg: RunConfig, *, run_dir: Path | None = None) -> Run:
    """Resolve ``cfg`` and build every piece of its run (see the module docstring); nothing is trained.

    Args:
        cfg: the run's config, as the CLI makes it (defaults not yet resolved).
        run_dir: the run folder, where the convergence monitor writes its samples (None: nowhere).
    """
    cfg, toy, recipe = resolve_config(cfg)
    return build_run(cfg, toy, recipe, make_accelerator(cfg), run_dir)


def build_run(
    cfg: RunConfig, toy: bool, recipe: Any, accelerator, run_dir: Path | None, resumed_step: int | None = None
) -> Run:
    """:func:`setup` after the config is resolved and the accelerator made (the loop checks the run folder
    in between, before any model is loaded); ``resumed_step``: where a resumed run starts (for
    ``--torch_compile auto``'s count of the steps left)."""
    from difftune_control import assembly

    started = command_seconds()  # a command's imports, configuration, accelerator and device start-up
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    torch.manual_seed(cfg.train.seed)
    device = accelerator.device
    tm = time.perf_counter()
    base = load_base_model(cfg.model, device, weight_dtype(accelerator))
    recipe, extractor = assembly.load_condition(cfg, toy, device, recipe)
    t0 = time.perf_counter()
    target = assembly.load_target(cfg, base, extractor, device, accelerator.main_process_first)
    t1 = time.perf_counter()
    crop = (cfg.data.crops_coords_top_left_h, cfg.data.crops_coords_top_left_w)
    empty = base.prompt_encoder(cfg.data.resolution, crop)([""])[0].float()  # caption dropout
    k = max(cfg.detector.convergence_samples, cfg.train.num_validation_images)
    val = assembly.load_validation(cfg, base, extractor, k)
    t2 = time.perf_counter()
    prepared = assembly.prepare_bank(cfg, base, recipe, extractor, target, accelerator)
    bank, bank_dir = prepared.dataset, prepared.path
    t3 = time.perf_counter()
    setup_seconds = {"start": started, "models": t0 - tm, "latent_cache": t1 - t0, "bank": t3 - t2}

    torch.manual_seed(cfg.train.seed)
    controlnet, optimizer, lr_scheduler = prepare_trainable(cfg, accelerator, base)
    check_hint_embedding(accelerator.unwrap_model(controlnet), base.vae)  # latents come from this VAE
    # the teacher ControlNet (--teacher_controlnet) was loaded for the bank: the trainer takes the same one
    extra = {"teacher": prepared.teacher_controlnet} if prepared.teacher_controlnet is not None else {}
    trainer = trainer_class(cfg)(cfg, accelerator, base, controlnet, target, empty, bank, **extra)
    equip(trainer, accelerator, controlnet, optimizer)
    if cfg.train.torch_compile == "auto":
        auto_compile(cfg, accelerator, base, trainer, cfg.train.max_train_steps - (resumed_step or 0))
    setup_seconds["trainable"] = time.perf_counter() - t3  # the ControlNet, optimizer, trainer (and compile)
    setup_seconds = {k: round(v, 3) for k, v in setup_seconds.items() if v is not None}
    monitor = make_monitor(cfg, recipe, extractor, val, run_dir) if cfg.detector.detect_convergence else None
    if device.type == "cuda" and cfg.data.cache_latents:  # every prompt is encoded by now
        freed = offload_text_encoders(base)
        logger.info("text encoders moved to the CPU for training on cached rows: %.2f GB freed", freed / 1e9)
    if device.type == "cuda":  # gpu_peak_gib describes training, not the caches and bank made before it
        torch.cuda.reset_peak_memory_stats(device)
    return Run(
        cfg=cfg,
        toy=toy,
        accelerator=accelerator,
        base=base,
        recipe=recipe,
        extractor=extractor,
        target=target,
        empty_prompt=empty,
        validation=val,
        bank=bank,
        bank_dir=bank_dir,
        controlnet=controlnet,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        trainer=trainer,
        monitor=monitor,
        setup_seconds=setup_seconds,
    )


def run_bank_only(cfg: RunConfig) -> Path:
    """Build (or reuse) the run's memory bank without training; returns its folder."""
    from difftune_control import assembly

    cfg, toy, recipe = resolve_config(cfg)
    if not cfg.uses_bank:
        raise ValueError(f"--method {cfg.method.method} --split {cfg.method.split} uses no memory bank")
    accelerator = make_accelerator(cfg)
    base = load_base_model(cfg.model, accelerator.device, weight_dtype(accelerator))
    recipe, extractor = assembly.load_condition(cfg, toy, accelerator.device, recipe)
    target = assembly.load_target(cfg, base, extractor, accelerator.device, accelerator.main_process_first)
    return assembly.prepare_bank(cfg, base, recipe, extractor, target, accelerator).path


def prepare_trainable(cfg: RunConfig, accelerator, base: BaseModel):
    """A fresh ControlNet from ``base.unet`` with the run's speed/memory settings, its optimizer and LR schedule.

    Gradient checkpointing, ``channels_last`` (ControlNet and UNet), ``torch.compile``
    (:func:`~difftune_control.training.compilation.compile_for_training`), cuDNN autotuning
    (``--cudnn_benchmark``) and the optimizer (``--optimizer``: fused AdamW on CUDA, or Adafactor). Returns
    ``(controlnet, optimizer, lr_scheduler)``, the first two prepared by ``accelerator``.
    """
    t = cfg.train
    device = accelerator.device
    torch.backends.cudnn.benchmark = device.type == "cuda" and t.cudnn_benchmark
    controlnet = make_controlnet(cfg.model, base.unet)
    if t.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        base.unet.enable_gradient_checkpointing()
    if t.channels_last:
        controlnet.to(memory_format=torch.channels_last)
        base.unet.to(memory_format=torch.channels_last)
    fused = t.fused_backward_pass
    if fused and accelerator.num_processes > 1:
        raise ValueError(ONE_PROCESS)
    params = param_groups(controlnet) if fused else controlnet.parameters()
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(
            params,
            lr=t.learning_rate,
            weight_decay=t.adam_weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    else:
        optimizer = torch.optim.AdamW(
            params,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
            fused=device.type == "cuda",
        )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.lr_scheduler, t.lr_warmup_steps, t.max_train_steps)
    )
    controlnet, optimizer = accelerator.prepare(controlnet, optimizer)
    if fused:
        optimizer = OptimizerInBackward(optimizer, accelerator.unwrap_model(controlnet), t.max_grad_norm)
    if t.torch_compile is True:
        net = accelerator.unwrap_model(controlnet)
        sign = compile_signature(cfg, net, base.unet)
        compile_for_training(net, base.unet, cfg.data.cache_dir, compile_mode(t), sign, t.torch_compile_scope)
    return controlnet, optimizer, lr_scheduler


def equip(trainer, accelerator, controlnet, optimizer) -> None:
    """What the trainer needs of the optimizer: ``--fused_backward_pass``'s hooks and ``--bf16_weights``' bf16
    forward copy of the ControlNet, refreshed after each of ``optimizer``'s steps."""
    from difftune_control.training.half_weights import HalfWeights

    attach(trainer, optimizer)
    if trainer.cfg.train.bf16_weights:  # bf16, one process: checked by make_accelerator
        trainer.half = HalfWeights(accelerator.unwrap_model(controlnet), optimizer)


def make_monitor(cfg: RunConfig, recipe, extractor, val, run_dir: Path | None):
    """The convergence monitor on the first ``--convergence_samples`` validation triples."""
    from difftune_control.convergence import ConvergenceMonitor

    k = cfg.detector.convergence_samples
    return ConvergenceMonitor(
        cfg.detector,
        extractor,
        val.prompt_embeds[:k],
        val.hints[:k],
        val.images[:k],
        prompts=val.prompts[:k],
        seeds=val.seeds[:k],
        negative_prompt_embeds=val.negative_prompt_embeds,
        added_cond={name: v[:k] for name, v in val.added_cond.items()},
        negative_added_cond=val.negative_added_cond,
        run_dir=run_dir,
        milestones=tuple((getattr(recipe, "detector", None) or {}).get("milestones", (0.25, 0.5, 0.75))),
    )
