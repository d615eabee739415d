#!/usr/bin/env bash
# The GPU-marked tests on one GPU (device tool, repository root; carry .whl):
#   OUT=... bash bench/h200_gpu_tests.sh
# Runs `pytest -m gpu` over the whole suite; test files whose imports the machine lacks (e.g. controlnet-aux)
# are reported as collection errors and the rest still run. The report comes back as $OUT/gpu-tests.log.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "commit $(cat REVISION 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F)"
timeout ${LIMIT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
  -o addopts="" tests > $OUT/gpu-tests.log 2>&1
echo "pytest: rc $?"
grep -E "passed|failed|error" $OUT/gpu-tests.log | tail -n 5
