"""ControlNet training: ``ControlNetTrainer``, the vanilla method and the base of every other.

setup (``loop.run_training``: config -> models, data, bank, detector) -> ``fit`` (the loop: checkpoints,
logging, detector, signals) -> ``training_step`` (one micro-batch: plan, assemble, backward)
-> ``compute_loss`` (per-sample denoising loss; the one override point for the objective).

Diff-Tuning changes only the batch plan (which slots come from the memory bank, their
timesteps and loss weights; see :mod:`difftune_control.methods.forgetting` and
:mod:`difftune_control.methods.difftuning`). Vanilla training is
the plan with no bank slots and uniform timesteps, so both run the same code.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from difftune_control.config import RunConfig
from difftune_control.methods.forgetting import BatchPlan, loss_weights, reweight, vanilla_plan
from difftune_control.methods.noising import add_noise, prediction_target
from difftune_control.training.compilation import cuda_graphs, eager_if_compiling_fails
from difftune_control.training.finite import host_flag
from difftune_control.utils import hint_to_float, to_device
from difftune_control.validation import controlled_forward

logger = logging.getLogger(__name__)

BATCH_KEYS = ("latents", "encoder_hidden_states", "conditioning_pixel_values")


class ControlNetTrainer:
    """Trains a ControlNet against a frozen base model (the ControlNet baseline).

    Args:
        cfg: the resolved run configuration.
        accelerator: an ``accelerate.Accelerator``.
        base: the frozen base model (:class:`difftune_control.training.runtime.BaseModel`).
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
        # a CPU copy for the batch plan's loss weights: reading the device copy there would wait for the GPU
        self.alphas_cumprod_cpu = base.noise_scheduler.alphas_cumprod.to("cpu", torch.float32)
        self.alphas_cumprod = self.alphas_cumprod_cpu.to(self.device)
        # the target rows' text conditioning; SDXL adds text_embeds and time_ids (difftune_control.sdxl)
        crop = (cfg.data.crops_coords_top_left_h, cfg.data.crops_coords_top_left_w)
        self.prompts = base.prompt_encoder(cfg.data.resolution, crop)
        self.batch_keys = BATCH_KEYS + self.prompts.added_keys
        self.empty_added = self.prompts([""], self.device)[1] if self.prompts.added_keys else {}
        self._pending: list = []  # (non-finite flag, CUDA event or None, per-sample losses) per step
        self.auto_weight = False  # --bank_weight auto measures lambda (DiffTuningTrainer, fixed split)
        self.optimizer_in_backward = None  # --fused_backward_pass: set by training.setup
        # --bf16_weights: the ControlNet's bf16 forward copy (training.half_weights), set by training.setup
        self.half = None
        # CUDA graphs of compiled blocks (reduce-overhead, max-autotune): each step starts a new generation,
        # else a block's forward waits behind the previous step's uninvoked backward graphs (slow path)
        self.graphed = cuda_graphs(cfg.train)
        # compiled blocks whose first step has not run yet: that step falls back to eager if compiling fails
        self.untried_compile = any(
            m._compiled_call_impl is not None for m in accelerator.unwrap_model(controlnet).modules()
        )

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
            self.alphas_cumprod_cpu[plan.timesteps],
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
            "conditioning_pixel_values": hint_to_float(
                to_device(batch["conditioning_pixel_values"], self.device)
            ),
        }

    def noisy_input_and_target(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t [B,C,h,w] and the regression target [B,C,h,w] of every slot of an assembled batch.

        The forward process at ``batch["timesteps"]`` (:func:`~difftune_control.methods.noising.add_noise`)
        and the epsilon or v target of the run's prediction type. Override to give some slots another
        input or target (the distillation trainer does, for its bank slots); return values, not keys.
        """
        latents, noise = batch["latents"], batch["noise"]
        a = self.alphas_cumprod[batch["timesteps"]].view(-1, 1, 1, 1)
        return add_noise(latents, noise, a), prediction_target(latents, noise, a, self.prediction_type)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample denoising loss [B] (epsilon or v target), the one override point of the objective."""
        t = batch["timesteps"]
        noisy, target = self.noisy_input_and_target(batch)
        dtype = self.base.unet.dtype
        ehs = batch["encoder_hidden_states"].to(dtype)
        added = {k: batch[k] for k in self.prompts.added_keys}  # SDXL: text_embeds, time_ids
        hint = batch["conditioning_pixel_values"]
        if self.cfg.train.channels_last:
            noisy, hint = (x.contiguous(memory_format=torch.channels_last) for x in (noisy, hint))
        # the ControlNet under the step's autocast (fp32 master weights), the frozen UNet in its own dtype
        pred = controlled_forward(
            self.base.unet,
            noisy,
            t,
            ehs,
            self.controlnet if self.half is None else self.half,
            hint,
            added_cond=added,
            cast_controlnet_inputs=self.half is not None,  # bf16 weights take bf16 inputs, outside autocast
        )
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def training_step(self, target_batch: dict, plan: BatchPlan | None = None) -> dict[str, Any]:
        """Forward + backward of one micro-batch; returns the loss parts for logging. The first step with
        compiled blocks goes on eagerly where compiling fails (:func:`eager_if_compiling_fails`)."""
        if self.untried_compile:
            self.untried_compile = False
            return eager_if_compiling_fails(self, lambda: self.training_step(target_batch, plan))
        # the phases are labelled for torch.profiler (scripts/bench_step.py --profile); a few microseconds when it is off
        with record_function("difftune.plan"):
            self.check_finite()  # the previous step's loss: finished on the GPU by now, so no wait
            self.before_step(target_batch)
            plan = plan or self.plan(len(target_batch["caption"]))
        with record_function("difftune.assemble"):
            batch = self.assemble(target_batch, plan)
        if self.graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with record_function("difftune.forward"), self.accelerator.autocast():
            per_sample = self.compute_loss(batch)
        weights = to_device(plan.weights, self.device)
        loss = (weights * per_sample).sum()
        self._watch_finite(loss, per_sample)
        with record_function("difftune.backward"):
            self.accelerator.backward(loss)
            if self.half is not None:
                self.half.fold()
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
        flag, event = host_flag(~torch.isfinite(loss.detach()))
        self._pending.append((flag, event, per_sample.detach()))
        if event is None:
            self.check_finite()

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
