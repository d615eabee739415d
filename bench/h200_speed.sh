#!/usr/bin/env bash
# One H200, one command (device tool, from the repository root): OUT=... bash bench/h200_speed.sh
# 1. diffusers' example at batch 32 beside our trainer at batch 32 and 8 (default settings, and the
#    frozen UNet under autocast as an A/B); 2. batch 1 with gradient checkpointing: AdamW, AdamW with
#    --fused_backward_pass, Adafactor (peak memory; MEMORY_SPEEDS); 3. regional torch.compile at batch 32 with a long warm-up.
# PARTS selects parts (default "main memory compile"); each part has its own time limit;
# MAIN_SPEED (default "default unet_autocast") and COMPILE_SPEED (default compile) are the
# --speed settings of parts 1 and 3, e.g. COMPILE_SPEED=channels_last+compile; COMPILE_BATCHES (default 32) and
# COMPILE_METHODS (default "vanilla difftuning") those of part 3, e.g. COMPILE_SPEED=compile-graphs COMPILE_BATCHES=4
# (our trainer, its data loading and lambda's measurement included, under CUDA graphs).
# table (not in the default PARTS): issue 21's side-by-side table, the example and ours (vanilla, Diff-Tuning)
# at TABLE_BATCHES (default "32 8 4 1"): images/s as the median and range of 3 chunks (ours: 3 x 10 timed
# steps; the example: its progress bar's rate at steps 10, 20 and 30), peak memory, MFU; then Diff-Tuning's
# overhead from vanilla and Diff-Tuning chunks interleaved in one process (scripts/bench_step.py, in table/interleaved;
# INTERLEAVED=0 skips it). TABLE_SPEED (default "default") and TABLE_METHODS select our settings and methods.
# bank (not in the default PARTS): memory-bank generation (scripts/bench_bank.py) at BANK_BATCHES (default
# "16 64"; 16 is the SD default --bank_batch_size) under BANK_SETTINGS (default "eager channels_last
# channels_last+compile"), 2 timed batches each after a warm-up batch: images/s, MFU, peak memory, warm-up
# (compile) time; ~5 min.
# Needs .whl (diffusers, datasets) and third_party/ (the example's parts).
set -u
OUT=${OUT:-/tmp/out}
PARTS=${PARTS:-main memory compile}
source bench/device_env.sh
B="python3 scripts/bench_throughput.py --skip checkpointing bank detector"
for part in $PARTS; do
  case $part in
    main) timeout ${MAIN_LIMIT:-300} $B --out $OUT/main --batches 32 8 --steps 10 --repeats 3 --warmup 5 \
            --speed ${MAIN_SPEED:-default unet_autocast} --example-batches 32 --example-steps 40 \
            --diffusers-example third_party/diffusers_example/train_controlnet.py ;;
    memory) for s in ${MEMORY_SPEEDS:-default fused adafactor}; do  # each setting in a fresh process: a clean peak
              timeout ${MEMORY_LIMIT:-120} $B --out $OUT/memory/$s --batches 1 --methods difftuning \
                --speed $s --grid-checkpointing --steps 20 --repeats 1 --warmup 3
            done ;;
    compile) timeout ${COMPILE_LIMIT:-300} $B --out $OUT/compile --batches ${COMPILE_BATCHES:-32} --methods ${COMPILE_METHODS:-vanilla difftuning} \
               --speed ${COMPILE_SPEED:-compile} --steps 10 --repeats 3 --warmup 5 ;;
    table) timeout ${TABLE_LIMIT:-560} $B --out $OUT/table --batches ${TABLE_BATCHES:-32 8 4 1} \
             --example-batches ${TABLE_BATCHES:-32 8 4 1} --steps 10 --repeats 3 --warmup 5 --speed ${TABLE_SPEED:-default} \
             --methods ${TABLE_METHODS:-vanilla difftuning} \
             --example-steps 30 --diffusers-example third_party/diffusers_example/train_controlnet.py
           # Diff-Tuning's overhead as issue 21 defines it: vanilla and Diff-Tuning chunks interleaved in one process
           [ "${INTERLEAVED:-1}" = 1 ] && timeout ${INTERLEAVED_LIMIT:-240} python3 scripts/bench_step.py --out $OUT/table/interleaved \
             --batches ${TABLE_BATCHES:-32 8 4 1} --repeats 3 --steps 10 ;;
    bank) timeout ${BANK_LIMIT:-480} python3 scripts/bench_bank.py --out $OUT/bank --batches ${BANK_BATCHES:-16 64} \
            --settings ${BANK_SETTINGS:-eager channels_last channels_last+compile} --repeats 2 ;;
  esac > $OUT/$part.log 2>&1
  echo "== $part: rc $?"; tail -n 12 $OUT/$part/results.md $OUT/$part/*/results.md 2>/dev/null || tail -n 20 $OUT/$part.log
done
