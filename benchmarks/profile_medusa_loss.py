"""Where the time of the fused multi-head loss goes: each component alone, then the op per chunk size.

At the Medusa benchmark's shapes (H = 4096, V = 128256, bf16), for chunk sizes C of the logit
buffer, one chunk of the op's loop is

    Z = h_c @ W^T        logits GEMM      2CHV FLOP, writes C*V bf16
    row kernel on Z      lse/loss/argmax, then Z <- dloss/dZ in place: reads Z twice, writes it once
    dh_c = Z @ W         hidden-grad GEMM 2CHV FLOP
    dW (+)= Z^T @ h_c    weight-grad GEMM 2CHV FLOP: bf16 x bf16 -> fp32 accumulator (default),
                         -> bf16 accumulator (accum_dtype=bf16), or written (first chunk, beta = 0)

and once per trainable projection: the fp32 -> bf16 cast of the accumulator and, in backward, the
scale of every gradient by grad_output. This script times each piece with do_bench (median ms,
L2 flushed), reports TFLOP/s or GB/s against the bf16 matmul rate and the copy bandwidth of the
same run, adds them up into a predicted time per configuration, and compares with the measured
whole op (one trainable head, and one frozen head, over N tokens) with its peak extra memory, so
the gap to the matmul floor splits into GEMM efficiency, the memory-bound passes, and overhead.

    python benchmarks/profile_medusa_loss.py          # H100: about a minute
    python benchmarks/profile_medusa_loss.py --quick  # small shapes, a smoke run (also on CPU)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

# Import our helpers from the repository root (benchmarks/kernels.py would shadow HF's `kernels`).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402

from medusa_liger.kernels import multi_head_linear_cross_entropy  # noqa: E402
from medusa_liger.kernels.cross_entropy import ce_rows  # noqa: E402
from medusa_liger.kernels.fused_linear_cross_entropy import _mm_into, default_chunk_rows  # noqa: E402
from medusa_liger.kernels.scale import scale_  # noqa: E402

CE = importlib.import_module("medusa_liger.kernels.cross_entropy")  # the module (the package exports a function)
CUDA = torch.cuda.is_available()
PERSISTENT = (1, 2, 4)  # row-kernel programs per SM tried besides one program per row
DEVICE = torch.device("cuda" if CUDA else "cpu")


@common.frees_memory
def components(C: int, H: int, V: int, dtype: torch.dtype, rep: int) -> dict[str, float]:
    """Median ms of each per-chunk piece at chunk size C (fresh buffers, freed afterwards)."""
    o = common.chunk_operands(C, H, V, dtype)
    h, w, z, dh, acc32, acc16 = o.h, o.w, o.z, o.dh, o.acc32, o.acc16
    labels = torch.randint(0, V, (C,), device=DEVICE)
    lse = torch.empty(C, device=DEVICE, dtype=torch.float32)
    loss = torch.empty(C, device=DEVICE, dtype=torch.float32)
    correct = torch.empty(C, device=DEVICE, dtype=torch.int32)
    scale = torch.full((1,), 1.0 / C, device=DEVICE, dtype=torch.float32)
    torch.mm(h, w.t(), out=z)
    saved = z.clone()

    def row_kernel() -> None:
        # Restore the logits first (the kernel overwrites them); the copy is timed apart and removed.
        z.copy_(saved)
        ce_rows(z, labels, seq_len=C, scale=scale, lse=lse, loss=loss, correct=correct,
                compute_lse=True, write_grad=True)

    ms = {
        "logits": common.bench(lambda: torch.mm(h, w.t(), out=z), rep=rep),
        "row+copy": common.bench(row_kernel, rep=rep),
        "copy": common.bench(lambda: z.copy_(saved), rep=rep),
        "dh": common.bench(lambda: torch.mm(z, w, out=dh), rep=rep),
        "dW fp32 +=": common.bench(lambda: _mm_into(acc32, z.t(), h, accumulate=True), rep=rep),
        "dW fp32 =": common.bench(lambda: _mm_into(acc32, z.t(), h, accumulate=False), rep=rep),
        "dW bf16 +=": common.bench(lambda: acc16.addmm_(z.t(), h), rep=rep),
        "dW bf16 =": common.bench(lambda: torch.mm(z.t(), h, out=acc16), rep=rep),
    }
    ms["row"] = max(ms.pop("row+copy") - ms["copy"], 0.0)
    default = CE.PERSISTENT_PROGRAMS_PER_SM
    for k in PERSISTENT:  # the striding grid (fewer rows in flight: pass 2 may hit L2)
        CE.PERSISTENT_PROGRAMS_PER_SM = k
        try:
            ms[f"row p{k}"] = max(common.bench(row_kernel, rep=rep) - ms["copy"], 0.0)
        except Exception as exc:  # a compile failure is recorded, not fatal
            print(f"persistent row kernel, {k} per SM: {type(exc).__name__}: {exc}", flush=True)
            ms[f"row p{k}"] = float("nan")
        finally:
            CE.PERSISTENT_PROGRAMS_PER_SM = default
    return ms


@common.frees_memory
def once_per_weight(H: int, V: int, dtype: torch.dtype, rep: int) -> dict[str, float]:
    """The per-projection passes: accumulator cast into the gradient, and backward's grad_output scale."""
    acc = torch.randn(V, H, device=DEVICE, dtype=torch.float32)
    grad = torch.empty(V, H, device=DEVICE, dtype=dtype)
    g_out = torch.full((), 0.5, device=DEVICE, dtype=torch.float32)  # not 1: scale_ skips a factor of 1
    ms = {"cast fp32->bf16": common.bench(lambda: grad.copy_(acc), rep=rep),
          "scale by grad_output": common.bench(lambda: scale_(grad, g_out), rep=rep)}
    return ms


