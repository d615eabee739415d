#!/usr/bin/env python
"""Scaling over GPUs through accelerate: training and memory-bank generation, 1 vs N processes.

    python scripts/bench_scaling.py --out bench/scaling                       # toy world, 1 vs 2 GPUs
    python scripts/bench_scaling.py --out bench/scaling-sd15 --sd15 --mixed_precision bf16 \\
        --global_batch 32 --steps 40 --bank_size 512 --window 5                # SD1.5 scale, 512 px
    python scripts/bench_scaling.py --out DIR -- --pretrained_model_name_or_path SD15 --train_data_dir DATA \\
        --mixed_precision bf16 --condition canny                             # your model and data

For each process count N (``--processes``, default 1 2):
- training: ``accelerate launch --num_processes N scripts/train_controlnet.py`` with the same
  *global* batch (``--global_batch``; each process takes global / N rows) or the same batch per
  process (``--per_gpu_batch``), ``--steps`` optimizer steps, detector off; throughput = median of
  the logged images/s (all processes) after the first fifth of the steps. ``--variant NAME=FLAGS``
  (repeatable) runs every N > 1 once per set of extra flags, e.g. the DDP knobs
  (``--variant ddp-defaults=--no-ddp_gradient_as_bucket_view --variant bf16="--ddp_comm_hook bf16"``);
  one process runs once (it has no DDP);
- bank generation: ``accelerate launch --num_processes N -m difftune_control.cli bank`` of
  ``--bank_size`` images into a fresh cache, timed as a whole command and by the bank's own log.
- profile (``--profile K``): one more run per variant at the largest N through
  ``scripts/profile_training.py``: torch.profiler records K optimizer steps after a warm-up; its
  summary (compute, NCCL kernels and their overlap with compute, GPU idle time, host waits,
  collective calls) goes to ``profile-<variant>/`` and into ``results.md``.
Then the loss curve of each N-process run against the 1-process run (means over windows of
``--window`` steps; the logged loss is rank 0's rows, so a two-process curve is noisier by about
sqrt(2), not different in mean; with ``--per_gpu_batch`` the global batches differ too). Writes
``results.json``, ``results.md`` and ``loss.png``. CPU smoke test (two gloo processes)::

    python scripts/bench_scaling.py --out /tmp/sc --steps 4 --global_batch 4 --bank_size 8 --window 2 \\
        --cpu -- --pretrained_model_name_or_path PIPE --train_data_dir DATA --resolution 16 \\
        --conditioning_embedding_out_channels 8 16 --condition canny --bank_num_inference_steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convergence import run_cmd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def launch(args, n: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
    ]
    cmd += ["--dynamo_backend", "no", "--mixed_precision", args.mixed_precision]
    if n > 1:
        cmd += ["--multi_gpu"]  # on a CPU-only machine too: two gloo processes
    return cmd


def batch_of(args, n: int) -> int:
    """The per-process batch of an ``n``-process run."""
    return args.per_gpu_batch or args.global_batch // n


def run_name(n: int, variant: str) -> str:
    return f"train-n{n}" if n == 1 or variant == "default" else f"train-n{n}-{variant}"


def train_flags(args, n: int, steps: int, name: str) -> list[str]:
    return [
        "--condition", args.condition,
        "--method", args.method,
        "--train_batch_size", str(batch_of(args, n)),
        "--max_train_steps", str(steps),
        "--no-detect_convergence",
        "--no-bank_check",
        "--logging_steps", "1",
        "--checkpointing_steps", str(steps),
        "--validation_steps", str(steps),
        "--output_dir", str(args.out / "runs"),
        "--run_name", name,
        "--report_to", "none",
        "--seed", "0",
        *(["--device", "cpu"] if args.cpu else []),
        *args.train_args,
    ]  # fmt: skip


def train_run(args, n: int, variant: str = "default") -> dict:
    name = run_name(n, variant)
    extra = [] if n == 1 else args.variants[variant]
    cmd = launch(args, n) + [str(ROOT / "scripts" / "train_controlnet.py")]
    cmd += train_flags(args, n, args.steps, name) + extra
    from difftune_control.utils import read_jsonl

    wall = None  # a reused run's wall time is not known
    if not (args.reuse and finished_run(args, name)):
        t0 = time.time()
        rc = run_cmd(cmd, args.out / "logs" / f"{name}.log")
        wall = time.time() - t0
        if rc != 0:
            raise SystemExit(f"{name} failed (rc={rc}); see {args.out / 'logs' / (name + '.log')}")

    train = [r for r in read_jsonl(args.out / "runs" / name / "metrics.jsonl") if r["type"] == "train"]
    steady = [r["images_per_s"] for r in train if r["step"] > args.steps // 5] or [train[-1]["images_per_s"]]
    return {
        "processes": n,
        "variant": "-" if n == 1 else variant,
        "flags": " ".join(extra),
        "per_process_batch": batch_of(args, n),
        "images_per_s": statistics.median(steady),
        "wall_s": wall,
        "loss": [(r["step"], r["loss"]) for r in train],
    }


def profile_run(args, n: int, variant: str) -> dict:
    """One ``n``-process run of ``scripts/profile_training.py``: ``--profile`` recorded steps after a warm-up."""
    out = args.out / f"profile-{variant}"
    skip = args.profile_skip
    cmd = launch(args, n) + [
        str(ROOT / "scripts" / "profile_training.py"),
        "--profile_out", str(out),
        "--profile_skip", str(skip),
        "--profile_steps", str(args.profile),
        "--",
        *train_flags(args, n, skip + args.profile + 2, f"profile-n{n}-{variant}"),
        *args.variants[variant],
    ]  # fmt: skip
    log = args.out / "logs" / f"profile-{variant}.log"
    shutil.rmtree(args.out / "runs" / f"profile-n{n}-{variant}", ignore_errors=True)  # a fresh run each call
    if run_cmd(cmd, log) != 0:
        raise SystemExit(f"profile {variant} failed; see {log}")
    from profile_training import write_summary

    return {"processes": n, "variant": variant, "summary": write_summary(out)}


def finished_run(args, name: str) -> bool:
    """A training run of an earlier call that reached ``--steps`` (its final checkpoint is written)."""
    return (args.out / "runs" / name / f"checkpoint-{args.steps}").is_dir()


def bank_run(args, n: int) -> dict:
    name = f"bank-n{n}"
    cmd = launch(args, n) + [
        "-m", "difftune_control.cli", "bank",
        "--condition", args.condition,
        "--bank_size", str(args.bank_size),
        "--cache_dir", str(args.out / f"cache-n{n}"),
        *(["--device", "cpu"] if args.cpu else []),
        *args.train_args,
    ]  # fmt: skip
    log = args.out / "logs" / f"{name}.log"
    t0 = time.time()
    rc = run_cmd(cmd, log)
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"{name} failed (rc={rc}); see {log}")
    # the bank's own timing per process: "memory bank: N images in X s (Y images/s...)"; N / Y, as X is
    # rounded to 0.1 s (0.0 for a tiny bank)
    found = re.findall(r"memory bank: (\d+) images in [\d.]+ s \(([\d.]+) images/s", log.read_text())
    per_process = [int(n) / float(rate) for n, rate in found if float(rate) > 0]
    generate_s = max(per_process) if per_process else None
    return {
        "processes": n,
        "wall_s": wall,
        "generate_s": generate_s,
        "images_per_s": args.bank_size / generate_s if generate_s else None,
    }


def windows(loss: list[tuple[int, float]], width: int) -> dict[int, float]:
    out: dict[int, list[float]] = {}
    for step, value in loss:
        out.setdefault((step - 1) // width, []).append(value)
    return {k: statistics.mean(v) for k, v in out.items()}


def compare(ref: dict, other: dict, width: int) -> dict:
    a, b = windows(ref["loss"], width), windows(other["loss"], width)
    common = sorted(set(a) & set(b))
    rel = [abs(b[k] - a[k]) / abs(a[k]) for k in common if a[k]]
    return {
        "windows": len(common),
        "mean_relative_difference": statistics.mean(rel) if rel else None,
        "max_relative_difference": max(rel) if rel else None,
        "mean_loss_1": statistics.mean(a[k] for k in common) if common else None,
        "mean_loss_n": statistics.mean(b[k] for k in common) if common else None,
    }


def plot(results: list[dict], width: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for r in results:
        w = windows(r["loss"], width)
        ax.plot(
            [(k + 1) * width for k in sorted(w)],
            [w[k] for k in sorted(w)],
            label=f"{r['processes']} x {r['per_process_batch']}"
            + ("" if r["variant"] in ("-", "default") else f" {r['variant']}"),
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (mean of {width} steps)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/scaling"))
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--condition", default="depth")
    p.add_argument("--method", default="difftuning", choices=["vanilla", "difftuning"])
    p.add_argument("--global_batch", type=int, default=64, help="batch over all processes")
    p.add_argument(
        "--per_gpu_batch", type=int, default=None, help="batch per process instead (overrides --global_batch)"
    )
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="NAME=FLAGS",
        help="extra train flags of the N > 1 runs, one run per variant (repeatable; default: none)",
    )
    p.add_argument("--profile", type=int, default=0, metavar="K", help="profile K steps per variant (0: off)")
    p.add_argument("--profile_skip", type=int, default=6, help="steps before the profile's warm-up step")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--bank_size", type=int, default=2048)
    p.add_argument("--window", type=int, default=25)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo), for a smoke test")
    p.add_argument("--skip_bank", action="store_true")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the training runs an earlier call finished in --out (a call cut short goes on from there)",
    )
    p.add_argument(
        "--sd15",
        action="store_true",
        help="SD1.5 scale: bench_throughput's random-initialised SD1.5 model and 512 px parquet data, canny",
    )
    p.add_argument("train_args", nargs="*", help="extra difftune train/bank flags (after --)")
    args = p.parse_args()
    problems = []
    if 1 not in args.processes:
        problems.append("--processes must include 1 (the reference)")
    for n in args.processes:
        if not args.per_gpu_batch and args.global_batch % n:
            problems.append(f"--global_batch {args.global_batch} does not split over {n} processes")
    args.variants = {}
    for v in args.variant or ["default="]:
        name, sep, flags = v.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in args.variants:
            problems.append(f"--variant {v!r}: expected NAME=FLAGS with a new name of letters, digits, . _ -")
        args.variants[name] = shlex.split(flags)
    if problems:
        raise SystemExit("bench_scaling: " + "; ".join(problems))
    from difftune_control.bank import SHARD_SIZE

    need = SHARD_SIZE * max(args.processes)
    if not args.skip_bank and args.bank_size < need and not args.cpu:
        raise SystemExit(
            f"--bank_size {args.bank_size}: bank generation is split by shards of {SHARD_SIZE} images; "
            f"a bank of at least {need} gives each of {max(args.processes)} processes work (or --skip_bank)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    if args.sd15:
        from bench_throughput import build_sd15, make_parquet

        model = build_sd15(Path("/tmp/sd15-random"))
        data = make_parquet(Path("/tmp/bench-parquet"))
        args.condition = "canny"  # an extractor without weights to download
        args.train_args = [
            "--pretrained_model_name_or_path", str(model),
            "--dataset_name", str(data),
            "--resolution", "512",
            "--bank_size", str(args.bank_size),  # the training runs' bank: the preparation builds it once
            *args.train_args,
        ]  # fmt: skip

    # one shared preparation (dataset, latent cache, bank) so the timed training runs do not build them
    prep = [sys.executable, "-m", "difftune_control.cli", "bank", "--condition", args.condition]
    prep += ["--mixed_precision", args.mixed_precision] + (["--device", "cpu"] if args.cpu else [])
    names = {run_name(n, v) for n in args.processes for v in args.variants}
    reused = args.reuse and all(finished_run(args, name) for name in names)
    if args.skip_train or reused:
        prep = None
    if (
        prep
        and args.method == "difftuning"
        and run_cmd(prep + args.train_args, args.out / "logs" / "prepare.log")
    ):
        raise SystemExit(f"preparation failed; see {args.out / 'logs' / 'prepare.log'}")
    runs = [(n, v) for n in sorted(args.processes) for v in (["default"] if n == 1 else args.variants)]
    train = [] if args.skip_train else [train_run(args, n, v) for n, v in runs]
    profile = [profile_run(args, max(args.processes), v) for v in args.variants] if args.profile else []
    bank = [] if args.skip_bank else [bank_run(args, n) for n in sorted(args.processes)]
    ref_t = train[0] if train else None
    lines = [
        "| processes | variant | per-process batch | training images/s | speed-up | loss vs 1 process (mean / max rel. diff.) |",
        "|---|---|---|---|---|---|",
    ] if train else []  # fmt: skip
    for r in train:
        r["speedup"] = r["images_per_s"] / ref_t["images_per_s"]
        r["vs_one"] = compare(ref_t, r, args.window) if r is not ref_t else None
        c = r["vs_one"]
        diff = (
            "reference"
            if c is None
            else f"{c['mean_relative_difference']:.3f} / {c['max_relative_difference']:.3f}"
        )
        lines.append(
            f"| {r['processes']} | {r['variant']} | {r['per_process_batch']} | {r['images_per_s']:.1f} "
            f"| {r['speedup']:.2f}x | {diff} |"
        )
    flags = {v: " ".join(f) for v, f in args.variants.items() if f}
    if flags and train:
        lines += ["", "variants: " + "; ".join(f"{v}: `{f}`" for v, f in flags.items())]
    if profile:
        from profile_training import table

        for r in profile:
            lines += [
                "",
                f"profile, {r['processes']} processes, variant {r['variant']} (per recorded step):",
                "",
            ]
            lines.append(table(r["summary"]).rstrip())
    if bank:
        lines += [
            "",
            "| processes | bank images/s (generation) | speed-up | command wall s |",
            "|---|---|---|---|",
        ]
        for r in bank:
            ips = r["images_per_s"]
            r["speedup"] = ips / bank[0]["images_per_s"] if ips and bank[0]["images_per_s"] else None
            up = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            lines.append(f"| {r['processes']} | {ips or float('nan'):.1f} | {up} | {r['wall_s']:.0f} |")
    md = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(
        json.dumps({"train": train, "bank": bank, "profile": profile}, indent=1)
    )
    if train:
        same = "same batch per process" if args.per_gpu_batch else "same global batch"
        plot(train, args.window, args.out / "loss.png", f"{same}, 1 vs N processes (processes x batch)")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
