"""What generative distillation adds to memory-bank generation (a :class:`~difftune_control.bank.BankExtras`).

A :class:`BankDistillation` tells the bank builder to (a) record N reverse-trajectory states per
image (``--retention trajectory|snr``) and/or (b) sample with a teacher ControlNet on A's
(caption, hint) pairs (``--teacher_controlnet``). It contributes a ``distillation`` entry to the bank
manifest only when active, so banks built for ``--retention renoise`` keep their key.

Shard tensors it adds (see :class:`difftune_control.distill.trajectory.TrajectoryRecorder`)::

    trajectory_latents      f16 [n,N,C,h,w]   x_t at the recorded steps (scaled latent space)
    trajectory_predictions  f16 [n,N,C,h,w]   the teacher's conditional prediction at x_t
    trajectory_timesteps    i64 [N]           the recorded timesteps

On import, this module registers their reader with the bank (``BankDataset.extras["trajectory"]``, a
:class:`~difftune_control.distill.trajectory.TrajectoryStates`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from difftune_control.bank.interfaces import register_bank_extra
from difftune_control.distill.teacher import TeacherData
from difftune_control.distill.trajectory import (
    TrajectoryRecorder,
    TrajectoryStates,
    trajectory_step_indices,
    trajectory_storage,
)

logger = logging.getLogger(__name__)


@dataclass
class DistillBatch:
    """One generation batch's extras: sampler kwargs, the trajectory recorder, hints to store."""

    sampling: dict[str, Any] = field(default_factory=dict)
    recorder: TrajectoryRecorder | None = None
    hints: torch.Tensor | None = None  # uint8 [b,3,R,R] stored instead of extracted hints


@dataclass
class BankDistillation:
    """Distillation settings of a bank build.

    Args:
        trajectory_states (`int`): states recorded per image (0: none).
        max_snr (`float`, *optional*): record only steps with SNR(t) below it (``snr`` retention).
        teacher (`TeacherData`, *optional*): A's pairs; ``prompts`` are then the bank's prompt list.
        teacher_controlnet: the loaded, frozen teacher (on the base's device and dtype).
        conditioning_scale (`float`): the teacher's conditioning scale while sampling.
    """

    trajectory_states: int = 0
    max_snr: float | None = None
    teacher: TeacherData | None = None
    teacher_controlnet: Any = None
    conditioning_scale: float = 1.0

    def __post_init__(self) -> None:
        if (self.teacher is None) != (self.teacher_controlnet is None):
            raise ValueError("a teacher bank needs both the teacher's data and its ControlNet")

    @property
    def active(self) -> bool:
        return self.trajectory_states > 0 or self.teacher is not None

    def step_indices(self, scheduler_config: Any, sampler: str, num_inference_steps: int) -> list[int]:
        """The sampler steps recorded for this bank's sampler settings (empty without trajectory)."""
        if self.trajectory_states == 0:
            return []
        from difftune_control.validation import make_scheduler

        scheduler = make_scheduler(scheduler_config, sampler)
        scheduler.set_timesteps(num_inference_steps)
        return trajectory_step_indices(
            [int(t) for t in scheduler.timesteps],
            self.trajectory_states,
            alphas_cumprod=scheduler.alphas_cumprod,
            max_snr=self.max_snr,
        )

    def manifest_entry(self, scheduler_config: Any, sampler: str, num_inference_steps: int) -> dict:
        """The bank manifest's ``distillation`` entry (``{}`` when inactive: the key is unchanged)."""
        if not self.active:
            return {}
        entry: dict[str, Any] = {}
        if self.trajectory_states:
            from difftune_control.validation import make_scheduler

            steps = self.step_indices(scheduler_config, sampler, num_inference_steps)
            scheduler = make_scheduler(scheduler_config, sampler)
            scheduler.set_timesteps(num_inference_steps)
            entry["trajectory"] = {
                "states": self.trajectory_states,
                "step_indices": steps,
                "timesteps": [int(scheduler.timesteps[i]) for i in steps],
                "max_snr": self.max_snr,
                "target": "conditional",
                "prediction_type": dict(scheduler_config).get("prediction_type", "epsilon"),
                "dtype": "float16",
            }
        if self.teacher is not None:
            entry["teacher"] = dict(self.teacher.identity, conditioning_scale=self.conditioning_scale)
        return entry

    def batch(
        self,
        unet,
        prompt_embeds: torch.Tensor,
        prompt_indices: list[int],
        key: dict,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> DistillBatch:
        """Extras of one generation batch whose samples use prompts ``prompt_indices`` of the list.

        ``key`` is the bank's manifest (its ``distillation`` entry names the recorded steps);
        ``added_cond`` is the batch's added conditioning (SDXL), as given to the sampler.
        """
        steps = ((key.get("distillation") or {}).get("trajectory") or {}).get("step_indices", [])
        out = DistillBatch()
        if self.teacher is not None:
            hints_u8 = self.teacher.hints[prompt_indices]
            out.hints = hints_u8
            out.sampling = {
                "controlnet": self.teacher_controlnet,
                "hints": hints_u8.float().div(255.0).to(unet.device),
                "conditioning_scale": self.conditioning_scale,
            }
        if steps:
            out.recorder = TrajectoryRecorder(
                steps,
                unet,
                prompt_embeds,
                key["guidance_scale"],
                controlnet=out.sampling.get("controlnet"),
                hints=out.sampling.get("hints"),
                conditioning_scale=self.conditioning_scale,
                added_cond=added_cond,
            )
        return out

    def merge(self, batches: list[DistillBatch]) -> dict[str, torch.Tensor]:
        """The shard's trajectory tensors from its batches' recorders (``{}`` when none recorded)."""
        parts = [b.recorder.tensors() for b in batches if b.recorder is not None]
        if not parts:
            return {}
        out = {}
        for k in ("trajectory_latents", "trajectory_predictions"):
            xs = [p[k] for p in parts]
            out[k] = torch.cat([x.float() for x in xs] if len({x.dtype for x in xs}) > 1 else xs)
        out["trajectory_timesteps"] = parts[0]["trajectory_timesteps"]
        return out

    def contents(self, first_shard: dict[str, Any], num_samples: int) -> dict[str, Any]:
        """The manifest contents' ``trajectory`` entry: bytes the recorded states take (``{}`` without states)."""
        if "trajectory_latents" not in first_shard:
            return {}
        x = first_shard["trajectory_latents"]
        report = trajectory_storage(x.shape[1], x.shape[2:], num_samples, itemsize=x.element_size())
        logger.info("memory bank: recorded trajectory states take %s", report)
        return {"trajectory": report}


register_bank_extra("trajectory", "trajectory_", TrajectoryStates.from_shards)


def bank_distillation(cfg, base, device: torch.device | str) -> BankDistillation | None:
    """The :class:`BankDistillation` a run config asks for (None for plain ``renoise`` retention)."""
    if not cfg.distills:
        return None
    m = cfg.method
    n = cfg.bank.trajectory_states if m.retention != "renoise" else 0
    teacher = teacher_net = None
    if m.teacher_controlnet is not None:
        from difftune_control.distill.teacher import load_teacher_controlnet, load_teacher_data

        teacher = load_teacher_data(cfg, base.is_toy, device)
        teacher_net = load_teacher_controlnet(m.teacher_controlnet, base.unet, device, base.unet.dtype)
    return BankDistillation(
        trajectory_states=n,
        max_snr=m.snr_threshold if m.retention == "snr" else None,
        teacher=teacher,
        teacher_controlnet=teacher_net,
    )
