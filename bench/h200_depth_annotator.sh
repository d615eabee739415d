#!/usr/bin/env bash
# (The commit run: git's HEAD where the copy has one, else REVISION (`git rev-parse --short HEAD > REVISION`, carried).)
# The toy depth annotator towards its target (RMSE <= 0.01 on normalised inverse depth; shipped: 0.0122, most of
# the error beside occlusion edges). One H200 (device tool, repository root; carry .whl, REVISION):
#   OUT=... bash bench/h200_depth_annotator.sh
# Continues the shipped depth annotator (--annotator_init) for STEPS steps (default 12000, cosine from LR, default
# 3e-4) in two processes side by side on the GPU: the plain loss and EDGE (default 4) times the weight on pixels
# beside a depth discontinuity (--annotator_edge_weight); each stops after BUDGET seconds (default 240). Then
# scripts/eval_toyworld.py scores both on the 512 held-out scenes (64 and 128 px) beside the shipped one.
# Returns in $OUT: depth-plain.safetensors, depth-edge.safetensors, eval-*.json, the training logs. Install the
# better one with: cp FILES_AT/depth-XXX.safetensors difftune_control/toyworld/weights/depth.safetensors
# A CPU dry run: DEVICE=cpu NO_DEVICE_ENV=1 STEPS=2 BUDGET=5 POOL="--annotator_pool 64 --annotator_pool_128 8" \
#   EVAL_ARGS="--n 16" W=/tmp/ann-dry OUT=/tmp/ann-out bash bench/h200_depth_annotator.sh
set -u
OUT=${OUT:-/tmp/out}
W=${W:-/tmp/depth-annotator}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-12000}
LR=${LR:-3e-4}
EDGE=${EDGE:-4}
BUDGET=${BUDGET:-240}
mkdir -p $OUT $W
[ -n "${NO_DEVICE_ENV:-}" ] || source bench/device_env.sh
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown), $(date -u +%F)"
t0=$(date +%s)
for name in plain edge; do
  weight=1; [ $name = edge ] && weight=$EDGE
  timeout $((BUDGET + 120)) python3 scripts/pretrain_toyworld.py --stage depth --device $DEVICE --out_dir $W/$name \
    --annotator_init difftune_control/toyworld/weights --annotator_steps $STEPS --annotator_lr $LR \
    --annotator_edge_weight $weight --time_budget $BUDGET --log_every 500 ${POOL:-} > $W/$name.log 2>&1 &
done
wait
echo "== trained after $(( $(date +%s) - t0 )) s"
for name in shipped plain edge; do
  dir=$W/eval-$name; mkdir -p $dir
  cp difftune_control/toyworld/weights/{depth,normal,segmentation}.safetensors $dir/
  [ $name != shipped ] && cp $W/$name/annotators/depth.safetensors $dir/depth.safetensors
  python3 scripts/eval_toyworld.py --device $DEVICE --annotators $dir --skip vae text latents ${EVAL_ARGS:-} \
    --out $W/eval-$name.json > $W/eval-$name.log 2>&1
  echo "$name: $(python3 -c "import json,sys; a=json.load(open(sys.argv[1]))['annotators']; print({k: v for k, v in a.items() if 'depth' in k})" $W/eval-$name.json)"
  [ $name != shipped ] && cp $W/$name/annotators/depth.safetensors $OUT/depth-$name.safetensors
  [ $name != shipped ] && cp $W/$name/logs/annotator_depth.jsonl $OUT/train-$name.jsonl
  cp $W/eval-$name.json $OUT/
done
grep -h "time_budget\|saved" $W/*/logs/annotator_depth.jsonl
echo "== done after $(( $(date +%s) - t0 )) s"
