#!/usr/bin/env bash
# Convergence benchmarks on a two-GPU machine (nvidia-h200-x2) in one 10-minute command.
#   GPU 0: depth, normal, canny       vanilla vs Diff-Tuning (fixed), seeds 0-2
#   GPU 1: segmentation, sketch       vanilla vs Diff-Tuning (fixed), seeds 0-2
#          depth, retention sources   trajectory, snr (seeds 0-1; vanilla/renoise are GPU 0's runs)
#          depth, ablations           lambda=0, s=0.5 (seeds 0-1)
# Every group is its own process tree with its own cache; each run is a `difftune train`
# subprocess with one intra-op thread (36 runs share 32 cores). A group still running after
# $BUDGET seconds is stopped (runs checkpoint on SIGTERM; the summary marks them partial).
# Usage (device tool, from the repository root, .whl carried): OUT=... bash bench/h200x2_convergence.sh
set -u
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-480}
STEPS=${STEPS:-800}
W=/tmp/conv
mkdir -p $W
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
source bench/device_env.sh
C="--max_train_steps $STEPS --convergence_every 50"
group() {  # gpu name script args...
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu DIFFTUNE_CACHE=/tmp/cache-$name timeout $BUDGET python3 "$@" --out $W/$name $C > $W/$name.log 2>&1
}
for c in depth normal canny; do group 0 $c scripts/bench_convergence.py --conditions $c --parallel 6 & done
for c in segmentation sketch; do group 1 $c scripts/bench_convergence.py --conditions $c --parallel 6 & done
group 1 distill scripts/bench_distill.py --parts retention --variants trajectory snr --seeds 0 1 --parallel 4 &
group 1 ablations scripts/bench_convergence.py --ablations --variants lambda=0 s=0.5 --seeds 0 1 --parallel 4 &
wait
pkill -TERM -f "difftune_control.cli train" && sleep 20
for g in depth normal canny segmentation sketch; do python3 scripts/bench_convergence.py --out $W/$g --aggregate-only >> $W/$g.log 2>&1; done
python3 scripts/bench_convergence.py --out $W/ablations --ablations --aggregate-only >> $W/ablations.log 2>&1
cd $W && tar czf $OUT/conv-runs.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pkl' --exclude='samples' . \
  && tar czf $OUT/conv-samples-s0.tgz */runs/depth-*-s0/samples */runs/sketch-*-s0/samples
ls -la $OUT
