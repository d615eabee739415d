#!/usr/bin/env bash
# The training step at SD1.5 scale on one H200 (device tool, repository root): OUT=... bash bench/h200_step.sh
# 1. vanilla vs the default Diff-Tuning, interleaved chunks, at batch 32, 8 and 4, with a profile of each;
# 2. the same with regional torch.compile + channels_last (COMPILE_BATCHES, default "4 8").
# Needs .whl (diffusers). Results: $OUT/{eager,compile}/results.{md,json}, traces and operator tables.
set -u
OUT=${OUT:-/tmp/out}
source bench/device_env.sh 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "commit $(cat REVISION 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F)"
timeout ${EAGER_LIMIT:-240} python3 scripts/bench_step.py --out $OUT/eager --batches ${BATCHES:-32 8 4} \
  --repeats 5 --steps 10 --profile > $OUT/eager.log 2>&1
echo "== eager: rc $?"; cat $OUT/eager/results.md
timeout ${COMPILE_LIMIT:-240} python3 scripts/bench_step.py --out $OUT/compile --batches ${COMPILE_BATCHES:-4 8} \
  --speed channels_last+compile --repeats 3 --steps 10 --profile > $OUT/compile.log 2>&1
echo "== compile: rc $?"; cat $OUT/compile/results.md; grep -E "^failed" $OUT/*.log | tail -5
