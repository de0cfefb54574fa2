#!/usr/bin/env bash
# Can tests/test_large_offsets_gpu.py fail? Each kernel's int64 offset cast is removed in a copy of the tree
# (the offsets then wrap past 2^31 elements) and that kernel's large-offset test must fail; then the tests on
# the unchanged tree must pass.   OUT=/tmp/out bash benchmarks/int32_offset_mutants.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
run() {  # run TREE -k EXPR: the large-offset tests of one tree, one process
  (cd "$1" && PYTHONPATH=$1 timeout 240 python3 -m pytest -q -x --tb=line -p no:cacheprovider \
     tests/test_large_offsets_gpu.py -k "$2" 2>&1 | tail -4)
}
echo "== unchanged tree"; run "$PWD" "" | tee "$OUT/large_offsets.log"
# file | sed expression | tests (-k)
while IFS='|' read -r file expr tests; do
  rm -rf /tmp/mutant && mkdir /tmp/mutant && cp -r medusa_liger tests /tmp/mutant/
  sed -i "$expr" "/tmp/mutant/$file"
  if cmp -s "$file" "/tmp/mutant/$file"; then echo "== $file: the mutant does not apply ($expr)"; continue; fi
  echo "== $file: $expr"; run /tmp/mutant "$tests"
done <<'MUTANTS'
medusa_liger/kernels/cross_entropy.py|s/_ce_row(tl.program_id(0).to(tl.int64)/_ce_row(tl.program_id(0)/; s/_ce_row(tl.cast(pid, tl.int64)/_ce_row(pid/|cross_entropy
medusa_liger/kernels/kl_divergence.py|s/pid = tl.program_id(0).to(tl.int64)/pid = tl.program_id(0)/|kl
medusa_liger/kernels/jsd.py|s/pid = tl.program_id(0).to(tl.int64)/pid = tl.program_id(0)/|jsd
medusa_liger/kernels/scale.py|s/tl.cast(block, tl.int64) \* BLOCK/block * BLOCK/|scale
medusa_liger/kernels/rms_norm.py|s/rows64 = rows.to(tl.int64)/rows64 = rows/|rms_norm
medusa_liger/kernels/swiglu.py|s/row = tl.program_id(0).to(tl.int64)/row = tl.program_id(0)/|swiglu
medusa_liger/kernels/rope.py|s/\.to(tl\.int64)//g|rope
MUTANTS
