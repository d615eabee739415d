"""The chain-of-forgetting splits: exact formulas and the empirical joint law of (t, source)."""

import pytest
import torch

from difftune_control.methods.forgetting import (
    bank_timestep_probs,
    fixed_plan,
    mixture_plan,
    plan_batch,
    psi,
    psi_only_plan,
    target_timestep_probs,
    vanilla_plan,
    xi,
)

T = 1000


def test_psi_xi_values():
    t = torch.tensor([0, 499, 999])
    assert torch.allclose(psi(t), torch.tensor([1 / T, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(psi(t, power=2.0), torch.tensor([1e-6, 0.25, 1.0], dtype=torch.float64))
    assert torch.allclose(psi(t) + xi(t), torch.ones(3, dtype=torch.float64))
    k = torch.arange(T)
    assert (psi(k)[1:] > psi(k)[:-1]).all(), "psi must increase in t"


def test_timestep_probs_hand_computed():
    p = target_timestep_probs(4, 1.0)
    assert torch.allclose(p, torch.tensor([1, 2, 3, 4], dtype=torch.float64) / 10)
    q = bank_timestep_probs(4, 2.0)
    assert torch.allclose(q, torch.tensor([16, 9, 4, 1], dtype=torch.float64) / 30)


def test_fixed_plan_composition_and_weights():
    plan = fixed_plan(10, bank_share=0.2, bank_weight=0.1, generator=torch.Generator().manual_seed(0))
    assert plan.num_bank == 2 and plan.is_bank[-2:].all()
    losses = torch.arange(10, dtype=torch.float32)
    # mean(target) + lambda * mean(bank)
    expected = losses[:8].mean() + 0.1 * losses[8:].mean()
    assert torch.allclose((plan.weights * losses).sum(), expected)


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    return float(((counts - expected) ** 2 / expected.clamp_min(1e-9)).sum())


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 2.0])
def test_fixed_plan_timestep_laws(power):
    g = torch.Generator().manual_seed(1)
    bins = 10  # compare in 10 bins of 100 timesteps
    tt, tb = [], []
    for _ in range(400):
        p = fixed_plan(50, power=power, generator=g)
        tt.append(p.timesteps[~p.is_bank])
        tb.append(p.timesteps[p.is_bank])
    tt, tb = torch.cat(tt), torch.cat(tb)
    pt = target_timestep_probs(T, power).view(bins, -1).sum(1)
    pb = bank_timestep_probs(T, power).view(bins, -1).sum(1)
    ct = torch.bincount(tt // 100, minlength=bins).double()
    cb = torch.bincount(tb // 100, minlength=bins).double()
    # chi-square with 9 dof: 99.9% quantile is 27.9
    assert _chi2_ok(ct, pt) < 27.9
    assert _chi2_ok(cb, pb) < 27.9
    # and a wrong law is rejected: target timesteps are uniform only at s = 0
    uniform = _chi2_ok(ct, torch.full((bins,), 0.1, dtype=torch.float64))
    assert uniform < 27.9 if power == 0 else uniform > 100


def test_mixture_joint_law_matches_psi_xi():
    """P(t in bin, source) = (1/T) * sum_{t in bin} psi(t) (target) or xi(t) (bank)."""
    g = torch.Generator().manual_seed(2)
    plans = [mixture_plan(64, generator=g) for _ in range(400)]
    t = torch.cat([p.timesteps for p in plans])
    bank = torch.cat([p.is_bank for p in plans])
    k = torch.arange(T)
    bins = 10
    joint = torch.cat([psi(k).view(bins, -1).sum(1), xi(k).view(bins, -1).sum(1)]) / T
    counts = torch.cat(
        [torch.bincount(t[~bank] // 100, minlength=bins), torch.bincount(t[bank] // 100, minlength=bins)]
    ).double()
    assert _chi2_ok(counts, joint) < 45.3  # 19 dof, 99.9% quantile
    # overall t is uniform
    assert (
        _chi2_ok(
            torch.bincount(t // 100, minlength=bins).double(), torch.full((bins,), 0.1, dtype=torch.float64)
        )
        < 27.9
    )
    assert abs(bank.double().mean().item() - float(xi(k).mean())) < 0.01
    assert torch.allclose(plans[0].weights.sum(), torch.tensor(1.0))


def test_psi_only_and_vanilla():
    g = torch.Generator().manual_seed(3)
    p = psi_only_plan(20000, generator=g)
    assert p.num_bank == 0
    assert abs(p.timesteps.double().mean().item() - (2 * T + 1) / 3 + 1) < 10  # E[t] for t~(k+1): ~ 2T/3
    v = vanilla_plan(20000, generator=g)
    assert v.num_bank == 0 and abs(v.timesteps.double().mean().item() - (T - 1) / 2) < 10


def test_plan_batch_rejects_unknown_split():
    with pytest.raises(ValueError, match="choose one of"):
        plan_batch(4, "bogus")
