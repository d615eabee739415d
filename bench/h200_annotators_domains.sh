#!/usr/bin/env bash
# (The commit run: git's HEAD where the copy has one, else REVISION (`git rev-parse --short HEAD > REVISION`, carried).)
# Toy annotators that see every domain, so that the detector can measure generated images of a shifted domain
# (trained on default renders alone they fail on dusk and swapped: depth RMSE 0.11 / 0.18, normal 16 / 44 deg,
# segmentation mIoU 0.57 / 0.22; docs/toyworld/annotators.json). One H200 (device tool, repository root; carry
# .whl, REVISION):
#   OUT=... bash bench/h200_annotators_domains.sh
# Continues each shipped annotator (--annotator_init) for STEPS steps (default 12000, cosine from LR, default 3e-4;
# depth with EDGE, default 4, times the weight beside depth jumps, as shipped) on pools rendered in equal shares
# of DOMAINS (default: default,crowded,dusk,swapped), the three kinds in side-by-side processes, each stopped
# after BUDGET seconds (default 240). Then scripts/eval_toyworld.py scores the new set and the shipped set on
# every domain. Returns in $OUT: {depth,normal,segmentation}.safetensors, eval-{shipped,mixed}.json, the training
# logs. Install only if the default-domain scores stay within their targets (depth RMSE <= 0.01, normal <= 8
# deg, mIoU >= 0.9): cp FILES_AT/*.safetensors difftune_control/toyworld/weights/
# A CPU dry run: DEVICE=cpu NO_DEVICE_ENV=1 STEPS=2 BUDGET=5 POOL="--annotator_pool 64 --annotator_pool_128 8" \
#   EVAL_ARGS="--n 16 --domain_n 8" W=/tmp/ann-dom-dry OUT=/tmp/ann-dom-out bash bench/h200_annotators_domains.sh
set -u
OUT=${OUT:-/tmp/out}
W=${W:-/tmp/annotators-domains}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-12000}
LR=${LR:-3e-4}
EDGE=${EDGE:-4}
BUDGET=${BUDGET:-240}
DOMAINS=${DOMAINS:-default,crowded,dusk,swapped}
mkdir -p $OUT $W
[ -n "${NO_DEVICE_ENV:-}" ] || source bench/device_env.sh
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown), $(date -u +%F)"
t0=$(date +%s)
for kind in depth normal segmentation; do
  edge=1; [ $kind = depth ] && edge=$EDGE
  timeout $((BUDGET + 180)) python3 scripts/pretrain_toyworld.py --stage $kind --device $DEVICE --out_dir $W/train \
    --annotator_init difftune_control/toyworld/weights --annotator_steps $STEPS --annotator_lr $LR \
    --annotator_edge_weight $edge --annotator_domains $DOMAINS --time_budget $BUDGET --log_every 500 ${POOL:-} \
    > $W/$kind.log 2>&1 &
done
wait
echo "== trained after $(( $(date +%s) - t0 )) s"
shifted=$(echo $DOMAINS | tr ',' '\n' | grep -v '^default$' | tr '\n' ' ')
for set in shipped mixed; do
  dir=difftune_control/toyworld/weights; [ $set = mixed ] && dir=$W/train/annotators
  python3 scripts/eval_toyworld.py --device $DEVICE --annotators $dir --skip vae text latents --domains $shifted \
    ${EVAL_ARGS:-} --out $W/eval-$set.json > $W/eval-$set.log 2>&1
  echo "$set: $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['annotators'], r.get('annotators_by_domain'))" $W/eval-$set.json)"
  cp $W/eval-$set.json $OUT/
done
cp $W/train/annotators/*.safetensors $OUT/ && cp $W/train/logs/annotator_*.jsonl $OUT/
echo "== done after $(( $(date +%s) - t0 )) s"
