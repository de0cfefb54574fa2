#!/usr/bin/env bash
# compute-sanitizer over the kernel tests on the GPU: the rules "never an out-of-bounds access in a kernel"
# (memcheck) and "never a silent NaN" from memory no one wrote (initcheck), checked where the interpreter
# cannot (it reads numpy memory; a bad GPU address may go unseen).
#   OUT=/tmp/out SANITIZE_TOOL=memcheck|initcheck bash benchmarks/sanitize_kernels.sh [test files]
# Needs a runtime that lets the sanitizer attach (the device's Firecracker machines; gVisor refuses the device,
# and the script says so and stops). PyTorch's caching allocator is off, so every tensor is an allocation of
# its own: memcheck knows each tensor's exact size, and initcheck sees a fresh allocation as unwritten.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TOOL=${SANITIZE_TOOL:-memcheck}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1
# Device backtraces only: recording a host backtrace at each launch kept tensors alive that the code had
# freed (the head-by-head lifetime test failed under the sanitizer only; runs 183-184).
SAN=(compute-sanitizer --tool "$TOOL" --target-processes all --report-api-errors no --error-exitcode 86
     --print-limit 20 --show-backtrace device)
# 1. The control, a planted bug the tool must report, or a clean run below proves nothing: memcheck, reads 24
#    and 1048 elements past a 1000-element tensor; initcheck, a read of a tensor no one wrote.
case "$TOOL" in
  memcheck)  controls=("--overrun 1024" "--overrun 2048"); report='Invalid __global__ read' ;;
  initcheck) controls=("--unwritten"); report='Uninitialized __global__ memory read' ;;
  *) echo "SANITIZE_TOOL must be memcheck or initcheck, got $TOOL" >&2; exit 2 ;;
esac
for control in "${controls[@]}"; do
  log="$OUT/${TOOL}_control_${control##* }.log"
  # shellcheck disable=SC2086  # (the control's options are two words)
  "${SAN[@]}" python3 benchmarks/sanitize_probe.py $control > "$log" 2>&1
  rc=$?
  reported=$(grep -c "$report" "$log")
  echo "control $control: rc $rc, $reported reports of '$report'"
  if [ "$reported" = 0 ]; then echo "$TOOL did not report the planted bug: no usable sanitizer here"; tail -5 "$log"; exit 3; fi
done
# 2. The kernel tests, each file one pytest process under the sanitizer (pytest-xdist's workers escaped it:
#    only the controller's log appeared), SANITIZE_JOBS files at a time, each within SANITIZE_TIMEOUT seconds.
[ $# -gt 0 ] || set -- tests/test_cross_entropy.py tests/test_scale.py tests/test_rms_norm.py tests/test_swiglu.py \
  tests/test_rope.py tests/test_jsd.py tests/test_distill_kernels_edges.py tests/test_exp_operand.py \
  tests/test_fused_linear_cross_entropy.py tests/test_fused_linear_cross_entropy_edges.py \
  tests/test_fused_linear_cross_entropy_options.py tests/test_chunking.py tests/test_head_by_head.py \
  tests/test_fused_linear_cross_entropy_gpu.py
sanitize_file() {  # one test file: its pytest log and the tool's log under $OUT, named after it
  name=$(basename "$1" .py)
  timeout "${SANITIZE_TIMEOUT:-450}" "${SAN[@]}" --log-file "$OUT/${TOOL}_$name.log" \
    python3 -m pytest -q -rfE --tb=line -p no:cacheprovider -p no:xdist "$1" > "$OUT/pytest_$name.log" 2>&1
  echo "$name: rc $? ($(tail -1 "$OUT/pytest_$name.log")) $TOOL: $(grep -h "ERROR SUMMARY" "$OUT/${TOOL}_$name.log")"
  grep -E "^(FAILED|ERROR) " "$OUT/pytest_$name.log" | cut -c1-400
}
export -f sanitize_file; export OUT TOOL SANITIZE_TIMEOUT; export SAN_ARGS="${SAN[*]}"
printf '%s\n' "$@" | xargs -P "${SANITIZE_JOBS:-4}" -I{} bash -c 'SAN=($SAN_ARGS); sanitize_file {}' \
  | tee "$OUT/${TOOL}_summary.txt"
grep -h -m 5 -B 1 -A 8 "$report" "$OUT/${TOOL}"_test_*.log | head -80
! grep -q "rc [^0]" "$OUT/${TOOL}_summary.txt"
