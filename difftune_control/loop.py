"""The training run: setup from a config, the optimizer-step loop, checkpoints, logging, stop rules."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

import difftune_control.distill  # noqa: F401  (registers the distilling retention sources)
from difftune_control import __version__
from difftune_control.checkpoints import (
    CHECKPOINT_RE,
    WeightWatch,
    latest_run,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from difftune_control.config import RunConfig, resolve_defaults
from difftune_control.distributed import StopVote, WindowMeans, ddp_kwargs, ddp_settings
from difftune_control.methods.registry import trainer_class
from difftune_control.runtime import (
    IndexStream,
    StopSignal,
    StreamBatchSampler,
    is_toy_model,
    load_base_model,
    lr_lambda,
    make_controlnet,
)
from difftune_control.utils import JsonlLogger, atomic_dir, atomic_write_text, derive_seed, read_jsonl

logger = logging.getLogger(__name__)


def _accelerator(cfg: RunConfig):
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


def _weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _resolve(cfg: RunConfig):
    from difftune_control.extractors import load_recipe

    toy = is_toy_model(cfg.model.pretrained_model_name_or_path)
    recipe = load_recipe(cfg.data.condition)
    cfg = resolve_defaults(cfg, toy=toy, recipe=recipe, kind=None if toy else _model_kind(cfg))
    cfg.validate()
    return cfg, toy, recipe


def _model_kind(cfg: RunConfig) -> str | None:
    """The base model's family for its defaults; None when unreadable (loading it then says why)."""
    from difftune_control.sdxl import detect_model_kind

    try:
        return detect_model_kind(cfg.model.pretrained_model_name_or_path, cfg.model.revision)
    except FileNotFoundError:
        return None


