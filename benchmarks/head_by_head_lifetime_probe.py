"""Is head k's activation freed before head k + 1 runs? (runs 176-177, ``memcheck_kernels_h200.md``)

The check of ``tests/test_head_by_head.py``'s lifetime test, outside pytest and three times over: each head
records a weak reference to its block's output (which SiLU saves for backward); at the start of head k it
prints (k, earlier activations alive, alive again after 0.5 s and gc, Python threads). Without compute-
sanitizer every count is 0; under it the earlier heads' stay alive when it records host backtraces
(``--show-backtrace yes``, its default, or ``host``), and not with ``no`` or ``device`` (runs 183-184).
    PYTHONPATH=. python3 benchmarks/head_by_head_lifetime_probe.py [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
import weakref

import torch
import torch.nn.functional as F

from medusa_liger.kernels import force_backend
from medusa_liger.kernels.head_by_head import head_by_head_linear_cross_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    torch.manual_seed(0)
    H, K, V = 8, 3, 11
    x = torch.randn(2, 5, H, device=device)
    blocks = [torch.nn.Linear(H, H, device=device) for _ in range(K)]
    weights = [torch.randn(V, H, device=device, requires_grad=True) for _ in range(K)]
    labels = torch.randint(0, V, (2, 5), device=device)
    params = [p for b in blocks for p in b.parameters()] + weights
    alive: list[weakref.ref] = []
    seen: list[tuple[int, int, int, int]] = []

    def head(k):
        def run(h):
            gc.collect()
            now = sum(ref() is not None for ref in alive)
            time.sleep(0.5)
            gc.collect()
            seen.append((k, now, sum(ref() is not None for ref in alive), threading.active_count()))
            a = blocks[k](h)
            alive.append(weakref.ref(a))
            return h + F.silu(a)
        return run

    for trial in range(3):
        alive.clear()
        seen.clear()
        with force_backend("torch"):
            out = head_by_head_linear_cross_entropy(x, [head(k) for k in range(K)], weights, labels, [1, 2, 3],
                                                    params=params)
        out.loss.backward()
        print(f"trial {trial}: (head, earlier activations alive, after 0.5 s, threads) {seen}")


if __name__ == "__main__":
    main()
