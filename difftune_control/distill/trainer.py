"""``DistillationTrainer``: Diff-Tuning whose bank slots distil (MAGD's NIGD / SGGD, continual adaptation).

Only the bank slots of a batch change; target slots, the plan (which slots, their timesteps
drawn from psi / xi, their weights) and the loss are Diff-Tuning's. For each bank slot, with the
plan's timestep t:

- re-noised (``renoise``, or ``snr`` where SNR(t) >= threshold): x_t = sqrt(a) z + sqrt(1-a) eps from
  the bank latent z; target = eps (or v), or the teacher's prediction at that x_t with
  ``--teacher_controlnet``;
- recorded (``trajectory``, or ``snr`` where SNR(t) < threshold): the bank image's recorded state
  whose timestep is nearest to t (among those the mode may use); the slot's timestep becomes the
  recorded one; x_t = the recorded latent; target = the recorded conditional prediction of the
  model that generated the bank (base, or base + teacher), converted to the trained prediction type.

The student in a bank slot is the base UNet + the ControlNet being trained, with the bank's
prompt embedding and hint, exactly as in Diff-Tuning. The teacher is frozen and never handed to
the optimizer. See :mod:`difftune_control.distill.trajectory` for why the SNR switch points this way.
"""

from __future__ import annotations

import dataclasses

import torch

from difftune_control.distill.trajectory import (
    convert_prediction,
    nearest_state,
    trajectory_slot_mask,
)
from difftune_control.methods.difftuning import DiffTuningTrainer
from difftune_control.methods.forgetting import BatchPlan
from difftune_control.methods.noising import add_noise, prediction_target
from difftune_control.methods.registry import register_retention
from difftune_control.validation import controlled_prediction