def _run_dir(cfg: RunConfig, accelerator) -> Path:
    from accelerate.utils import broadcast_object_list

    rc = cfg.train.resume_from_checkpoint
    if rc not in (None, "latest"):
        return Path(rc).resolve().parent
    name = cfg.train.run_name
    if name is None:
        m = cfg.method
        tag = m.method if m.method == "vanilla" else f"difftuning-{m.split}"
        prefix = f"{Path(cfg.data.condition).stem}-{tag}-"
        found = latest_run(Path(cfg.train.output_dir), prefix) if rc == "latest" else None
        name = [found.name if found else f"{prefix}{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
        broadcast_object_list(name)
        name = name[0]
    return Path(cfg.train.output_dir) / name


def run_bank_only(cfg: RunConfig) -> Path:
    from difftune_control import assembly

    cfg, toy, _ = _resolve(cfg)
    if not cfg.uses_bank:
        raise ValueError(f"--method {cfg.method.method} --split {cfg.method.split} uses no memory bank")
    accelerator = _accelerator(cfg)
    base = load_base_model(cfg.model, accelerator.device, _weight_dtype(accelerator))
    recipe, extractor = assembly.load_condition(cfg, toy, accelerator.device)
    target = assembly.load_target(cfg, base, extractor, accelerator.device, accelerator.main_process_first)
    _, path = assembly.prepare_bank(cfg, base, recipe, extractor, target, accelerator)
    return path


def prepare_trainable(cfg: RunConfig, accelerator, base):
    """A fresh ControlNet from ``base.unet`` with the run's speed/memory settings, its optimizer and LR schedule.

    Gradient checkpointing, ``channels_last`` (ControlNet and UNet), ``torch.compile``, cuDNN autotuning
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
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        optimizer = Adafactor(
            controlnet.parameters(),
            lr=t.learning_rate,
            weight_decay=t.adam_weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    else:
        optimizer = torch.optim.AdamW(
            controlnet.parameters(),
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
    if t.torch_compile:
        compile_blocks(accelerator.unwrap_model(controlnet))
        compile_blocks(base.unet)
    return controlnet, optimizer, lr_scheduler


COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def compile_blocks(model: torch.nn.Module, **compile_kwargs) -> int:
    """Regional ``torch.compile``: each transformer and ResNet block of ``model`` compiled in place.

    Blocks of one shape share their compiled code, so this compiles a handful of small graphs instead
    of the whole UNet (which took minutes before its first step) and keeps the fusions that matter
    (GroupNorm + SiLU, attention projections, GEGLU). Static shapes; dynamo's recompile limit is raised
    to the number of blocks, since every block shape is one more graph. Returns the number of blocks.
    """
    blocks = [m for m in model.modules() if type(m).__name__ in COMPILED_BLOCKS]
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 2 * len(blocks)))
    for m in blocks:
        m.compile(**{"dynamic": False, **compile_kwargs})
    return len(blocks)


def run_training(cfg: RunConfig) -> Path:
    """Set up everything from ``cfg`` and train; returns the run folder."""
    from difftune_control import assembly

    cfg, toy, _ = _resolve(cfg)
    accelerator = _accelerator(cfg)
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    run_dir = _run_dir(cfg, accelerator)
    resume = resolve_resume(run_dir, cfg.train.resume_from_checkpoint)
    if resume is None and list_checkpoints(run_dir):
        raise ValueError(
            f"run folder {run_dir} already has checkpoints; continue it with --resume_from_checkpoint latest, "
            "or pick another --run_name"
        )
    resumed_step = _checkpoint_step(resume)
    if (
        resumed_step is not None
        and resumed_step >= cfg.train.max_train_steps
        and (run_dir / "controlnet").is_dir()
    ):
        from difftune_control.console import already_finished_message

        if accelerator.is_main_process:
            logger.info("%s", already_finished_message(run_dir, resumed_step, cfg.train.max_train_steps))
        return run_dir
    if accelerator.is_main_process:
        from difftune_control.console import run_summary

        summary = run_summary(
            cfg,
            run_dir=run_dir,
            toy=toy,
            device=accelerator.device.type,
            precision=accelerator.mixed_precision,
            world_size=accelerator.num_processes,
            resumed_step=resumed_step,
        )
        logger.info("%s", summary)
    torch.manual_seed(cfg.train.seed)
    device = accelerator.device
    base = load_base_model(cfg.model, device, _weight_dtype(accelerator))
    recipe, extractor = assembly.load_condition(cfg, toy, device)
    target = assembly.load_target(cfg, base, extractor, device, accelerator.main_process_first)
    crop = (cfg.data.crops_coords_top_left_h, cfg.data.crops_coords_top_left_w)
    empty = base.prompt_encoder(cfg.data.resolution, crop)([""])[0].float()  # caption dropout
    k = max(cfg.detector.convergence_samples, cfg.train.num_validation_images)
    val = assembly.load_validation(cfg, base, extractor, k)
    bank, bank_dir = assembly.prepare_bank(cfg, base, recipe, extractor, target, accelerator)

    torch.manual_seed(cfg.train.seed)
    controlnet, optimizer, lr_scheduler = prepare_trainable(cfg, accelerator, base)
    trainer = trainer_class(cfg)(cfg, accelerator, base, controlnet, target, empty, bank)
    monitor = _make_monitor(cfg, recipe, extractor, val, run_dir) if cfg.detector.detect_convergence else None

    state: dict[str, Any] = {"global_step": 0, "consumed_batches": 0, "elapsed": 0.0, "stop_at": None}
    if resume is not None:
        accelerator.load_state(str(resume))
        saved = json.loads((resume / "trainer_state.json").read_text())
        state.update({k: saved[k] for k in state if k in saved})
        trainer.load_state_dict(saved["trainer"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if monitor is not None and saved.get("monitor") is not None:
            monitor.load_state_dict(saved["monitor"])
        if accelerator.is_main_process:
            _truncate_metrics(run_dir / "metrics.jsonl", state["global_step"])
        logger.info("resumed from %s at optimizer step %d", resume, state["global_step"])
    elif accelerator.is_main_process and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()

    if accelerator.is_main_process:
        extra = {
            "condition": _recipe_dict(recipe),
            "base_model": {"id": base.model_id, "is_toy": base.is_toy, "kind": base.kind},
            "bank_dir": str(bank_dir) if bank_dir else None,
            "version": __version__,
            "world_size": accelerator.num_processes,
            "ddp": ddp_settings(controlnet),  # what DDP was built with (None on one process)
        }
        cfg.save(run_dir / "config.json", extra)
        if extra["ddp"] is not None:
            logger.info(
                "DistributedDataParallel over %d processes: %s", accelerator.num_processes, extra["ddp"]
            )
    check = _bank_check(cfg, trainer, target, accelerator) if resume is None else None
    loop = _Loop(cfg, accelerator, trainer, optimizer, lr_scheduler, monitor, val, run_dir, state)
    if check is not None and loop.log is not None:
        loop.log.log({"type": "bank_check", "step": 0, **check})
    loop.fit()
    return run_dir


def _checkpoint_step(checkpoint: Path | None) -> int | None:
    """The optimizer step in a ``checkpoint-N`` folder name (None for no checkpoint or another name)."""
    match = CHECKPOINT_RE.match(checkpoint.name) if checkpoint is not None else None
    return int(match.group(1)) if match else None


def _bank_check(cfg: RunConfig, trainer, target, accelerator) -> dict | None:
    """The memory-bank check of :mod:`difftune_control.diagnostics` on the first target rows (a fresh run with a bank)."""
    if trainer.bank is None or not cfg.method.bank_check:
        return None
    from difftune_control.diagnostics import bank_pull, warn_if_bank_dominates

    n = min(cfg.train.train_batch_size, len(target))
    batch = torch.utils.data.default_collate([target[i] for i in range(n)])
    if trainer.auto_weight:  # lambda measured first, so the check shows the pull it sets
        trainer.calibrate_bank_weight(batch)
    check = bank_pull(trainer, batch)
    if accelerator.is_main_process:
        warn_if_bank_dominates(check, cfg.method.retention)
    return check


def _recipe_dict(recipe: Any) -> dict:
    to_dict = getattr(recipe, "to_dict", None)
    return json.loads(json.dumps(to_dict() if to_dict else {"name": str(recipe)}, default=str))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint being resumed, so the log reads as one run."""
    if path.exists():
        # an event is written when confirmed: keep it only if confirmed by the checkpoint
        kept = [r for r in read_jsonl(path) if r.get("confirmed_step", r.get("step", 0)) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _make_monitor(cfg: RunConfig, recipe, extractor, val, run_dir: Path):
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


class _Loop:
    """The optimizer-step loop of one run (see :func:`run_training`)."""

    def __init__(
        self, cfg, accelerator, trainer, optimizer, lr_scheduler, monitor, val, run_dir: Path, state
    ):
        self.cfg, self.acc, self.trainer = cfg, accelerator, trainer
        self.optimizer, self.lr_scheduler, self.monitor, self.val = optimizer, lr_scheduler, monitor, val
        self.run_dir, self.state = run_dir, state
        self.main = accelerator.is_main_process
        self.log = JsonlLogger(run_dir / "metrics.jsonl") if self.main else None
        self._pending_log: tuple[dict, WindowMeans] | None = None  # a train record read one step later
        # several processes agree on a signal at logging steps, without a wait at each step
        reduce = accelerator.reduce if accelerator.num_processes > 1 else None
        self.vote = StopVote(cfg.train.logging_steps, reduce, accelerator.device)
        self._postfix: dict[str, str] = {}
        self.weights = WeightWatch(trainer.controlnet.parameters, run_dir, cfg.train.learning_rate)
        self.tb = None
        if self.main and cfg.train.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "logs"))

    def now(self) -> float:
        return self.state["elapsed"] + time.time() - self._t0

    def emit(self, record: dict) -> None:
        if not self.main:
            return
        record.setdefault("time", round(self.now(), 3))
        self.log.log(record)
        bar = getattr(self, "bar", None)
        if bar is not None and record["type"] in ("train", "convergence_eval"):
            keys = {"train": ("loss", "images_per_s"), "convergence_eval": ("p",)}[record["type"]]
            self._postfix.update({k: f"{record[k]:.3g}" for k in keys if record.get(k) is not None})
            bar.set_postfix(self._postfix, refresh=False)
        if self.tb is not None:
            prefix = record["type"]
            for key, value in record.items():
                if (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and key not in ("step", "time")
                ):
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def fit(self) -> None:
        cfg, acc, st = self.cfg, self.acc, self.state
        t = cfg.train
        self._t0 = time.time()
        stream = IndexStream(
            len(self.trainer.target), t.train_batch_size, t.seed, acc.process_index, acc.num_processes
        )
        loader = torch.utils.data.DataLoader(
            self.trainer.target,
            batch_sampler=StreamBatchSampler(stream, st["consumed_batches"]),
            num_workers=cfg.data.dataloader_num_workers,
            collate_fn=torch.utils.data.default_collate,
            pin_memory=acc.device.type == "cuda",  # asynchronous copies (utils.to_device)
            generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched (exact resume)
        )
        batches = iter(loader)
        if self.monitor is not None and self.monitor.should_evaluate(st["global_step"]):
            self._evaluate()  # step 0: measures d0 and d_floor first
        reason = "max_steps"
        window: list[dict] = []
        t_log = time.time()
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=t.max_train_steps,
            initial=st["global_step"],
            desc="training",
            unit="step",
            disable=not self.main,
        )
        with StopSignal() as stop:
            while st["global_step"] < t.max_train_steps:
                self._seed_step(st["consumed_batches"])
                self.weights.check(keep=1)  # the update before last: finished on the GPU by now
                with acc.accumulate(self.trainer.controlnet):
                    parts = self.trainer.training_step(next(batches))
                    st["consumed_batches"] += 1
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(self.trainer.controlnet.parameters(), t.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window.append(parts)
                if not acc.sync_gradients:
                    continue
                self.lr_scheduler.step()
                st["global_step"] += 1
                step = st["global_step"]
                self.weights.watch(step)
                self.bar.update(1)
                self._flush_log()  # the previous step's record: finished on the GPU by now
                if step % t.logging_steps == 0 or step == t.max_train_steps:
                    self._log_train(step, window, time.time() - t_log)
                    window, t_log = [], time.time()
                if self.monitor is not None and self.monitor.should_evaluate(step):
                    self._evaluate()
                if step % t.validation_steps == 0:
                    self._validation_grid(step)
                finished = self._should_stop(stop)
                if finished:
                    reason = finished
                if step % t.checkpointing_steps == 0 or finished or step == t.max_train_steps:
                    self._checkpoint(step)
                if finished:
                    break
        self.bar.close()
        self._finish(reason)

    def _check_finite(self) -> None:
        """Raise ``FloatingPointError`` if a loss or an update since the last check was not finite."""
        self.weights.check()
        self.trainer.check_finite()

    def _seed_step(self, micro_step: int) -> None:
        """Seed every random draw of micro-batch ``micro_step`` from (seed, process, micro_step) alone.

        The trainer's generator (batch plan, timesteps, noise, caption dropout, bank rows) and torch's
        global generator (anything else a model might draw) restart from seeds derived from the step, so
        the step's numbers never depend on what ran before it: a resume, a detector evaluation, or a model
        loaded with a random initialisation in between (exact resume, same numbers with or without a
        prebuilt bank). The data items are seeded per (seed, epoch, index) by the sampler.
        """
        seed, rank = self.cfg.train.seed, self.acc.process_index
        self.trainer.generator.manual_seed(derive_seed(seed, "step", rank, micro_step))
        torch.manual_seed(derive_seed(seed, "global", rank, micro_step))

    def _should_stop(self, stop: StopSignal) -> str | None:
        """Every process returns the same answer at the same step (:class:`StopVote`; ``stop_at`` is shared)."""
        st = self.state
        reason = None
        if self.vote(st["global_step"], stop.received is not None):
            reason = "signal"
        elif st["stop_at"] is not None and st["global_step"] >= st["stop_at"]:
            reason = "stop_after_convergence"
        if reason and self.acc.num_processes > 1:
            logger.info(
                "process %d stops at optimizer step %d (%s)",
                self.acc.process_index,
                st["global_step"],
                reason,
            )
        return reason

    def _log_train(self, step: int, window: list[dict], seconds: float) -> None:
        """Queue the train record of ``step``; it is written one step later (or at the next checkpoint,
        evaluation or the end), when the GPU has its losses: logging never waits for the GPU or other ranks."""
        self._flush_log()
        images = sum(p["images"] for p in window) * self.acc.num_processes
        record = {
            "type": "train",
            "step": step,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "images_per_s": images / max(seconds, 1e-9),
            "time": round(self.now(), 3),
        }
        keys = ("loss", "loss_target", "loss_bank", "bank_share", "bank_weight")
        means = WindowMeans(window if self.main else [], keys)  # only the main process writes it
        self._pending_log = (record, means)
        if self.acc.device.type != "cuda":  # values at hand: write at once
            self._flush_log()

    def _flush_log(self) -> None:
        if self._pending_log is None:
            return
        record, means = self._pending_log
        self._pending_log = None
        self._check_finite()  # nothing from a non-finite step is logged or saved
        head = {"type": record.pop("type"), "step": record.pop("step")}
        self.emit({**head, **means.get(), **record})

    def _evaluate(self) -> None:
        self._flush_log()
        self._check_finite()  # nothing from a non-finite step is logged or saved
        if self.main:
            base = self.trainer.base
            net = self.acc.unwrap_model(self.trainer.controlnet)
            records = self.monitor.evaluate(
                self.state["global_step"], base.unet, base.vae, net, base.scheduler_config, elapsed=self.now()
            )
            for record in records:
                self.emit(record)
                if (
                    record["type"] == "convergence_event"
                    and self.cfg.detector.stop_after_convergence is not None
                ):
                    self.state["stop_at"] = record["step"] + self.cfg.detector.stop_after_convergence
                    logger.info(
                        "sudden convergence at step %d; stopping at step %d",
                        record["step"],
                        self.state["stop_at"],
                    )
        if self.acc.num_processes > 1:  # every process knows the stop step, so each stops there alone
            from accelerate.utils import broadcast_object_list

            self.state["stop_at"] = broadcast_object_list([self.state["stop_at"]])[0]
        self.acc.wait_for_everyone()

    def _validation_grid(self, step: int) -> None:
        self._flush_log()
        self._check_finite()  # nothing from a non-finite step is logged or saved
        if self.main:
            from difftune_control.validation import sample_images

            n = self.cfg.train.num_validation_images
            base, net = self.trainer.base, self.acc.unwrap_model(self.trainer.controlnet)
            was_training = net.training
            net.eval()
            images = sample_images(
                unet=base.unet,
                vae=base.vae,
                scheduler_config=base.scheduler_config,
                prompt_embeds=self.val.prompt_embeds[:n],
                negative_prompt_embeds=self.val.negative_prompt_embeds,
                added_cond={k: v[:n] for k, v in self.val.added_cond.items()},
                negative_added_cond=self.val.negative_added_cond,
                seeds=self.val.seeds[:n],
                resolution=self.cfg.data.resolution,
                controlnet=net,
                hints=self.val.hints[:n],
                num_inference_steps=20,
                guidance_scale=7.5,
            )
            net.train(was_training)
            path = self.run_dir / "validation" / f"step{step:07d}.png"
            save_grid(path, [self.val.hints[:n], images.cpu()])
            self.emit({"type": "validation", "step": step, "path": str(path.relative_to(self.run_dir))})
        self.acc.wait_for_everyone()

    def _checkpoint(self, step: int) -> None:
        self._flush_log()
        self._check_finite()  # nothing from a non-finite step is logged or saved
        st = dict(self.state)
        st["elapsed"] = self.now()
        st["trainer"] = self.trainer.state_dict()
        st["lr_scheduler"] = self.lr_scheduler.state_dict()
        st["monitor"] = self.monitor.state_dict() if self.monitor is not None else None
        path = save_checkpoint(
            self.acc, self.run_dir, step, self.trainer.controlnet, st, self.cfg.train.checkpoints_total_limit
        )
        self.emit({"type": "checkpoint", "step": step, "path": path.name})

    def _finish(self, reason: str) -> None:
        self._flush_log()
        self._check_finite()  # nothing from a non-finite step is logged or saved
        if self.main:
            net = self.acc.unwrap_model(self.trainer.controlnet)
            with atomic_dir(self.run_dir / "controlnet") as tmp:
                net.save_pretrained(tmp, safe_serialization=True)
            self.emit({"type": "end", "step": self.state["global_step"], "reason": reason})
            self.log.close()
            if self.tb is not None:
                self.tb.close()
            logger.info(
                "finished (%s) at optimizer step %d: %s", reason, self.state["global_step"], self.run_dir
            )
        self.acc.wait_for_everyone()


def save_grid(path: Path, columns: list[torch.Tensor]) -> None:
    """Save a PNG grid: one row per sample, one column per tensor [N,3,H,W] in [0,1]."""
    from PIL import Image

    from difftune_control.utils import atomic_path

    cols = [c.detach().float().clamp(0, 1).cpu() for c in columns]
    rows = torch.cat([torch.cat(list(c_row), dim=2) for c_row in zip(*cols)], dim=1)  # [3, N*H, C*W]
    arr = (rows.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
