"""A/B of cross_entropy's saved 1 - P_t (forward stores it, backward's target column reads it) against the
same op without it (backward's target column from exp(y_t - lse) - 1), bf16 logits [8192, 128256] on
the GPU: interleaved rounds of triton.testing.do_bench medians (forward + backward, gradient in place).

    python benchmarks/ce_target_miss_ab.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

# The module (the package's name cross_entropy is the function).
ce = importlib.import_module("medusa_liger.kernels.cross_entropy")


def main() -> None:
    import triton

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ce_target_miss_ab.py needs a CUDA device")
    N, V = 8192, 128256
    logits = [torch.randn(N, V, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    labels = torch.randint(0, V, (N,), device="cuda")
    original = ce.ce_rows

    def without_miss(*a, target_miss=None, **kw):  # the op before 1 - P_t was saved
        return original(*a, **kw)

    def step(x):
        x = x.detach().requires_grad_()
        ce.cross_entropy(x, labels).backward()

    times = {"with 1 - P_t saved": [], "without": []}
    for _ in range(args.rounds):
        for name in times:
            ce.ce_rows = original if name.startswith("with ") else without_miss
            x = logits[len(times[name]) % 2]  # alternate the two inputs between rounds
            times[name].append(triton.testing.do_bench(partial(step, x), warmup=25, rep=200))
    ce.ce_rows = original
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t):.3f} ms (rounds {min(t):.3f}-{max(t):.3f})")


if __name__ == "__main__":
    main()
