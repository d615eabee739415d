"""Generative distillation as a retention source (MAGD's NIGD and SGGD) and its recorded states.

Implements the two retention sources of Jiang et al., "Fast Multi-Mode Adaptive Generative
Distillation for Continually Learning Diffusion Models" (MAGD) on top of Diff-Tuning's memory bank
(Zhong et al., NeurIPS 2024). A bank slot of a Diff-Tuning batch can be filled three ways
(``--retention``):

- ``renoise`` (Diff-Tuning as published): the bank image's latent re-noised at the slot's t;
  target = the true noise (or v).
- ``trajectory`` (NIGD): a state x_t the sampler actually passed through while generating the bank
  image; target = the teacher's own prediction at that state. The states are recorded during bank
  generation (:class:`TrajectoryRecorder`), so they cost no extra sampling.
- ``snr`` (SGGD): ``trajectory`` where SNR(t) = alpha_bar / (1 - alpha_bar) is below
  ``--snr_threshold``, ``renoise`` elsewhere.

Why that direction, and why the default threshold is 1. The chain of forgetting says the
pre-trained denoiser is a universal denoiser at low noise (high SNR) and holds the model's layout
and domain knowledge at high noise (low SNR). At high SNR the posterior of the clean latent given
x_t is concentrated, so the true noise of a re-noised bank image is practically the teacher's
answer, the input follows the forward process exactly at any t, and the latent is on the VAE's
manifold; a recorded state there is the sampler's nearly finished *raw* latent, which DESIGN.md
measured as off-manifold (2.4x the base's low-noise error). At low SNR the posterior is broad: a
single re-noised image gives a high-variance target (one noise draw among the many clean images
compatible with x_t), whereas the teacher's prediction is its conditional expectation, i.e. the
knowledge retention is meant to keep, and the state's small off-manifold error is drowned in
noise. SNR = 1 is where signal and noise carry equal power (t ~ 354 of 1000 for SD's
scaled-linear schedule): the point past which x_t is mostly noise. With Diff-Tuning's bank
timesteps (xi(t) proportional to T - t) that sends about 42% of the bank slots to recorded states.

What the toy world measured (BENCHMARKS.md sections 2-3): the premise about high SNR does not hold
for a weak base. Its own samples are smoother than the data it learned from, and it errs on them
in one coherent direction at every t, so a re-noised slot with the true noise as target pulls a
fresh ControlNet 2-12x harder than a target sample does (``scripts/diagnose_bank.py``). There
``trajectory`` (the teacher's prediction as target everywhere: zero pull at step 0) converged
sooner than vanilla while ``snr`` and ``renoise`` did not converge. The threshold stays 1 as
above; on such a base choose ``trajectory``.

Targets are the teacher's *conditional, unguided* prediction. The bank is sampled with CFG, so the
``model_output`` a sampler step sees is the guided mix ``u + w (c - u)``; the student in a bank
slot is the base UNet + ControlNet run once with the prompt (as in training), which is what the
conditional prediction ``c`` answers, so ``c`` is recorded (re-computed at the recorded steps
only when CFG is on). The states lie on the CFG-guided trajectory, i.e. where the model actually
goes at inference.

Everything here is pure or a small stateful helper; the trainer side is
:mod:`difftune_control.distill.trainer`, the teacher's side :mod:`difftune_control.distill.teacher`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from difftune_control.methods.forgetting import snr
from difftune_control.validation import controlled_prediction

Retention = Literal["renoise", "trajectory", "snr"]
PredictionType = Literal["epsilon", "v_prediction"]
TRAJECTORY_DTYPE = torch.float16


# -- pure functions ------------------------------------------------------------------------------
def trajectory_slot_mask(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, retention: Retention, snr_threshold: float = 1.0
) -> torch.Tensor:
    """Which bank slots take a recorded trajectory state instead of a re-noised bank image.

    Args:
        timesteps (`torch.Tensor`): long [n], the bank slots' timesteps.
        alphas_cumprod (`torch.Tensor`): [T], the training noise schedule.
        retention (`str`): ``renoise`` (none), ``trajectory`` (all) or ``snr`` (SGGD).
        snr_threshold (`float`): for ``snr``: slots with SNR(t) strictly below it take a state.

    Returns:
        `torch.Tensor`: bool [n].
    """
    if retention == "renoise":
        return torch.zeros(timesteps.shape, dtype=torch.bool, device=timesteps.device)
    if retention == "trajectory":
        return torch.ones(timesteps.shape, dtype=torch.bool, device=timesteps.device)
    if retention == "snr":
        return snr(alphas_cumprod.to(timesteps.device))[timesteps] < snr_threshold
    raise ValueError(f"--retention: got {retention!r}; choose one of ['renoise', 'trajectory', 'snr']")


def trajectory_step_indices(
    sampler_timesteps: Sequence[int],
    num_states: int,
    alphas_cumprod: torch.Tensor | None = None,
    max_snr: float | None = None,
) -> list[int]:
    """Sampler steps whose states are recorded: ``num_states`` spread evenly over the eligible steps.

    Eligible steps are all of them, or (``max_snr``) those with SNR(t) < max_snr, the only ones the
    ``snr`` retention uses. The first and last eligible steps are always included (one state: the
    middle one), so the recorded timesteps span the range the states serve.

    Args:
        sampler_timesteps (`Sequence[int]`): the sampler's timesteps, in sampling order.
        num_states (`int`): N >= 1.
        alphas_cumprod (`torch.Tensor`, *optional*): [T]; needed with ``max_snr``.
        max_snr (`float`, *optional*): record only steps below this SNR.

    Returns:
        `list[int]`: N increasing step indices into ``sampler_timesteps``.
    """
    steps = list(range(len(sampler_timesteps)))
    if max_snr is not None:
        if alphas_cumprod is None:
            raise ValueError("max_snr needs alphas_cumprod")
        ratio = snr(alphas_cumprod)
        steps = [i for i in steps if ratio[int(sampler_timesteps[i])] < max_snr]
    if not 1 <= num_states <= len(steps):
        where = f" with SNR(t) < --snr_threshold {max_snr}" if max_snr is not None else ""
        raise ValueError(
            f"--trajectory_states {num_states}: the bank sampler has {len(steps)} steps{where}; choose 1 to "
            f"{len(steps)}, or raise --bank_num_inference_steps" + (" or --snr_threshold" if max_snr else "")
        )
    if num_states == 1:
        return [steps[(len(steps) - 1) // 2]]
    return [steps[round(k * (len(steps) - 1) / (num_states - 1))] for k in range(num_states)]


def nearest_state(timesteps: torch.Tensor, recorded: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """For each timestep, the eligible recorded state whose timestep is nearest (ties: the lower t).

    The plan's bank timestep (drawn from xi(t), the chain of forgetting) picks the state, so the
    states are used with the retention preference Diff-Tuning gives its bank.

    Args:
        timesteps (`torch.Tensor`): long [n].
        recorded (`torch.Tensor`): long [N], the recorded states' timesteps.
        eligible (`torch.Tensor`): bool [N]; at least one True.

    Returns:
        `torch.Tensor`: long [n], indices into ``recorded``.
    """
    if not bool(eligible.any()):
        raise ValueError("no eligible recorded state")
    dist = (timesteps.view(-1, 1) - recorded.view(1, -1)).abs().double()  # [n, N]
    dist = dist + (recorded.view(1, -1).double() / (2.0 * (int(recorded.max()) + 1)))  # ties -> lower t
    dist[:, ~eligible] = float("inf")
    return dist.argmin(dim=1)


def convert_prediction(
    pred: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor,
    source: PredictionType,
    target: PredictionType,
) -> torch.Tensor:
    """Convert a denoiser output between epsilon and v (Salimans & Ho 2022), given x_t and alpha_bar.

    With x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0:
    v = (eps - sqrt(1-a) x_t) / sqrt(a) and eps = sqrt(a) v + sqrt(1-a) x_t.

    Args:
        pred (`torch.Tensor`): [B,C,h,w] in ``source`` form.
        x_t (`torch.Tensor`): [B,C,h,w], the noisy input the prediction was made at.
        alpha_bar (`torch.Tensor`): [B] (or broadcastable [B,1,1,1]).
        source, target (`str`): ``epsilon`` or ``v_prediction``.
    """
    if source == target:
        return pred
    a = alpha_bar.reshape(-1, 1, 1, 1).to(pred.dtype)
    if source == "epsilon" and target == "v_prediction":
        return (pred - (1 - a).sqrt() * x_t) / a.sqrt()
    if source == "v_prediction" and target == "epsilon":
        return a.sqrt() * pred + (1 - a).sqrt() * x_t
    raise ValueError(f"prediction types: got {source!r} -> {target!r}; choose epsilon or v_prediction")


def trajectory_storage(
    num_states: int, latent_shape: Sequence[int], num_images: int, itemsize: int = 2
) -> dict:
    """Bytes the recorded states take: per image N x (x_t + prediction) x latent size x itemsize."""
    per_state = 2 * itemsize * int(torch.tensor(list(latent_shape)).prod())
    per_image = num_states * per_state
    return {
        "states_per_image": int(num_states),
        "bytes_per_image": per_image,
        "bytes_total": per_image * int(num_images),
    }


# -- recording ---------------------------------------------------------------------------------------
class TrajectoryRecorder:
    """``on_step`` callback of :func:`difftune_control.validation.sample_images`: records N states.

    At each recorded step it keeps the sampler's latent x_t (scaled latent space, before the step)
    and the model's *conditional* prediction there: the ``model_output`` itself without CFG, and one
    extra conditional forward with CFG (the guided output is not what the student learns). Storage
    is bounded: N states per sample, kept in float16 (float32 if a value overflows float16).

    Args:
        step_indices (`Sequence[int]`): sampler step indices to record (see :func:`trajectory_step_indices`).
        unet: the frozen base UNet the sampler runs.
        prompt_embeds (`torch.Tensor`): [n,L,D], the same tensor given to ``sample_images``.
        guidance_scale (`float`): the sampler's CFG scale.
        controlnet, hints, conditioning_scale: the ControlNet the sampler runs, if any, with its hints [n,3,R,R].
        added_cond: the prompts' added conditioning (SDXL), [n,...] per name, as given to ``sample_images``.
    """

    def __init__(
        self,
        step_indices: Sequence[int],
        unet,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        controlnet=None,
        hints: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        added_cond: dict[str, torch.Tensor] | None = None,
    ):
        self.slot = {int(i): k for k, i in enumerate(step_indices)}
        self.added_cond = added_cond or {}
        self.unet, self.prompt_embeds, self.guidance_scale = unet, prompt_embeds, guidance_scale
        self.controlnet, self.hints, self.conditioning_scale = controlnet, hints, conditioning_scale
        self.n, self.num_states = prompt_embeds.shape[0], len(self.slot)
        self.latents: torch.Tensor | None = None
        self.predictions: torch.Tensor | None = None
        self.timesteps = torch.full((self.num_states,), -1, dtype=torch.long)
        self.filled = torch.zeros(self.n, self.num_states, dtype=torch.bool)

    def __call__(
        self, i: int, t: torch.Tensor, latents_in: torch.Tensor, model_output: torch.Tensor, chunk: slice
    ) -> None:
        k = self.slot.get(int(i))
        if k is None:
            return
        x = latents_in.float()
        if self.guidance_scale > 1.0:
            ehs = self.prompt_embeds[chunk].to(x.device)
            hints = None if self.hints is None else self.hints[chunk]
            added = {k: v[chunk] for k, v in self.added_cond.items()}
            pred = controlled_prediction(
                self.unet, x, t, ehs, self.controlnet, hints, self.conditioning_scale, added
            ).float()
        else:
            pred = model_output.float()
        if self.latents is None:
            shape = (self.n, self.num_states, *x.shape[1:])
            self.latents, self.predictions = torch.zeros(shape), torch.zeros(shape)
        self.latents[chunk, k] = x.cpu()
        self.predictions[chunk, k] = pred.cpu()
        self.timesteps[k] = int(t)
        self.filled[chunk, k] = True

    def tensors(self) -> dict[str, torch.Tensor]:
        """``trajectory_latents`` / ``trajectory_predictions`` [n,N,C,h,w] and ``trajectory_timesteps`` [N]."""
        if self.latents is None or not bool(self.filled.all()):
            raise RuntimeError(
                f"trajectory recording incomplete: steps {sorted(self.slot)} were not all seen by the sampler"
            )
        return {
            "trajectory_latents": _compact(self.latents),
            "trajectory_predictions": _compact(self.predictions),
            "trajectory_timesteps": self.timesteps.clone(),
        }


def _compact(x: torch.Tensor) -> torch.Tensor:
    half = x.to(TRAJECTORY_DTYPE)
    return half if bool(torch.isfinite(half).all()) else x


@dataclass
class TrajectoryStates:
    """The recorded states of a whole bank, in memory (what :class:`~difftune_control.bank.BankDataset` exposes).

    Attributes:
        latents (`torch.Tensor`): [n,N,C,h,w] x_t of each bank image at each recorded step (float16).
        predictions (`torch.Tensor`): [n,N,C,h,w] the teacher's conditional prediction there.
        timesteps (`torch.Tensor`): long [N], the recorded timesteps (the same for every image).
        prediction_type (`str`): the form of ``predictions`` (the base scheduler's prediction type).
    """

    latents: torch.Tensor
    predictions: torch.Tensor
    timesteps: torch.Tensor
    prediction_type: PredictionType

    @property
    def num_states(self) -> int:
        return int(self.timesteps.numel())

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.latents, self.predictions))

    @classmethod
    def from_shards(cls, shards: list[dict[str, Any]], manifest: dict) -> TrajectoryStates | None:
        """Concatenate the shards' states; None when the bank recorded none."""
        if "trajectory_latents" not in shards[0]:
            return None
        steps = [s["trajectory_timesteps"] for s in shards]
        if any(not torch.equal(x, steps[0]) for x in steps):
            raise ValueError("memory bank shards recorded different trajectory timesteps; rebuild the bank")

        def cat(key: str) -> torch.Tensor:
            parts = [s[key] for s in shards]
            return torch.cat([p.float() for p in parts] if len({p.dtype for p in parts}) > 1 else parts)

        info = (manifest.get("distillation") or {}).get("trajectory") or {}
        return cls(
            latents=cat("trajectory_latents"),
            predictions=cat("trajectory_predictions"),
            timesteps=steps[0].long(),
            prediction_type=info.get("prediction_type", "epsilon"),
        )
