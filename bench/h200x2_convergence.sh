#!/usr/bin/env bash
# Convergence benchmark on a two-GPU machine (nvidia-h200-x2), one 10-minute command.
# GPU 0: depth, normal, canny (vanilla vs Diff-Tuning, seeds 0-2, 1,000 steps).
# GPU 1: segmentation, sketch, and the first ablations (psi-only, s=0; seeds 0-1).
# Each group has its own cache; a group still running after $BUDGET seconds is stopped (its
# runs checkpoint on SIGTERM and are summarised as partial). Results: $OUT/*.tgz, logs.
set -u
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-500}
W=/tmp/conv
mkdir -p $W
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
B="python3 scripts/bench_convergence.py --max_train_steps 1000 --convergence_every 50"
CUDA_VISIBLE_DEVICES=0 DIFFTUNE_CACHE=/tmp/c0 timeout $BUDGET $B --out $W/main0 --conditions depth normal canny --parallel 18 > $W/main0.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 DIFFTUNE_CACHE=/tmp/c1 timeout $BUDGET $B --out $W/main1 --conditions segmentation sketch --parallel 12 > $W/main1.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 DIFFTUNE_CACHE=/tmp/c2 timeout $BUDGET $B --out $W/abl1 --ablations --variants psi-only s=0 --seeds 0 1 --parallel 4 > $W/abl1.log 2>&1 &
wait
pkill -TERM -f "difftune_control.cli train" && sleep 20
for d in main0 main1; do python3 scripts/bench_convergence.py --out $W/$d --aggregate-only >> $W/$d.log 2>&1; done
python3 scripts/bench_convergence.py --out $W/abl1 --ablations --aggregate-only >> $W/abl1.log 2>&1
cd $W && tar czf $OUT/conv-runs.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pkl' --exclude='samples' . \
  && tar czf $OUT/conv-samples-depth-s0.tgz */runs/depth-*-s0/samples
ls -la $OUT; nvidia-smi --query-gpu=name,memory.used --format=csv
