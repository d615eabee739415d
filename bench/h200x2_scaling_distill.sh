#!/usr/bin/env bash
# Two-GPU machine (nvidia-h200-x2), one command (device tool, from the repository root):
#   OUT=... bash bench/h200x2_scaling_distill.sh
# 1. retention sources trajectory (GPU 0) and snr (GPU 1) on depth, seeds 0-1, 800 steps, with
#    their retention score (bench_distill.py --parts retention); at most $DISTILL_BUDGET seconds;
# 2. SD1.5-scale scaling over 1 vs 2 processes through accelerate (bench_scaling.py --sd15):
#    training with a global batch of 32 and a bank of 512 images (two shards, one per process; the
#    2026-11-22 call used 64, one shard, so its bank scaling measured nothing); at most $SCALING_BUDGET s.
# PARTS (default "distill scaling") picks the parts, e.g. PARTS=scaling. Needs .whl (diffusers, datasets) carried.
set -u
OUT=${OUT:-/tmp/out}
DISTILL_BUDGET=${DISTILL_BUDGET:-230}
SCALING_BUDGET=${SCALING_BUDGET:-480}  # a 512-image bank is built three times (preparation, 1 and 2 processes)
source bench/device_env.sh
W=/tmp/x2
mkdir -p $W
PARTS=${PARTS:-distill scaling}
for v in trajectory:0 snr:1; do
  [[ " $PARTS " == *" distill "* ]] || break
  name=${v%%:*} gpu=${v##*:}
  CUDA_VISIBLE_DEVICES=$gpu DIFFTUNE_CACHE=/tmp/cache-$name OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    timeout $DISTILL_BUDGET python3 scripts/bench_distill.py --out $W/distill-$name --max_train_steps 800 \
    --convergence_every 50 --parts retention --variants $name --seeds 0 1 --parallel 2 > $W/distill-$name.log 2>&1 &
done
wait
bash bench/stop_runs.sh
[[ " $PARTS " == *" scaling "* ]] && timeout $SCALING_BUDGET python3 scripts/bench_scaling.py --out $W/scaling-sd15 --sd15 --mixed_precision bf16 \
  --global_batch 32 --steps 40 --bank_size 512 --window 5 > $W/scaling-sd15.log 2>&1
cd $W && tar czf $OUT/x2-runs.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pkl' --exclude='samples' \
  --exclude='cache-n*' .
tail -n 12 $W/distill-*.log; tail -n 15 $W/scaling-sd15.log
