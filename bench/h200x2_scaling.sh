#!/usr/bin/env bash
# Two-GPU machine (nvidia-h200-x2), one device call from the repository root, .whl carried (as for
# bench/h200x2_scaling_distill.sh):   OUT=... bash bench/h200x2_scaling.sh
# Training scaling over 1 vs 2 processes through accelerate at SD1.5 scale (bench_scaling.py --sd15:
# random weights, 512 px, bf16, canny, vanilla so that no bank is built; bank scaling, 2.06x, is
# BENCHMARKS section 5's), each two-process setting twice: DDP as accelerate builds it by default
# (variant ddp-defaults) and with the knobs (gradients as bucket views, the default now; bf16
# gradient compression; static graph):
#   1. one process at batch 32 (GPU 0) and at batch 8 (GPU 1), side by side;
#   2. fixed per-GPU batch 32: two processes x 32;
#   3. torch.profiler of 3 two-process steps at 32 per GPU, both variants (profile-b32/);
#   4. fixed per-GPU batch 8: two processes x 8;
#   5. fixed global batch 32: two processes x 16 (the one-process run of 2 is the reference).
# Every part has a time limit and the whole stays under BUDGET seconds (default 540); the results
# (results.md of every part, loss.png, profile tables, metrics, logs) come back in $OUT.
# CPU check of this script (two gloo processes, tiny model and data):
#   DRY_RUN="PIPELINE_DIR DATA_DIR" BIG=4 SMALL=2 PY=.venv/bin/python OUT=/tmp/o bash bench/h200x2_scaling.sh
set -u
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-540}
BIG=${BIG:-32}
SMALL=${SMALL:-8}
PY=${PY:-python3}
T0=$SECONDS
W=${W:-/tmp/x2s}
mkdir -p $W $OUT
if [[ -n ${DRY_RUN:-} ]]; then
  read -r PIPE DATA <<< "$DRY_RUN"
  B="$PY scripts/bench_scaling.py --cpu --mixed_precision no --method vanilla --skip_bank --window 5"
  TAIL=(-- --pretrained_model_name_or_path "$PIPE" --train_data_dir "$DATA" --resolution 16
    --conditioning_embedding_out_channels 8 16 --condition canny)
else
  source bench/device_env.sh
  B="$PY scripts/bench_scaling.py --sd15 --mixed_precision bf16 --method vanilla --skip_bank --window 5"
  TAIL=()
  # the model and the data once, before the side-by-side runs
  $PY -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; from bench_throughput import build_sd15, make_parquet; build_sd15(Path('/tmp/sd15-random')); make_parquet(Path('/tmp/bench-parquet'))" > $W/build.log 2>&1
fi
V=(--variant ddp-defaults=--no-ddp_gradient_as_bucket_view --variant "knobs=--ddp_comm_hook bf16 --ddp_static_graph")
echo "model and data at $((SECONDS - T0))s" >> $W/parts.log

left() { echo $((BUDGET - 25 - (SECONDS - T0))); }  # 25 s kept for packing the results
limit() { local l; l=$(left); ((l < $1)) && echo "$l" || echo "$1"; }
settle() {  # a part cut short: its training processes checkpoint on SIGTERM; let them finish first
  for _ in $(seq 30); do pgrep -f "scripts/(train_controlnet|profile_training).py" > /dev/null || return 0; sleep 1; done
}
part() {  # part NAME LIMIT CACHE ARGS...: one bench_scaling call, skipped when the budget is spent
  local name=$1 lim cache=$3
  lim=$(limit "$2")
  shift 3
  if ((lim < 30)); then echo "$name: skipped (budget spent)" >> $W/parts.log; return; fi
  echo "$name: ${lim}s limit, start at $((SECONDS - T0))s" >> $W/parts.log
  DIFFTUNE_CACHE=$cache timeout "$lim" $B "$@" "${TAIL[@]}" > $W/$name.log 2>&1
  echo "$name: rc=$? at $((SECONDS - T0))s" >> $W/parts.log
  settle
}

L1=$(limit 150)
CUDA_VISIBLE_DEVICES=0 DIFFTUNE_CACHE=$W/cache-a timeout $L1 $B --out $W/b32 --per_gpu_batch $BIG --steps 20 \
  --processes 1 "${TAIL[@]}" > $W/b32-n1.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 DIFFTUNE_CACHE=$W/cache-b timeout $L1 $B --out $W/b8 --per_gpu_batch $SMALL --steps 30 \
  --processes 1 "${TAIL[@]}" > $W/b8-n1.log 2>&1 &
wait
settle
echo "one-process runs done at $((SECONDS - T0))s" >> $W/parts.log
part b32 150 $W/cache-a --out $W/b32 --per_gpu_batch $BIG --steps 20 --reuse "${V[@]}"
part profile-b32 120 $W/cache-a --out $W/profile-b32 --per_gpu_batch $BIG --skip_train --profile 3 \
  --profile_skip 6 "${V[@]}"
part b8 120 $W/cache-b --out $W/b8 --per_gpu_batch $SMALL --steps 30 --reuse "${V[@]}"
mkdir -p $W/g32/runs && cp -r $W/b32/runs/train-n1 $W/g32/runs/ 2> /dev/null
part g32 130 $W/cache-a --out $W/g32 --global_batch $BIG --steps 20 --reuse "${V[@]}"

for d in b32 profile-b32 b8 g32; do
  [[ -f $W/$d/results.md ]] && { echo "## $d"; cat $W/$d/results.md; echo; } >> $OUT/results.md
done
cd $W && tar czf $OUT/x2-scaling.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pkl' \
  --exclude='trace-rank*.json' --exclude='samples' .
tar czf $OUT/x2-traces.tgz profile-b32/profile-*/trace-rank*.json 2> /dev/null
# at most 16 MiB a file comes back: rank 0's traces alone when both ranks' are too large
(($(stat -c %s $OUT/x2-traces.tgz 2> /dev/null || echo 0) > 16000000)) \
  && tar czf $OUT/x2-traces.tgz profile-b32/profile-*/trace-rank0.json
cat $W/parts.log
cat $OUT/results.md 2> /dev/null
