#!/usr/bin/env bash
# Where initcheck's reports over a kernel test file come from: each report counted under the test that drew
# it and the kernel that read, beside the cuBLAS control (sanitize_probe.py --cublas-written: a float32
# cuBLAS product cast to bf16, which initcheck reports if it does not see cuBLAS's stores).
#   OUT=/tmp/out bash benchmarks/initcheck_classify.sh [test file, default tests/test_head_by_head.py]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1
SAN=(compute-sanitizer --tool initcheck --target-processes all --report-api-errors no --show-backtrace no
     --print-limit 10000000)
FILE=${1:-tests/test_head_by_head.py}
# The control in the background, the test file in the foreground (pytest -v: a test's reports follow its id).
timeout "${CONTROL_TIMEOUT:-400}" "${SAN[@]}" python3 benchmarks/sanitize_probe.py --cublas-written \
  > "$OUT/initcheck_cublas_control.log" 2>&1 &
control=$!
timeout "${FILE_TIMEOUT:-450}" "${SAN[@]}" python3 -m pytest -v -p no:cacheprovider -p no:xdist --tb=line "$FILE" 2>&1 \
  | awk '/\.py::/ { split($0, words, " "); for (i in words) if (words[i] ~ /\.py::/) test = words[i] }
         /Uninitialized __global__ memory read/ { reads[test]++; pending = 1; next }
         pending && /=========     at / { sub(/.*=========     at /, ""); kernel[test " | " substr($0, 1, 90)]++; pending = 0 }
         /(PASSED|FAILED|SKIPPED|ERROR)/ && /\.py::/ || / in [0-9.]+s/ { print }
         END { print "--- initcheck reports by test"; for (t in reads) print reads[t], t
               print "--- by test and reading kernel"; for (k in kernel) print kernel[k], k }' \
  > "$OUT/initcheck_by_test.txt"
echo "test file: rc ${PIPESTATUS[0]}"
wait $control; echo "cuBLAS control: rc $?, $(grep -c 'Uninitialized __global__ memory read' "$OUT/initcheck_cublas_control.log") reports"
grep -m 3 -A 3 "Uninitialized" "$OUT/initcheck_cublas_control.log"; tail -2 "$OUT/initcheck_cublas_control.log"
sed -n '/--- initcheck reports by test/,$p' "$OUT/initcheck_by_test.txt" | sort -k1,1nr | head -40
grep -E "FAILED|ERROR| in [0-9.]+s" "$OUT/initcheck_by_test.txt" | head
