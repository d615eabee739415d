#!/usr/bin/env bash
# (The commit run: git's HEAD where the copy has one, else REVISION (`git rev-parse --short HEAD > REVISION`, carried).)
# End to end at full size on one GPU (device tool, repository root; carry .whl and REVISION):
#   OUT=... bash bench/h200_e2e.sh                  # KIND=sdxl (bench/h200_sdxl_e2e.sh)
#   KIND=sd15 OUT=... bash bench/h200_e2e.sh
# A random-initialised pipeline of the KIND's architecture (SDXL: scripts/bench_sdxl.py's; SD1.5:
# scripts/bench_throughput.py's) and rendered toy scenes as a parquet dataset without hints (canny hints are
# extracted), then what a user runs: the default Diff-Tuning through `accelerate launch
# scripts/train_controlnet.py`, the detector on; `difftune report`; `difftune export --format webui` and
# `--format diffusers` (each reloaded and verified); then the same run resumed for 10 more steps. The weights
# stay on the machine; the run's metrics, config, report and the export's key check come back.
# - sdxl: 1024 px, batch 1 with gradient checkpointing, Adafactor and the fused backward pass (the 16 GB
#   setting), the detector every 10 steps with 2 samples; STEPS 20.
# - sd15: 512 px, batch BATCH (8), the detector and validation at their SD defaults (every 500 steps, K = 8,
#   10 DDIM steps: the report's "in evaluations" share is the detector's cost inside the trainer), a bank of
#   64 images (its cost is measured by scripts/bench_bank.py); STEPS 500. TRAIN_FLAGS adds flags, e.g.
#   TRAIN_FLAGS="--torch_compile --torch_compile_mode reduce-overhead" STEPS=100 W=/tmp/e2e-compiled.
# TRAIN_ONLY=1 stops after the first training (its torch.compile and speed lines printed), e.g. what
#   `--torch_compile auto` decides on this machine: KIND=sd15 STEPS=30000 LIMIT=200 TRAIN_ONLY=1
#   TRAIN_FLAGS="--torch_compile auto" (the run is stopped by LIMIT; the decision comes before the first step).
# MODEL_DIR, DATA_DIR, RES, STEPS, BUILD (1: build the model when missing), W (work folder), RUN (the run's name);
# EXTRA: more `train` flags (a tiny test model: EXTRA="--conditioning_embedding_out_channels 8 16"); LIMIT:
# seconds per training.
set -u
OUT=${OUT:-/tmp/out}
KIND=${KIND:-sdxl}
case $KIND in
  sdxl) M=${MODEL_DIR:-/tmp/sdxl-random}; RES=${RES:-1024}; STEPS=${STEPS:-20}; W=${W:-/tmp/sdxl-e2e}
        FLAGS="--train_batch_size 1 --gradient_checkpointing --optimizer adafactor --fused_backward_pass
          --max_grad_norm 0 --bank_size 8 --bank_num_inference_steps 4 --convergence_every 10
          --convergence_samples 2 --num_validation_images 2 --validation_steps 10 --checkpointing_steps 10" ;;
  sd15) M=${MODEL_DIR:-/tmp/sd15-random}; RES=${RES:-512}; STEPS=${STEPS:-500}; W=${W:-/tmp/sd15-e2e}
        FLAGS="--train_batch_size ${BATCH:-8} --bank_size 64 --checkpointing_steps $(( STEPS / 2 ))" ;;
  *) echo "KIND must be sdxl or sd15, got $KIND"; exit 2 ;;
esac
D=${DATA_DIR:-/tmp/$KIND-e2e-parquet-$RES}
RUN=${RUN:-$KIND-e2e}  # the run folder's name (and the export's: a toy model refuses names that say sd15)
mkdir -p $OUT $W
[ "${DEVICE_ENV:-1}" = 1 ] && source bench/device_env.sh
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown), $(date -u +%F)"
BUILD=${BUILD:-${SDXL_BUILD:-1}}
if [ $KIND = sdxl ]; then
  parts="data"; [ "$BUILD" = 1 ] && parts="model data"
  python3 scripts/bench_sdxl.py --model-dir $M --data-dir $D --resolution $RES --batches 1 --example-steps 15 \
    --build-only $parts 2>&1 | grep -v "it/s\]" | tail -n 3
else
  python3 -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; import bench_throughput as b; \
b.build_sd15(Path(sys.argv[1])) if sys.argv[4] == '1' else None; b.make_parquet(Path(sys.argv[2]), 256, int(sys.argv[3]))" \
    $M $D $RES $BUILD
fi
python3 -c "import datasets, sys; datasets.load_dataset('parquet', data_files=sys.argv[1] + '/train.parquet', split='train')\
.remove_columns('conditioning_image').to_parquet(sys.argv[2])" $D $W/images.parquet  # no hints: canny extracts them
train() {
  timeout ${LIMIT:-400} accelerate launch --num_processes 1 scripts/train_controlnet.py \
    --pretrained_model_name_or_path $M --dataset_name $W/images.parquet \
    --condition canny --resolution $RES --mixed_precision bf16 $FLAGS ${TRAIN_FLAGS:-} \
    --output_dir $W/runs --run_name $RUN ${EXTRA:-} "$@"
}
t0=$(date +%s)
train --max_train_steps $STEPS > $OUT/train.log 2>&1; echo "train: rc $? in $(( $(date +%s) - t0 )) s"
if [ "${TRAIN_ONLY:-0}" = 1 ]; then
  grep -hE "torch.compile|torch_compile|setup:" $OUT/train.log
  tail -c 600 $OUT/train.log; echo; exit 0
fi
R=$W/runs/$RUN
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
