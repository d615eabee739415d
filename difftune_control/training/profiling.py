"""What a torch.profiler record says about training steps: GPU busy and idle time, host waits, collectives.

:func:`summarize` reads a Chrome trace's events (``scripts/profile_training.py``, ``scripts/bench_step.py``);
:func:`gpu_busy_seconds` records one call of a function and returns the time its kernels kept the GPU busy
(``--torch_compile auto`` weighs CUDA graphs by it: what a step's host dispatch leaves the GPU idle, graphs save).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
"""Trace categories of work on the GPU."""

SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(events: list[dict]) -> dict:
    """Per-step times (ms) from a Chrome trace's events of one process.

    ``steps``: the recorded ``ProfilerStep#N`` spans. On the GPU: ``compute_ms`` (union of the
    non-NCCL kernels and copies), ``nccl_ms`` (union of NCCL kernels), ``nccl_hidden`` (share of
    the NCCL time that overlaps compute), ``exposed_nccl_ms`` (NCCL time with no compute beside it),
    ``gpu_idle_ms`` (step time with no kernel at all). On the host: ``sync_wait_ms`` and
    ``sync_calls`` (CUDA calls that block until the GPU catches up), ``collective_cpu_ms`` and
    ``collective_calls`` (``c10d::*`` calls: DDP's bucket all-reduces and the loop's own collectives;
    with NCCL the host time is the launch, with gloo a blocking call waits for the other ranks).
    Everything is per recorded step.
    """
    spans = [
        e
        for e in events
        if e.get("ph") == "X"
        and e.get("cat") in ("user_annotation", "cpu_op")  # not the GPU-side copies of the annotation
        and str(e.get("name", "")).startswith("ProfilerStep#")
    ]
    steps = len(spans)
    if not steps:
        return {"steps": 0}
    window = _union([(e["ts"], e["ts"] + e["dur"]) for e in spans])
    wall = _length(window)
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    nccl = _union([(e["ts"], e["ts"] + e["dur"]) for e in gpu if "nccl" in e["name"].lower()])
    compute = _union([(e["ts"], e["ts"] + e["dur"]) for e in gpu if "nccl" not in e["name"].lower()])
    busy = _union(compute + nccl)
    syncs = [
        e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("name", "") in SYNC_CALLS
    ]
    colls = [e for e in events if e.get("cat") == "cpu_op" and str(e.get("name", "")).startswith("c10d::")]
    overlap = _intersection(compute, nccl)
    per = 1e-3 / steps  # microseconds per recording -> milliseconds per step
    return {
        "steps": steps,
        "step_ms": wall * per,
        "gpu": bool(gpu),
        "compute_ms": _length(compute) * per,
        "nccl_ms": _length(nccl) * per,
        "nccl_hidden": overlap / _length(nccl) if nccl else None,
        "exposed_nccl_ms": (_length(nccl) - overlap) * per,
        "gpu_idle_ms": (wall - _intersection(busy, window)) * per if gpu else None,
        "sync_wait_ms": sum(e["dur"] for e in syncs) * per,
        "sync_calls": len(syncs) / steps,
        "collective_cpu_ms": sum(e["dur"] for e in colls) * per,
        "collective_calls": len(colls) / steps,
    }


def gpu_busy_seconds(fn: Callable[[], object]) -> float | None:
    """Seconds the GPU was busy (the union of kernels and copies) while ``fn()`` ran once under torch.profiler;
    None where the profiler saw no GPU work (no CUDA, or no CUPTI). The host's dispatch is slowed by the profiler;
    the kernels' own times are not."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    busy = _union(
        [
            (e["ts"], e["ts"] + e["dur"])
            for e in events
            if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES
        ]
    )
    return _length(busy) * 1e-6 if busy else None
