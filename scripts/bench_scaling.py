#!/usr/bin/env python
"""Scaling over GPUs through accelerate: training and memory-bank generation, 1 vs N processes.

    python scripts/bench_scaling.py --out bench/scaling                       # toy world, 1 vs 2 GPUs
    python scripts/bench_scaling.py --out bench/scaling-sd15 --sd15 --mixed_precision bf16 \\
        --global_batch 32 --steps 40 --bank_size 512 --window 5                # SD1.5 scale, 512 px
    python scripts/bench_scaling.py --out DIR -- --pretrained_model_name_or_path SD15 --train_data_dir DATA \\
        --mixed_precision bf16 --condition canny                             # your model and data

For each process count N (``--processes``, default 1 2):
- training: ``accelerate launch --num_processes N scripts/train_controlnet.py`` with the same
  *global* batch (``--global_batch``; each process takes global / N rows), ``--steps`` optimizer
  steps, detector off; throughput = median of the logged images/s (all processes) after the first
  fifth of the steps;
- bank generation: ``accelerate launch --num_processes N -m difftune_control.cli bank`` of
  ``--bank_size`` images into a fresh cache, timed as a whole command and by the bank's own log.
Then the loss curve of each N-process run against the 1-process run of the same global batch
(means over windows of ``--window`` steps; the logged loss is rank 0's rows, so a two-process
curve is noisier by about sqrt(2), not different in mean). Writes ``results.json``,
``results.md`` and ``loss.png``. CPU smoke test (two gloo processes)::

    python scripts/bench_scaling.py --out /tmp/sc --steps 4 --global_batch 4 --bank_size 8 --window 2 \\
        --cpu -- --pretrained_model_name_or_path PIPE --train_data_dir DATA --resolution 16 \\
        --conditioning_embedding_out_channels 8 16 --condition canny --bank_num_inference_steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def train_run(args, n: int) -> dict:
    name = f"train-n{n}"
    cmd = launch(args, n) + [
        str(ROOT / "scripts" / "train_controlnet.py"),
        "--condition", args.condition,
        "--method", args.method,
        "--train_batch_size", str(args.global_batch // n),
        "--max_train_steps", str(args.steps),
        "--no-detect_convergence",
        "--no-bank_check",
        "--logging_steps", "1",
        "--checkpointing_steps", str(args.steps),
        "--validation_steps", str(args.steps),
        "--output_dir", str(args.out / "runs"),
        "--run_name", name,
        "--report_to", "none",
        "--seed", "0",
        *(["--device", "cpu"] if args.cpu else []),
        *args.train_args,
    ]  # fmt: skip
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
        "per_process_batch": args.global_batch // n,
        "images_per_s": statistics.median(steady),
        "wall_s": wall,
        "loss": [(r["step"], r["loss"]) for r in train],
    }


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
    # the bank's own timing per process: "memory bank: N images in X s (Y images/s)"
    per_process = [float(m) for m in re.findall(r"memory bank: \d+ images in ([\d.]+) s", log.read_text())]
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


def plot(results: list[dict], width: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for r in results:
        w = windows(r["loss"], width)
        ax.plot(
            [(k + 1) * width for k in sorted(w)],
            [w[k] for k in sorted(w)],
            label=f"{r['processes']} process(es)",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (mean of {width} steps)")
    ax.set_title("same global batch, 1 vs N processes", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/scaling"))
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--condition", default="depth")
    p.add_argument("--method", default="difftuning", choices=["vanilla", "difftuning"])
    p.add_argument("--global_batch", type=int, default=64)
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
    if 1 not in args.processes:
        raise SystemExit("--processes must include 1 (the reference)")
    for n in args.processes:
        if args.global_batch % n:
            raise SystemExit(f"--global_batch {args.global_batch} does not split over {n} processes")
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
    reused = args.reuse and all(finished_run(args, f"train-n{n}") for n in args.processes)
    if args.skip_train or reused:
        prep = None
    if (
        prep
        and args.method == "difftuning"
        and run_cmd(prep + args.train_args, args.out / "logs" / "prepare.log")
    ):
        raise SystemExit(f"preparation failed; see {args.out / 'logs' / 'prepare.log'}")
    train = [] if args.skip_train else [train_run(args, n) for n in sorted(args.processes)]
    bank = [] if args.skip_bank else [bank_run(args, n) for n in sorted(args.processes)]
    ref_t = train[0] if train else None
    lines = [
        "| processes | per-process batch | training images/s | speed-up | loss vs 1 process (mean / max rel. diff.) |",
        "|---|---|---|---|---|",
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
            f"| {r['processes']} | {r['per_process_batch']} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x | {diff} |"
        )
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
    (args.out / "results.json").write_text(json.dumps({"train": train, "bank": bank}, indent=1))
    if train:
        plot(train, args.window, args.out / "loss.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
