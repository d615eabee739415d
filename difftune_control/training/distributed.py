"""Several processes (``accelerate launch``): DDP settings, and loop decisions that never wait on other ranks.

A value that needs the GPU (a loss to log, a stop vote summed over the processes) is copied to the
host behind an event when it is produced and read one optimizer step later (:class:`HostValue`):
by then the GPU has finished it, so the read does not stall the queue of work, and on several
processes it does not wait for the other ranks' all-reduce either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from difftune_control.config import TrainConfig

COMM_HOOKS = ("none", "fp16", "bf16")


def ddp_kwargs(t: TrainConfig):
    """accelerate's ``DistributedDataParallelKwargs`` from the ``--ddp_*`` flags (used only when DDP wraps a model)."""
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    hook = {
        "none": DDPCommunicationHookType.NO,
        "fp16": DDPCommunicationHookType.FP16,
        "bf16": DDPCommunicationHookType.BF16,
    }[t.ddp_comm_hook]
    return DistributedDataParallelKwargs(
        bucket_cap_mb=t.ddp_bucket_cap_mb,
        gradient_as_bucket_view=t.ddp_gradient_as_bucket_view,
        static_graph=t.ddp_static_graph,
        comm_hook=hook,
    )


def ddp_settings(model: torch.nn.Module) -> dict[str, Any] | None:
    """What a ``DistributedDataParallel`` wrapper was built with (None for an unwrapped model), for the log."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    hooks = [getattr(hook, "__name__", type(hook).__name__) for hook, _ in getattr(model, "_comm_hooks", [])]
    return {
        "bucket_cap_mb": model.bucket_bytes_cap / 1024**2,
        "gradient_as_bucket_view": model.gradient_as_bucket_view,
        "static_graph": model.static_graph,
        "comm_hooks": hooks,
    }


class HostValue:
    """A tensor on its way to host memory: queued now, read later without waiting for later GPU work.

    On CUDA the copy goes to pinned memory behind an event, so :meth:`get` waits only for the work
    queued before this value, not for what the loop queued since; elsewhere the value is at hand.
    """

    def __init__(self, value: torch.Tensor):
        self.event = None
        if value.device.type == "cuda":
            self.value = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self.value.copy_(value.detach(), non_blocking=True)  # pinned host memory: an asynchronous copy
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.value = value.detach()

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.value


class StopVote:
    """Whether any process asked to stop, the same answer on every process, without a wait at each step.

    One process (``reduce`` None) decides alone at every step. With several, each process's flag is
    summed over them by ``reduce`` (``Accelerator.reduce``) only at *due* steps, multiples of
    ``every`` (the loop passes ``--logging_steps``), and the sum is read at the next step: with NCCL
    the all-reduce is queued behind the step's work and its result reaches the host behind an event
    (:class:`HostValue`), so reading it one step later waits for nothing. Every process votes at the
    same steps and reads the same sum, so all stop at the same step, at most ``every`` + 1 steps after
    the flag was raised.
    """

    def __init__(self, every: int, reduce: Callable[..., torch.Tensor] | None = None, device=None):
        self.every, self.reduce, self.device = every, reduce, device
        self._pending: HostValue | None = None

    def __call__(self, step: int, flag: bool) -> bool:
        """The agreed decision after optimizer step ``step``, given this process's ``flag``."""
        if self.reduce is None:
            return flag
        agreed = False
        if self._pending is not None:
            agreed = bool(self._pending.get().item() > 0)
            self._pending = None
        if not agreed and step % self.every == 0:
            local = torch.tensor([int(flag)], dtype=torch.int32)
            if self.device is not None and torch.device(self.device).type == "cuda":
                local = local.pin_memory().to(self.device, non_blocking=True)
            self._pending = HostValue(self.reduce(local, reduction="sum"))
        return agreed


class WindowMeans:
    """Means over a logging window of the per-step values of ``keys``, read when the GPU has them.

    ``window`` holds the loss parts of each micro-batch (tensors on the device, floats, or None).
    The tensors are stacked and sent to the host at once (:class:`HostValue`); :meth:`get` returns
    ``{key: mean or None}``.
    """

    def __init__(self, window: Sequence[dict], keys: Sequence[str]):
        self.keys = tuple(keys)
        # per key, in window order: a float, or the index of a tensor in the stacked copy
        self._entries: dict[str, list[tuple[bool, float | int]]] = {k: [] for k in self.keys}
        tensors = []
        for key in self.keys:
            for parts in window:
                value = parts.get(key)
                if isinstance(value, torch.Tensor):
                    self._entries[key].append((True, len(tensors)))
                    tensors.append(value.detach().float().reshape(()))
                elif value is not None:
                    self._entries[key].append((False, float(value)))
        self._host = HostValue(torch.stack(tensors)) if tensors else None

    def get(self) -> dict[str, float | None]:
        stacked = self._host.get().tolist() if self._host is not None else []
        out: dict[str, float | None] = {}
        for key in self.keys:
            vals = [stacked[int(v)] if is_tensor else v for is_tensor, v in self._entries[key]]
            out[key] = sum(vals) / len(vals) if vals else None
        return out