@common.frees_memory
def whole_op(N: int, H: int, V: int, dtype: torch.dtype, chunk: int, accum: torch.dtype, trainable: bool,
             rep: int) -> tuple[float, float]:
    """(median ms, peak extra GiB) of forward+backward of one head over N tokens; grads freed per call."""
    hidden = torch.randn(1, N, H, device=DEVICE, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, device=DEVICE, dtype=dtype) * H**-0.5).requires_grad_(trainable)
    labels = torch.randint(0, V, (1, N), device=DEVICE)

    def step() -> None:
        hidden.grad = w.grad = None
        multi_head_linear_cross_entropy(hidden, w, labels, [1], accum_dtype=accum, chunk_size=chunk).loss.backward()

    step()
    hidden.grad = w.grad = None
    gib = common.peak_extra_memory_gib(step)
    ms = common.bench(step, warmup=1, rep=rep)
    return ms, gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    args = parser.parse_args()
    if args.quick:
        H, V, N, chunks, rep = 128, 1000, 512, [128, 256, 512], 5
    else:
        H, V, N, chunks, rep = 4096, 128256, 16384, [1024, 2048, 4096, 8192], 60
    dtype = torch.bfloat16 if CUDA else torch.float32
    rate = common.matmul_tflops(torch.bfloat16) if CUDA else float("nan")  # TFLOP/s
    bw = common.copy_bandwidth_gbs() if CUDA else float("nan")  # GB/s (read + write)
    gemm_floor = 2 * N * H * V / (rate * 1e12) * 1e3  # ms of one 2NHV GEMM pass at the peak rate
    print(f"bf16 matmul {rate:.0f} TFLOP/s, copy {bw:.0f} GB/s; one 2NHV pass at N={N}: {gemm_floor:.1f} ms",
          flush=True)

    per_weight = once_per_weight(H, V, dtype, rep)
    print("per projection:", {k: round(v, 3) for k, v in per_weight.items()}, flush=True)

    rows = []
    for C in chunks:
        part = components(C, H, V, dtype, rep)
        n_chunks = -(-N // C)
        flop = 2 * C * H * V

        def tf(key: str, part: dict = part, flop: int = flop) -> str:
            return f"{part[key]:.2f} ({flop / part[key] / 1e9:.0f})"

        row_bytes = 3 * C * V * torch.empty((), dtype=dtype).element_size()

        def row(key: str, part: dict = part, row_bytes: int = row_bytes) -> str:
            return f"{part[key]:.2f} ({row_bytes / part[key] / 1e6:.0f})" if part[key] > 0 else "-"

        # Predicted op time over N tokens = chunks x per-chunk pieces (+ once-per-weight passes).
        frozen_pred = n_chunks * (part["logits"] + part["row"] + part["dh"])
        train_pred = {
            "fp32": frozen_pred + part["dW fp32 ="] + (n_chunks - 1) * part["dW fp32 +="]
            + (per_weight["cast fp32->bf16"] if n_chunks > 1 else 0) + per_weight["scale by grad_output"],
            "bf16": frozen_pred + part["dW bf16 ="] + (n_chunks - 1) * part["dW bf16 +="]
            + per_weight["scale by grad_output"],
        }
        measured = {}
        for label, accum, trainable in (("fp32", torch.float32, True), ("bf16", dtype, True), ("frozen", dtype, False)):
            try:
                measured[label] = whole_op(N, H, V, dtype, C, accum, trainable, rep=8 * rep)
            except torch.cuda.OutOfMemoryError:
                measured[label] = (float("nan"), float("nan"))
                common.free_memory()
        floors = {"fp32": 3 * gemm_floor, "bf16": 3 * gemm_floor, "frozen": 2 * gemm_floor}
        preds = {"fp32": train_pred["fp32"], "bf16": train_pred["bf16"], "frozen": frozen_pred}
        cells = [f"{measured[k][0]:.1f} / {preds[k]:.1f} / {floors[k] / measured[k][0]:.0%} / {measured[k][1]:.2f}"
                 for k in ("fp32", "bf16", "frozen")]
        rows.append([C, tf("logits"), row("row"), *[row(f"row p{k}") for k in PERSISTENT], tf("dh"), tf("dW fp32 ="),
                     tf("dW fp32 +="), tf("dW bf16 ="), tf("dW bf16 +="), *cells])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)

    header = ["chunk C", "logits GEMM ms (TFLOP/s)", "row kernel ms (GB/s)",
              *[f"row, {k}/SM striding" for k in PERSISTENT], "dh GEMM", "dW fp32 write",
              "dW fp32 accumulate", "dW bf16 write", "dW bf16 accumulate",
              f"op fp32 acc, N={N}", f"op bf16 acc, N={N}", f"op frozen, N={N}"]
    notes = [
        f"H={H}, V={V}, {str(dtype).replace('torch.', '')}; bf16 matmul rate {rate:.0f} TFLOP/s and copy "
        f"bandwidth {bw:.0f} GB/s measured in this run; do_bench medians (L2 flushed).",
        "Component columns: ms for one chunk of C rows (TFLOP/s of its 2CHV FLOP; the row kernel's GB/s counts "
        "its two reads and one write of the [C, V] chunk, so above the copy bandwidth means pass 2 hits L2). "
        "'k/SM striding': cross_entropy.PERSISTENT_PROGRAMS_PER_SM = k (k programs per SM loop over the rows) "
        "instead of one program per row (the default, used by the op columns).",
        "Op columns, one head over N tokens, forward+backward: measured ms / sum of the components ms "
        "(chunks x pieces + the accumulator cast + the grad_output scale) / matmul floor as a fraction of the "
        "measured time (6NHV trainable, 4NHV frozen) / peak extra GiB (weight gradient included when trainable).",
        f"Once per trainable projection: cast of the fp32 accumulator {per_weight['cast fp32->bf16']:.2f} ms, "
        f"grad_output scale {per_weight['scale by grad_output']:.2f} ms. Default chunk now: "
        f"{default_chunk_rows(V, dtype)} rows.",
    ]
    common.write_table("profile_medusa_loss_h100" if not args.quick else "profile_medusa_loss_quick",
                       "Fused multi-head loss: time per component and per chunk size", header, rows, notes)


if __name__ == "__main__":
    main()
