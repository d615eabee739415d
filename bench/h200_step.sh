#!/usr/bin/env bash
# (The commit run: git's HEAD where the copy has one, else REVISION (`git rev-parse --short HEAD > REVISION`, carried).)
# The training step at SD1.5 scale on one H200 (device tool, repository root): OUT=... bash bench/h200_step.sh
# eager: vanilla vs the default Diff-Tuning, interleaved chunks (BATCHES, default "32 8 4"), PROFILE=--profile adds
#        a torch.profiler record of each; SPEEDS (default "default"): the settings, e.g. "default bf16-weights";
# compile: the same under COMPILE_SPEEDS (default "compile-graphs channels_last+compile": regional
#        torch.compile with CUDA graphs, and without them + channels_last) at
#        COMPILE_BATCHES (default "4 8"); compile-warm: the same again, a new process on the compiled-artefact
#        cache the first left (its warmup_s against compile's: the compile time a second or resumed run pays).
# ab: the vanilla step under AB_SPEEDS (default "default bf16-weights"), each in its own model, interleaved chunks:
#        the settings' ratio in one process (scripts/bench_step.py --ab). The SDPA backend check:
#        AB_SPEEDS="default sdpa-flash sdpa-efficient sdpa-cudnn" (torch's choice against each backend alone).
# PARTS selects (default "eager compile"); *_LIMIT: seconds per part.
# Needs .whl (diffusers). Results: $OUT/{eager,compile}/results.{md,json} (ab: results-ab.*), traces, operator tables.
set -u
OUT=${OUT:-/tmp/out}
PARTS=${PARTS:-eager compile}
source bench/device_env.sh 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown), $(date -u +%F)"
for part in $PARTS; do
  case $part in
    eager) timeout ${EAGER_LIMIT:-240} python3 scripts/bench_step.py --out $OUT/eager --batches ${BATCHES:-32 8 4} \
             --speed ${SPEEDS:-default} --repeats ${REPEATS:-5} --steps 10 ${PROFILE:-} ;;
    ab) timeout ${AB_LIMIT:-300} python3 scripts/bench_step.py --out $OUT/ab --batches ${BATCHES:-32 8 4} \
          --ab ${AB_SPEEDS:-default bf16-weights} --repeats ${REPEATS:-5} --steps 10 ;;
    compile|compile-warm) timeout ${COMPILE_LIMIT:-240} python3 scripts/bench_step.py --out $OUT/$part \
               --batches ${COMPILE_BATCHES:-4 8} --speed ${COMPILE_SPEEDS:-compile-graphs channels_last+compile} --repeats 3 --steps 10 ${PROFILE:-} ;;
  esac > $OUT/$part.log 2>&1
  echo "== $part: rc $?"; cat $OUT/$part/results*.md 2>/dev/null; grep -E "^failed" $OUT/$part.log | tail -3
done
