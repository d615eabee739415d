"""ControlNet training: ``ControlNetTrainer`` (vanilla) and ``DiffTuningTrainer``.

setup (``train()``: config -> models, data, bank, detector) -> ``fit`` (the loop: checkpoints,
logging, detector, signals) -> ``training_step`` (one micro-batch: plan, assemble, backward)
-> ``compute_loss`` (per-sample denoising loss; the one override point for the objective).

Diff-Tuning changes only the batch plan (which slots come from the memory bank, their
timesteps and loss weights; see :mod:`difftune_control.forgetting`). Vanilla training is
the plan with no bank slots and uniform timesteps, so both run the same code.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Any

import torch
import torch.nn.functional as F

from difftune_control.conditioning import added_kwargs, move_added
from difftune_control.config import RunConfig
from difftune_control.forgetting import BatchPlan, loss_weights, plan_batch, reweight, vanilla_plan
from difftune_control.utils import to_device

logger = logging.getLogger(__name__)

BATCH_KEYS = ("latents", "encoder_hidden_states", "conditioning_pixel_values")


class ControlNetTrainer:
    """Trains a ControlNet against a frozen base model (the ControlNet baseline).

    Args:
        cfg: the resolved run configuration.
        accelerator: an ``accelerate.Accelerator``.
        base: the frozen base model (:class:`difftune_control.runtime.BaseModel`).
        controlnet: the trainable ControlNet (fp32 master weights).
        target: the target dataset (cached: latents + text embeddings; or raw images + captions).
        empty_prompt_embedding: [1,L,D] embedding of "" for caption dropout.
        bank: the memory bank dataset (Diff-Tuning only).
    """

    def __init__(
        self, cfg: RunConfig, accelerator, base, controlnet, target, empty_prompt_embedding, bank=None
    ):
        self.cfg, self.accelerator, self.base = cfg, accelerator, base
        self.controlnet, self.target, self.bank = controlnet, target, bank
        self.device = accelerator.device
        self.empty = empty_prompt_embedding.to(self.device)  # moved once, not at every caption dropout
        self.num_train_timesteps = int(base.noise_scheduler.config.num_train_timesteps)
        self.prediction_type = cfg.model.prediction_type or base.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction type {self.prediction_type!r} is not supported; use epsilon or v_prediction"
            )
        # One CPU generator drives plans, noise, caption dropout and bank draws: saved in checkpoints.
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + accelerator.process_index)
        self.alphas_cumprod = base.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        # the target rows' text conditioning; SDXL adds text_embeds and time_ids (difftune_control.sdxl)
        crop = (cfg.data.crops_coords_top_left_h, cfg.data.crops_coords_top_left_w)
        self.prompts = base.prompt_encoder(cfg.data.resolution, crop)
        self.batch_keys = BATCH_KEYS + self.prompts.added_keys
        self.empty_added = self.prompts([""], self.device)[1] if self.prompts.added_keys else {}
        self._pending: list = []  # (non-finite flag, CUDA event or None, per-sample losses) per step
        self.auto_weight = False  # --bank_weight auto measures lambda (DiffTuningTrainer, fixed split)

    # -- the batch plan -----------------------------------------------------------------------
    def plan(self, batch_size: int) -> BatchPlan:
        """Which slots come from where, their timesteps and loss weights. Vanilla: uniform t, target only."""
        return self.weigh(vanilla_plan(batch_size, self.num_train_timesteps, self.generator))

    def weigh(self, plan: BatchPlan) -> BatchPlan:
        """Apply ``--loss_weighting`` (x0-supervision's inverse SNR, Min-SNR-gamma) to the target slots."""
        m = self.cfg.method
        if m.loss_weighting in (None, "none"):
            return plan
        w = loss_weights(
            m.loss_weighting,
            self.alphas_cumprod.cpu()[plan.timesteps],
            self.prediction_type,
            snr_gamma=m.snr_gamma,
            max_weight=m.loss_weight_max,
        )
        return reweight(plan, w)

    # -- one micro-batch ----------------------------------------------------------------------
    def assemble(self, target_batch: dict, plan: BatchPlan) -> dict[str, torch.Tensor]:
        """Place target rows at the plan's target slots and bank rows at its bank slots; draw noise."""
        n = plan.is_bank.numel()
        n_target = n - plan.num_bank
        tb = self._encode_target(
            {k: v[:n_target] if hasattr(v, "__getitem__") else v for k, v in target_batch.items()}
        )
        out = {
            k: torch.empty((n, *tb[k].shape[1:]), dtype=tb[k].dtype, device=self.device)
            for k in self.batch_keys
        }
        # slot indices on the device, computed once per batch (the loss parts and subclasses reuse them)
        out["target_slots"] = self._slots(~plan.is_bank)
        for k in self.batch_keys:
            out[k].index_copy_(0, out["target_slots"], tb[k])
        if plan.num_bank:
            idx = torch.randint(len(self.bank), (plan.num_bank,), generator=self.generator)
            sample = self.cfg.method.bank_latents == "sample"  # a posterior draw, as target rows get
            rows = self.bank.batch(idx, self.device, posterior_generator=self.generator if sample else None)
            if self.cfg.method.bank_prompt == "drop":  # the null text condition, as for caption dropout
                rows["encoder_hidden_states"] = self.empty.expand(plan.num_bank, -1, -1)
            out["bank_slots"] = self._slots(plan.is_bank)
            for k in self.batch_keys:
                out[k].index_copy_(0, out["bank_slots"], rows[k].to(out[k].dtype))
            out["bank_index"] = idx  # bank rows of the bank slots, in slot order
        out["timesteps"] = to_device(plan.timesteps, self.device)
        out["noise"] = to_device(torch.randn(out["latents"].shape, generator=self.generator), self.device)
        return out

    def _slots(self, mask: torch.Tensor) -> torch.Tensor:
        """Indices of a CPU row mask, on the device: rows are picked without a device synchronisation."""
        return to_device(mask.nonzero().flatten(), self.device)

    def _encode_target(self, batch: dict) -> dict[str, torch.Tensor]:
        """Latents, text embeddings (with caption dropout) and hints of the target rows."""
        n = len(batch["caption"])
        drop = torch.rand(n, generator=self.generator) < self.cfg.data.proportion_empty_prompts
        if "latents" in batch:
            ehs = to_device(batch["encoder_hidden_states"], self.device)
            added = {k: to_device(batch[k], self.device) for k in self.prompts.added_keys}
            if drop.any():
                ehs = ehs.clone()
                ehs[self._slots(drop)] = self.empty.to(ehs.dtype)
                for k, v in added.items():  # the empty prompt's pooled embedding too (SDXL)
                    added[k] = v.clone()
                    added[k][self._slots(drop)] = self.empty_added[k].to(v.dtype)
            latents = to_device(batch["latents"], self.device)
        else:
            from difftune_control.validation import encode_images

            captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
            ehs, added = self.prompts(captions, self.device)
            images = (to_device(batch["pixel_values"], self.device) + 1) / 2
            latents = encode_images(self.base.vae, images)
        return {
            "latents": latents.float(),
            "encoder_hidden_states": ehs.float(),
            **{k: v.float() for k, v in added.items()},
            "conditioning_pixel_values": to_device(batch["conditioning_pixel_values"], self.device).float(),
        }

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample denoising loss [B] (epsilon or v target), the one override point of the objective."""
        latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        if "retention_mask" in batch:  # distilling bank slots: given x_t (see distill_trainer.py)
            noisy = torch.where(batch["retention_mask"].view(-1, 1, 1, 1), batch["retention_input"], noisy)
        dtype = self.base.unet.dtype
        ehs = batch["encoder_hidden_states"].to(dtype)
        added = {k: batch[k] for k in self.prompts.added_keys}  # SDXL: text_embeds, time_ids
        hint = batch["conditioning_pixel_values"]
        if self.cfg.train.channels_last:
            noisy, hint = (x.contiguous(memory_format=torch.channels_last) for x in (noisy, hint))
        down, mid = self.controlnet(
            noisy,
            t,
            encoder_hidden_states=ehs,
            controlnet_cond=hint,
            added_cond_kwargs=added_kwargs(added),
            return_dict=False,
        )
        # The frozen UNet runs in its own precision outside autocast, as diffusers runs it: on CUDA,
        # autocast would lift its GroupNorms and LayerNorms to fp32 (twice the activation traffic).
        with torch.autocast(noisy.device.type, enabled=False):
            pred = self.base.unet(
                noisy.to(dtype),
                t,
                encoder_hidden_states=ehs,
                down_block_additional_residuals=[d.to(dtype) for d in down],
                mid_block_additional_residual=mid.to(dtype),
                added_cond_kwargs=added_kwargs(move_added(added, dtype=dtype)),
                return_dict=False,
            )[0]
        target = noise if self.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        if "retention_mask" in batch:  # ... and the teacher's prediction as their target
            target = torch.where(batch["retention_mask"].view(-1, 1, 1, 1), batch["retention_target"], target)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def training_step(self, target_batch: dict, plan: BatchPlan | None = None) -> dict[str, Any]:
        """Forward + backward of one micro-batch; returns the loss parts for logging."""
        self.check_finite()  # the previous step's loss: finished on the GPU by now, so no wait
        self.before_step(target_batch)
        plan = plan or self.plan(len(target_batch["caption"]))
        batch = self.assemble(target_batch, plan)
        with self.accelerator.autocast():
            per_sample = self.compute_loss(batch)
        weights = to_device(plan.weights, self.device)
        loss = (weights * per_sample).sum()
        self._watch_finite(loss, per_sample)
        self.accelerator.backward(loss)
        ps = per_sample.detach()
        return {
            "loss": loss.detach(),
            "loss_target": ps[batch["target_slots"]].mean() if plan.num_bank < len(ps) else None,
            "loss_bank": ps[batch["bank_slots"]].mean() if plan.num_bank else None,
            "bank_share": plan.num_bank / plan.is_bank.numel(),
            "bank_weight": plan.bank_weight if plan.num_bank else None,
            "images": plan.is_bank.numel(),
        }

    def before_step(self, target_batch: dict) -> None:
        """Hook at the start of each micro-batch (before its plan is drawn); nothing for vanilla."""

    # -- non-finite loss ---------------------------------------------------------------------
    def _watch_finite(self, loss: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Note whether ``loss`` is finite without waiting for the GPU (checked by :meth:`check_finite`).

        On CUDA the flag is copied to pinned memory behind an event, so the CPU can queue the next
        step while this one runs; elsewhere it is checked at once.
        """
        bad = ~torch.isfinite(loss.detach())
        ps = per_sample.detach()
        if loss.device.type != "cuda":
            self._pending.append((bad, None, ps))
            return self.check_finite()
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(bad, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((flag, event, ps))

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` if a loss since the last check was NaN or infinite.

        Called before each step and by the loop before anything is logged, evaluated or saved: a
        bad step's update never reaches a checkpoint.
        """
        while self._pending:
            flag, event, ps = self._pending.pop(0)
            if event is not None:
                event.synchronize()
            if bool(flag):
                self._pending.clear()
                raise FloatingPointError(
                    f"loss is not finite (per-sample: {ps.cpu().tolist()[:8]}...). Lower --learning_rate, try "
                    "--mixed_precision no or bf16 instead of fp16, and check the data for broken images; "
                    "the last checkpoint is intact: resume with --resume_from_checkpoint latest"
                )

    # -- resumable state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


FALLBACK_BANK_WEIGHT = 0.1
"""lambda of ``--bank_weight auto`` while the bank rows pull nothing (the published value)."""


class DiffTuningTrainer(ControlNetTrainer):
    """Diff-Tuning: the chain of forgetting changes batch composition and t-sampling only.

    With ``--bank_weight auto`` the bank weight lambda is measured, not given: lambda makes the
    weighted bank rows' gradient on the ControlNet ``--bank_pull`` times the target rows' (see
    :func:`calibrate_bank_weight`), at the first step and every ``--bank_pull_every`` steps.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        m = self.cfg.method
        if m.split != "psi-only" and self.bank is None:
            raise ValueError(f"--split {m.split} needs a memory bank; none was built")
        self.bank_lambda: float | None = None  # --bank_weight auto: the measured lambda
        self.auto_weight = m.bank_weight == "auto" and m.split == "fixed"  # only the fixed split has a lambda
        self.micro_batches = 0  # micro-batches trained (re-measurement schedule of --bank_weight auto)

    def plan(self, batch_size: int) -> BatchPlan:
        m = self.cfg.method
        return self.weigh(
            plan_batch(
                batch_size,
                m.split,
                power=m.psi_power,
                bank_share=m.bank_share,
                bank_weight=m.bank_weight if m.bank_weight != "auto" else (self.bank_lambda or 1.0),
                num_train_timesteps=self.num_train_timesteps,
                generator=self.generator,
            )
        )

    def before_step(self, target_batch: dict) -> None:
        m, accum = self.cfg.method, self.cfg.train.gradient_accumulation_steps
        micro, self.micro_batches = self.micro_batches, self.micro_batches + 1
        if not self.auto_weight or micro % accum:  # only where no gradient is being accumulated
            return
        step = micro // accum
        if self.bank_lambda is None or (m.bank_pull_every and step % m.bank_pull_every == 0 and step > 0):
            self.calibrate_bank_weight(target_batch)

    def calibrate_bank_weight(self, target_batch: dict) -> dict:
        """Measure both parts' pull at lambda = 1 on ``target_batch`` and set lambda (mean over processes).

        Leaves the random generator, the gradients and the schedule of the run untouched.
        """
        from difftune_control.diagnostics import bank_pull
        from difftune_control.forgetting import weight_for_pull

        previous, self.bank_lambda = self.bank_lambda, 1.0
        try:
            check = bank_pull(self, target_batch)
        finally:
            self.bank_lambda = previous
        if not (check["bank_grad"] > 0 and check["target_grad"] > 0):
            # e.g. distillation targets the base already meets (a fresh ControlNet): nothing to balance yet
            lam = previous if previous is not None else FALLBACK_BANK_WEIGHT
            logger.info("--bank_weight auto: no pull to balance (%s); lambda stays %.4g", check, lam)
            self.bank_lambda = lam
            return {**check, "bank_weight": lam}
        lam = weight_for_pull(check["bank_grad"], check["target_grad"], self.cfg.method.bank_pull)
        if self.accelerator.num_processes > 1:
            lam = float(self.accelerator.reduce(torch.tensor(lam, device=self.device), reduction="mean"))
        self.bank_lambda = lam
        logger.info(
            "--bank_weight auto: lambda = %.4g (bank rows at lambda 1 pull %.3gx the target rows; aiming at %.2fx)",
            lam,
            check["ratio"],
            self.cfg.method.bank_pull,
        )
        return {**check, "bank_weight": lam}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bank_lambda": self.bank_lambda, "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "bank_lambda" in state and self.cfg.method.bank_weight == "auto":
            self.bank_lambda = state["bank_lambda"]
        self.micro_batches = int(state.get("micro_batches", 0))


_METHODS: dict[str, type[ControlNetTrainer]] = {}


def register_method(name: str, cls: type[ControlNetTrainer]) -> None:
    """Register a training method (``--method NAME``): a :class:`ControlNetTrainer` subclass."""
    if name != name.lower() or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"method name must be lowercase letters, digits, '-' or '_': {name!r}")
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered ({_METHODS[name].__name__})")
    if not (isinstance(cls, type) and issubclass(cls, ControlNetTrainer)):
        raise TypeError(f"method {name!r}: {cls!r} is not a ControlNetTrainer subclass")
    _METHODS[name] = cls


def available_methods() -> list[str]:
    return sorted(_METHODS)


register_method("vanilla", ControlNetTrainer)
register_method("difftuning", DiffTuningTrainer)


_RETENTION_SOURCES: dict[str, type[ControlNetTrainer]] = {}


def register_retention(name: str, cls: type[ControlNetTrainer]) -> None:
    """Register a retention source: the trainer whose bank slots distil instead of re-noising.

    ``name`` is a ``--retention`` value, or ``"teacher"`` for re-noised slots with a teacher ControlNet's
    targets (``--teacher_controlnet``). Re-noising (``renoise``) is Diff-Tuning's own and not registered.
    """
    if name in _RETENTION_SOURCES:
        raise ValueError(
            f"retention source {name!r} is already registered ({_RETENTION_SOURCES[name].__name__})"
        )
    if not (isinstance(cls, type) and issubclass(cls, DiffTuningTrainer)):
        raise TypeError(f"retention source {name!r}: {cls!r} is not a DiffTuningTrainer subclass")
    _RETENTION_SOURCES[name] = cls


def retention_source(cfg: RunConfig) -> str | None:
    """The retention source a configuration uses, or None when bank slots are re-noised (no distillation)."""
    if cfg.method.retention != "renoise":
        return cfg.method.retention
    return "teacher" if cfg.method.teacher_controlnet is not None else None


def trainer_class(cfg: RunConfig) -> type[ControlNetTrainer]:
    """The trainer of a configuration: its retention source's when bank slots distil, else its method's.

    Retention sources register on import of their module (:mod:`difftune_control.distill_trainer`).
    """
    source = retention_source(cfg)
    if source is not None:
        if source not in _RETENTION_SOURCES:
            raise ValueError(
                f"retention source {source!r} is not registered; registered: {sorted(_RETENTION_SOURCES)}"
            )
        return _RETENTION_SOURCES[source]
    if cfg.method.method not in _METHODS:
        raise ValueError(f"--method: got {cfg.method.method!r}; choose one of {available_methods()}")
    return _METHODS[cfg.method.method]


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so it can save a checkpoint before exiting."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received signal %d: saving a checkpoint after this step, then stopping", signum)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def lr_lambda(name: str, warmup: int, total: int):
    def f(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if name == "constant_with_warmup":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return (
            max(0.0, 1.0 - progress)
            if name == "linear"
            else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        )

    return f
