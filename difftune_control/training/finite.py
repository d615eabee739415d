"""``WeightWatch``: whether every optimizer step left the trained weights finite, read without waiting
for the GPU, and the error that names the last checkpoint to resume from when one did not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftune_control.training.checkpoints import last_finite_checkpoint


def host_flag(bad: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A boolean scalar the host reads later without stalling the GPU: on CUDA ``(pinned copy, event)``, read
    once ``event.synchronize()`` returns; elsewhere ``(bad, None)``, to read at once."""
    if bad.device.type != "cuda":
        return bad, None
    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
    flag.copy_(bad, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return flag, event


class WeightWatch:
    """Whether every optimizer step left the trained weights finite, read without waiting for the GPU.

    :meth:`watch` takes one fused norm over the parameters after a step (NaN and inf propagate into it;
    a weight beyond float32's range overflows it too); on CUDA its flag is copied to pinned memory behind
    an event, and :meth:`check` reads it later: one step later in the loop, by which time the GPU is
    past it (no bubble), or at once before anything is logged, evaluated or saved. On other devices the
    flag is read at once. A non-finite update raises ``FloatingPointError`` naming the step and the last
    checkpoint of ``run_dir`` whose weights are all finite.
    """

    def __init__(self, parameters, run_dir: Path, learning_rate: float) -> None:
        self.parameters, self.run_dir, self.learning_rate = parameters, run_dir, learning_rate
        self._flags: list[tuple[int, torch.Tensor, Any]] = []  # (step, non-finite flag, CUDA event)

    def watch(self, step: int) -> None:
        """Note whether the weights after optimizer step ``step`` are all finite."""
        with torch.no_grad():
            params = [p.detach() for p in self.parameters()]
            norms = (
                torch._foreach_norm(params) if hasattr(torch, "_foreach_norm") else [p.norm() for p in params]
            )
            bad = ~torch.stack(list(norms)).isfinite().all()
        flag, event = host_flag(bad)
        self._flags.append((step, flag, event))
        if event is None:
            self.check()

    def check(self, keep: int = 0) -> None:
        """Read the flags, all but the newest ``keep``; raise ``FloatingPointError`` at a non-finite step."""
        while len(self._flags) > keep:
            step, flag, event = self._flags.pop(0)
            if event is not None:
                event.synchronize()
            if bool(flag):
                self._flags.clear()
                raise FloatingPointError(self.message(step))

    def message(self, step: int) -> str:
        good = last_finite_checkpoint(self.run_dir)
        where = (
            f"the last checkpoint whose weights are all finite is {good.name}: resume with "
            f"--resume_from_checkpoint {good} (or latest)"
            if good is not None
            else "no checkpoint was written before it"
        )
        return (
            f"optimizer step {step} made ControlNet weights non-finite (NaN or inf): the update diverged and "
            f"nothing of it was saved. Lower --learning_rate (now {self.learning_rate:g}), use bf16 rather "
            f"than fp16, and check the data for broken images; {where}"
        )
