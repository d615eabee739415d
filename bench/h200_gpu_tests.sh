#!/usr/bin/env bash
# The GPU-marked tests on the device machine (device tool, repository root; carry .whl):
#   OUT=... bash bench/h200_gpu_tests.sh            # about 1-2 minutes after the install
# The image has torch, transformers, accelerate, pytest; diffusers comes from .whl. controlnet-aux is not in
# the image, so the extractor-model test is left out (it runs wherever `make install` ran).
set -u
OUT=${OUT:-/tmp/out}
source bench/device_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown), $(date -u +%F)"
timeout ${LIMIT:-400} python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
  --deselect tests/test_extractors_models.py::test_model_backend_runs_batched_on_the_gpu_and_agrees_with_the_cpu \
  tests/ 2>&1 | tee $OUT/gpu-tests.log | tail -n 30
