#!/usr/bin/env bash
# Throughput on one H200 in one command (device tool, from the repository root):
#   OUT=... bash bench/h200_throughput.sh
# diffusers' example at batch 32 side by side with our trainer (vanilla and Diff-Tuning) at batch
# 32 and 8 under the speed settings $SPEED (default: the trainer's defaults), then batch 1 with
# gradient checkpointing unless SKIP includes it. Needs .whl (diffusers, datasets) and third_party/.
set -u
OUT=${OUT:-/tmp/out}
SPEED=${SPEED:-default}
SKIP=${SKIP:-bank detector}
LIMIT=${LIMIT:-540}
source bench/device_env.sh
timeout $LIMIT python3 scripts/bench_throughput.py --out $OUT/thr --batches 32 8 --steps 30 --warmup 5 \
  --speed $SPEED --skip $SKIP --diffusers-example third_party/diffusers_example/train_controlnet.py \
  --example-batches 32 --example-steps 40 > $OUT/thr.log 2>&1
cat $OUT/thr/results.md
