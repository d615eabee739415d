#!/usr/bin/env bash
# (The commit run: git's HEAD where the copy has one, else REVISION (`git rev-parse --short HEAD > REVISION`, carried).)
# SDXL at 1024 px, bf16, on one H200 (device tool, repository root): OUT=... bash bench/h200_sdxl.sh
# Our trainer (vanilla and the default Diff-Tuning, on synthetic rows shaped like the SDXL latent cache)
# beside diffusers' train_controlnet_sdxl.py (through scripts/example_unet_cast.py: as it is, it fails at
# its first bf16 step) on one random-initialised SDXL-architecture pipeline and 1024 px parquet data:
# images/s, peak memory, MFU at batch 4, then 1 (gradient checkpointing; ours with AdamW and
# Adafactor), then 8 (scripts/bench_sdxl.py).
# build: the model (on the GPU, saved as bf16 safetensors) and the data (on the CPU), side by side;
# bench: every setting, a new one begun only while BUDGET seconds (default 330) have not passed.
# asis (not run by default, ~1 minute): the example as it is at batch 1, to record its bf16 failure on the GPU.
# PARTS selects parts (default "build bench"); BATCHES the batches in run order (default "4 1 8"); B1_SPEEDS
# our optimizers at batch 1 (default "default adafactor adafactor+fused");
# BUILD_LIMIT, BENCH_LIMIT, ASIS_LIMIT: seconds per part.
# Needs .whl (diffusers, datasets), third_party/ (the example) and REVISION carried.
# Results: $OUT/bench/results.{md,json} and the example's logs; $OUT/<part>.log.
set -u
OUT=${OUT:-/tmp/out}
PARTS=${PARTS:-build bench}
mkdir -p $OUT
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown), $(date -u +%F)"
B="python3 scripts/bench_sdxl.py --model-dir /tmp/sdxl-random --data-dir /tmp/sdxl-parquet --batches ${BATCHES:-4 1 8}"
B="$B --batch1-speeds ${B1_SPEEDS:-default adafactor adafactor+fused}"
for part in $PARTS; do
  case $part in
    build) timeout ${BUILD_LIMIT:-150} $B --build-only data & data=$!
           timeout ${BUILD_LIMIT:-150} $B --build-only model; model=$?
           wait $data && [ $model -eq 0 ] ;;
    bench) timeout ${BENCH_LIMIT:-390} $B --out $OUT/bench --time-budget ${BUDGET:-330} \
             --diffusers-example third_party/diffusers_example/train_controlnet_sdxl.py ;;
    asis) timeout ${ASIS_LIMIT:-120} $B --out $OUT/asis --batches 1 --methods --example-steps 2 --example-as-is \
            --diffusers-example third_party/diffusers_example/train_controlnet_sdxl.py ;;
  esac > $OUT/$part.log 2>&1
  echo "== $part: rc $?"; cat $OUT/$part/results.md 2>/dev/null || tail -n 20 $OUT/$part.log
done
