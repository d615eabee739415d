#!/usr/bin/env python
"""Host time of drawing bank rows (``BankRows.batch``) at SD1.5 size, against the per-step gather it replaced.

    python scripts/bench_bank_rows.py                      # CPU
    python scripts/bench_bank_rows.py --device cuda --rows 6 26

Random SD1.5-shaped bank rows (latents f32 [4,64,64], posterior spreads f16, text embeddings f16 [77,768],
uint8 hints [3,512,512]) stand in for a loaded bank; both hint modes (``zero``: the default null-hint
bank, and ``extracted``) and both latent modes (``mean``, ``sample``: a posterior draw). ``before`` is
the gather every step ran until ``BankRows``: index the CPU tensors, then pin each piece (a copy) and
copy it asynchronously. Reports the median host milliseconds per call (what the training step's main
thread spends; on CUDA the copies and kernels are only queued, the GPU is not waited for) and checks
that both give the same values bit for bit. Needs no model; the CPU numbers leave out the pinning.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

from difftune_control.bank import BankRows
from difftune_control.utils import hint_to_float, to_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import SyntheticCached, synthetic_bank  # noqa: E402


def before(rows: BankRows, indices, device, posterior_generator=None) -> dict[str, torch.Tensor]:
    """The previous ``BankDataset.batch``, verbatim: the reference for time and values."""
    latents = rows.latents[indices].float()
    if posterior_generator is not None:
        noise = torch.randn(latents.shape, generator=posterior_generator)
        latents = latents + rows.latent_std[indices].float() * noise
    return {
        "latents": to_device(latents, device).float(),
        "encoder_hidden_states": to_device(rows.encoder_hidden_states[indices], device).float(),
        **{k: to_device(v[indices], device) for k, v in rows.added.items()},
        "conditioning_pixel_values": hint_to_float(to_device(rows.hints[indices], device)),
    }


def call(fetch, rows: BankRows, idx, device, seed: int | None) -> dict[str, torch.Tensor]:
    """``fetch(rows, idx, device, generator)``, the posterior noise from a generator seeded ``seed`` (or none)."""
    return fetch(rows, idx, device, None if seed is None else torch.Generator().manual_seed(seed))


def host_ms(fn, calls: int, device: torch.device) -> float:
    """Median host milliseconds of ``fn()`` over ``calls`` calls (the GPU drained between calls, not timed)."""
    times = []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bank-size", type=int, default=256)
    p.add_argument("--rows", nargs="+", type=int, default=[6], help="bank rows per batch (6: 20%% of 32)")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, bank {args.bank_size}"
    )
    print("| hints | latents | rows | before ms | now ms | same values |")
    print("|---|---|---|---|---|---|")
    for hint in ("zero", "extracted"):
        rows = synthetic_bank(SyntheticCached(args.bank_size), zero_hints=hint == "zero")
        for mode in ("mean", "sample"):
            for n in args.rows:
                idx = torch.randint(args.bank_size, (n,), generator=torch.Generator().manual_seed(n))
                seed = 1 if mode == "sample" else None
                old_call = functools.partial(call, before, rows, idx, device, seed)
                new_call = functools.partial(call, BankRows.batch, rows, idx, device, seed)
                new_call()  # first use: the resident copy on CUDA, the allocators
                a, b = old_call(), new_call()
                same = all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
                old, new = host_ms(old_call, args.calls, device), host_ms(new_call, args.calls, device)
                print(f"| {hint} | {mode} | {n} | {old:.3f} | {new:.3f} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
