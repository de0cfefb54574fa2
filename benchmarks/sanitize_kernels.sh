#!/usr/bin/env bash
# compute-sanitizer's memcheck over the kernel tests on the GPU: the rule "never an out-of-bounds access in
# a kernel", checked where the interpreter cannot (it reads numpy memory; a bad GPU address may go unseen).
#   OUT=/tmp/out bash benchmarks/sanitize_kernels.sh [test files]
# Needs a runtime that lets the sanitizer attach (the device's Firecracker machines; gVisor refuses the device,
# and the script says so and stops). PyTorch's caching allocator is off, so every tensor is an allocation of
# its own and an access past its end is reported instead of landing in a neighbour of the same pool
# (memcheck then knows each tensor's exact size: the control below is caught 1 byte past the end).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1
SAN=(compute-sanitizer --tool memcheck --target-processes all --report-api-errors no --error-exitcode 86
     --print-limit 20)
# 1. The control: reads 24 and 1048 elements past a 1000-element tensor must both be reported, or a clean
#    run below proves nothing (gVisor machines refuse the device: the script stops there).
for overrun in 1024 2048; do
  "${SAN[@]}" python3 benchmarks/sanitize_probe.py --overrun $overrun > "$OUT/memcheck_control_$overrun.log" 2>&1
  rc=$?
  reported=$(grep -c 'Invalid __global__ read' "$OUT/memcheck_control_$overrun.log")
  echo "control: $overrun elements read of 1000: rc $rc, $reported invalid reads reported"
  if [ "$reported" = 0 ]; then
    echo "memcheck did not report the planted read: no usable sanitizer here"; tail -5 "$OUT/memcheck_control_$overrun.log"
    exit 3
  fi
done
# 2. The kernel tests, each file one pytest process under the sanitizer (pytest-xdist's workers escaped it:
#    only the controller's log appeared), SANITIZE_JOBS files at a time, each within SANITIZE_TIMEOUT seconds.
[ $# -gt 0 ] || set -- tests/test_cross_entropy.py tests/test_scale.py tests/test_rms_norm.py tests/test_swiglu.py \
  tests/test_rope.py tests/test_jsd.py tests/test_distill_kernels_edges.py tests/test_exp_operand.py \
  tests/test_fused_linear_cross_entropy.py tests/test_fused_linear_cross_entropy_edges.py \
  tests/test_fused_linear_cross_entropy_options.py tests/test_chunking.py tests/test_head_by_head.py \
  tests/test_fused_linear_cross_entropy_gpu.py
sanitize_file() {  # one test file: its pytest log and memcheck log under $OUT, named after it
  name=$(basename "$1" .py)
  timeout "${SANITIZE_TIMEOUT:-450}" "${SAN[@]}" --log-file "$OUT/memcheck_$name.log" \
    python3 -m pytest -q -rfE --tb=line -p no:cacheprovider -p no:xdist "$1" > "$OUT/pytest_$name.log" 2>&1
  echo "$name: rc $? ($(tail -1 "$OUT/pytest_$name.log")) memcheck: $(grep -h "ERROR SUMMARY" "$OUT/memcheck_$name.log")"
  grep -E "^(FAILED|ERROR) " "$OUT/pytest_$name.log" | cut -c1-400
}
export -f sanitize_file; export OUT SANITIZE_TIMEOUT; export SAN_ARGS="${SAN[*]}"
printf '%s\n' "$@" | xargs -P "${SANITIZE_JOBS:-4}" -I{} bash -c 'SAN=($SAN_ARGS); sanitize_file {}' | tee "$OUT/memcheck_summary.txt"
grep -h -m 5 -A 6 "Invalid __global__" "$OUT"/memcheck_test_*.log | head -60
! grep -q "rc [^0]" "$OUT/memcheck_summary.txt"
