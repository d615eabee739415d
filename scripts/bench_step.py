#!/usr/bin/env python
"""The training step at SD1.5 scale, method against method, interleaved in one process; and a profile of it.

    python scripts/bench_step.py --out DIR --batches 32 8 4 --repeats 5 --steps 10
    python scripts/bench_step.py --out DIR --batches 4 --speed compile --profile
    python scripts/bench_step.py --out DIR --batches 32 8 4 --ab default bf16-weights   # settings, interleaved

Both trainers (``--method vanilla`` and the default ``--method difftuning``: null-hint bank rows drawn
from the posterior, ``--bank_weight auto``, inverse-SNR) share one random-initialised SD1.5-sized base
model, one ControlNet and one optimizer (made by the run's own ``prepare_trainable``), and run chunks
of ``--steps`` optimizer steps in turn: vanilla, difftuning, vanilla, ... ``--repeats`` times after a
warm-up of every method. The chunks see the same GPU state, clocks and allocator, so their ratio is
the method's overhead; the median and the spread over the repeats are reported. ``--bank_weight
auto``'s re-measurement of the pulls (every ``--bank_pull_every`` x pooled plans steps, as the trainer) is timed apart and amortised.

``--profile`` adds a torch.profiler record of three steps per method and batch: wall time per
step, GPU busy time, kernels per step, host calls that wait on the GPU
(``scripts/profile_training.py``'s summary), and the top host operators. Writes ``results.json``,
``results.md`` and the traces under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import (  # noqa: E402
    FLOP_PER_IMAGE,
    PEAK_BF16,
    SPEED_SETTINGS,
    SyntheticCached,
    bench_config,
    build_sd15,
    make_ours,
    synthetic_bank,
)
from profile_training import summarize  # noqa: E402

METHODS = ("vanilla", "difftuning")


def make_trainers(model_dir: Path, speed: str, batch: int, rows=SyntheticCached, device: str | None = None):
    """The two trainers over one base model, ControlNet and optimizer (vanilla's made by ``make_ours``, the
    default Diff-Tuning's beside it with a null-hint bank), configs resolved as ``difftune train`` does."""
    from difftune_control.methods.registry import trainer_class

    vanilla, opt, acc = make_ours(model_dir, batch, "vanilla", speed=speed, rows=rows, device=device)
    target = vanilla.target
    cfg = bench_config(model_dir, batch, "difftuning", target.hints.shape[-1], speed=speed, device=device)
    empty = torch.zeros(1, *target.encoder_hidden_states.shape[1:])
    bank = synthetic_bank(rows(64))
    difftuning = trainer_class(cfg)(cfg, acc, vanilla.base, vanilla.controlnet, target, empty, bank)
    difftuning.half = vanilla.half  # --bf16_weights: one bf16 copy of the one ControlNet
    loader = torch.utils.data.DataLoader(
        target,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=2,
        pin_memory=acc.device.type == "cuda",
        persistent_workers=True,
    )
    trainers = {"vanilla": vanilla, "difftuning": difftuning}
    return acc, vanilla.controlnet, opt, trainers, loader, cfg


def device_name(device: str | None) -> str:
    return "cpu" if device == "cpu" else torch.cuda.get_device_name()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_steps(n: int, trainer, acc, controlnet, opt, it) -> float:
    """``n`` optimizer steps as the loop runs them; seconds from the first to the GPU's end of the last."""
    synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.training_step(next(it))
        acc.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    trainer.check_finite()
    synchronize()
    return time.perf_counter() - t0


def interleaved(arms: dict, repeats: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each arm (``arms[name](n)`` runs ``n`` steps and returns their seconds) in ``repeats``
    chunks of ``steps``, the arms taking turns, their order reversed every other round."""
    names = list(arms)
    times = {k: [] for k in names}
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            times[k].append(arms[k](steps) / steps)
    return times


def profile(trainer, acc, controlnet, opt, it, out: Path, name: str, steps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile, schedule

    sched = schedule(wait=0, warmup=1, active=steps, repeat=1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, schedule=sched) as prof:
        for _ in range(steps + 1):
            run_steps(1, trainer, acc, controlnet, opt, it)
            prof.step()
    trace = out / f"trace-{name}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    s = summarize(events)
    per = max(1, s.get("steps", 0))
    s["kernels_per_step"] = sum(1 for e in events if e.get("ph") == "X" and e.get("cat") == "kernel") / per
    # ATen operator calls a step makes (nested ones included): the host's work, comparable on any device
    s["ops_per_step"] = sum(1 for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op") / per
    (out / f"ops-{name}.txt").write_text(
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    )
    # host time of the trainer's labelled phases (ControlNetTrainer.training_step), per step
    s["phases_host_ms"] = {
        e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.key.startswith("difftune.")
    }
    return s


def bench_batch(args, batch: int, speed: str, rows=SyntheticCached, device: str | None = None) -> list[dict]:
    """Interleaved chunks of both methods at ``batch`` (``args``: repeats, steps, warmup, profile, out);
    ``rows`` and ``device`` as in ``make_ours`` (the tests run it on the CPU at a tiny size)."""
    acc, controlnet, opt, trainers, loader, dt_cfg = make_trainers(args.model_dir, speed, batch, rows, device)
    cuda = acc.device.type == "cuda"

    def batches():
        while True:
            yield from loader

    it = batches()
    t_warm = time.perf_counter()
    for m in METHODS:  # compile, cuDNN autotuning, the allocator, the first lambda measurement
        run_steps(args.warmup, trainers[m], acc, controlnet, opt, it)
    warm_s = time.perf_counter() - t_warm
    times = interleaved(
        {m: functools.partial(run_steps, trainer=trainers[m], acc=acc, controlnet=controlnet, opt=opt, it=it)
         for m in METHODS}, args.repeats, args.steps,
    )  # fmt: skip
    # --bank_weight auto's re-measurement, amortised over its period
    dt = trainers["difftuning"]
    synchronize()
    t0 = time.perf_counter()
    dt.calibrate_bank_weight(next(it))
    synchronize()
    calib_s = time.perf_counter() - t0
    every = (
        dt_cfg.method.bank_pull_every or 0
    ) * dt.pull_plans  # the trainer's period: pooled plans come less often
    out = []
    for m in METHODS:
        med = statistics.median(times[m])
        out.append(
            {
                "method": m,
                "batch": batch,
                "speed": speed,
                "step_ms_median": 1e3 * med,
                "step_ms_min": 1e3 * min(times[m]),
                "step_ms_max": 1e3 * max(times[m]),
                "step_ms_all": [1e3 * t for t in times[m]],
                "images_per_s": batch / med,
                "mfu": batch / med * FLOP_PER_IMAGE / PEAK_BF16,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                "warmup_s": warm_s,
            }
        )
    ratios = [d / v for d, v in zip(times["difftuning"], times["vanilla"])]
    out[1]["overhead_median"] = statistics.median(ratios) - 1
    out[1]["overhead_range"] = [min(ratios) - 1, max(ratios) - 1]
    out[1]["calibration_s"] = calib_s
    out[1]["calibration_share"] = calib_s / (every * statistics.median(times["difftuning"])) if every else 0.0
    if args.profile:
        for m in METHODS:
            out[METHODS.index(m)]["profile"] = profile(
                trainers[m], acc, controlnet, opt, it, args.out, f"{m}-b{batch}-{speed}"
            )
    del trainers, controlnet, opt, it
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def ab_batch(
    args, batch: int, speeds: list[str], rows=SyntheticCached, device: str | None = None
) -> list[dict]:
    """The vanilla step under each setting of ``speeds`` (each its own base model, ControlNet and optimizer, made by
    ``make_ours``), in interleaved chunks as :func:`bench_batch` runs the methods: the settings' ratio to the first
    one, measured in one process (``args``: repeats, steps, warmup)."""
    arms = {s: make_ours(args.model_dir, batch, "vanilla", speed=s, rows=rows, device=device) for s in speeds}
    loader = torch.utils.data.DataLoader(
        arms[speeds[0]][0].target, batch_size=batch, shuffle=True, drop_last=True
    )

    def batches():
        while True:
            yield from loader

    it = batches()
    for trainer, opt, acc in arms.values():
        run_steps(args.warmup, trainer, acc, trainer.controlnet, opt, it)
    times = interleaved(
        {s: functools.partial(run_steps, trainer=t, acc=a, controlnet=t.controlnet, opt=o, it=it)
         for s, (t, o, a) in arms.items()}, args.repeats, args.steps,
    )  # fmt: skip
    out = []
    for s in speeds:
        ratios = [a / b for a, b in zip(times[s], times[speeds[0]])]
        med = statistics.median(times[s])
        out.append(
            {
                "batch": batch,
                "speed": s,
                "step_ms_median": 1e3 * med,
                "step_ms_all": [1e3 * t for t in times[s]],
                "images_per_s": batch / med,
                "time_vs_first_median": statistics.median(ratios),
                "time_vs_first_range": [min(ratios), max(ratios)],
            }
        )
    del arms, it
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def ab_table(rows: list[dict]) -> str:
    lines = [
        "| batch | setting (vanilla) | ms/step median [min, max] | images/s | step time vs the first setting, median [range] |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["time_vs_first_range"]
        lines.append(
            f"| {r['batch']} | {r['speed']} | {r['step_ms_median']:.1f} [{min(r['step_ms_all']):.1f}, "
            f"{max(r['step_ms_all']):.1f}] | {r['images_per_s']:.1f} | {r['time_vs_first_median']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] |"
        )
    return "\n".join(lines) + "\n"


def table(rows: list[dict]) -> str:
    lines = [
        "| method | batch | speed | ms/step median [min, max] | images/s | MFU | Diff-Tuning overhead median [range] "
        "| lambda re-measurement (amortised) | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        over = (
            f"{100 * r['overhead_median']:+.1f}% [{100 * r['overhead_range'][0]:+.1f}, {100 * r['overhead_range'][1]:+.1f}]"
            if "overhead_median" in r
            else "-"
        )
        calib = (
            f"{r['calibration_s']:.2f} s ({100 * r['calibration_share']:.1f}%)"
            if "calibration_s" in r
            else "-"
        )
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['speed']} | {r['step_ms_median']:.1f} [{r['step_ms_min']:.1f}, "
            f"{r['step_ms_max']:.1f}] | {r['images_per_s']:.1f} | {100 * r['mfu']:.0f}% | {over} | {calib} "
            f"| {r['peak_gib']:.1f} |"
        )
    prof = [r for r in rows if "profile" in r]
    phases = sorted({k for r in prof for k in r["profile"].get("phases_host_ms", {})})
    if phases:
        lines += [
            "",
            "Host time of the step's phases, ms per step (torch.profiler, CPU time inside each label):",
            "",
        ]
        lines += [
            "| method | batch | speed | " + " | ".join(p.removeprefix("difftune.") for p in phases) + " |"
        ]
        lines += ["|---|---|---|" + "---|" * len(phases)]
        for r in prof:
            ph = r["profile"].get("phases_host_ms", {})
            cells = " | ".join(f"{ph[p]:.1f}" if p in ph else "-" for p in phases)
            lines.append(f"| {r['method']} | {r['batch']} | {r['speed']} | {cells} |")
    if prof:
        lines += [
            "",
            "| method | batch | speed | profiled ms/step | GPU busy ms | GPU idle ms | kernels/step | ATen calls/step "
            "| host waits ms (calls) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in prof:
            s = {
                k: ("-" if v is None else f"{v:.1f}")
                for k, v in r["profile"].items()
                if not isinstance(v, (bool, dict))
            }
            lines.append(
                f"| {r['method']} | {r['batch']} | {r['speed']} | {s['step_ms']} | {s['compute_ms']} "
                f"| {s['gpu_idle_ms']} | {s['kernels_per_step']} | {s.get('ops_per_step', '-')} "
                f"| {s['sync_wait_ms']} ({s['sync_calls']}) |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/step"))
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sd15-random"))
    p.add_argument("--batches", nargs="+", type=int, default=[32, 8, 4])
    p.add_argument("--speed", nargs="+", default=["default"], choices=list(SPEED_SETTINGS))
    p.add_argument("--repeats", type=int, default=5, help="chunks per method, interleaved")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per chunk")
    p.add_argument("--warmup", type=int, default=5, help="steps per method before the first chunk")
    p.add_argument("--profile", action="store_true", help="record three steps per method and batch")
    p.add_argument("--resolution", type=int, default=512, help="image side of the synthetic rows")
    p.add_argument(
        "--ab", nargs="+", choices=list(SPEED_SETTINGS), metavar="SPEED",
        help="instead: these settings' vanilla steps against each other, interleaved (results-ab.{md,json})",
    )  # fmt: skip
    p.add_argument(
        "--device",
        default=None,
        help="cpu: count a step's operators (--profile) where no GPU is; times mean little",
    )
    args = p.parse_args()
    if not torch.cuda.is_available() and args.device != "cpu":
        raise SystemExit("bench_step needs a CUDA GPU (or --device cpu to count operators)")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    build_sd15(args.model_dir)
    rows: list[dict] = []
    synthetic = functools.partial(SyntheticCached, resolution=args.resolution)
    if args.ab:
        for b in args.batches:
            rows += ab_batch(args, b, args.ab, synthetic, args.device)
            (args.out / "results-ab.json").write_text(
                json.dumps(
                    {"device": device_name(args.device), "torch": torch.__version__, "rows": rows}, indent=1
                )
            )
            (args.out / "results-ab.md").write_text(ab_table(rows))
        print(ab_table(rows))
        return 0
    for speed in args.speed:
        for b in args.batches:
            try:
                rows += bench_batch(args, b, speed, synthetic, args.device)
            except Exception as e:  # a setting that fails (e.g. a compiler error) is a result too
                rows.append({"batch": b, "speed": speed, "error": repr(e)[:2000]})
                torch._dynamo.reset()
                torch.cuda.empty_cache()
            ok = [r for r in rows if "error" not in r]
            (args.out / "results.json").write_text(
                json.dumps(
                    {"device": device_name(args.device), "torch": torch.__version__, "rows": rows},
                    indent=1,
                )
            )
            (args.out / "results.md").write_text(table(ok))
            print(json.dumps(rows[-1])[:600], flush=True)
    print(table([r for r in rows if "error" not in r]))
    for r in rows:
        if "error" in r:
            print(f"failed: batch {r['batch']} {r['speed']}: {r['error'][-400:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
