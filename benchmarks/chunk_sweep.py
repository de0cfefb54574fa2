"""Chunk-size sweep of the whole Medusa loss: is the default logit chunk the fastest in the op?

``gemm_split_sweep.py`` times each chunk GEMM alone (L2 flushed, short bursts): there a [2048, V] chunk
ran its three products ~4% faster than half a [4096, V] chunk under bf16 accumulation. Whether that
holds inside the loop (clocks under a long load, operands already in L2, the row kernel between the
GEMMs) only the op itself can say. This script runs the benchmark of ``medusa_loss.py`` (K = 5 heads,
ResBlock then projection, forward + backward, bf16) for ``chunk_size`` in a list of row counts and the
default plan, in two interleaved rounds (drift between rounds is visible), and reports median ms and
peak memory beyond the parameters and the weight gradients.

    python benchmarks/chunk_sweep.py          # H100: about 3 minutes
    python benchmarks/chunk_sweep.py --quick  # small shapes, a smoke run (also on CPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402
from benchmarks.medusa_loss import CUDA, Problem, make_ours, measure  # noqa: E402

from medusa_liger.kernels.chunking import plan_chunk_rows  # noqa: E402
from medusa_liger.kernels.fused_linear_cross_entropy import chunk_budget  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    args = parser.parse_args()
    if args.quick:
        K, H, V, T, chunks = 5, 64, 512, 128, [64, 128, 256]
        cases = [("(a)", False, 256, ["fp32", "bf16"]), ("(b)", True, 256, ["fp32"])]
    else:
        K, H, V, T, chunks = 5, 4096, 128256, 4096, [1024, 1536, 2048, 3072, 4096]
        cases = [("(a)", False, 4096, ["fp32", "bf16"]), ("(a)", False, 16384, ["fp32", "bf16"]),
                 ("(b)", True, 16384, ["fp32"])]
    dtype = torch.bfloat16 if CUDA else torch.float32
    acc = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    for setting, frozen, N, modes in cases:
        p = Problem(K, N // T, T, H, V, dtype, frozen)
        grads_gib = 0.0 if frozen else sum(w.numel() * w.element_size() for w in p.weights) / 2**30
        sizes = [None] + [c for c in chunks if c < N] + [N]
        for mode in modes:
            default = plan_chunk_rows(N, V, dtype, not frozen, common.DEVICE,
                                      V * H * 4 if mode == "fp32" and not frozen else 0,
                                      chunk_budget(not frozen, False, dtype, common.DEVICE, bias=False,
                                                   label_smoothing=0.0, z_loss=0.0, softcap=None))
            cells: dict[int | None, list[tuple[float, float]]] = {c: [] for c in sizes}
            for _ in range(2):  # two interleaved rounds
                for c in sizes:
                    ms, gib = measure(p, make_ours(acc[mode], chunk_size=c), reps=1500 if N > 4096 else 800)
                    cells[c].append((ms, gib - grads_gib))
                    common.free_memory()
                    print(setting, N, mode, c, f"{ms:.1f} ms", flush=True)
            base = min(ms for ms, _ in cells[None])
            for c in sizes:
                best = min(ms for ms, _ in cells[c])
                rows.append([setting, N, f"{mode} acc", f"default ({default})" if c is None else c,
                             " / ".join(f"{ms:.1f}" for ms, _ in cells[c]), f"{cells[c][0][1]:.2f}",
                             f"{base / best:.3f}x"])
        del p
        common.free_memory()
    notes = [
        f"K={K} heads, H={H}, V={V}, {str(dtype).replace('torch.', '')}, T={T}; forward+backward of ResBlocks + "
        "projections + loss as in medusa_loss.py. ms: do_bench medians of round 1 / round 2 (interleaved). "
        "GiB: peak memory beyond parameters, inputs and weight gradients. speed: the default's best round over "
        "this chunk's best round (> 1: this chunk is faster).",
    ]
    common.write_table("chunk_sweep_quick" if args.quick else "chunk_sweep_h100", "Medusa loss: logit chunk rows",
                       ["setting", "tokens", "accumulation", "chunk rows", "ms (round 1 / 2)", "extra GiB",
                        "speed vs default"], rows, notes)


if __name__ == "__main__":
    main()
