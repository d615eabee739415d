#!/usr/bin/env bash
# Toy-world runs on one GPU in one command (device tool, from the repository root):
#   OUT=... BUDGET=300 bash bench/h200_toy_runs.sh
#   distill:   retention sources trajectory and snr on depth, seeds 0-1, with their retention score
#   ablations: mixture, s=2, r=0.4, lambda=0.3, bank=500, bank_hint=zero on depth, seed 0 (niced:
#              the distill group goes first when the CPU is short)
# Each group has its own cache; runs use one intra-op thread; a group still running after $BUDGET
# seconds is stopped (runs checkpoint on SIGTERM; the summaries mark them partial).
set -u
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-300}
W=/tmp/toy
mkdir -p $W
source bench/device_env.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
C="--max_train_steps 800 --convergence_every 50"
DIFFTUNE_CACHE=/tmp/cache-distill timeout $BUDGET python3 scripts/bench_distill.py --out $W/distill $C \
  --parts retention --variants trajectory snr --seeds 0 1 --parallel 4 > $W/distill.log 2>&1 &
DIFFTUNE_CACHE=/tmp/cache-ablations timeout $BUDGET nice -n 10 python3 scripts/bench_convergence.py --out $W/ablations $C \
  --ablations --variants mixture s=2 r=0.4 lambda=0.3 bank=500 bank_hint=zero --seeds 0 --parallel 6 > $W/ablations.log 2>&1 &
wait
bash bench/stop_runs.sh
python3 scripts/bench_convergence.py --out $W/ablations --ablations --aggregate-only >> $W/ablations.log 2>&1
cd $W && tar czf $OUT/toy-runs.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pkl' --exclude='samples' .
tail -n 30 $W/distill.log; tail -n 25 $W/ablations.log
