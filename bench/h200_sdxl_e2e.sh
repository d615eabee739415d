#!/usr/bin/env bash
# (The commit run: git's HEAD where the copy has one, else REVISION (`git rev-parse --short HEAD > REVISION`, carried).)
# SDXL end to end at full size on one GPU (device tool, repository root; carry .whl and REVISION):
#   OUT=... bash bench/h200_sdxl_e2e.sh
# A random-initialised SDXL-architecture pipeline (scripts/bench_sdxl.py's) and 16 rendered 1024 px images
# as a parquet dataset without hints (canny hints are extracted), then what a user runs: the default
# Diff-Tuning through `accelerate launch scripts/train_controlnet.py` at batch 1 with gradient checkpointing,
# Adafactor and the fused backward pass (the 16 GB setting), the detector on; `difftune report`;
# `difftune export --format webui` and `--format diffusers` (each reloaded and verified); then the same run
# resumed for a few more steps. The weights stay on the machine; the run's metrics, config, report and the
# export's key check come back.
# MODEL_DIR, DATA_DIR, RES (1024), STEPS (20), SDXL_BUILD (1: build the model when missing) for other sizes;
# EXTRA: more `train` flags (a tiny test model: EXTRA="--conditioning_embedding_out_channels 8 16"); LIMIT: seconds per training.
set -u
OUT=${OUT:-/tmp/out}
M=${MODEL_DIR:-/tmp/sdxl-random}
RES=${RES:-1024}
D=${DATA_DIR:-/tmp/sdxl-e2e-parquet-$RES}
STEPS=${STEPS:-20}
W=${W:-/tmp/sdxl-e2e}
mkdir -p $OUT $W
[ "${DEVICE_ENV:-1}" = 1 ] && source bench/device_env.sh
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown), $(date -u +%F)"
parts="data"; [ "${SDXL_BUILD:-1}" = 1 ] && parts="model data"
python3 scripts/bench_sdxl.py --model-dir $M --data-dir $D --resolution $RES --batches 1 --example-steps 15 \
  --build-only $parts 2>&1 | grep -v "it/s\]" | tail -n 3
python3 -c "import datasets, sys; datasets.load_dataset('parquet', data_files=sys.argv[1] + '/train.parquet', split='train')\
.remove_columns('conditioning_image').to_parquet(sys.argv[2])" $D $W/images.parquet  # no hints: canny extracts them
train() {
  timeout ${LIMIT:-400} accelerate launch --num_processes 1 scripts/train_controlnet.py \
    --pretrained_model_name_or_path $M --dataset_name $W/images.parquet \
    --condition canny --resolution $RES --train_batch_size 1 --gradient_checkpointing \
    --optimizer adafactor --fused_backward_pass --max_grad_norm 0 --mixed_precision bf16 \
    --bank_size 8 --bank_num_inference_steps 4 --convergence_every 10 --convergence_samples 2 \
    --num_validation_images 2 --validation_steps 10 --checkpointing_steps 10 \
    --output_dir $W/runs --run_name sdxl-e2e ${EXTRA:-} "$@"
}
t0=$(date +%s)
train --max_train_steps $STEPS > $OUT/train.log 2>&1; echo "train: rc $? in $(( $(date +%s) - t0 )) s"
R=$W/runs/sdxl-e2e
t0=$(date +%s)
train --max_train_steps $(( STEPS + 10 )) --resume_from_checkpoint latest > $OUT/resume.log 2>&1
echo "resume to step $(( STEPS + 10 )): rc $? in $(( $(date +%s) - t0 )) s"
python3 -m difftune_control.cli report $R > $OUT/report.log 2>&1; echo "report: rc $?"
python3 -m difftune_control.cli export $R --format webui --out $W/export > $OUT/export-webui.log 2>&1; echo "export webui: rc $?"
python3 -m difftune_control.cli export $R --format diffusers --out $W/export > $OUT/export-diffusers.log 2>&1; echo "export diffusers: rc $?"
python3 - "$W/export" "$OUT/export-check.json" <<'EOF'
import json, sys
from pathlib import Path
from safetensors import safe_open
files = sorted(Path(sys.argv[1]).glob("*.safetensors"))
out = {"files": [f.name for f in files]}
for f in files:
    with safe_open(str(f), framework="pt") as g:
        keys = list(g.keys())
        meta = g.metadata() or {}
        out[f.name] = {
            "tensors": len(keys),
            "dtypes": sorted({str(g.get_slice(k).get_dtype()) for k in keys}),
            "label_emb": [k for k in keys if "label_emb" in k][:4],
            "bytes": f.stat().st_size,
            "kind": json.loads(meta.get("training_config", "{}")).get("base_model", {}).get("kind"),
        }
print(json.dumps(out, indent=1))
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
EOF
grep -h "GPU memory" $R/report/report.md | tee $OUT/peaks.txt  # the report's peak per part of the run
grep -hE "sudden|converg|peak|GiB|lambda|error|Error" $OUT/train.log $OUT/resume.log | grep -v "it/s\]" | tail -n 20
tail -n 5 $OUT/report.log $OUT/export-webui.log $OUT/export-diffusers.log
(cd $R && tar czf $OUT/run.tgz --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*.pkl' .)
cp -r $R/report $OUT/ 2>/dev/null || true
