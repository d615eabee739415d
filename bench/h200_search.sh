#!/usr/bin/env bash
# (The commit run: git's HEAD where the copy has one, else REVISION (`git rev-parse --short HEAD > REVISION`, carried).)
# The method search on one GPU, one condition set per call (device tool, repository root):
#   OUT=... CONDS=depth bash bench/h200_search.sh
#   CONDS     conditions (default: depth); CANDS: candidates of scripts/bench_convergence.py
#   SEEDS     (default: 0 1 2); STEPS: optimizer steps (800); PAR: runs at once (15)
#   BUDGET    seconds for preparation + training (420); RET_BUDGET: seconds for retention scores (120)
#   W         work folder on the device (default /tmp/search): a call's archive holds every run in it, so
#             give each call its own (W=/tmp/search-seg) on a warm machine unless the runs belong together
#   EXTRA     extra `difftune train` flags for every run, e.g. EXTRA="--toy_domain crowded" (with W=/tmp/search-crowded
#             so the runs do not mix with default-domain ones on a warm machine)
# Every run is a toy-world `difftune train` with one intra-op thread; runs still going after BUDGET are
# stopped (they checkpoint on SIGTERM; their AUCC is reported as incomplete). Results: search.log,
# results.md, curves.png and the runs' metrics (search-runs.tgz, no weights) in $OUT.
set -u
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-420}
RET_BUDGET=${RET_BUDGET:-120}
CONDS=${CONDS:-depth}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-800}
PAR=${PAR:-15}
CANDS=${CANDS:-"vanilla published psi-only inverse-snr min-snr null null-drop null-l05 null-auto null-auto-isnr"}
W=${W:-/tmp/search}
source bench/device_env.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DIFFTUNE_CACHE=${DIFFTUNE_CACHE:-/tmp/cache-search}
ARGS="--out $W --conditions $CONDS --candidates $CANDS --seeds $SEEDS --max_train_steps $STEPS --convergence_every 50"
EXTRA=${EXTRA:-}
TAIL=""; [ -n "$EXTRA" ] && TAIL="-- $EXTRA"  # after every other flag: bench_convergence passes them on
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git_rev=$(git rev-parse --short HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown); echo "commit $git_rev, $(date -u +%F)"
timeout $BUDGET python3 scripts/bench_convergence.py $ARGS --parallel $PAR --no-retention $TAIL > $OUT/search.log 2>&1
bash bench/stop_runs.sh
# a failed run's log tail comes back (the logs themselves are mostly progress bars)
for n in $(grep -E ": rc=[1-9]" $OUT/search.log | cut -d: -f1); do
  tail -c 6000 $W/logs/$n.log | tr '\r' '\n' | grep -v "it/s\]$" | tail -n 60 > $OUT/failed-$n.log; done
# metrics, configs and retention scores only: checkpoint states and validation images are most of a run's
# bytes, and everything the device carries counts against one limit. Archived and tabled once before the
# retention scores and again after them, so a call cut short still brings the convergence results back.
archive() {
  (cd $W && tar czf $OUT/search-runs.tgz.part --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pkl' \
    --exclude='samples' --exclude='logs' --exclude='checkpoint-*' --exclude='validation' runs \
    $(ls -d retention 2>/dev/null)) && mv $OUT/search-runs.tgz.part $OUT/search-runs.tgz
  cp $W/results.md $W/results.json $W/curves.png $OUT/ 2>/dev/null || true
}
archive
timeout $RET_BUDGET python3 scripts/bench_convergence.py $ARGS --retention-only $TAIL >> $OUT/search.log 2>&1
python3 scripts/bench_convergence.py $ARGS --aggregate-only $TAIL >> $OUT/search.log 2>&1
archive
grep -E "rc=|all runs|prepared|retention " $OUT/search.log | tail -n 45
cat $W/results.md
