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
import functools
import weakref
from collections.abc import Callable, Iterator

import torch

ONE_PROCESS = "--fused_backward_pass runs on one process (the update would precede the all-reduce)"


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
        self._fold = None
        self._group = {}
        for group in self.inner.param_groups:
            if len(group["params"]) != 1:
                raise ValueError(
                    "--fused_backward_pass: the optimizer needs one parameter group per parameter"
                )
            self._group[group["params"][0]] = group
        # the hooks hold this object weakly: a tensor's hooks are not seen by the garbage collector, so a
        # strong reference would keep the optimizer and every parameter alive after the run (a second run in
        # the same process, a benchmark's next setting, ran with the first one's ControlNet still allocated)
        hook = functools.partial(_step_param_of, weakref.ref(self))
        self._handles = [
            p.register_post_accumulate_grad_hook(hook) for p in module.parameters() if p.requires_grad
        ]

    def _step_param(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if self._fold is not None:  # a measurement reads the gradient instead of a step
            self._fold(p)
            p.grad = None
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
    def diverted(self, fold: Callable[[torch.Tensor], None]) -> Iterator[None]:
        """No updates: each completed gradient goes to ``fold(param)`` and is freed (the bank-pull measurement)."""
        self._fold, before = fold, self._fold
        try:
            yield
        finally:
            self._fold = before

    # the loop's calls: the update already happened in backward
    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _step_param_of(ref: weakref.ReferenceType, p: torch.Tensor) -> None:
    owner = ref()
    if owner is not None:
        owner._step_param(p)


def attach(trainer, optimizer) -> None:
    """Let ``trainer`` divert the in-backward updates (its bank-pull measurement) when ``optimizer`` makes them."""
    if isinstance(optimizer, OptimizerInBackward):
        trainer.optimizer_in_backward = optimizer


class GradientSketch:
    """The norm of a sum of gradients, from gradients folded in one parameter at a time and then freed.

    A count sketch (Charikar et al. 2002): every coordinate of every parameter is hashed, the same way on
    every call, to one of ``buckets`` cells with a random sign; a cell adds up its coordinates' signed
    values. The sketch is linear, so gradients of several backward passes add up in it as in ``.grad``,
    and its squared norm is an unbiased estimate of the sum's squared norm, with a relative standard
    deviation of at most sqrt(2 / buckets) (0.3% at the default). It needs ``buckets`` floats where the
    gradients themselves need the ControlNet's size (about 5 GB at SDXL).

    Args:
        params: the parameters whose gradients are folded in (their order fixes each one's hash).
        buckets: cells of the sketch.
    """

    chunk = 2**22

    def __init__(self, params, buckets: int = 2**18):
        self.index = {p: i for i, p in enumerate(params)}
        self.buckets = buckets
        self.table: torch.Tensor | None = None

    def fold(self, p: torch.Tensor) -> None:
        g = p.grad.detach().reshape(-1)
        gen = torch.Generator(device=g.device).manual_seed(1_000_003 * (self.index[p] + 1))
        if self.table is None:
            self.table = torch.zeros(self.buckets, dtype=torch.float32, device=g.device)
        for part in g.split(self.chunk):  # a few MB of hashes at a time, whatever the parameter's size
            cell = torch.randint(self.buckets, part.shape, generator=gen, device=g.device)
            sign = torch.randint(2, part.shape, generator=gen, device=g.device, dtype=torch.bool)
            self.table.index_add_(0, cell, torch.where(sign, part, -part).float())

    def norm(self) -> float:
        return 0.0 if self.table is None else float(self.table.double().pow(2).sum().sqrt())
