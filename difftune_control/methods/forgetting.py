"""The chain of forgetting: psi/xi schedules and batch splits (pure functions, no I/O).

Implements Zhong, Guo, Dong, Long, "Diffusion Tuning: Transferring Diffusion Models via
Chain of Forgetting" (NeurIPS 2024). A pre-trained denoiser transfers well at low noise and
badly at high noise, so fine-tuning *retains* pre-trained behaviour at small t (memory bank,
weight xi) and *reconsolidates* at large t (target data, weight psi), psi + xi = 1.

A training step is described by a :class:`BatchPlan`: for each of the B slots of a batch,
whether it holds a bank sample, its timestep, and its weight in the loss
``loss = sum_i weight_i * per_sample_loss_i``. Vanilla ControlNet training is the plan with
no bank slots, uniform timesteps and weights 1/B, so every method runs the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Split = Literal["fixed", "mixture", "psi-only"]


def psi(t: torch.Tensor, num_train_timesteps: int = 1000, power: float = 1.0) -> torch.Tensor:
    """Reconsolidation weight psi(t) = ((t+1)/T)^s, increasing in t (Diff-Tuning, Eq. 5)."""
    return ((t.double() + 1.0) / num_train_timesteps) ** power


def xi(t: torch.Tensor, num_train_timesteps: int = 1000, power: float = 1.0) -> torch.Tensor:
    """Retention weight xi(t) = 1 - psi(t), decreasing in t (Diff-Tuning, Eq. 5)."""
    return 1.0 - psi(t, num_train_timesteps, power)


def target_timestep_probs(num_train_timesteps: int = 1000, power: float = 1.0) -> torch.Tensor:
    """Categorical distribution of target-sample timesteps, proportional to (k+1)^s (released code)."""
    k = torch.arange(num_train_timesteps, dtype=torch.float64)
    w = (k + 1.0) ** power
    return w / w.sum()


def bank_timestep_probs(num_train_timesteps: int = 1000, power: float = 1.0) -> torch.Tensor:
    """Categorical distribution of bank-sample timesteps, proportional to (T-k)^s (released code)."""
    k = torch.arange(num_train_timesteps, dtype=torch.float64)
    w = (num_train_timesteps - k) ** power
    return w / w.sum()


@dataclass(frozen=True)
class BatchPlan:
    """Composition of one batch.

    Attributes:
        is_bank: bool [B], True where the slot holds a memory-bank sample.
        timesteps: long [B], the diffusion timestep of each slot.
        weights: float32 [B], loss weight of each slot (the batch loss is ``(weights * loss).sum()``).
        bank_weight: the weight lambda the bank mean carries (for logging).
    """

    is_bank: torch.Tensor
    timesteps: torch.Tensor
    weights: torch.Tensor
    bank_weight: float = 0.0

    @property
    def num_bank(self) -> int:
        return int(self.is_bank.sum())


def _sample(probs: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.multinomial(probs.float(), n, replacement=True, generator=generator)


def vanilla_plan(
    batch_size: int, num_train_timesteps: int = 1000, generator: torch.Generator | None = None
) -> BatchPlan:
    """ControlNet baseline: target data only, t ~ U{0..T-1}, loss = batch mean."""
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    return BatchPlan(
        is_bank=torch.zeros(batch_size, dtype=torch.bool),
        timesteps=t,
        weights=torch.full((batch_size,), 1.0 / batch_size),
    )


def fixed_plan(
    batch_size: int,
    bank_share: float = 0.2,
    bank_weight: float = 0.1,
    power: float = 1.0,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
) -> BatchPlan:
    """The released code's split: a fixed share r of bank slots (the last ones).

    Target t ~ Cat((k+1)^s), bank t ~ Cat((T-k)^s); loss = mean(target) + lambda * mean(bank).
    A batch of one has no room for both: its slot holds a bank row with probability r, weighted
    lambda (1-r) / r, else a target row weighted 1, so that the expected loss is (1-r) times the
    larger batches' (Adam does not see the factor) and the bank keeps its weight against the data.
    """
    if batch_size == 1 and 0 < bank_share < 1:
        is_bank = bool(torch.rand((), generator=generator, dtype=torch.float64) < bank_share)
        probs = (bank_timestep_probs if is_bank else target_timestep_probs)(num_train_timesteps, power)
        weight = bank_weight * (1.0 - bank_share) / bank_share if is_bank else 1.0
        return BatchPlan(
            is_bank=torch.tensor([is_bank]),
            timesteps=_sample(probs, 1, generator),
            weights=torch.tensor([weight], dtype=torch.float32),
            bank_weight=bank_weight,
        )
    n_bank = int(round(bank_share * batch_size))
    n_bank = min(max(n_bank, 1 if bank_share > 0 and batch_size > 1 else 0), batch_size - 1)
    n_target = batch_size - n_bank
    t_target = _sample(target_timestep_probs(num_train_timesteps, power), n_target, generator)
    t_bank = _sample(bank_timestep_probs(num_train_timesteps, power), n_bank, generator)
    weights = torch.cat(
        [torch.full((n_target,), 1.0 / n_target), torch.full((n_bank,), bank_weight / max(n_bank, 1))]
    )
    return BatchPlan(
        is_bank=torch.cat([torch.zeros(n_target, dtype=torch.bool), torch.ones(n_bank, dtype=torch.bool)]),
        timesteps=torch.cat([t_target, t_bank]),
        weights=weights,
        bank_weight=bank_weight,
    )


def mixture_plan(
    batch_size: int,
    power: float = 1.0,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
) -> BatchPlan:
    """The paper's formulation: t ~ U{0..T-1} per slot, then target w.p. psi(t), bank w.p. xi(t).

    Sampled equivalently and more cheaply: each slot's source first, P(bank) = mean_t xi(t),
    then t from the source's normalised weight (psi for target, xi for bank). The joint law of
    (t, source) is the same. Loss = batch mean of the per-sample losses, so the expected
    objective is sum_t psi(t) L_target(t) + xi(t) L_bank(t) with an overall uniform t.
    """
    k = torch.arange(num_train_timesteps)
    p = psi(k, num_train_timesteps, power)
    x = 1.0 - p
    p_bank = float(x.mean())
    is_bank = torch.rand(batch_size, generator=generator, dtype=torch.float64) < p_bank
    n_bank = int(is_bank.sum())
    t = torch.empty(batch_size, dtype=torch.long)
    t[~is_bank] = _sample(p / p.sum(), batch_size - n_bank, generator)
    t[is_bank] = _sample(x / x.sum(), n_bank, generator)
    return BatchPlan(
        is_bank=is_bank,
        timesteps=t,
        weights=torch.full((batch_size,), 1.0 / batch_size),
        bank_weight=1.0,
    )


def psi_only_plan(
    batch_size: int,
    power: float = 1.0,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
) -> BatchPlan:
    """Ablation: the t-skew without a bank. Target only, t ~ Cat((k+1)^s), loss = batch mean."""
    t = _sample(target_timestep_probs(num_train_timesteps, power), batch_size, generator)
    return BatchPlan(
        is_bank=torch.zeros(batch_size, dtype=torch.bool),
        timesteps=t,
        weights=torch.full((batch_size,), 1.0 / batch_size),
    )


def plan_batch(
    batch_size: int,
    split: Split,
    *,
    power: float = 1.0,
    bank_share: float = 0.2,
    bank_weight: float = 0.1,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
) -> BatchPlan:
    """Dispatch to the Diff-Tuning split named ``split`` (``fixed``, ``mixture`` or ``psi-only``)."""
    if split == "fixed":
        return fixed_plan(batch_size, bank_share, bank_weight, power, num_train_timesteps, generator)
    if split == "mixture":
        return mixture_plan(batch_size, power, num_train_timesteps, generator)
    if split == "psi-only":
        return psi_only_plan(batch_size, power, num_train_timesteps, generator)
    raise ValueError(f"--split: got {split!r}; choose one of ['fixed', 'mixture', 'psi-only']")


# -- loss weightings over t ---------------------------------------------------------------------
LossWeighting = Literal["none", "inverse_snr", "min_snr"]


def snr(alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of the timesteps' noise levels."""
    a = alphas_cumprod_t.double()
    return a / (1.0 - a)


