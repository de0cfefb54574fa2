#!/usr/bin/env bash
# Two GPUs: the distributed tests (NCCL) and a tiny FSDP run with and without train.fsdp_param_dtype=bfloat16.
#   OUT=/tmp/out bash benchmarks/fsdp_param_dtype_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD OMP_NUM_THREADS=2
status=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
nvidia-smi -L > "$OUT/env.txt"; git log --oneline | head -1 >> "$OUT/env.txt"
# (the GPU tests only: the file's CPU gloo tests outlast a call's time on these hosts)
timeout 280 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_distributed.py -k gpus --timeout=270 > "$OUT/dist.log" 2>&1 || status=1
tail -3 "$OUT/dist.log"
O="model.tiny.hidden_size=64 model.tiny.num_layers=2 model.tiny.num_attention_heads=4 model.tiny.num_key_value_heads=2 model.tiny.intermediate_size=128 model.tiny.vocab_size=400 data.seq_len=64 data.max_examples=40 data.eval_fraction=0.1 train.warmup_steps=2 train.lr=3e-3 train.heads_lr=3e-3 logging.wandb=disabled logging.progress=false train.device=cuda train.micro_batch_size=2 train.steps=6 checkpoint.every=3 export.formats=[medusa] train.heads_only_steps=1 train.fsdp=true"
for run in plain:train.fsdp=true mixed:train.fsdp_param_dtype=bfloat16; do
  name=${run%%:*}; opt=${run#*:}
  timeout 150 python3 -m torch.distributed.run --nproc_per_node 2 -m medusa_liger train configs/tiny.yaml $O output_dir=/tmp/fs_$name $opt > "$OUT/run_$name.log" 2>&1
  rc=$?; echo "$name rc=$rc"; [ $rc = 0 ] || status=1; grep -E "sharded|precision" "$OUT/run_$name.log" | head -3
done
python3 - <<'PY'
import json
rows = {n: [json.loads(l) for l in open(f"/tmp/fs_{n}/metrics.jsonl")] for n in ("plain", "mixed")}
for a, b in zip(rows["plain"], rows["mixed"]):
    print(a["step"], round(a["loss"], 4), round(b["loss"], 4), round(a["grad_norm"], 4), round(b["grad_norm"], 4))
PY
[ $? = 0 ] || status=1
exit $status
