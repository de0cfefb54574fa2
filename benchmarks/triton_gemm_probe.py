"""Can a Triton GEMM carry the cross-entropy row work of the Medusa loss at cuBLAS speed?

The fused loss runs each chunk as cuBLAS GEMMs plus a row kernel (~6% of the step at 16384 tokens;
NOTES.md). The row kernel cannot hide under cuBLAS (its CTAs take whole SMs), so the only way to
remove its time is to fuse it into the GEMMs:

* the logits GEMM  C[M, V] = A[M, H] @ W[V, H]^T  writes, beside C, each tile's row max and
  sum of exp (``stats`` [M, V / BN, 2]), so the log-sum-exp needs no pass over C;
* the hidden-gradient GEMM  dA[M, H] = G[M, V] @ W[V, H]  builds its A operand G = (softmax - onehot)
  * scale from the logits tile in its prologue, so the gradient pass over C disappears too.

That only pays if these Triton GEMMs run within a few percent of cuBLAS on the same shapes. This
script measures exactly that on the issue's shapes (M = 4096 rows, H = 4096, V = 128256, bf16):
cuBLAS, a plain Triton GEMM, a persistent Triton GEMM over TMA tensor descriptors, and the two
fused variants, over a handful of tile configurations, median of ``do_bench``.

    python benchmarks/triton_gemm_probe.py            # GPU
    python benchmarks/triton_gemm_probe.py --quick    # CPU interpreter: correctness on small shapes
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, installed or not

from benchmarks.common import CUDA, DEVICE, DTYPE, bench, write_table  # noqa: E402  (sets TRITON_INTERPRET on CPU)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from medusa_liger.kernels.exp_operand import _tile_of  # noqa: E402  (program id -> tile, grouped rows)

LOG2E = 1.4426950408889634


@triton.jit
def _store_tile_stats(out, rows, cols, tn, stats_ptr, M, N, BN: tl.constexpr):
    """Each row's max and sum of exp(x - max) over one logits tile ``out`` [BM, BN] (the rounded
    logits, what a gradient pass would read; columns past N at -inf) -> stats[row, tn, 0:2]."""
    x = tl.where(cols[None, :] < N, out.to(tl.float32), float("-inf"))
    row_max = tl.max(x, axis=1)
    row_sum = tl.sum(tl.exp2((x - row_max[:, None]) * 1.4426950408889634), axis=1)
    base = stats_ptr + (rows * tl.cdiv(N, BN) + tn) * 2
    tl.store(base, row_max, mask=rows < M)
    tl.store(base + 1, row_sum, mask=rows < M)


@triton.jit
def logits_gemm_kernel(a_ptr, w_ptr, c_ptr, stats_ptr, M, N, K,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                       WITH_STATS: tl.constexpr):
    """C[M, N] = A[M, K] @ W[N, K]^T (row-major A, W, C); with WITH_STATS also each row's max and
    sum of exp(C - max) over this tile's columns, into stats[M, cdiv(N, BN), 2] (fp32)."""
    tm, tn = _tile_of(tl.program_id(0), M, N, BM, BN, GROUP)
    rows = tm * BM + tl.arange(0, BM)
    cols = tn * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        # Masked loads: rows/cols past the end read 0 (never out of bounds).
        a = tl.load(a_ptr + rows[:, None] * K + (k + ks)[None, :],
                    mask=(rows[:, None] < M) & ((k + ks)[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + (k + ks)[None, :],
                    mask=(cols[:, None] < N) & ((k + ks)[None, :] < K), other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)
    out = acc.to(c_ptr.dtype.element_ty)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], out, mask=inside)
    if WITH_STATS:
        _store_tile_stats(out, rows, cols, tn, stats_ptr, M, N, BN)


