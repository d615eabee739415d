"""Diff-Tuning (Zhong et al., 2024): ``DiffTuningTrainer``, the chain of forgetting as a batch plan."""

from __future__ import annotations

import logging

import torch

from difftune_control.methods.base import ControlNetTrainer
from difftune_control.methods.forgetting import BatchPlan, plan_batch

logger = logging.getLogger(__name__)


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
        self.pull_plans = 1  # batch plans the last measurement pooled

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
        every = m.bank_pull_every * self.pull_plans  # a pooled measurement costs more: it comes less often
        if self.bank_lambda is None or (every and step % every == 0 and step > 0):
            self.calibrate_bank_weight(target_batch)

    def calibrate_bank_weight(self, target_batch: dict) -> dict:
        """Measure both parts' pull at lambda = 1 on ``target_batch`` and set lambda (mean over processes).

        Leaves the random generator, the gradients and the schedule of the run untouched.
        """
        from difftune_control.methods.forgetting import weight_for_pull
        from difftune_control.training.diagnostics import bank_pull

        previous, self.bank_lambda = self.bank_lambda, 1.0
        if previous is None:  # before the first step: the pooled passes take a few steps' time
            logger.info(
                "--bank_weight auto: measuring lambda on >= %d bank rows before the first step",
                self.cfg.method.bank_pull_rows,
            )
        try:
            check = bank_pull(self, target_batch)
        finally:
            self.bank_lambda = previous
        self.pull_plans = check["plans"]
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
        return {
            **super().state_dict(),
            "bank_lambda": self.bank_lambda,
            "micro_batches": self.micro_batches,
            "pull_plans": self.pull_plans,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "bank_lambda" in state and self.cfg.method.bank_weight == "auto":
            self.bank_lambda = state["bank_lambda"]
        self.micro_batches = int(state.get("micro_batches", 0))
        self.pull_plans = int(state.get("pull_plans", 1))