class DistillationTrainer(DiffTuningTrainer):
    """Diff-Tuning with generative-distillation retention (``--retention``, ``--teacher_controlnet``).

    Args:
        cfg, accelerator, base, controlnet, target, empty_prompt_embedding, bank: as
            :class:`~difftune_control.methods.base.ControlNetTrainer`; ``bank`` must hold recorded
            trajectory states for ``--retention trajectory|snr``.
        teacher (*optional*): an already loaded frozen teacher ControlNet; by default it is loaded
            from ``--teacher_controlnet`` onto the base's device and dtype.
    """

    def __init__(
        self, cfg, accelerator, base, controlnet, target, empty_prompt_embedding, bank=None, teacher=None
    ):
        super().__init__(cfg, accelerator, base, controlnet, target, empty_prompt_embedding, bank)
        m = cfg.method
        self.retention, self.snr_threshold = m.retention, m.snr_threshold
        self.base_prediction_type = base.noise_scheduler.config.prediction_type
        states = bank.extras.get("trajectory") if bank is not None else None  # TrajectoryStates or None
        self.states = states if m.retention != "renoise" else None
        if m.retention != "renoise":
            if self.states is None:
                raise ValueError(
                    f"--retention {m.retention} needs a memory bank with recorded trajectory states; the bank "
                    f"at {getattr(bank, 'bank_dir', None)} has none. Build it with this configuration "
                    "(`difftune bank ... --retention ...`) instead of pointing --bank_dir at a renoise bank"
                )
            recorded = self.states.timesteps
            self.eligible = trajectory_slot_mask(
                recorded, self.alphas_cumprod.cpu(), m.retention, m.snr_threshold
            )
            if not bool(self.eligible.any()):
                raise ValueError(
                    f"--snr_threshold {m.snr_threshold}: no recorded state of the bank (timesteps "
                    f"{recorded.tolist()}) lies below it; rebuild the bank with this threshold"
                )
        self.teacher = teacher
        if self.teacher is None and m.teacher_controlnet is not None:
            from difftune_control.distill.teacher import load_teacher_controlnet

            self.teacher = load_teacher_controlnet(
                m.teacher_controlnet, base.unet, self.device, base.unet.dtype
            )

    def plan(self, batch_size: int) -> BatchPlan:
        """Diff-Tuning's plan; ``--distill_weight`` replaces lambda (fixed) or scales bank slots (mixture)."""
        plan = super().plan(batch_size)
        w = self.cfg.method.distill_weight
        if w is None or plan.num_bank == 0:
            return plan
        weights = plan.weights.clone()
        weights[plan.is_bank] = w / (plan.num_bank if self.cfg.method.split == "fixed" else batch_size)
        return dataclasses.replace(plan, weights=weights, bank_weight=float(w))

    def assemble(self, target_batch: dict, plan: BatchPlan) -> dict[str, torch.Tensor]:
        """Diff-Tuning's batch, then each bank slot's x_t and target as the retention source says."""
        out = super().assemble(target_batch, plan)
        if plan.num_bank == 0:
            return out
        slots = out["bank_slots"]  # [nb], in the order of bank_index
        t = out["timesteps"][slots].clone()
        latents, noise = out["latents"][slots], out["noise"][slots]
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_in = add_noise(latents, noise, a)
        target = prediction_target(latents, noise, a, self.prediction_type)
        recorded = torch.zeros(len(slots), dtype=torch.bool)
        if self.states is not None:
            recorded = trajectory_slot_mask(
                t.cpu(), self.alphas_cumprod.cpu(), self.retention, self.snr_threshold
            )
        if recorded.any():
            rows = out["bank_index"][recorded]
            k = nearest_state(t.cpu()[recorded], self.states.timesteps, self.eligible)
            t_rec = self.states.timesteps[k].to(self.device)
            x_rec = self.states.latents[rows, k].to(self.device, torch.float32)
            pred = self.states.predictions[rows, k].to(self.device, torch.float32)
            sel = recorded.to(self.device)
            x_in[sel], t[sel] = x_rec, t_rec
            target[sel] = convert_prediction(
                pred, x_rec, self.alphas_cumprod[t_rec], self.base_prediction_type, self.prediction_type
            )
        if self.teacher is not None and not bool(recorded.all()):
            sel = (~recorded).to(self.device)
            target[sel] = self.teacher_prediction(
                x_in[sel],
                t[sel],
                out["encoder_hidden_states"][slots][sel],
                out["conditioning_pixel_values"][slots][sel],
                {k: out[k][slots][sel] for k in self.prompts.added_keys},
            )
        changed = recorded.to(self.device) | (self.teacher is not None)
        mask = torch.zeros(plan.is_bank.numel(), dtype=torch.bool, device=self.device)
        mask[slots[changed]] = True
        out["timesteps"] = out["timesteps"].clone()
        out["timesteps"][slots] = t
        out["retention_mask"] = mask
        out["retention_input"] = torch.zeros_like(out["latents"])
        out["retention_input"][slots] = x_in
        out["retention_target"] = torch.zeros_like(out["latents"])
        out["retention_target"][slots] = target.float()
        return out

    def noisy_input_and_target(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The base class's x_t and target, with the distilled bank slots' own (set by :meth:`assemble`)."""
        noisy, target = super().noisy_input_and_target(batch)
        if "retention_mask" not in batch:  # no bank slot in this batch
            return noisy, target
        mask = batch["retention_mask"].view(-1, 1, 1, 1)
        return torch.where(mask, batch["retention_input"], noisy), torch.where(
            mask, batch["retention_target"], target
        )

    def teacher_prediction(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        hints: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The frozen teacher's (base UNet + teacher ControlNet) prediction in the trained prediction type."""
        # no autocast: the frozen models run in their own dtype, as when the bank recorded its targets
        with torch.no_grad():
            pred = controlled_prediction(
                self.base.unet, x_t, t, encoder_hidden_states, self.teacher, hints, added_cond=added_cond
            )
        return convert_prediction(
            pred.float(), x_t, self.alphas_cumprod[t], self.base_prediction_type, self.prediction_type
        )


for _source in ("trajectory", "snr", "teacher"):
    register_retention(_source, DistillationTrainer)