@triton.jit
def grad_gemm_kernel(g_ptr, w_ptr, out_ptr, lse_ptr, label_ptr, scale_ptr, M, N, K,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                     SOFTMAX_PROLOGUE: tl.constexpr):
    """out[M, N] = G[M, K] @ W[K, N] (row-major; here K = V and N = H).

    SOFTMAX_PROLOGUE: g_ptr holds the logits, and each A tile becomes the cross-entropy gradient
    (exp(x - lse) - [col == label]) * scale in registers before the dot; otherwise G is read as is.
    """
    tm, tn = _tile_of(tl.program_id(0), M, N, BM, BN, GROUP)
    rows = tm * BM + tl.arange(0, BM)
    cols = tn * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    if SOFTMAX_PROLOGUE:
        lse = tl.load(lse_ptr + rows, mask=rows < M, other=0.0)
        label = tl.load(label_ptr + rows, mask=rows < M, other=-1)
        scale = tl.load(scale_ptr + rows, mask=rows < M, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        kk = k + ks
        inside = (rows[:, None] < M) & (kk[None, :] < K)
        g = tl.load(g_ptr + rows[:, None] * K + kk[None, :], mask=inside, other=0.0)
        w = tl.load(w_ptr + kk[:, None] * N + cols[None, :], mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)
        if SOFTMAX_PROLOGUE:
            prob = tl.exp2((g.to(tl.float32) - lse[:, None]) * 1.4426950408889634)
            hit = (kk[None, :] == label[:, None]).to(tl.float32)
            grad = tl.where(inside, (prob - hit) * scale[:, None], 0.0)
            acc = tl.dot(grad.to(w.dtype), w, acc)
        else:
            acc = tl.dot(g, w, acc)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def persistent_logits_kernel(a_desc, w_desc, c_desc, M, N, K,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                             NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """C = A @ W^T as a persistent kernel over TMA tensor descriptors (one program per SM)."""
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        tm, tn = _tile_of(tile, M, N, BM, BN, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = a_desc.load([tm * BM, k])
            w = w_desc.load([tn * BN, k])
            acc = tl.dot(a, w.T, acc)
        c_desc.store([tm * BM, tn * BN], acc.to(tl.bfloat16))


@triton.jit
def persistent_logits_stats_kernel(a_desc, w_desc, c_desc, stats_ptr, M, N, K,
                                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                                   NUM_SMS: tl.constexpr):
    """The persistent TMA logits GEMM whose epilogue also writes each tile's row max and sum of exp."""
    tiles_n = tl.cdiv(N, BN)
    tiles = tl.cdiv(M, BM) * tiles_n
    for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True):
        tm, tn = _tile_of(tile, M, N, BM, BN, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a_desc.load([tm * BM, k]), w_desc.load([tn * BN, k]).T, acc)
        out = acc.to(tl.bfloat16)
        c_desc.store([tm * BM, tn * BN], out)
        _store_tile_stats(out, tm * BM + tl.arange(0, BM), tn * BN + tl.arange(0, BN), tn, stats_ptr, M, N, BN)


@triton.jit
def persistent_grad_kernel(g_desc, w_desc, out_desc, lse_ptr, label_ptr, scale_ptr, M, N, K,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                           NUM_SMS: tl.constexpr, SOFTMAX_PROLOGUE: tl.constexpr,
                           ROW_SCALE_PROLOGUE: tl.constexpr = False):
    """out[M, N] = G[M, K] @ W[K, N] as a persistent TMA kernel; SOFTMAX_PROLOGUE as grad_gemm_kernel."""
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True):
        tm, tn = _tile_of(tile, M, N, BM, BN, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if SOFTMAX_PROLOGUE or ROW_SCALE_PROLOGUE:
            rows = tm * BM + tl.arange(0, BM)
            lse2 = tl.load(lse_ptr + rows, mask=rows < M, other=0.0) * 1.4426950408889634
            label = tl.load(label_ptr + rows, mask=rows < M, other=-1)
            scale = tl.load(scale_ptr + rows, mask=rows < M, other=0.0)
        for k in range(0, K, BK):
            g = g_desc.load([tm * BM, k])
            w = w_desc.load([k, tn * BN])
            if SOFTMAX_PROLOGUE:
                kk = k + tl.arange(0, BK)
                prob = tl.exp2(g.to(tl.float32) * 1.4426950408889634 - lse2[:, None])
                hit = (kk[None, :] == label[:, None]).to(tl.float32)
                grad = tl.where(kk[None, :] < K, (prob - hit) * scale[:, None], 0.0)
                acc = tl.dot(grad.to(tl.bfloat16), w, acc)
            elif ROW_SCALE_PROLOGUE:
                # The cheapest operand rewrite: a per-row scale, no exp (what the A path alone costs).
                acc = tl.dot((g.to(tl.float32) * scale[:, None]).to(tl.bfloat16), w, acc)
            else:
                acc = tl.dot(g, w, acc)
        out_desc.store([tm * BM, tn * BN], acc.to(tl.bfloat16))


def _launch_persistent(kernel, operands, cfg, *args, **constexprs):
    """One program per SM; ``operands``: (tensor, block shape) pairs, passed as TMA descriptors first."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    BM, BN, BK, stages, warps = cfg
    descriptors = [TensorDescriptor.from_tensor(t, [{"BM": BM, "BN": BN, "BK": BK}[d] for d in block])
                   for t, block in operands]
    sms = torch.cuda.get_device_properties(operands[0][0].device).multi_processor_count
    kernel[(sms,)](*descriptors, *args, BM=BM, BN=BN, BK=BK, GROUP=8, NUM_SMS=sms, num_stages=stages,
                   num_warps=warps, **constexprs)


def run_persistent(a, w, c, cfg, warp_specialize):
    """c[M, N] = a[M, K] @ w[N, K]^T."""
    _launch_persistent(persistent_logits_kernel, [(a, ("BM", "BK")), (w, ("BN", "BK")), (c, ("BM", "BN"))],
                       cfg, a.shape[0], w.shape[0], a.shape[1], WARP_SPECIALIZE=warp_specialize)


def run_persistent_stats(a, w, c, stats, cfg):
    """As ``run_persistent``, plus each tile's row statistics into ``stats``."""
    _launch_persistent(persistent_logits_stats_kernel, [(a, ("BM", "BK")), (w, ("BN", "BK")),
                                                        (c, ("BM", "BN"))],
                       cfg, stats, a.shape[0], w.shape[0], a.shape[1])


def run_persistent_grad(g, w, out, lse, labels, scale, cfg, prologue, row_scale=False):
    """out[M, H] = g[M, V] @ w[V, H], with the operand rewrites of ``persistent_grad_kernel``."""
    _launch_persistent(persistent_grad_kernel, [(g, ("BM", "BK")), (w, ("BK", "BN")), (out, ("BM", "BN"))],
                       cfg, lse, labels, scale, g.shape[0], w.shape[1], g.shape[1],
                       SOFTMAX_PROLOGUE=prologue, ROW_SCALE_PROLOGUE=row_scale)


CONFIGS = [  # BM, BN, BK, stages, warps
    (128, 256, 64, 3, 8),
    (128, 256, 64, 4, 8),
    (128, 128, 64, 4, 4),
    (256, 128, 64, 3, 8),
    (128, 128, 128, 3, 8),
]
QUICK_CONFIGS = [(32, 32, 32, 1, 4), (16, 64, 16, 1, 4)]
# --persistent: the TMA kernels only (runs 51-53), over the configurations that compiled and led in run 50.
PERSISTENT_CONFIGS = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 4), (256, 128, 64, 3, 8), (64, 256, 64, 4, 4),
                      (128, 256, 32, 4, 8)]


