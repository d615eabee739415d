#!/usr/bin/env python
"""Behaviour check for refactors: seeded toy-world runs must not change, bit for bit.

Trains 30 steps on CPU with ``--method vanilla`` and with the default ``--method difftuning``
(tiny settings), then compares each run's ``metrics.jsonl`` loss column and a SHA-256 of the
final ControlNet weights against a reference file.

    python scripts/check_refactor.py --record   # write the reference (on the code before a change)
    python scripts/check_refactor.py            # compare against it; exit 1 on any difference

Exact equality holds only on the same machine and library versions (seeded CPU runs); a
reference recorded elsewhere may differ without any change to the code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "scripts" / "check_refactor_reference.json"
METHODS = ("vanilla", "difftuning")
FLAGS = [
    "--device", "cpu",
    "--seed", "0",
    "--max_train_steps", "30",
    "--max_train_samples", "256",
    "--bank_size", "64",
    "--train_batch_size", "8",
    "--convergence_every", "10",
    "--checkpointing_steps", "1000",
    "--logging_steps", "1",
]  # fmt: skip


def run_method(method: str, out: Path, cache: str) -> dict:
    """Train one seeded run in a child process; return its loss column and weights hash."""
    env = dict(os.environ, DIFFTUNE_CACHE=cache, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "difftune_control.cli",
        "train",
        "--method",
        method,
        "--output_dir",
        str(out),
    ]
    proc = subprocess.run(cmd + FLAGS, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{method}: training failed (exit {proc.returncode})")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    losses = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses.append([row.get("step"), row["loss"]])
    digest = hashlib.sha256()
    for f in sorted((run_dir / "controlnet").glob("*.safetensors")):
        digest.update(f.read_bytes())
    return {"losses": losses, "controlnet_sha256": digest.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="Write the reference instead of comparing.")
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="Reference file.")
    parser.add_argument(
        "--cache", default=os.environ.get("DIFFTUNE_CACHE", "/tmp/check-refactor-cache"), help="Cache folder."
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run_method(m, Path(tmp) / m, args.cache) for m in METHODS}
    if args.record:
        args.reference.write_text(json.dumps(results, indent=1) + "\n")
        print(f"recorded {args.reference}")
        return 0

    reference = json.loads(args.reference.read_text())
    ok = True
    for method, got in results.items():
        want = reference[method]
        same_loss = got["losses"] == want["losses"]
        same_weights = got["controlnet_sha256"] == want["controlnet_sha256"]
        print(
            f"{method}: {len(got['losses'])} losses {'identical' if same_loss else 'DIFFER'}, "
            f"weights {'identical' if same_weights else 'DIFFER'}"
        )
        ok &= same_loss and same_weights
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
