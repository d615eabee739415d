#!/usr/bin/env bash
# (The commit run: git's HEAD where the copy has one, else REVISION (`git rev-parse --short HEAD > REVISION`, carried).)
# Does compiling pay for the toy world's runs on one GPU? (device tool, repository root; carry .whl, REVISION)
#   OUT=... bash bench/h200_toy_compile.sh
# The toy world's training step is likely bound by the host's kernel dispatch (BENCHMARKS.md section 6: 71 ms a
# step at batch 64 for a 7 M-parameter UNet and its ControlNet at 16x16 latents), so CUDA graphs may speed the
# benchmark grids' runs several times. One toy run (CONDITION, default depth; the default Diff-Tuning; STEPS, default 300;
# batch 64) eager, then with --torch_compile --torch_compile_mode MODE (default reduce-overhead) on an empty
# compile cache, then again on the cache it left; REPEATS (default 1) rounds. Per run: wall time of the
# command, the logged images/s (median of the train records after the first 50 steps), the mean
# loss_target of the last 50 steps and the final p. Prints a table; the runs' metrics come back in
# toy-compile.tgz. EXTRA: more `train` flags for every run (a CPU dry run: DEVICE_ENV=0 STEPS=4 MODE=default
# EXTRA="--bank_size 16 --bank_num_inference_steps 2 --convergence_every 2 --convergence_samples 2").
set -u
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-300}
MODE=${MODE:-reduce-overhead}
CONDITION=${CONDITION:-depth}
W=${W:-/tmp/toy-compile}
mkdir -p $OUT $W
[ "${DEVICE_ENV:-1}" = 1 ] && source bench/device_env.sh
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat REVISION 2>/dev/null || echo unknown), $(date -u +%F)"
export DIFFTUNE_CACHE=$W/cache TORCHINDUCTOR_CACHE_DIR=$W/inductor
run() {  # name, flags...
  local name=$1; shift
  local t0=$(date +%s.%N)
  timeout ${LIMIT:-400} python3 -m difftune_control.cli train --condition $CONDITION --max_train_steps $STEPS \
    --train_batch_size 64 --output_dir $W/runs --run_name $name --logging_steps 10 ${EXTRA:-} "$@" > $W/$name.log 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(python3 -c "import time,sys; print(round(time.time()-float(sys.argv[1]),1))" $t0)" \
    | tee -a $W/times.txt
}
run warmup --max_train_steps 10  # the latent cache and the bank: built once, shared by every run below
for rep in $(seq 1 ${REPEATS:-1}); do
  rm -rf $W/inductor
  run eager$rep
  run cold$rep --torch_compile --torch_compile_mode $MODE
  run warm$rep --torch_compile --torch_compile_mode $MODE
done
python3 - $W <<'EOF'
import json, re, statistics, sys
from pathlib import Path
w = Path(sys.argv[1])
times = dict(re.match(r"(\S+) rc=\S+ seconds=(\S+)", l).groups() for l in (w / "times.txt").read_text().splitlines())
print("| run | command s | images/s (median after step 50) | loss_target, last 50 steps | final p |")
print("|---|---|---|---|---|")
for name, seconds in times.items():
    if name == "warmup":
        continue
    path = w / "runs" / name / "metrics.jsonl"
    recs = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    train = [r for r in recs if r.get("type") == "train"]
    rate = [r["images_per_s"] for r in train if r["step"] > 50]
    loss = [r["loss_target"] for r in train if r["step"] > train[-1]["step"] - 50] if train else []
    evals = [r for r in recs if r.get("type") == "convergence_eval"]
    cell = lambda xs, f: f.format(statistics.median(xs)) if xs else "-"  # noqa: E731
    p = f"{evals[-1]['p']:.2f}" if evals and evals[-1].get("p") is not None else "-"
    loss_text = f"{statistics.fmean(loss):.4f}" if loss else "-"
    print(f"| {name} | {seconds} | {cell(rate, '{:.0f}')} | {loss_text} | {p} |")
EOF
grep -h "torch.compile\|torch_compile" $W/cold1.log $W/warm1.log 2>/dev/null | cut -c1-300 | head -4
(cd $W && tar czf $OUT/toy-compile.tgz --exclude='*.safetensors' --exclude='samples' runs times.txt *.log)
