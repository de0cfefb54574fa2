#!/usr/bin/env bash
# One GPU session on the device machine: GPU tests and/or benchmarks, logs and tables under $OUT.
#   bash benchmarks/gpu_session.sh tests kernels medusa_loss patching
# Baseline wheels (liger-kernel, cut-cross-entropy) travel in .whl/ (git-ignored, carried).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
status=0
for stage in "$@"; do
  case "$stage" in
    tests)       timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -q -rfEs -p no:cacheprovider tests --timeout=300 -x --maxfail=30 2>&1 | tee "$OUT/pytest.log" | tail -60 || status=1 ;;
    kernel_tests) timeout 300 python3 -m pytest -q -rfEs -p no:cacheprovider tests/test_cross_entropy.py tests/test_chunking.py tests/test_scale.py tests/test_fused_linear_cross_entropy*.py tests/test_self_distillation.py --timeout=200 2>&1 | tee "$OUT/pytest_kernels.log" | tail -15 || status=1 ;;
    train_tests) timeout 420 python3 -m pytest -q -rfEs -p no:cacheprovider tests/test_train*.py tests/test_end_to_end.py tests/test_data.py tests/test_evaluate.py tests/test_distributed.py tests/test_heads.py tests/test_export.py --timeout=300 2>&1 | tee "$OUT/pytest_train.log" | tail -15 || status=1 ;;
    fsdp_resume) NPROC=$(nvidia-smi -L | wc -l) bash benchmarks/fsdp_resume_check.sh || status=1 ;;
    kernels)     timeout 300 python3 benchmarks/kernels.py 2>&1 | tee "$OUT/bench_kernels.log" | tail -40 || status=1 ;;
    medusa_loss) timeout 570 python3 benchmarks/medusa_loss.py 2>&1 | tee "$OUT/bench_medusa_loss.log" | tail -40 || status=1 ;;
    patching)    timeout 300 python3 benchmarks/patching.py 2>&1 | tee "$OUT/bench_patching.log" | tail -40 || status=1 ;;
    loss_options) timeout 400 python3 benchmarks/loss_options_path.py 2>&1 | tee "$OUT/bench_loss_options.log" | tail -20 || status=1 ;;
    self_distill) timeout 300 python3 benchmarks/self_distill_loss.py 2>&1 | tee "$OUT/bench_self_distill.log" | tail -20 || status=1 ;;
    profile)     timeout 300 python3 benchmarks/profile_medusa_loss.py 2>&1 | tee "$OUT/bench_profile.log" | tail -30 || status=1 ;;
    trace)       for s in a b; do timeout 200 python3 benchmarks/trace_medusa_loss.py --setting $s 2>&1 | tail -60 || status=1; done ;;
    tiles)       timeout 400 python3 benchmarks/exp_operand_tiles.py --rounds 21 2>&1 | tee "$OUT/bench_tiles.log" | tail -20 || status=1 ;;
    gemm_split)  timeout 420 python3 benchmarks/gemm_split_sweep.py 2>&1 | tee "$OUT/bench_gemm_split.log" | tail -40 || status=1 ;;
    chunk_sweep) timeout 420 python3 benchmarks/chunk_sweep.py 2>&1 | tee "$OUT/bench_chunk_sweep.log" | tail -40 || status=1 ;;
    tune_row)    timeout 420 python3 benchmarks/tune_row_kernel.py 2>&1 | tee "$OUT/bench_tune_row.log" | tail -70 || status=1 ;;
    distill_8b)  # self-distillation throughput with a random Llama-3-8B-shaped backbone (bf16, greedy, HF generate)
                 [ -f /tmp/llama8b/config.json ] || python3 scripts/make_random_backbone.py /tmp/llama8b 2>&1 | grep -v Writing | tail -2
                 for bs in ${DISTILL_BATCHES:-16 64}; do
                   timeout 300 python3 -m medusa_liger distill --backbone /tmp/llama8b --data medusa_liger/data/pydoc_chat.jsonl \
                     --output "$OUT/distill_8b_bs$bs.jsonl" --overwrite --num-records $((2 * bs)) --batch-size $bs \
                     --block-records $((2 * bs)) --max-new-tokens 256 2>&1 | grep -v "Loading weights\|distill:" | tee -a "$OUT/distill_8b.log" || status=1
                 done ;;
    sanitize)    bash benchmarks/sanitize_kernels.sh || status=1 ;;
    initcheck)   SANITIZE_TOOL=initcheck bash benchmarks/sanitize_kernels.sh || status=1 ;;
    initcheck_classify) bash benchmarks/initcheck_classify.sh || status=1 ;;
    int32_mutants) bash benchmarks/int32_offset_mutants.sh || status=1 ;;
    quick)       for b in kernels medusa_loss patching; do timeout 120 python3 benchmarks/$b.py --quick 2>&1 | tail -30 || status=1; done ;;
    *) echo "unknown stage $stage" >&2; status=2 ;;
  esac
done
exit $status
