#!/usr/bin/env python
"""Entry point for ``accelerate launch``: a training run with a torch.profiler window over a few optimizer steps.

    accelerate launch --num_processes 2 scripts/profile_training.py --profile_out DIR --profile_skip 6 \\
        --profile_steps 3 -- <difftune train flags, with --max_train_steps >= skip + steps + 2>
    python scripts/profile_training.py --summarize DIR     # the table again, from the traces

The real training loop runs unchanged; a global optimizer hook (``torch.optim.optimizer.
register_optimizer_step_post_hook``) steps the profiler after every optimizer step, so a recorded
step is everything between two updates: data, forward, backward, gradient all-reduce, logging and
the stop vote. After ``--profile_skip`` steps and one warm-up step, ``--profile_steps`` steps are
recorded. Each process writes ``DIR/trace-rank{R}.json`` (a Chrome trace: ui.perfetto.dev or
chrome://tracing) and ``DIR/ops-rank{R}.txt`` (operators by time); rank 0 then writes
``DIR/profile.{md,json}``, a summary per process (:func:`summarize`): step time, GPU compute,
NCCL kernels, how much of the NCCL time ran under compute, GPU idle time, host waits on the GPU,
and the CPU time inside collectives (with gloo on the CPU: the all-reduce itself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from difftune_control.training.profiling import summarize


def table(summaries: dict[str, dict]) -> str:
    """Markdown: one row per process (``summaries``: name -> :func:`summarize` output)."""
    lines = [
        "| process | steps | ms/step | GPU compute ms | NCCL kernels ms | NCCL under compute | exposed NCCL ms "
        "| GPU idle ms | host sync waits ms (calls) | collectives CPU ms (calls) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    for name, s in summaries.items():
        if not s.get("steps"):
            lines.append(f"| {name} | 0 | - | - | - | - | - | - | - | - |")
            continue
        gpu = s["gpu"]
        lines.append(
            f"| {name} | {s['steps']} | {s['step_ms']:.1f} | {f(s['compute_ms'] if gpu else None)} "
            f"| {f(s['nccl_ms'] if gpu else None)} | {f(s['nccl_hidden'], '{:.0%}')} "
            f"| {f(s['exposed_nccl_ms'] if gpu else None)} | {f(s['gpu_idle_ms'])} "
            f"| {s['sync_wait_ms']:.1f} ({s['sync_calls']:.1f}) "
            f"| {s['collective_cpu_ms']:.1f} ({s['collective_calls']:.1f}) |"
        )
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> dict[str, dict]:
    """Summarise every ``trace-rank*.json`` of ``out`` into ``profile.json`` and ``profile.md``."""
    summaries = {}
    for trace in sorted(out.glob("trace-rank*.json")):
        events = json.loads(trace.read_text()).get("traceEvents", [])
        summaries[trace.stem.removeprefix("trace-")] = summarize(events)
    (out / "profile.json").write_text(json.dumps(summaries, indent=1))
    (out / "profile.md").write_text(table(summaries))
    return summaries


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile_out", type=Path, help="folder for the traces and the summary")
    p.add_argument("--profile_skip", type=int, default=6, help="optimizer steps before the warm-up step")
    p.add_argument("--profile_steps", type=int, default=3, help="optimizer steps recorded")
    p.add_argument("--summarize", type=Path, metavar="DIR", help="only summarise the traces in DIR")
    p.add_argument("train_args", nargs="*", help="difftune train flags (after --)")
    args = p.parse_args()
    if args.summarize:
        print(table(write_summary(args.summarize)))
        return 0
    if args.profile_out is None:
        p.error("--profile_out is required (or --summarize DIR)")
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from difftune_control.cli import main as cli_main

    rank = int(os.environ.get("RANK", "0"))
    out = args.profile_out
    out.mkdir(parents=True, exist_ok=True)

    def ready(prof) -> None:
        prof.export_chrome_trace(str(out / f"trace-rank{rank}.json"))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (out / f"ops-rank{rank}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(
        skip_first=args.profile_skip, wait=0, warmup=1, active=args.profile_steps, repeat=1
    )
    prof = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=ready)
    register_optimizer_step_post_hook(lambda optimizer, a, kw: prof.step())
    with prof:
        rc = cli_main(["train", *args.train_args])
    if rank == 0 and rc == 0:
        import time

        deadline = time.time() + 60  # the other ranks write their traces at the same step
        world = int(os.environ.get("WORLD_SIZE", "1"))
        while len(list(out.glob("trace-rank*.json"))) < world and time.time() < deadline:
            time.sleep(0.5)
        print(table(write_summary(out)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
