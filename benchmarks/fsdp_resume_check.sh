#!/usr/bin/env bash
# Sharded checkpoints on GPUs (NCCL): the tiny config trained 20 steps with train.fsdp over NPROC ranks,
# then resumed from its step-10 checkpoint twice: sharded again (must log steps 11-20 as the straight
# run did) and replicated (the same files load without FSDP; equal up to bf16 rounding).
#   NPROC=2 bash benchmarks/fsdp_resume_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
NPROC=${NPROC:-2}; W=/tmp/fsdp_resume
rm -rf $W
run() { timeout 200 torchrun --nproc_per_node "$NPROC" -m medusa_liger train configs/tiny.yaml train.steps=20 \
  checkpoint.every=10 logging.wandb=disabled logging.progress=false 'export.formats=[medusa]' "$@" 2>&1 \
  | grep -E "^model, gradients|resumed from|Error" | head -5; }
run train.fsdp=true output_dir=$W/straight
run train.fsdp=true output_dir=$W/sharded train.resume=$W/straight/checkpoints/step-000010
run output_dir=$W/replicated train.resume=$W/straight/checkpoints/step-000010
python3 - "$W" <<'PY' | tee "$OUT/fsdp_resume_check.txt"
import json, sys
def losses(name):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(f"{sys.argv[1]}/{name}/metrics.jsonl"))]
straight, sharded, replicated = losses("straight"), losses("sharded"), losses("replicated")
print("straight steps 11-20:", [round(l, 5) for _, l in straight[10:]])
print("resumed sharded == straight:", sharded == straight[10:])
print("resumed replicated max rel diff:", max(abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(replicated, straight[10:])))
# The check must fail the script (gpu_session.sh's fsdp_resume stage reads only the exit status).
ok = len(straight) > 10 and sharded == straight[10:]
sys.exit(0 if ok else "FAILED: the sharded resume must log steps 11-20 exactly as the straight run did")
PY
