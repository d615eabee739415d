"""The optimizer step inside the backward pass (``--fused_backward_pass``).

Each ControlNet parameter is updated, and its gradient freed, as soon as its gradient is complete, so a
step never holds every gradient at once: the ControlNet's fp32 gradients are 1.4 GB at SD1.5 and about
5 GB at SDXL, the difference between fitting a 16 GB card or not. As kohya's sd-scripts
``--fused_backward_pass``: one process, one micro-batch per optimizer step, no fp16 loss scaling, and
``--max_grad_norm`` clips each parameter's gradient on its own (a global norm needs every gradient).

The optimizer is built with one parameter group per parameter (:func:`param_groups`); the hook steps
that group alone. The learning-rate schedule, checkpoints and resume see the optimizer as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def param_groups(module: torch.nn.Module) -> list[dict]:
    """One optimizer parameter group per trainable parameter of ``module``."""
    return [{"params": [p]} for p in module.parameters() if p.requires_grad]


class OptimizerInBackward:
    """Steps ``optimizer`` parameter by parameter from gradient hooks; the loop's own step is then a no-op.

    Args:
        optimizer: the run's optimizer (accelerate's wrapper or a plain one), built on :func:`param_groups`.
        module: the trained module whose parameters get the hooks.
        max_grad_norm: per-parameter clipping norm (0: none).
    """

    def __init__(self, optimizer, module: torch.nn.Module, max_grad_norm: float = 0.0):
        self.wrapped = optimizer
        self.inner = getattr(optimizer, "optimizer", optimizer)
        self.max_grad_norm = max_grad_norm
        self._paused = False
        self._group = {}
        for group in self.inner.param_groups:
            if len(group["params"]) != 1:
                raise ValueError(
                    "--fused_backward_pass: the optimizer needs one parameter group per parameter"
                )
            self._group[group["params"][0]] = group
        self._handles = [
            p.register_post_accumulate_grad_hook(self._step_param)
            for p in module.parameters()
            if p.requires_grad
        ]

    def _step_param(self, p: torch.Tensor) -> None:
        if self._paused or p.grad is None:
            return
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        groups = self.inner.param_groups
        self.inner.param_groups = [self._group[p]]
        try:
            self.inner.step()
        finally:
            self.inner.param_groups = groups
        p.grad = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Gradients without updates (the bank-pull measurement reads them, then clears them)."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    # the loop's calls: the update already happened in backward
    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attach(trainer, optimizer) -> None:
    """Let ``trainer`` pause the in-backward updates (its bank-pull measurement) when ``optimizer`` makes them."""
    if isinstance(optimizer, OptimizerInBackward):
        trainer.optimizer_in_backward = optimizer
