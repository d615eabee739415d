#!/usr/bin/env python
"""How much does ``--bank_weight auto``'s lambda depend on the batch it is measured on? (CPU, toy world)

    python scripts/bench_pull_noise.py                         # depth, batches 4 and 64, 24 draws each
    python scripts/bench_pull_noise.py --out docs/bench/pull-noise.json -- --condition segmentation

For each batch size and ``--bank_pull_rows`` setting, lambda = --bank_pull x target pull / bank pull
(both at lambda 1) is measured on ``--draws`` random target batches with fresh plans, on the fresh
ControlNet of step 0 (as the step-0 calibration sees it). Printed: the median lambda, its spread
(coefficient of variation, 10th-90th percentile) and the seconds per measurement. Flags after ``--``
are ``difftune train`` flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", nargs="+", type=int, default=[4, 64])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 12], help="--bank_pull_rows settings")
    p.add_argument("--draws", type=int, default=24)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("train_args", nargs="*", help="difftune train flags (after --)")
    args = p.parse_args()

    from difftune_control.cli import build_parser
    from difftune_control.config import RunConfig, apply_preset, config_from_args
    from difftune_control.training.diagnostics import bank_pull
    from difftune_control.training.setup import setup

    flags = ["--method", "difftuning", "--device", "cpu", "--max_train_samples", "512", "--bank_size", "128"]
    parsed = build_parser().parse_args(["train", *flags, *args.train_args])
    run = setup(config_from_args(parsed, apply_preset(RunConfig(), parsed.preset)))
    trainer, target, cfg = run.trainer, run.target, run.cfg
    fraction = cfg.method.bank_pull
    results = []
    print(f"condition {cfg.data.condition}; lambda at --bank_pull {fraction} on the step-0 ControlNet")
    print("\n| batch | --bank_pull_rows | plans pooled | median lambda | CV | 10-90% | s per measurement |")
    print("|---|---|---|---|---|---|---|")
    for n in args.batches:
        for rows in args.rows:
            cfg.method.bank_pull_rows = rows
            pick = torch.Generator().manual_seed(1000 * n + rows)
            lams, plans, t0 = [], 0, time.perf_counter()
            for d in range(args.draws):
                idx = torch.randint(len(target), (n,), generator=pick).tolist()
                batch = torch.utils.data.default_collate([target[i] for i in idx])
                trainer.generator.manual_seed(d)
                trainer.bank_lambda = 1.0
                check = bank_pull(trainer, batch)
                lams.append(fraction * check["target_grad"] / check["bank_grad"])
                plans = check["plans"]
            secs = (time.perf_counter() - t0) / args.draws
            q = statistics.quantiles(lams, n=10)
            row = {
                "batch": n,
                "bank_pull_rows": rows,
                "plans": plans,
                "median": statistics.median(lams),
                "cv": statistics.stdev(lams) / statistics.mean(lams),
                "p10": q[0],
                "p90": q[-1],
                "seconds": secs,
                "lambdas": lams,
            }
            results.append(row)
            print(
                f"| {n} | {rows} | {plans} | {row['median']:.3g} | {row['cv']:.2f} | "
                f"{row['p10']:.3g}-{row['p90']:.3g} | {secs:.2f} |",
                flush=True,
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"condition": cfg.data.condition, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