def loss_weights(
    kind: LossWeighting,
    alphas_cumprod_t: torch.Tensor,
    prediction_type: str = "epsilon",
    *,
    snr_gamma: float = 5.0,
    max_weight: float | None = None,
) -> torch.Tensor:
    """Per-sample weight of the denoising loss at the given noise levels (float32, same shape).

    - ``none``: 1.
    - ``inverse_snr``: x0-supervision (Sangare et al., CVPR 2026, "Improving Controllable
      Generation: Faster Training and Better Performance via x0-Supervision"): the loss of the
      clean-latent estimate. For an epsilon model ||x0 - x0_hat||^2 = sigma_t^2 / alpha_t^2
      ||eps - eps_hat||^2 = ||eps - eps_hat||^2 / SNR(t); for a v model the factor is
      sigma_t^2 = 1 / (SNR(t) + 1).
    - ``min_snr``: Min-SNR-gamma (Hang et al., ICCV 2023): min(SNR, gamma) / SNR for epsilon,
      min(SNR, gamma) / (SNR + 1) for v.

    ``max_weight`` clamps the weight from above (the inverse SNR reaches ~200 at SD's last step).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction type {prediction_type!r}: use epsilon or v_prediction")
    s = snr(alphas_cumprod_t)
    denom = s if prediction_type == "epsilon" else s + 1.0
    if kind == "none":
        w = torch.ones_like(s)
    elif kind == "inverse_snr":
        w = 1.0 / denom
    elif kind == "min_snr":
        w = s.clamp(max=snr_gamma) / denom
    else:
        raise ValueError(f"--loss_weighting: got {kind!r}; choose one of ['none', 'inverse_snr', 'min_snr']")
    if max_weight is not None:
        w = w.clamp(max=max_weight)
    return w.float()


def reweight(plan: BatchPlan, slot_weights: torch.Tensor, *, bank: bool = False) -> BatchPlan:
    """The plan with its target slots' (and, with ``bank=True``, its bank slots') weights multiplied."""
    mask = torch.ones_like(plan.is_bank) if bank else ~plan.is_bank
    w = torch.where(mask, plan.weights * slot_weights.to(plan.weights.dtype), plan.weights)
    return BatchPlan(is_bank=plan.is_bank, timesteps=plan.timesteps, weights=w, bank_weight=plan.bank_weight)


def weight_for_pull(bank_pull_at_unit_weight: float, target_pull: float, fraction: float) -> float:
    """The bank weight lambda that makes the weighted bank rows pull ``fraction`` of the target rows' pull.

    The pull of a loss part is the norm of its gradient on the ControlNet's parameters
    (:mod:`difftune_control.training.diagnostics`); it is linear in the part's weight, so measuring it once
    at lambda = 1 gives lambda = fraction * target_pull / bank_pull(1).
    """
    if bank_pull_at_unit_weight <= 0 or not target_pull > 0:
        raise ValueError(
            f"cannot set the bank weight from pulls bank={bank_pull_at_unit_weight}, target={target_pull}"
        )
    return fraction * target_pull / bank_pull_at_unit_weight
