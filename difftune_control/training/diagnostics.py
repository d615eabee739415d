"""How hard each part of the loss pulls a fresh ControlNet: the memory-bank check at step 0.

A new ControlNet outputs zero (zero convolutions), so at step 0 the base model alone makes the
prediction and the gradient reaching the ControlNet says how strongly each part of the loss wants
it to change. Diff-Tuning's ``renoise`` retention asks it to predict the true noise of the base's
own re-noised samples. If the base denoises its samples no better than real data, or errs on them
in one coherent direction, the bank rows pull harder than the target rows and the ControlNet
spends itself correcting the base instead of learning the hint: on the toy world the weighted bank
part was 1.3x the target part and Diff-Tuning never converged on depth (BENCHMARKS.md section 2).

Used by ``run_training`` (one check before the first step of a run with a bank; warns when the
bank outweighs the data) and by ``scripts/diagnose_bank.py`` (per-timestep table).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from difftune_control.compiler import run_eagerly
from difftune_control.methods.forgetting import BatchPlan
from difftune_control.training.fused_step import GradientSketch

logger = logging.getLogger(__name__)


def gradient_pull(
    trainer, target_batch: dict | list[dict], plan: BatchPlan | list[BatchPlan], mask: torch.Tensor | list
) -> tuple[float, float]:
    """Norm of the ControlNet's gradient of ``sum(weights * mask * per_sample_loss)``, and the masked mean loss.

    Lists of batches, plans and masks are pooled: their gradients are summed before the norm is taken.
    Each pass has the step's shapes: the plan's rows, or, where the plan is larger than the batch (a batch
    of one measures on two-row plans), the masked rows alone. Compiled blocks run their eager code here
    (:func:`~difftune_control.compiler.run_eagerly`): replayed as CUDA graphs, a pass's saved activations were overwritten by the next
    graph run before its backward on the GPU, and a measurement every few hundred steps gains nothing from
    compiled kernels. A run that updates in backward (``--fused_backward_pass``) cannot hold every gradient: each
    one is folded into a :class:`~difftune_control.training.fused_step.GradientSketch` as it completes
    and freed. So the measurement needs no more memory than a step. Runs on the unwrapped ControlNet (no
    gradient synchronisation across processes) and leaves its gradients cleared and the trainer's
    random generator where it was.
    """
    batches, plans, masks = (x if isinstance(x, list) else [x] for x in (target_batch, plan, mask))
    acc = trainer.accelerator
    wrapped = trainer.controlnet
    net = acc.unwrap_model(wrapped)
    state = trainer.generator.get_state()
    trainer.controlnet = net
    fused = trainer.optimizer_in_backward  # --fused_backward_pass: gradients only, no update
    sketch = GradientSketch(list(net.parameters())) if fused is not None else None
    losses = []
    try:
        with run_eagerly():  # see above
            net.zero_grad(set_to_none=True)
            for batch, pl, mask_ in zip(batches, plans, masks, strict=True):
                mask_ = mask_.bool().cpu()
                sub = trainer.assemble(batch, pl)
                # every row passes, weighted by its mask, unless that would exceed the step's batch
                rows = slice(None)
                if pl.is_bank.numel() > len(batch["caption"]):
                    sub, rows = _rows(sub, mask_), mask_
                with acc.autocast():
                    per_sample = trainer.compute_loss(sub)
                weights = (pl.weights * mask_)[rows].to(per_sample.device, per_sample.dtype)
                with fused.diverted(sketch.fold) if fused is not None else contextlib.nullcontext():
                    (weights * per_sample).sum().backward()
                if trainer.half is not None:  # --bf16_weights: the copy's gradients onto the parameters
                    trainer.half.fold()
                losses.append(per_sample.detach()[mask_[rows].to(per_sample.device)].float())
            if sketch is not None:
                norm = sketch.norm()
            else:
                grads = [p.grad.double().pow(2).sum() for p in net.parameters() if p.grad is not None]
                norm = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
            picked = torch.cat(losses)
            loss = float(picked.mean()) if picked.numel() else float("nan")
    finally:
        net.zero_grad(set_to_none=True)
        trainer.controlnet = wrapped
        trainer.generator.set_state(state)
    return norm, loss


def _rows(batch: dict, rows: torch.Tensor) -> dict:
    """The assembled batch cut to ``rows`` (a CPU bool mask over its slots); slot indices are left out."""
    n, idx = rows.numel(), rows.nonzero().squeeze(1)
    out = {}
    for k, v in batch.items():
        if k in ("target_slots", "bank_slots", "bank_index"):
            continue
        out[k] = v[idx.to(v.device)] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v
    return out


def _two_source_plan(trainer, n: int) -> BatchPlan:
    """The run's next plan for ``n`` rows; a plan of one source (a batch of one, or a random split's draw)
    is replaced by the run's plans of two slots or more, redrawn until both are in one (the pulls are per
    unit of each part's weight, as in any plan)."""
    plan = trainer.plan(n)
    for _ in range(64):
        if 0 < plan.num_bank < plan.is_bank.numel():
            return plan
        plan = trainer.plan(max(n, 2))
    raise ValueError("bank_pull: this run's batch plan never holds both target and bank slots")