def run_logits(a, w, c, stats, cfg, with_stats):
    BM, BN, BK, stages, warps = cfg
    M, K = a.shape
    N = w.shape[0]
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    logits_gemm_kernel[grid](a, w, c, stats, M, N, K, BM=BM, BN=BN, BK=BK, GROUP=8, WITH_STATS=with_stats,
                             num_stages=stages, num_warps=warps)


def run_grad(g, w, out, lse, labels, scale, cfg, prologue):
    """out[M, H] = g[M, V] @ w[V, H] (g: the gradient, or with ``prologue`` the logits)."""
    BM, BN, BK, stages, warps = cfg
    M, K = g.shape
    N = w.shape[1]
    if w.shape[0] != K or tuple(out.shape) != (M, N):
        raise ValueError(f"shapes: g {list(g.shape)}, w {list(w.shape)}, out {list(out.shape)}")
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    grad_gemm_kernel[grid](g, w, out, lse, labels, scale, M, N, K, BM=BM, BN=BN, BK=BK, GROUP=8,
                           SOFTMAX_PROLOGUE=prologue, num_stages=stages, num_warps=warps)


def check(M: int, H: int, V: int, configs, persistent: bool = False) -> None:
    """Every variant against torch on (M, H, V): logits, stats, both gradient GEMMs (``persistent``:
    the TMA kernels too, which need a GPU)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(M, H, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(DEVICE, DTYPE)
    ref = (a.float() @ w.float().T)
    for cfg in configs:
        c = torch.full((M, V), float("nan"), device=DEVICE, dtype=DTYPE)
        stats = torch.full((M, triton.cdiv(V, cfg[1]), 2), float("nan"), device=DEVICE)
        run_logits(a, w, c, stats, cfg, True)
        torch.testing.assert_close(c.float(), ref, rtol=2e-2, atol=2e-2)
        lse = torch.logsumexp(stats[..., 0] + stats[..., 1].log(), dim=1)
        torch.testing.assert_close(lse, torch.logsumexp(c.float(), dim=1), rtol=1e-4, atol=1e-4)
        labels = torch.randint(0, V, (M,), generator=g).to(DEVICE)
        scale = torch.rand(M, generator=g).to(DEVICE)
        grad = (torch.softmax(c.float(), 1) - torch.nn.functional.one_hot(labels, V)) * scale[:, None]
        expected = grad @ w.float()
        out = torch.full((M, H), float("nan"), device=DEVICE, dtype=DTYPE)
        run_grad(c, w, out, lse, labels, scale, cfg, True)
        torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
        run_grad(grad.to(DTYPE), w, out, lse, labels, scale, cfg, False)
        torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
        if persistent:
            c2 = torch.full_like(c, float("nan"))
            stats.fill_(float("nan"))
            run_persistent_stats(a, w, c2, stats, cfg)
            torch.testing.assert_close(c2, c)
            torch.testing.assert_close(torch.logsumexp(stats[..., 0] + stats[..., 1].log(), dim=1), lse)
            out.fill_(float("nan"))
            run_persistent_grad(c, w, out, lse, labels, scale, cfg, True)
            torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
            run_persistent_grad(c, w, out, lse, labels, scale, cfg, False, True)
            torch.testing.assert_close(out.float(), (c.float() * scale[:, None]) @ w.float(), rtol=3e-2, atol=3e-2)
    print(f"checked M={M} H={H} V={V}: {len(configs)} configs")


def measure(M: int, H: int, V: int, persistent: bool) -> list[list[str]]:
    """Table rows: cuBLAS, then each variant x configuration (the persistent TMA ones, fused and not,
    with ``persistent``; else the pointer-based kernels and the plain persistent logits GEMM)."""
    a = torch.randn(M, H, device=DEVICE, dtype=DTYPE)
    w = torch.randn(V, H, device=DEVICE, dtype=DTYPE) / H**0.5
    c = torch.empty(M, V, device=DEVICE, dtype=DTYPE)
    out = torch.empty(M, H, device=DEVICE, dtype=DTYPE)
    labels = torch.randint(0, V, (M,), device=DEVICE)
    scale = torch.full((M,), 1.0 / M, device=DEVICE)
    lse = torch.zeros(M, device=DEVICE)
    flop = 2.0 * M * H * V

    def row(gemm: str, name: str, cfg: object, fn, base_ms: float | None = None) -> tuple[list[str], float]:
        ms = bench(fn, warmup=50, rep=300)
        ratio = 1.0 if base_ms is None else base_ms / ms
        return [gemm, name, str(cfg), f"{ms:.3f}", f"{flop / ms / 1e9:.0f}", f"{ratio:.2f}"], ms

    rows = []
    cublas_logits, base_l = row("logits [M,H]x[H,V]", "cuBLAS (torch.mm)", "-", lambda: torch.mm(a, w.T, out=c))
    cublas_dh, base_g = row("dh [M,V]x[V,H]", "cuBLAS (torch.mm)", "-", lambda: torch.mm(c, w, out=out))
    rows += [cublas_logits, cublas_dh]
    # Realistic logits for the fused gradient: the row statistics of what the logits GEMM wrote.
    torch.mm(a, w.T, out=c)
    lse.copy_(torch.logsumexp(c.float(), dim=1))
    for cfg in PERSISTENT_CONFIGS if persistent else CONFIGS:
        stats = torch.empty(M, triton.cdiv(V, cfg[1]), 2, device=DEVICE)
        pointer_based = [
            ("logits", "Triton", partial(run_logits, a, w, c, stats, cfg, False), base_l),
            ("logits", "Triton + row stats epilogue", partial(run_logits, a, w, c, stats, cfg, True), base_l),
            ("logits", "Triton persistent TMA", partial(run_persistent, a, w, c, cfg, False), base_l),
            ("logits", "Triton persistent TMA, warp-specialized", partial(run_persistent, a, w, c, cfg, True), base_l),
            ("dh", "Triton", partial(run_grad, c, w, out, lse, labels, scale, cfg, False), base_g),
            ("dh", "Triton + softmax-gradient prologue", partial(run_grad, c, w, out, lse, labels, scale, cfg, True), base_g),
        ]
        fused_persistent = [
            ("logits", "Triton persistent TMA", partial(run_persistent, a, w, c, cfg, False), base_l),
            ("logits", "Triton persistent TMA + row stats epilogue", partial(run_persistent_stats, a, w, c, stats, cfg), base_l),
            ("dh", "Triton persistent TMA", partial(run_persistent_grad, c, w, out, lse, labels, scale, cfg, False), base_g),
            ("dh", "Triton persistent TMA + softmax-gradient prologue",
             partial(run_persistent_grad, c, w, out, lse, labels, scale, cfg, True), base_g),
            ("dh", "Triton persistent TMA + row-scale prologue (no exp)",
             partial(run_persistent_grad, c, w, out, lse, labels, scale, cfg, False, True), base_g),
        ]
        for gemm, name, fn, base in fused_persistent if persistent else pointer_based:
            try:
                rows.append(row(gemm, name, cfg, fn, base)[0])
            except Exception as exc:  # a config this Triton/card cannot compile (shared memory, features)
                rows.append([gemm, name, str(cfg), f"failed: {type(exc).__name__}: {str(exc)[:80]}", "", ""])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the CPU interpreter): correctness only")
    parser.add_argument("--persistent", action="store_true", help="only the persistent TMA kernels, fused and not")
    args = parser.parse_args()
    if args.quick or not CUDA:
        check(37, 64, 123, QUICK_CONFIGS)
        return
    configs = PERSISTENT_CONFIGS if args.persistent else CONFIGS
    check(300, 256, 1024, configs, persistent=args.persistent)  # 1024: whole TMA tiles
    write_table(f"triton_gemm_probe{'_persistent' if args.persistent else ''}",
                "Triton GEMMs with the row work fused, against cuBLAS (M=4096, H=4096, V=128256, bf16)",
                ["GEMM", "variant", "config (BM, BN, BK, stages, warps)", "median ms", "TFLOP/s", "vs cuBLAS"],
                measure(4096, 4096, 128256, args.persistent))


if __name__ == "__main__":
    main()
