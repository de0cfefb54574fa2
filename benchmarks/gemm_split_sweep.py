"""Does cuBLAS run the fused loss's GEMMs faster in thinner calls, or through cuBLASLt?

The chunk loop's three products at H = 4096, V = 128256 (bf16), chunk C rows:

    logits  Z[C, V]   = h[C, H] @ W^T       split: rows of Z (tokens)
    dh      dh[C, H]  = Z @ W               split: rows of dh (tokens)
    dW      dW[V, H] (+)= Z^T @ h           split: rows of dW (vocabulary), fp32 or bf16 accumulator

Each product is timed whole and in calls of C/2, C/4, ... rows (``chunking.GEMM_ROWS``) under both
``torch.backends.cuda.preferred_blas_library`` choices; then the op itself (one head, N = 16384,
forward + backward) with the default and with the best split per product, in the same run. Last, the
bf16 square-GEMM rate over one call and sustained over ~0.5 s (clocks drop under long loads).

    python benchmarks/gemm_split_sweep.py          # H100: a few minutes
    python benchmarks/gemm_split_sweep.py --quick  # small shapes, a smoke run
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
from benchmarks.profile_medusa_loss import whole_op  # noqa: E402

from medusa_liger.kernels import chunking  # noqa: E402

DEVICE = common.DEVICE
BACKENDS = ("cublas", "cublaslt")


def set_backend(name: str) -> None:
    if common.CUDA:
        torch.backends.cuda.preferred_blas_library(name)


@common.frees_memory
def products(C: int, H: int, V: int, dtype: torch.dtype, splits: list[int], rep: int) -> dict[tuple[str, int], float]:
    """Median ms of each product at chunk C, whole (split 1) and in `split` calls."""
    o = common.chunk_operands(C, H, V, dtype)
    h, w, z, dh, acc32, acc16 = o.h, o.w, o.z, o.dh, o.acc32, o.acc16
    ms = {}
    for split in splits:
        r_tok, r_voc = -(-C // split), -(-V // split)
        ms[("logits", split)] = common.bench(lambda r=r_tok: chunking.mm_into(z, h, w.t(), False, r), rep=rep)
        ms[("dh", split)] = common.bench(lambda r=r_tok: chunking.mm_into(dh, z, w, False, r), rep=rep)
        ms[("dW fp32 +=", split)] = common.bench(lambda r=r_voc: chunking.mm_into(acc32, z.t(), h, True, r), rep=rep)
        ms[("dW bf16 +=", split)] = common.bench(lambda r=r_voc: chunking.mm_into(acc16, z.t(), h, True, r), rep=rep)
    return ms


@common.frees_memory
def sustained_tflops(n: int, seconds: float) -> tuple[float, float]:
    """bf16 n^3 GEMM rate: (median of do_bench, back-to-back over ~`seconds`)."""
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=DEVICE, dtype=torch.bfloat16)
    flop = 2 * n**3
    one = common.bench(lambda: torch.mm(a, b, out=c))
    calls = max(1, int(seconds * 1e3 / one))

    def back_to_back() -> None:
        for _ in range(calls):
            torch.mm(a, b, out=c)

    loop_ms = common.time_once(back_to_back) / calls
    return flop / one / 1e9, flop / loop_ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    args = parser.parse_args()
    if args.quick:
        H, V, N, chunks, splits, rep = 128, 1000, 512, [256], [1, 2], 3
    else:
        H, V, N, chunks, splits, rep = 4096, 128256, 16384, [2048, 4096], [1, 2, 4, 8], 40
    dtype = common.DTYPE
    rows, best = [], {}
    backends = BACKENDS if common.CUDA else ("default",)
    for backend in backends:
        set_backend(backend)
        for C in chunks:
            ms = products(C, H, V, dtype, splits, rep)
            for kind in ("logits", "dh", "dW fp32 +=", "dW bf16 +="):
                base = ms[(kind, 1)]
                cells = [f"{ms[(kind, s)]:.2f} ({2 * C * H * V / ms[(kind, s)] / 1e9:.0f})" for s in splits]
                top = min(splits, key=lambda s: ms[(kind, s)])
                best[(backend, C, kind)] = top
                rows.append([backend, C, kind, *cells, f"{base / ms[(kind, top)]:.3f}x at {top}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)

    # The op with the default calls and with the best split per product, per backend and chunk.
    op_rows = []
    modes = (("fp32 acc", torch.float32, True, 4096), ("bf16 acc", dtype, True, 4096), ("frozen", dtype, False, 2048))
    if args.quick:
        modes = tuple((m, a, t, 256) for m, a, t, _ in modes)
    for backend in backends:
        set_backend(backend)
        for label, accum, trainable, C in modes:
            cells = []
            for tuned in (False, True):
                if tuned:
                    chunking.GEMM_ROWS["logits"] = -(-C // best[(backend, C, "logits")])
                    chunking.GEMM_ROWS["dh"] = -(-C // best[(backend, C, "dh")])
                    kind = "dW fp32 +=" if accum == torch.float32 else "dW bf16 +="
                    chunking.GEMM_ROWS["dw"] = -(-V // best[(backend, C, kind)])
                try:
                    t, gib = whole_op(N, H, V, dtype, C, accum, trainable, rep=3 if args.quick else 15)
                finally:
                    chunking.GEMM_ROWS.update(logits=None, dh=None, dw=None)
                cells.append(f"{t:.1f} ms / {gib:.2f} GiB")
            op_rows.append([backend, label, C, *cells])
            print(" | ".join(str(c) for c in op_rows[-1]), flush=True)
    set_backend("cublas")

    notes = [f"H={H}, V={V}, {str(dtype).replace('torch.', '')}; do_bench medians (L2 flushed), ms (TFLOP/s)."]
    if common.CUDA:
        one, loop = sustained_tflops(8192, 0.5)
        notes.append(f"bf16 8192^3 GEMM: {one:.0f} TFLOP/s (do_bench median), {loop:.0f} TFLOP/s back to back "
                     "over 0.5 s.")
        print(notes[-1], flush=True)
    quick = "_quick" if args.quick else ""
    common.write_table("gemm_split_sweep" + quick, "Fused-loss GEMMs: split calls and BLAS backend",
                       ["backend", "chunk C", "product", *[f"{s} call(s)" for s in splits], "best"], rows, notes)
    common.write_table("gemm_split_op" + quick, "Fused loss, one head, N=%d: default calls vs best split" % N,
                       ["backend", "mode", "chunk C", "default", "best split"], op_rows, notes)


if __name__ == "__main__":
    main()
