"""Sweep of the fused loss's overlap settings at the Medusa benchmark's shapes, plus two ceilings.

The op cuts each logit chunk into SUBCHUNKS pieces and runs each piece's row kernel on a side stream
(SIDE_ROW_PROGRAMS programs, None = one per row) while the main stream runs the GEMMs. This script
times the whole Medusa loss step of benchmarks/medusa_loss.py (K=5 ResBlock heads, forward +
backward) for each setting, and two references measured in the same run:

* "GEMMs only": the op's GEMM sequence (logits, dh, dW per chunk, per head) with no row kernel,
  back to back: what cuBLAS sustains on this schedule, the floor for any overlap;
* backward's grad_output scale of one [V, H] bf16 gradient: ``mul_`` vs our ``scale_`` kernel.

    python benchmarks/overlap_sweep.py          # H100: about 3 minutes
    python benchmarks/overlap_sweep.py --quick  # small shapes (also on CPU)
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
from benchmarks.medusa_loss import Problem, cleanup, make_ours, measure  # noqa: E402

from medusa_liger.kernels import chunking  # noqa: E402
from medusa_liger.kernels import fused_linear_cross_entropy as flce  # noqa: E402
from medusa_liger.kernels.scale import scale_  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# (label, OVERLAP_ROW_KERNEL, SUBCHUNKS, SIDE_ROW_PROGRAMS, chunk bytes trainable, chunk bytes frozen)
SETTINGS = [
    ("one stream, whole chunks (before)", False, 1, None, 2**30, 2**29),
    ("overlap S=2", True, 2, None, 2**30, 2**29),
    ("overlap S=2, 16 programs", True, 2, 16, 2**30, 2**29),
    ("overlap S=2, 32 programs", True, 2, 32, 2**30, 2**29),
    ("overlap S=2, 66 programs", True, 2, 66, 2**30, 2**29),
    ("overlap S=4", True, 4, None, 2**30, 2**29),
    ("overlap S=4, 32 programs", True, 4, 32, 2**30, 2**29),
    ("overlap S=2, frozen 4096 rows", True, 2, None, 2**30, 2**30),
    ("overlap S=4, frozen 4096 rows, 32 programs", True, 4, 32, 2**30, 2**30),
    ("overlap S=2, 2048-row chunks", True, 2, None, 2**29, 2**29),
]


def gemms_only(N: int, H: int, V: int, C: int, K: int, rep: int) -> float:
    """ms of the op's GEMMs alone for K trainable heads (fp32 dW accumulator), back to back."""
    h = torch.randn(N, H, device=DEVICE, dtype=common.DTYPE)
    w = torch.randn(V, H, device=DEVICE, dtype=common.DTYPE) * H**-0.5
    z = torch.randn(C, V, device=DEVICE, dtype=common.DTYPE) * 1e-3
    dh = torch.empty(N, H, device=DEVICE, dtype=common.DTYPE)
    acc = torch.empty(V, H, device=DEVICE, dtype=torch.float32)

    def run() -> None:
        for _ in range(K):
            for r0 in range(0, N, C):
                torch.mm(h[r0 : r0 + C], w.t(), out=z)
                torch.mm(z, w, out=dh[r0 : r0 + C])
                chunking.mm_into(acc, z.t(), h[r0 : r0 + C], accumulate=r0 > 0)

    ms = common.bench(run, warmup=1, rep=rep)
    del h, w, z, dh, acc
    cleanup()
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    args = parser.parse_args()
    if args.quick:
        K, H, V, T, sizes, rep = 2, 64, 512, 128, [256], 5
    else:
        K, H, V, T, sizes, rep = 5, 4096, 128256, 4096, [4096, 16384], 1500
    rate = common.matmul_tflops(torch.bfloat16) if CUDA else float("nan")
    rows = []
    for label, overlap, parts, programs, chunk_bytes, frozen_bytes in SETTINGS[: 2 if args.quick else None]:
        flce.OVERLAP_ROW_KERNEL, flce.SUBCHUNKS, flce.SIDE_ROW_PROGRAMS = overlap, parts, programs
        chunking.DEFAULT_CHUNK_BYTES, chunking.FROZEN_CHUNK_BYTES = chunk_bytes, frozen_bytes
        row = [label]
        for setting, frozen, N, accum in (("a", False, sizes[-1], torch.float32), ("a", False, sizes[-1], common.DTYPE),
                                          ("a", False, sizes[0], torch.float32), ("b", True, sizes[-1], common.DTYPE)):
            p = Problem(K, N // T, T, H, V, common.DTYPE, frozen)
            try:
                ms, gib = measure(p, make_ours(accum), reps=rep)
                row.append(f"{ms:.1f} / {gib:.2f}")
            except Exception as exc:  # recorded, not fatal
                row.append(f"error: {type(exc).__name__}: {str(exc)[:60]}")
            del p
            cleanup()
        print(" | ".join(row), flush=True)
        rows.append(row)
    flce.OVERLAP_ROW_KERNEL, flce.SUBCHUNKS, flce.SIDE_ROW_PROGRAMS = True, 2, None
    chunking.DEFAULT_CHUNK_BYTES, chunking.FROZEN_CHUNK_BYTES = 2**30, 2**29

    C = chunking.default_chunk_rows(V, common.DTYPE)
    floors = [f"GEMMs only, C={c}: {gemms_only(sizes[-1], H, V, c, K, rep):.1f} ms" for c in (C // 2, C)]
    grad = torch.randn(V, H, device=DEVICE, dtype=common.DTYPE)
    g_out = torch.ones((), device=DEVICE, dtype=torch.float32)
    mul_ms = common.bench(lambda: grad.mul_(g_out), rep=200)
    scale_ms = common.bench(lambda: scale_(grad, g_out), rep=200)
    del grad
    cleanup()
    print(floors, mul_ms, scale_ms, flush=True)
    header = ["setting", f"(a) N={sizes[-1]} fp32 acc", f"(a) N={sizes[-1]} bf16 acc", f"(a) N={sizes[0]} fp32 acc",
              f"(b) N={sizes[-1]}"]
    notes = [
        f"K={K} ResBlock heads, H={H}, V={V}; cells: median ms of forward+backward / peak extra GiB "
        f"(as benchmarks/medusa_loss.py). bf16 matmul rate {rate:.0f} TFLOP/s.",
        f"(a) fp32-acc GEMM sequence alone, {K} heads, N={sizes[-1]} (no row kernel, no ResBlocks): "
        + "; ".join(floors) + ".",
        f"grad_output scale of one [V, H] gradient: mul_ {mul_ms:.2f} ms, scale_ {scale_ms:.2f} ms.",
    ]
    common.write_table("overlap_sweep_quick" if args.quick else "overlap_sweep_h100",
                       "Fused loss: row kernel overlap settings", header, rows, notes)


if __name__ == "__main__":
    main()
