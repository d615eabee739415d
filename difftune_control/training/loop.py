"""The training run: the optimizer-step loop over a :class:`~difftune_control.training.setup.Run`, checkpoints,
logging, evaluation and stop rules."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from difftune_control import __version__
from difftune_control.config import RunConfig
from difftune_control.training.checkpoints import (
    TrainState,
    checkpoint_step,
    latest_run,
    list_checkpoints,
    resolve_resume,
    restore_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from difftune_control.training.diagnostics import bank_check_at_start
from difftune_control.training.distributed import StopVote, WindowMeans, ddp_settings
from difftune_control.training.finite import WeightWatch
from difftune_control.training.runtime import IndexStream, PeakMeter, StopSignal, StreamBatchSampler
from difftune_control.training.setup import build_run, make_accelerator, resolve_config
from difftune_control.utils import JsonlLogger, atomic_dir, command_seconds, derive_seed
from difftune_control.validation import sample_images, sampling_batch, sampling_mode, save_grid

logger = logging.getLogger(__name__)
# progress bar: the target rows' plain MSE (as diffusers shows; inverse-SNR takes `loss` to tens), speed, memory, p
BAR_KEYS = {"train": ("loss_target", "images_per_s", "gpu_peak_gib"), "convergence_eval": ("p",)}


def _run_dir(cfg: RunConfig, accelerator) -> Path:
    from accelerate.utils import broadcast_object_list

    rc = cfg.train.resume_from_checkpoint
    if rc not in (None, "latest"):
        return Path(rc).resolve().parent
    name = cfg.train.run_name
    if name is None:
        m = cfg.method
        tag = f"difftuning-{m.split}" if m.method == "difftuning" else m.method
        prefix = f"{Path(cfg.data.condition).stem}-{tag}-"
        found = latest_run(Path(cfg.train.output_dir), prefix) if rc == "latest" else None
        name = [found.name if found else f"{prefix}{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
        broadcast_object_list(name)
        name = name[0]
    return Path(cfg.train.output_dir) / name


def run_training(cfg: RunConfig) -> Path:
    """Set up everything from ``cfg`` (:func:`~difftune_control.training.setup.setup`) and train; returns the run folder."""
    cfg, toy, recipe = resolve_config(cfg)
    accelerator = make_accelerator(cfg)
    run_dir = _run_dir(cfg, accelerator)
    resume = resolve_resume(run_dir, cfg.train.resume_from_checkpoint)
    if resume is None and list_checkpoints(run_dir):
        raise ValueError(
            f"run folder {run_dir} already has checkpoints; continue it with --resume_from_checkpoint latest, "
            "or pick another --run_name"
        )
    resumed_step = checkpoint_step(resume)
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
    run = build_run(cfg, toy, recipe, accelerator, run_dir, resumed_step)
    trainer, monitor, lr_scheduler = run.trainer, run.monitor, run.lr_scheduler

    state = TrainState()
    if resume is not None:
        state = restore_checkpoint(accelerator, resume, trainer, lr_scheduler, monitor)
        if accelerator.is_main_process:
            truncate_metrics(run_dir / "metrics.jsonl", state.global_step)
        logger.info("resumed from %s at optimizer step %d", resume, state.global_step)
    elif accelerator.is_main_process and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()

    if accelerator.is_main_process:
        base = run.base
        extra = {
            "condition": _recipe_dict(run.recipe),
            "base_model": {"id": base.model_id, "is_toy": base.is_toy, "kind": base.kind},
            "bank_dir": str(run.bank_dir) if run.bank_dir else None,
            "version": __version__,
            "world_size": accelerator.num_processes,
            "ddp": ddp_settings(run.controlnet),  # what DDP was built with (None on one process)
        }
        cfg.save(run_dir / "config.json", extra)
        if extra["ddp"] is not None:
            logger.info(
                "DistributedDataParallel over %d processes: %s", accelerator.num_processes, extra["ddp"]
            )
    check = bank_check_at_start(cfg, trainer, run.target, accelerator) if resume is None else None
    loop = _Loop(
        cfg, accelerator, trainer, run.optimizer, lr_scheduler, monitor, run.validation, run_dir, state
    )
    if loop.log is not None:  # what this start spent before its first step (a resumed run adds one)
        loop.log.log({"type": "setup", "step": state.global_step, "seconds": run.setup_seconds})
    if check is not None and loop.log is not None:
        loop.log.log({"type": "bank_check", "step": 0, **check})
    loop.fit()
    return run_dir


def _recipe_dict(recipe: Any) -> dict:
    to_dict = getattr(recipe, "to_dict", None)
    return json.loads(json.dumps(to_dict() if to_dict else {"name": str(recipe)}, default=str))


class _Loop:
    """The optimizer-step loop of one run (see :func:`run_training`)."""

    def __init__(
        self, cfg, accelerator, trainer, optimizer, lr_scheduler, monitor, val, run_dir: Path, state
    ):
        self.cfg, self.acc, self.trainer = cfg, accelerator, trainer
        self.optimizer, self.lr_scheduler, self.monitor, self.val = optimizer, lr_scheduler, monitor, val
        self.run_dir, self.state = run_dir, state  # a TrainState, updated in place
        self.main = accelerator.is_main_process
        self.log = JsonlLogger(run_dir / "metrics.jsonl") if self.main else None
        self._pending_log: tuple[dict, WindowMeans] | None = None  # a train record read one step later
        # several processes agree on a signal at logging steps, without a wait at each step
        reduce = accelerator.reduce if accelerator.num_processes > 1 else None
        self.vote = StopVote(cfg.train.logging_steps, reduce, accelerator.device)
        self._postfix: dict[str, str] = {}
        self.weights = WeightWatch(trainer.controlnet.parameters, run_dir, cfg.train.learning_rate)
        self.peaks = PeakMeter(self.acc.device)
        self.tb = None
        if self.main and cfg.train.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "logs"))

    def now(self) -> float:
        return self.state.elapsed + time.time() - self._t0

    def emit(self, record: dict) -> None:
        if not self.main:
            return
        record.setdefault("time", round(self.now(), 3))
        self.log.log(record)
        bar = getattr(self, "bar", None)
        if bar is not None and record["type"] in BAR_KEYS:
            keys = BAR_KEYS[record["type"]]
            self._postfix.update({k: f"{record[k]:.3g}" for k in keys if record.get(k) is not None})
            bar.set_postfix(self._postfix, refresh=False)
        if self.tb is not None:
            for key, value in record.items():
                if (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and key not in ("step", "time")
                ):
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def fit(self) -> None:
        cfg, acc, st = self.cfg, self.acc, self.state
        t = cfg.train
        self._t0 = time.time()
        stream = IndexStream(
            len(self.trainer.target), t.train_batch_size, t.seed, acc.process_index, acc.num_processes
        )
        loader = torch.utils.data.DataLoader(
            self.trainer.target,
            batch_sampler=StreamBatchSampler(stream, st.consumed_batches),
            num_workers=cfg.data.dataloader_num_workers,
            collate_fn=torch.utils.data.default_collate,
            pin_memory=acc.device.type == "cuda",  # asynchronous copies (utils.to_device)
            generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched (exact resume)
        )
        batches = iter(loader)
        if self.monitor is not None and self.monitor.should_evaluate(st.global_step):
            self._evaluate()  # step 0: measures d0 and d_floor first
        reason = "max_steps"
        window: list[dict] = []
        t_log = time.time()
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=t.max_train_steps,
            initial=st.global_step,
            desc="training",
            unit="step",
            disable=not self.main,
        )
        with StopSignal() as stop:
            while st.global_step < t.max_train_steps:
                self._seed_step(st.consumed_batches)
                self.weights.check(keep=1)  # the update before last: finished on the GPU by now
                with acc.accumulate(self.trainer.controlnet):
                    parts = self.trainer.training_step(next(batches))
                    st.consumed_batches += 1
                    if acc.sync_gradients and t.max_grad_norm > 0 and not t.fused_backward_pass:
                        acc.clip_grad_norm_(self.trainer.controlnet.parameters(), t.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window.append(parts)
                if not acc.sync_gradients:
                    continue
                self.lr_scheduler.step()
                st.global_step += 1
                step = st.global_step
                self.weights.watch(step)
                self.bar.update(1)
                self._flush_log()  # the previous step's record: finished on the GPU by now
                if step % t.logging_steps == 0 or step == t.max_train_steps:
                    self._log_train(step, window, time.time() - t_log)
                    window, t_log = [], time.time()
                if self.monitor is not None and self.monitor.should_evaluate(step, step == t.max_train_steps):
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
        if self.vote(st.global_step, stop.received is not None):
            reason = "signal"
        elif st.stop_at is not None and st.global_step >= st.stop_at:
            reason = "stop_after_convergence"
        if reason and self.acc.num_processes > 1:
            logger.info(
                "process %d stops at optimizer step %d (%s)", self.acc.process_index, st.global_step, reason
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
            **self.peaks.run(),
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
            step, models = self.state.global_step, (base.unet, base.vae, net, base.scheduler_config)
            with self.peaks.phase() as peak:
                records = self.monitor.evaluate(step, *models, elapsed=self.now())
            for record in records:
                self.emit({**record, **peak} if record["type"] == "convergence_eval" else record)
                if (
                    record["type"] == "convergence_event"
                    and self.cfg.detector.stop_after_convergence is not None
                ):
                    self.state.stop_at = record["step"] + self.cfg.detector.stop_after_convergence
                    logger.info(
                        "sudden convergence at step %d; stopping at step %d",
                        record["step"],
                        self.state.stop_at,
                    )
        if self.acc.num_processes > 1:  # every process knows the stop step, so each stops there alone
            from accelerate.utils import broadcast_object_list

            self.state.stop_at = broadcast_object_list([self.state.stop_at])[0]
        self.acc.wait_for_everyone()

    def _validation_grid(self, step: int) -> None:
        self._flush_log()
        self._check_finite()  # nothing from a non-finite step is logged or saved
        if self.main:
            n = self.cfg.train.num_validation_images
            base, net = self.trainer.base, self.acc.unwrap_model(self.trainer.controlnet)
            was_training = net.training
            net.eval()
            with sampling_mode(base.unet), self.peaks.phase() as peak:
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
                    batch_size=sampling_batch(self.cfg.data.resolution),
                )
            net.train(was_training)
            path = self.run_dir / "validation" / f"step{step:07d}.png"
            save_grid(path, [self.val.hints[:n], images.cpu()])
            rel = str(path.relative_to(self.run_dir))
            self.emit({"type": "validation", "step": step, "path": rel, **peak})
        self.acc.wait_for_everyone()

    def _checkpoint(self, step: int) -> None:
        self._flush_log()
        self._check_finite()  # nothing from a non-finite step is logged or saved
        st = dataclasses.replace(
            self.state,
            elapsed=self.now(),
            trainer=self.trainer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(),
            monitor=self.monitor.state_dict() if self.monitor is not None else None,
        )
        with self.peaks.phase() as peak:
            limit = self.cfg.train.checkpoints_total_limit
            path = save_checkpoint(self.acc, self.run_dir, step, self.trainer.controlnet, st, limit)
        self.emit({"type": "checkpoint", "step": step, "path": path.name, **peak})

    def _finish(self, reason: str) -> None:
        self._flush_log()
        self._check_finite()  # nothing from a non-finite step is logged or saved
        step = self.state.global_step
        if self.main:
            net = self.acc.unwrap_model(self.trainer.controlnet)
            with atomic_dir(self.run_dir / "controlnet") as tmp:
                net.save_pretrained(tmp, safe_serialization=True)
            # process_seconds: a command's process, from its imports to the last save (None in-process)
            self.emit({"type": "end", "step": step, "reason": reason, "process_seconds": command_seconds()})
            self.log.close()
            if self.tb is not None:
                self.tb.close()
            logger.info("finished (%s) at optimizer step %d: %s", reason, step, self.run_dir)
        self.acc.wait_for_everyone()
