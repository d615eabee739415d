#!/usr/bin/env bash
# Throughput grid on one H200 in one command (device tool, from the repository root):
#   OUT=... bash bench/h200_throughput.sh
# diffusers' example at batch 32 side by side with our trainer at batch 32 under each speed setting
# (default, channels_last, torch.compile, both), then batch 8 without torch.compile, then batch 1
# with gradient checkpointing. Needs .whl (diffusers, datasets) and third_party/ carried.
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/diffusers-*.whl .whl/importlib_metadata-*.whl
python3 -m pip install -q --no-index --find-links .whl/ds datasets --break-system-packages
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
EX=third_party/diffusers_example/train_controlnet.py
timeout 420 python3 scripts/bench_throughput.py --out $OUT/thr32 --batches 32 --steps 30 --warmup 5 \
  --speed default channels_last compile channels_last+compile --skip checkpointing bank detector \
  --diffusers-example $EX --example-batches 32 --example-steps 40 > $OUT/thr32.log 2>&1
timeout 150 python3 scripts/bench_throughput.py --out $OUT/thr8 --batches 8 --steps 40 --warmup 5 \
  --speed default channels_last --skip bank detector > $OUT/thr8.log 2>&1
tail -25 $OUT/thr32.log $OUT/thr8.log
