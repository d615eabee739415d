#!/usr/bin/env bash
# Does a second `--torch_compile` run reuse the first one's compiled artefacts? (any machine; CPU by default)
#   bash bench/cpu_compile_cache.sh          # REPEATS (2), DIFFTUNE (the difftune command), C (a scratch cache root)
# Per repeat: an empty compile cache, a toy-world run of 3 steps with --torch_compile (cold), the same again
# (warm: the FX-graph and AOT-autograd caches under <cache root>/inductor), then, once, the same run eager.
# Wall time of each whole command (model loading included).
set -u
DIFFTUNE=${DIFFTUNE:-.venv/bin/difftune}
C=${C:-/tmp/compile-cache-bench}
mkdir -p $C
[ -d ~/.cache/difftune_control/toyworld ] && [ ! -d $C/toyworld ] && cp -r ~/.cache/difftune_control/toyworld $C/
ARGS="--condition depth --method vanilla --max_train_steps 3 --max_train_samples 64 --train_batch_size 8 --no-detect_convergence --output_dir $C/runs"
run() { local s=$(date +%s.%N); DIFFTUNE_CACHE=$C OMP_NUM_THREADS=2 $DIFFTUNE train $ARGS --run_name $1 "${@:2}" > $C/$1.log 2>&1
  local rc=$?; printf "%-8s %6.1f s (rc %d)\n" $1 $(echo "$(date +%s.%N) - $s" | bc) $rc; }
for rep in $(seq ${REPEATS:-2}); do
  rm -rf $C/inductor $C/runs
  run cold$rep --torch_compile
  run warm$rep --torch_compile
done
run eager
grep -h "artefacts cached in" $C/warm1.log | sed 's/.*cached in/compiled artefacts cached in/'