def bank_pull(trainer, target_batch: dict) -> dict:
    """The run's own batch plan on one target batch: the target rows' pull against the weighted bank rows'.

    Plans are pooled until they hold ``--bank_pull_rows`` bank rows (a batch of 4 has one): the next
    plans take target batches of the same size drawn from the target set. Pooled gradients measure the
    pull itself rather than the noise of a few rows, so lambda means the same at every batch size.
    """
    n = len(target_batch["caption"])
    state = trainer.generator.get_state()
    plans, batches = [_two_source_plan(trainer, n)], [target_batch]
    k = -(-int(trainer.cfg.method.bank_pull_rows) // plans[0].num_bank)
    if k > 1:
        rows = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=trainer.generator)))
        for _ in range(k - 1):
            idx = torch.randint(len(trainer.target), (n,), generator=rows).tolist()
            batches.append(torch.utils.data.default_collate([trainer.target[i] for i in idx]))
            plans.append(_two_source_plan(trainer, n))
    trainer.generator.set_state(state)
    target_grad, target_loss = gradient_pull(trainer, batches, plans, [(~p.is_bank).float() for p in plans])
    bank_grad, bank_loss = gradient_pull(trainer, batches, plans, [p.is_bank.float() for p in plans])
    return {
        "target_grad": target_grad,
        "bank_grad": bank_grad,
        "ratio": bank_grad / target_grad if target_grad > 0 else float("inf"),
        "target_loss": target_loss,
        "bank_loss": bank_loss,
        "bank_slots": sum(p.num_bank for p in plans),
        "plans": k,
        "bank_weight": plans[0].bank_weight,
        "batch": n,
    }


def per_timestep_pull(trainer, target_batch: dict, timesteps: list[int]) -> list[dict]:
    """For each t: the pull of a batch of target rows at t against a batch of bank rows at t (equal weights)."""
    n = len(target_batch["caption"])
    rows = []
    for t in timesteps:
        row: dict = {"t": int(t)}
        for source in ("target", "bank"):
            plan = BatchPlan(
                is_bank=torch.full((n,), source == "bank"),
                timesteps=torch.full((n,), int(t)),
                weights=torch.full((n,), 1.0 / n),
            )
            row[f"{source}_grad"], row[f"{source}_loss"] = gradient_pull(
                trainer, target_batch, plan, torch.ones(n)
            )
        row["ratio"] = row["bank_grad"] / row["target_grad"] if row["target_grad"] > 0 else float("inf")
        rows.append(row)
    return rows


def warn_if_bank_dominates(check: dict, retention: str) -> bool:
    """Log the check; warn (and return True) when the weighted bank rows pull harder than the target rows."""
    msg = (
        f"memory bank check at step 0: the weighted bank rows pull the ControlNet {check['ratio']:.2f}x as hard "
        f"as the target rows (gradient norm {check['bank_grad']:.3g} vs {check['target_grad']:.3g})"
    )
    if check["ratio"] <= 1.0:
        logger.info(msg)
        return False
    logger.warning(
        msg + ". The base model denoises its own samples worse than your data, so the bank will "
        "first teach the ControlNet to correct the base instead of following the hint; on the toy world "
        "this delayed or prevented sudden convergence (BENCHMARKS.md section 2)."
        + (" " + BANK_ADVICE if retention == "renoise" else "")
    )
    return True


BANK_ADVICE = (
    "What measured best on the toy world (BENCHMARKS.md section 0) is the default --method difftuning: "
    "null-hint bank rows (--bank_hint zero) whose latents are drawn from the VAE posterior as the data's are "
    "(--bank_latents sample), lambda set from the measured pull (--bank_weight auto) so the weighted bank rows "
    "pull a tenth as hard as the target rows (--bank_pull 0.1, section 0f), the target rows weighted by inverse "
    "SNR; on five conditions x five seeds (section 0h) it converged sooner than vanilla and than inverse-SNR alone "
    "and kept 97% of the base's null-hint text following. A bank of posterior means (--bank_latents mean) pulled 2x "
    "as hard as draws."
)


def bank_check_at_start(cfg, trainer, target, accelerator) -> dict | None:
    """The check of this module on the first target rows, before a fresh run's first step (None without a
    bank or with ``--no-bank_check``); with ``--bank_weight auto`` lambda is measured first."""
    if trainer.bank is None or not cfg.method.bank_check:
        return None
    n = min(cfg.train.train_batch_size, len(target))
    batch = torch.utils.data.default_collate([target[i] for i in range(n)])
    if trainer.auto_weight:  # lambda measured first; the check shows the pull it sets (linear in lambda)
        measured = trainer.calibrate_bank_weight(batch)
        lam = measured["bank_weight"]
        check = {**measured, "bank_grad": measured["bank_grad"] * lam, "ratio": measured["ratio"] * lam}
    else:
        check = bank_pull(trainer, batch)
    if accelerator.is_main_process:
        warn_if_bank_dominates(check, cfg.method.retention)
    return check
