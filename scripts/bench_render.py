"""Throughput of the toy-world renderer (scenes per second).

python scripts/bench_render.py --device cpu --n 1024
python scripts/bench_render.py --device cuda --n 51200 --resolution 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from difftune_control.toyworld import render_scenes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=1024, help="scenes per timed run")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--supersample", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    render_scenes(min(args.n, 256), seed=123, resolution=args.resolution, device=args.device)  # warm-up
    rates = []
    for r in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        render_scenes(
            args.n, seed=r, resolution=args.resolution, device=args.device, supersample=args.supersample
        )
        sync()
        rates.append(args.n / (time.perf_counter() - t0))
    result = {
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu x{torch.get_num_threads()}",
        "resolution": args.resolution,
        "supersample": args.supersample,
        "n": args.n,
        "scenes_per_s_best": round(max(rates), 1),
        "scenes_per_s_median": round(sorted(rates)[len(rates) // 2], 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
