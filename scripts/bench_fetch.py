#!/usr/bin/env python
"""Host time of one training batch's rows: fetching them from the run's target dataset and collating them.

    python scripts/bench_fetch.py                                  # toy world, normal (hints from files)
    python scripts/bench_fetch.py --rows 64 --repeats 20 -- --condition canny
    python scripts/bench_fetch.py -- --pretrained_model_name_or_path DIR --train_data_dir DATA --condition depth

With ``--dataloader_num_workers 0`` (the default) this work runs on the training loop's own thread before
every step. The run is set up as ``difftune train`` sets it up (``training.setup.setup``: the latent cache
is built or reused; no bank, no detector), then ``--rows`` random rows are fetched and collated
``--repeats`` times; the median and the range are printed, in milliseconds. Flags after ``--`` are
``difftune train`` flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="rows per batch (the toy world's default batch)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("train_args", nargs="*", help="difftune train flags (after --)")
    args = p.parse_args()

    import torch

    from difftune_control.cli import _config, build_parser
    from difftune_control.training.setup import setup

    defaults = ["--method", "vanilla", "--no-detect_convergence", "--max_train_samples", "1000"]
    cfg = _config(build_parser().parse_args(["train", *defaults, *args.train_args]))
    run = setup(cfg)
    target = run.target
    g = torch.Generator().manual_seed(args.seed)
    times = []
    for _ in range(args.repeats + 1):  # the first one opens the cache's files
        idx = torch.randint(len(target), (args.rows,), generator=g).tolist()
        t0 = time.perf_counter()
        torch.utils.data.default_collate([target[i] for i in idx])
        times.append(time.perf_counter() - t0)
    ms = [1e3 * t for t in times[1:]]
    print(
        f"{type(target).__name__}, {len(target)} rows, condition {run.cfg.data.condition}: {args.rows} rows "
        f"fetched and collated in {statistics.median(ms):.1f} ms (median of {args.repeats}; "
        f"range {min(ms):.1f}-{max(ms):.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
