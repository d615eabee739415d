#!/usr/bin/env bash
# Throughput on one H200 in one command (device tool, from the repository root):
#   OUT=... bash bench/h200_throughput.sh
# diffusers' example at batch 32 side by side with our trainer at batch 32 (default and
# channels_last), then batch 8 and batch 1 with gradient checkpointing.
# Needs .whl (diffusers, datasets) and third_party/ carried. SPEED32 overrides the batch-32 settings.
set -u
OUT=${OUT:-/tmp/out}
SPEED32=${SPEED32:-default channels_last}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/diffusers-*.whl .whl/importlib_metadata-*.whl
python3 -m pip install -q --no-index --find-links .whl/ds datasets --break-system-packages
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
EX=third_party/diffusers_example/train_controlnet.py
timeout 330 python3 scripts/bench_throughput.py --out $OUT/thr32 --batches 32 --steps 30 --warmup 5 \
  --speed $SPEED32 --skip checkpointing bank detector \
  --diffusers-example $EX --example-batches 32 --example-steps 40 > $OUT/thr32.log 2>&1
timeout 150 python3 scripts/bench_throughput.py --out $OUT/thr8 --batches 8 --steps 40 --warmup 5 \
  --skip bank detector > $OUT/thr8.log 2>&1
cat $OUT/thr32/results.md $OUT/thr8/results.md
