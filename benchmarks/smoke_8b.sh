#!/usr/bin/env bash
# An 8B config end to end on one GPU with a randomly initialized Llama-3-8B-shaped backbone (no
# weights or network needed): build it, train 20 steps on the shipped data, export, evaluate 2
# prompts. Memory and speed are the real model's; losses and acceptance are not.
#   bash benchmarks/smoke_8b.sh                      # configs/llama3-8b-medusa1.yaml
#   bash benchmarks/smoke_8b.sh llama3-8b-medusa2-lora train.heads_only_steps=5
#   NPROC=2 TAG=zero EVAL=0 bash benchmarks/smoke_8b.sh llama3-8b-medusa1 train.shard_optimizer=true
# NPROC > 1 launches one process per GPU with torchrun; TAG names the run (/tmp/run8b<TAG>, logs under
# $OUT); EVAL=0 skips the evaluation.
set -uo pipefail
CONFIG=${1:-llama3-8b-medusa1}; shift || true
NPROC=${NPROC:-1}; TAG=${TAG:-}; RUN=/tmp/run8b$TAG
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -f /tmp/llama8b/config.json ] || python3 scripts/make_random_backbone.py /tmp/llama8b 2>&1 | grep -v Writing | tail -2
LAUNCH=(python3); [ "$NPROC" -gt 1 ] && LAUNCH=(torchrun --nproc_per_node "$NPROC")
timeout 420 "${LAUNCH[@]}" -m medusa_liger train "configs/$CONFIG.yaml" model.name_or_path=/tmp/llama8b \
  'data.paths=[medusa_liger/data/pydoc_chat.jsonl]' data.num_proc=4 train.steps=20 train.grad_accum=2 \
  checkpoint.every=0 logging.wandb=disabled logging.progress=false output_dir=$RUN "$@" 2>&1 \
  | grep -v "Loading weights" | tee "$OUT/train_8b$TAG.log" | tail -14
cp $RUN/metrics.jsonl "$OUT/metrics_8b$TAG.jsonl" 2>/dev/null
RUN=$RUN python3 - <<'PY'
import json, os
records = [json.loads(line) for line in open(os.environ["RUN"] + "/metrics.jsonl")]
for r in records[-3:]:
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if not k.startswith(("loss/", "acc/"))})
PY
if [ "${EVAL:-1}" != 0 ]; then
  timeout 240 python3 -m medusa_liger eval $RUN --num-prompts 2 --max-new-tokens 32 --tree-size 16 2>&1 | tail -4
  cp $RUN/eval/report.json "$OUT/eval_8b${TAG}_report.json" 2>/dev/null
fi
du -sh $RUN/final/* 2>/dev/null
