#!/usr/bin/env bash
# Continue training the toy world's base model on one H200, one chunk per device command (each
# ends within ~8 minutes), until its text-following targets are met (issue 16).
#
#   first call:  OUT=... bash bench/h200_pretrain_base.sh            (carry .whl)
#   next calls:  the same, after copying the previous call's $OUT files into .toybase/ here
#                (git ignores it): mkdir -p .toybase && cp FILES_AT/* .toybase/   (carry .whl .toybase)
#
# Each call: continues the run (the exact checkpoint when the machine is still warm from the last
# call, else the carried .toybase/base_ema.safetensors at its step, else the shipped weights at
# step 0), trains for TRAIN_BUDGET seconds, saves, evaluates the EMA weights with
# scripts/eval_toyworld.py (CFG 7.5: single-object right, two objects both present, left/right
# right; latent fidelity; domain gap), appends a row to progress.json (the score-vs-steps curve)
# and writes to $OUT: base_ema.safetensors (15 MB: the state to carry), progress.json, eval.json,
# samples.png, base.jsonl (training log). Install the final weights here with
#   python scripts/pretrain_toyworld.py --stage install_ema --resume_from .toybase/base_ema.safetensors
# Settings (environment): TOTAL steps of the cosine schedule, BATCH, LR, WARMUP, EMA decay,
# TRAIN_BUDGET seconds of training per call. Keep them the same over one run. EVAL=0 skips the evaluation
# (its ~2.5 minutes go to training: TRAIN_BUDGET=480); the chunk's progress row then has no scores. COMPILE=1 compiles the
# step (torch.compile: its compile time counts in TRAIN_BUDGET; compare steps_per_s in base.jsonl); COMPILE_MODE=reduce-overhead
# replays it as CUDA graphs. A dry run on a CPU
# (tiny sizes, no wheels; PY: a python with the package): DEVICE=cpu NO_DEVICE_ENV=1 W=/tmp/toybase-dry OUT=/tmp/out-dry \
#   TRAIN_BUDGET=5 TRAIN_ARGS="--base_pool 8 --base_batch 2" \
#   EVAL_ARGS="--steps 2 --single_repeats 1 --two 2 --latent_n 4 --domain_n 8" bash bench/h200_pretrain_base.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
TOTAL=${TOTAL:-16000}
BATCH=${BATCH:-1024}
LR=${LR:-4e-4}
WARMUP=${WARMUP:-200}
EMA=${EMA:-0.9995}
TRAIN_BUDGET=${TRAIN_BUDGET:-330}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
W=${W:-/tmp/toybase}
STATE=${STATE:-.toybase}
mkdir -p $W $OUT
[ -n "${NO_DEVICE_ENV:-}" ] || source bench/device_env.sh
t0=$(date +%s)

RESUME=() SOURCE=init
if [ -f $W/checkpoints/base.pt ]; then
  SOURCE=exact
elif [ -f $STATE/base_ema.safetensors ]; then
  SOURCE=portable RESUME=(--resume_from $STATE/base_ema.safetensors)
fi
[ -f $STATE/progress.json ] && [ ! -f $W/progress.json ] && cp $STATE/progress.json $W/progress.json
echo "== resume: $SOURCE"

timeout $((TRAIN_BUDGET + 150)) $PY scripts/pretrain_toyworld.py --stage base --out_dir $W \
  --init_from difftune_control/toyworld/weights/base --base_steps $TOTAL --base_batch $BATCH \
  --base_lr $LR --base_warmup $WARMUP --ema_decay $EMA --time_budget $TRAIN_BUDGET \
  --save_every 2000 --log_every 250 --device $DEVICE --base_compile ${COMPILE:-0} --base_compile_mode ${COMPILE_MODE:-default} ${TRAIN_ARGS:-} "${RESUME[@]}" > $W/train.log 2>&1
echo "== train: rc $? after $(( $(date +%s) - t0 )) s"; grep -v '"step"' $W/train.log | tail -n 5; tail -n 2 $W/logs/base.jsonl

rm -f $W/eval.json $W/samples.png  # a chunk's row holds its own scores or none
if [ "${EVAL:-1}" = 1 ]; then
  timeout ${EVAL_TIMEOUT:-150} $PY scripts/eval_toyworld.py --device $DEVICE --pipeline $W/pipeline --skip vae annotators \
    --guidance 7.5 --latent_n 256 --domains crowded dusk swapped --domain_n 512 ${EVAL_ARGS:-} \
    --out $W/eval.json --grid $W/samples.png > $W/eval.log 2>&1
  echo "== eval: rc $? after $(( $(date +%s) - t0 )) s"; tail -n 3 $W/eval.log
fi

$PY - "$W" "$SOURCE" "$BATCH" "$TOTAL" "$LR" "$EMA" "$t0" <<'EOF'
import json, sys, time
from pathlib import Path

w, source, batch, total, lr, ema, t0 = sys.argv[1:]
w = Path(w)
progress = json.loads((w / "progress.json").read_text()) if (w / "progress.json").exists() else {"chunks": []}
saved = [json.loads(x) for x in (w / "logs" / "base.jsonl").read_text().splitlines() if '"saved"' in x]
step = saved[-1]["step"] if saved else 0
prev = progress["chunks"][-1] if progress["chunks"] else {"step": 0, "samples_seen": 0}
ev = json.loads((w / "eval.json").read_text()) if (w / "eval.json").exists() else {}
tf = (ev.get("text_following") or [{}])[0]
lat = ev.get("latents", {})
row = {
    "chunk": len(progress["chunks"]) + 1, "resume": source, "step": step,
    "samples_seen": prev["samples_seen"] + (step - prev["step"]) * int(batch),
    "batch": int(batch), "total_steps": int(total), "lr": float(lr), "ema_decay": float(ema),
    "single_correct": tf.get("single_correct"), "two_both_present": tf.get("two_both_present"),
    "two_left_right": tf.get("two_left_right"),
    "std_ratio_reencoded_vs_renders": lat.get("reencoded_mean_vs_renders_mean", {}).get("std_ratio"),
    "loss_ratio_reencoded_vs_renders": lat.get("loss_ratio_reencoded_mean_vs_renders_mean"),
    "domain_frechet": {k: v["frechet_to_default"] for k, v in ev.get("domains", {}).items() if k != "n"},
    "seconds": round(time.time() - int(t0)),
}
progress["chunks"].append(row)
(w / "progress.json").write_text(json.dumps(progress, indent=2) + "\n")
print(json.dumps(row))
EOF
cp $W/base_ema.safetensors $W/progress.json $OUT/ 2>/dev/null
cp $W/eval.json $W/samples.png $OUT/ 2>/dev/null
cp $W/logs/base.jsonl $OUT/base.jsonl 2>/dev/null
echo "== done after $(( $(date +%s) - t0 )) s"; ls -la $OUT
