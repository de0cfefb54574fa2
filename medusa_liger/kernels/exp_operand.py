"""One chunk of the fused cross-entropy with the row work inside the logits GEMM (Hopper, TMA).

The plain chunk step (fused_linear_cross_entropy.py) runs a row kernel between the GEMMs: three
passes over the [C, V] logits for the log-sum-exp and the gradient. That kernel cannot run beside
cuBLAS's GEMMs, and building the gradient inside the dh GEMM's operand costs that GEMM half its speed
(benchmarks/results/triton_gemm_probe_h100.md). Here the logits GEMM's epilogue writes an operand
that needs no log-sum-exp: with c_i the target logit of row i (computed first, one dot product),

    E_ij = exp(x_ij - c_i)   (j != t_i)        x = h W^T, never stored
    Z_i  = sum_{j != t_i} E_ij                 per-tile partial sums from the epilogue
    E_it = -Z_i                                written after the GEMM
    P_ij = E_ij / (1 + Z_i),   P_it - 1 = -Z_i / (1 + Z_i),   loss_i = lse_i - x_it = log(1 + Z_i)

so the gradient g = s (P - onehot) is the row-scaled operand  g_i = r_i E_i,  r_i = s_i / (1 + Z_i):

    dh (+)= r * (E @ W)      cuBLAS's GEMM, then one pass over [C, H] scaling the rows (or a Triton
                             GEMM with the scale in its epilogue: GemmConfig.cublas=False, when it
                             writes dh rather than adding to it)
    dW (+)= E^T @ (r * h)    cuBLAS, on the rows of h scaled first ([C, H], small)

No pass over the logits remains outside the GEMMs, the small gradients of confident rows keep their
digits (no exp(x - lse) - 1), and top-1 accuracy is "no other logit reaches the target's" (the
epilogue's row max). The shift fails only when a row's largest logit exceeds its target's by more
than ~88 (exp overflows): rows past OVERFLOW_MARGIN are recomputed by a device-side kernel with the
row max as shift (slow, one GEMV per such row, and no host sync), so the general formulas use

    e_t = exp(x_t - c),   r = s / (e_t + Z),   loss = (c - x_t) + log(e_t + Z).

A chunk is seven launches (``exp_operand_chunk``): the target logits, the exp-epilogue logits GEMM,
the overflow check, one row-results kernel (loss, accuracy, r, E_it, and r * h for dW), then the dW
GEMM and the dh GEMM with its row scale (z-loss: an eighth, rescaling the rows noted below). The
GEMMs' tiles are ``GemmConfig``s in ``GPU_TILES``.

Label smoothing eps (PyTorch's: loss = (1 - eps)(lse - x_t) + eps (lse - mean_j x_j)) keeps the
operand and adds a term that is the same for every column of a row, u_i = s_i eps / V:

    g_i = r_i E_i - u_i 1,   E_it = eps (e_t + Z) - Z,   loss = (lse - x_t) + eps (x_t - mean_i)
    dh  -= u w_sum           w_sum = sum_j W_j (fp32, one pass over W per projection), in the row scale
    dW  -= 1 q^T             q = sum_i u_i h_i over the chunks, applied once after the last
    mean_i = h_i . w_sum / V  in the target-logit kernel

A z-loss z lse^2 (lse = x_t + loss, the row's log-sum-exp) scales every probability's gradient by
a = 1 + 2 z lse (the row kernel's p_scale), so it moves into the row scale and the target column:

    r_i = s_i a_i / (e_t + Z),   E_it = (eps (e_t + Z) - Z + 2 z lse e_t) / a_i,   loss += z lse^2

which is r E_it - u = s (a P_t - (1 - eps) - eps / V). The numerator keeps the -Z of the plain case
(no e_t - (e_t + Z) cancellation on confident rows). Where |a| < 1/2 (lse < -1 / (4 z): all logits
far below 0) the division could overflow, so such a row is rescaled instead: E_i *= a / (e_t + Z),
r = s, E_it = (eps (e_t + Z) - Z + 2 z lse e_t) / (e_t + Z) (a device-side branch per row, like the
overflow check: a pass over the row only where it is taken).

Scope: hard labels without softcap or bias, bf16 on CUDA devices with TMA
(compute capability 9.0+, Triton 3.4+) or fp32 in the Triton interpreter; ``eligible`` says when, and the chunk
loop falls back to the row kernel otherwise. MEDUSA_LIGER_EXP_OPERAND=0 turns the path off.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from medusa_liger.kernels.chunking import mm_into
from medusa_liger.kernels.utils import multiprocessors, next_power_of_2, triton_interpreter_enabled, use_triton

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - no triton, or one without tensor descriptors
    triton = None
# Host-side tensor descriptors and tl.range(..., flatten=True) in persistent kernels: Triton 3.4+
# (tested on 3.6 on an H100 and 3.9 in the interpreter); older versions take the row kernel.
if triton is not None and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 4):
    triton = None

ENABLED = os.environ.get("MEDUSA_LIGER_EXP_OPERAND", "1") != "0"
# Rows whose max logit exceeds the target's by more are recomputed with the max as shift: exp(64) and
# the GEMM sums of such terms stay far from fp32/bf16 overflow (3.4e38 = exp(88.7)).
OVERFLOW_MARGIN = 64.0
# z-loss: rows with |1 + 2 z lse| below this are rescaled rather than divided by it (at most a
# factor 2 on E_it's magnitude, as without z-loss).
Z_LOSS_MIN_SCALE = 0.5


class GemmConfig(NamedTuple):
    """Launch configuration of one of the path's persistent TMA GEMMs."""

    bm: int  # tile rows
    bn: int  # tile columns
    bk: int  # reduction step
    stages: int  # pipeline depth (shared-memory buffers per operand)
    warps: int
    group: int  # tile rows visited together (_tile_of): their tiles share the other operand's in L2
    subtile: bool = False  # logits GEMM: the epilogue in two column halves (half the store buffer's memory)
    warp_specialize: bool = False  # producer/consumer warps (Triton's tl.range warp_specialize)
    # dh only: cuBLAS's GEMM into the output, then one pass scaling its rows (the other fields unused).
    cublas: bool = False
    # Persistent programs per SM: 2 lets two CTAs share an SM (when their shared memory and registers
    # fit), so one's epilogue can run beside the other's MMAs.
    programs_per_sm: int = 1
    # logits only: the ping-pong Gluon kernel (exp_operand_gluon.py; bm, bn, bk, stages, group used)
    # instead of the Triton one. Off: 1.6-2.2% slower (benchmarks/NOTES.md, runs 108-117).
    gluon: bool = False


# The configuration that matched cuBLAS on an H100 (triton_gemm_probe_h100.md, exp_operand_tiles_h100.md);
# small tiles in the interpreter. dh: cuBLAS and a row-scale pass, 2% faster than the Triton GEMM over a
# (b) step's chunks under sustained load (exp_operand_tiles_h100.md, dh_wave_probe_h100.md).
GPU_TILES = {"logits": GemmConfig(128, 256, 64, 3, 8, 8), "dh": GemmConfig(128, 256, 64, 3, 8, 8, cublas=True)}
INTERPRETER_TILES = GemmConfig(16, 32, 16, 1, 4, 8)

if triton is not None:
    # The kernels take exp(x) as exp2(x * LOG2E): one multiply-add per element.
    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _tile_of(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
        """Tile index -> (tile row, tile column), GROUP tile rows at a time (L2 reuse of W's tiles)."""
        tiles_n = tl.cdiv(N, BN)
        per_group = GROUP * tiles_n
        first_m = (tile // per_group) * GROUP
        size = tl.minimum(tl.cdiv(M, BM) - first_m, GROUP)
        return first_m + (tile % per_group) % size, (tile % per_group) // size

    @triton.jit
    def _target_logit_kernel(h_ptr, w_ptr, target_ptr, valid_ptr, t_ptr, x_t_ptr, shift_ptr, row_max_ptr,
                             w_sum_ptr, mean_ptr, H, V, BLOCK_H: tl.constexpr, SMOOTH: tl.constexpr):
        """Per row: t = target where valid else -1 (int32), x_t = h . w[t] in fp32 and the shift (both
        +inf on an ignored row, so that its E row is 0), and the row max's start value -inf. SMOOTH:
        also the row's mean logit h . w_sum / V (0 on an ignored row)."""
        row = tl.program_id(0)
        t = tl.where(tl.load(valid_ptr + row) != 0, tl.load(target_ptr + row), -1)
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc_sum = tl.zeros((BLOCK_H,), dtype=tl.float32)
        w_row = w_ptr + tl.maximum(t, 0).to(tl.int64) * H  # an ignored row reads row 0 (in bounds)
        for k in range(0, H, BLOCK_H):
            ks = k + tl.arange(0, BLOCK_H)
            h = tl.load(h_ptr + row.to(tl.int64) * H + ks, mask=ks < H, other=0.0).to(tl.float32)
            acc += h * tl.load(w_row + ks, mask=ks < H, other=0.0).to(tl.float32)
            if SMOOTH:
                acc_sum += h * tl.load(w_sum_ptr + ks, mask=ks < H, other=0.0)
        x_t = tl.where(t >= 0, tl.sum(acc, axis=0), float("inf"))
        tl.store(t_ptr + row, t.to(tl.int32))
        tl.store(x_t_ptr + row, x_t)
        tl.store(shift_ptr + row, x_t)
        tl.store(row_max_ptr + row, float("-inf"))
        if SMOOTH:
            tl.store(mean_ptr + row, tl.where(t >= 0, tl.sum(acc_sum, axis=0) / V, 0.0))

    @triton.jit
    def _exp_store(acc, row0, col0, shift2, target, N, e_desc, BN_PART: tl.constexpr):
        """The epilogue on acc = logits[row0:, col0:col0 + BN_PART]: stores E, returns its row sums and
        the rows' largest non-target logit."""
        cols = col0 + tl.arange(0, BN_PART)
        # The target column and columns past V at -inf: exp gives 0 and they never win the max.
        x = tl.where((cols[None, :] == target[:, None]) | (cols[None, :] >= N), float("-inf"), acc)
        e = tl.exp2(x * LOG2E - shift2[:, None])
        e_desc.store([row0, col0], e.to(e_desc.dtype))
        return tl.sum(e, axis=1), tl.max(x, axis=1)

    @triton.jit
    def _exp_logits_kernel(h_desc, w_desc, e_desc, shift_ptr, target_ptr, row_max_ptr, tile_sum_ptr,
                           M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           GROUP: tl.constexpr, SUBTILE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                           NUM_PROGRAMS: tl.constexpr):
        """E = exp(h W^T - shift) with the target column at 0, persistent over TMA descriptors.

        Epilogue per tile: E (bf16/fp32 store; the descriptor clips columns past V), each row's sum of
        E into tile_sum[row, tile column], and its largest non-target logit into row_max (atomic max:
        order-independent, so the result is deterministic). Ignored rows carry shift = +inf: E = 0.
        SUBTILE: the epilogue in two column halves, so its store buffer takes half the shared memory.
        """
        tiles_n = tl.cdiv(N, BN)
        # Hopper's warp specialization needs the loop nest kept (not flattened).
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * tiles_n, NUM_PROGRAMS, flatten=not WARP_SPECIALIZE,
                             warp_specialize=WARP_SPECIALIZE):
            tm, tn = _tile_of(tile, M, N, BM, BN, GROUP)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                acc = tl.dot(h_desc.load([tm * BM, k]), w_desc.load([tn * BN, k]).T, acc)
            rows = tm * BM + tl.arange(0, BM)
            in_rows = rows < M
            shift2 = tl.load(shift_ptr + rows, mask=in_rows, other=float("inf")) * LOG2E
            target = tl.load(target_ptr + rows, mask=in_rows, other=-1)
            if SUBTILE:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
                sum_l, max_l = _exp_store(left, tm * BM, tn * BN, shift2, target, N, e_desc, BN // 2)
                sum_r, max_r = _exp_store(right, tm * BM, tn * BN + BN // 2, shift2, target, N, e_desc, BN // 2)
                row_sum, row_max = sum_l + sum_r, tl.maximum(max_l, max_r)
            else:
                row_sum, row_max = _exp_store(acc, tm * BM, tn * BN, shift2, target, N, e_desc, BN)
            tl.store(tile_sum_ptr + rows * tiles_n + tn, row_sum, mask=in_rows)
            # Relaxed: the next kernel reads row_max; the default acq_rel puts a GPU-wide memory barrier
            # (waiting for the tile_sum stores) and an L1 invalidation around every tile's atomics.
            tl.atomic_max(row_max_ptr + rows, row_max, mask=in_rows, sem="relaxed")

    @triton.jit
    def _overflow_rows_kernel(h_ptr, w_ptr, e_ptr, shift_ptr, row_max_ptr, tile_sum_ptr, target_ptr,
                              V, H, tiles_n, margin, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        """Recompute E for a row whose max logit exceeds its shift by more than ``margin``, with the
        max as shift (a GEMV over W, fp32); every other row returns at once (a branch on the device)."""
        row = tl.program_id(0)
        m = tl.load(row_max_ptr + row)
        if tl.load(target_ptr + row) >= 0 and m - tl.load(shift_ptr + row) > margin:
            t = tl.load(target_ptr + row)
            total = tl.zeros((BLOCK_V,), dtype=tl.float32)
            for v in range(0, V, BLOCK_V):
                vs = v + tl.arange(0, BLOCK_V)
                x = tl.zeros((BLOCK_V,), dtype=tl.float32)
                for k in range(0, H, BLOCK_H):
                    ks = k + tl.arange(0, BLOCK_H)
                    h = tl.load(h_ptr + row.to(tl.int64) * H + ks, mask=ks < H, other=0.0).to(tl.float32)
                    w = tl.load(w_ptr + vs.to(tl.int64)[:, None] * H + ks[None, :],
                                mask=(vs[:, None] < V) & (ks[None, :] < H), other=0.0).to(tl.float32)
                    x += tl.sum(w * h[None, :], axis=1)
                e = tl.where((vs == t) | (vs >= V), 0.0, tl.exp2((x - m) * LOG2E))
                tl.store(e_ptr + row.to(tl.int64) * V + vs, e.to(e_ptr.dtype.element_ty), mask=vs < V)
                total += e
            # The row's sum now sits in its first tile's slot; the others are cleared.
            for j in range(0, tiles_n, BLOCK_V):
                js = j + tl.arange(0, BLOCK_V)
                tl.store(tile_sum_ptr + row.to(tl.int64) * tiles_n + js, tl.where(js == 0, tl.sum(total, axis=0), 0.0),
                         mask=js < tiles_n)
            tl.store(shift_ptr + row, m)

    @triton.jit
    def _row_results_kernel(e_ptr, t_ptr, x_t_ptr, shift_ptr, row_max_ptr, tile_sum_ptr, scale_ptr,
                            loss_ptr, correct_ptr, r_ptr, h_ptr, h_scaled_ptr, mean_ptr, u_ptr, eps, z_loss,
                            rescale_ptr, C, V, H, tiles_n, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                            SCALE_H: tl.constexpr, BLOCK_H: tl.constexpr, SMOOTH: tl.constexpr,
                            ZLOSS: tl.constexpr, MIN_SCALE: tl.constexpr):
        """Per row, from the epilogue's statistics: loss, top-1 hit and gradient scale, and E_it = -Z;
        with SCALE_H also the dW GEMM's operand h_scaled = r * h (rounded once from fp32).

        Z = sum of the row's tile sums; e_t = exp(x_t - shift) (1 unless the row overflowed);
        loss = (shift - x_t) + log(e_t + Z), which is log1p(Z) when shift == x_t;
        correct = no other logit reaches the target's; r = s / (e_t + Z). Ignored rows (t < 0) get
        0 everywhere and keep their all-zero E row. SMOOTH (label smoothing ``eps``, the row's mean
        logit in ``mean``): loss += eps (x_t - mean), E_it = eps (e_t + Z) - Z, and u = s eps / V,
        the gradient's part common to every column. ZLOSS (``z_loss``): loss += z lse^2, r and E_it
        as in the module docstring, and rescale = a / (e_t + Z) on rows with |a| < MIN_SCALE, else 1
        (``_rescale_rows_kernel`` then scales those rows of E).
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_rows = rows < C
        # Step 1: Z, the sum of the row's per-tile sums, added up per lane and reduced once after the
        # loop. (A reduction inside the loop crashes Triton 3.6's thread-locality pass when tiles_n is a
        # multiple of 16, e.g. V = 32768.)
        z_parts = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
        for j in range(0, tiles_n, BLOCK_T):
            js = j + tl.arange(0, BLOCK_T)
            z_parts += tl.load(tile_sum_ptr + rows[:, None] * tiles_n + js[None, :],
                               mask=in_rows[:, None] & (js[None, :] < tiles_n), other=0.0)
        z = tl.sum(z_parts, axis=1)
        t = tl.load(t_ptr + rows, mask=in_rows, other=-1)
        valid = t >= 0
        x_t = tl.load(x_t_ptr + rows, mask=valid, other=0.0)
        shift = tl.load(shift_ptr + rows, mask=valid, other=0.0)
        # Step 2: the loss. log1p(Z) without libdevice: log(u) * Z / (u - 1) with u = 1 + Z rounded
        # (exact to fp32 rounding, also for the tiny Z of confident rows, where log(u) alone is not).
        normal = shift == x_t
        e_t = tl.where(normal, 1.0, tl.exp(x_t - shift))
        denom = e_t + z
        u = 1.0 + z
        # (The divisor is kept off 0 where its branch is not taken: no 0/0 even in unused lanes.)
        log1p_z = tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))
        loss = tl.where(normal, log1p_z, (shift - x_t) + tl.log(denom))
        lse = x_t + loss
        if SMOOTH:
            loss += eps * (x_t - tl.load(mean_ptr + rows, mask=valid, other=0.0))
        if ZLOSS:
            loss += z_loss * lse * lse
        tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=in_rows)
        # Step 3: top-1 accuracy and the gradient's row scale (z-loss: times a = 1 + 2 z lse).
        row_max = tl.load(row_max_ptr + rows, mask=valid, other=0.0)
        tl.store(correct_ptr + rows, (valid & (row_max < x_t)).to(tl.int32), mask=in_rows)
        r = tl.where(valid, tl.load(scale_ptr) / denom, 0.0)
        if ZLOSS:
            a = 1.0 + 2.0 * z_loss * lse
            small = valid & (tl.abs(a) < MIN_SCALE)
            # A small a: E's row is rescaled by a / (e_t + Z) (below), so r is s and E_it's divisor e_t + Z.
            r = tl.where(small, tl.load(scale_ptr), r * a)
            tl.store(rescale_ptr + rows, tl.where(small, a / denom, 1.0), mask=in_rows)
        tl.store(r_ptr + rows, r, mask=in_rows)
        # Step 4: the target column of E, -Z (the gradient there is r * -Z = s (P_t - 1)); with
        # smoothing eps (e_t + Z) - Z, so that r E_it - u = s (P_t - (1 - eps) - eps / V); z-loss
        # adds 2 z lse e_t and divides by a, so that r E_it - u = s (a P_t - (1 - eps) - eps / V).
        e_target = -z
        if SMOOTH:
            e_target += eps * denom
            tl.store(u_ptr + rows, tl.where(valid, tl.load(scale_ptr) * eps / V, 0.0), mask=in_rows)
        if ZLOSS:
            e_target = (e_target + 2.0 * z_loss * lse * e_t) / tl.where(small, denom, a)
        tl.store(e_ptr + rows.to(tl.int64) * V + t, e_target.to(e_ptr.dtype.element_ty), mask=in_rows & valid)
        # Step 5: the rows of h scaled by r, the dW GEMM's second operand.
        if SCALE_H:
            for k in range(0, H, BLOCK_H):
                ks = k + tl.arange(0, BLOCK_H)
                offsets = rows.to(tl.int64)[:, None] * H + ks[None, :]
                mask = in_rows[:, None] & (ks[None, :] < H)
                h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                tl.store(h_scaled_ptr + offsets, (h * r[:, None]).to(h_scaled_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rescale_rows_kernel(e_ptr, rescale_ptr, t_ptr, V, BLOCK_V: tl.constexpr):
        """E[row, j] *= rescale[row] for j != t (z-loss rows with a small a); rows with rescale 1
        return at once (a branch on the device)."""
        row = tl.program_id(0)
        f = tl.load(rescale_ptr + row)
        if f != 1.0:
            t = tl.load(t_ptr + row)
            for v in range(0, V, BLOCK_V):
                vs = v + tl.arange(0, BLOCK_V)
                mask = (vs < V) & (vs != t)
                e = tl.load(e_ptr + row.to(tl.int64) * V + vs, mask=mask, other=0.0).to(tl.float32)
                tl.store(e_ptr + row.to(tl.int64) * V + vs, (e * f).to(e_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_scaled_gemm_kernel(e_desc, w_desc, out_desc, r_ptr, M, N, K,
                                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                                WARP_SPECIALIZE: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
        """out[M, N] = r[:, None] * (E[M, K] @ W[K, N]), persistent over TMA descriptors: the row
        scale is applied to the fp32 accumulator in the epilogue, the operands stream untouched."""
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * tl.cdiv(N, BN), NUM_PROGRAMS,
                             flatten=not WARP_SPECIALIZE, warp_specialize=WARP_SPECIALIZE):
            tm, tn = _tile_of(tile, M, N, BM, BN, GROUP)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                acc = tl.dot(e_desc.load([tm * BM, k]), w_desc.load([k, tn * BN]), acc)
            rows = tm * BM + tl.arange(0, BM)
            acc = acc * tl.load(r_ptr + rows, mask=rows < M, other=0.0)[:, None]
            out_desc.store([tm * BM, tn * BN], acc.to(out_desc.dtype))


    @triton.jit
    def _row_scale_kernel(x_ptr, r_ptr, u_ptr, v_ptr, out_ptr, M, N, stride_x, stride_out, ACCUMULATE: tl.constexpr,
                          RANK1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[M, N] (+)= r[:, None] * x (RANK1: - u[:, None] * v[None, :]) in fp32, rounded once (x may
        be out itself)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = x * tl.load(r_ptr + rows, mask=rows < M, other=0.0)[:, None]
        if RANK1:
            y -= tl.load(u_ptr + rows, mask=rows < M, other=0.0)[:, None] * tl.load(v_ptr + cols, mask=cols < N,
                                                                                      other=0.0)[None, :]
        if ACCUMULATE:
            y += tl.load(out_ptr + rows64 * stride_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows64 * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _tma_ready(*tensors: torch.Tensor) -> bool:
    # TMA descriptors: contiguous rows, 16-byte aligned base and row stride.
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0
               for t in tensors)


def supported(dtype: torch.dtype, device: torch.device, *, teacher: bool, bias: bool, label_smoothing: float,
              z_loss: float, softcap: float | None) -> bool:
    """Whether the path handles chunks of these options, dtype and device (before any buffer exists)."""
    if not (ENABLED and triton is not None and use_triton(torch.empty(0, device=device))):
        return False
    if teacher or bias or softcap is not None:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return triton_interpreter_enabled() and dtype == torch.float32


def eligible(logits_buf: torch.Tensor, weight: torch.Tensor, **options) -> bool:
    """``supported`` for the buffer's dtype and device, and TMA-ready operands (``options``: as there)."""
    return (supported(logits_buf.dtype, logits_buf.device, **options) and weight.dtype == logits_buf.dtype
            and _tma_ready(logits_buf, weight))


def _tiles(gemm: str, device: torch.device) -> GemmConfig:
    return GPU_TILES[gemm] if device.type == "cuda" else INTERPRETER_TILES


def target_logits(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                  w_sum: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The rows' shifts, from h [C, H], w [V, H] (contiguous), target [C] int64 and valid [C] bool.

    Returns (t [C] int32: target, -1 on ignored rows; x_t [C] fp32: h[i] . w[t_i], +inf on ignored
    rows so that their E row is 0; shift: a copy of x_t for ``exp_logits``; row_max: -inf, the start
    of ``exp_logits``' running max; mean [C] fp32: h[i] . w_sum / V, the mean logit, when ``w_sum``
    [H] fp32 (the column sums of w) is given, else None)."""
    C, H = h.shape
    t = torch.empty(C, device=h.device, dtype=torch.int32)
    x_t, shift, row_max, mean = torch.empty(4, C, device=h.device, dtype=torch.float32)
    _target_logit_kernel[(C,)](h, w, target, valid, t, x_t, shift, row_max, x_t if w_sum is None else w_sum, mean,
                               H, w.shape[0], BLOCK_H=min(1024, next_power_of_2(H)), SMOOTH=w_sum is not None)
    return t, x_t, shift, row_max, (None if w_sum is None else mean)


def exp_logits(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, shift: torch.Tensor, e: torch.Tensor,
               row_max: torch.Tensor) -> torch.Tensor:
    """E = exp(h w^T - shift) into ``e`` [C, V], the target column at 0, and ``row_max`` [C] fp32
    (start: -inf) raised to each row's largest non-target logit; returns the per-tile row sums of E
    [C, cdiv(V, BN)] fp32."""
    (C, H), V = h.shape, w.shape[0]
    cfg = _tiles("logits", h.device)
    if cfg.cublas:  # the epilogue is the point of this GEMM
        raise ValueError("GPU_TILES['logits'].cublas must be False: E comes from the logits GEMM's epilogue")
    if cfg.gluon:
        from medusa_liger.kernels import exp_operand_gluon

        return exp_operand_gluon.exp_logits(h, w, t, shift, e, row_max, bm=cfg.bm, bn=cfg.bn, bk=cfg.bk,
                                            stages=cfg.stages, group=cfg.group)
    programs = multiprocessors(h.device) * cfg.programs_per_sm
    tile_sum = torch.empty(C, triton.cdiv(V, cfg.bn), device=h.device)
    descriptors = [TensorDescriptor.from_tensor(h, [cfg.bm, cfg.bk]), TensorDescriptor.from_tensor(w, [cfg.bn, cfg.bk]),
                   TensorDescriptor.from_tensor(e, [cfg.bm, cfg.bn // 2 if cfg.subtile else cfg.bn])]
    _exp_logits_kernel[(programs,)](*descriptors, shift, t, row_max, tile_sum, C, V, H, BM=cfg.bm, BN=cfg.bn,
                                    BK=cfg.bk, GROUP=cfg.group, SUBTILE=cfg.subtile,
                                    WARP_SPECIALIZE=cfg.warp_specialize, NUM_PROGRAMS=programs,
                                    num_stages=cfg.stages, num_warps=cfg.warps)
    return tile_sum


def row_scaled_gemm(e: torch.Tensor, w: torch.Tensor, r: torch.Tensor, out: torch.Tensor, accumulate: bool,
                    rank1: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """out [C, H] (+)= r[:, None] * (e [C, V] @ w [V, H]) (- u[:, None] * v[None, :] with rank1 = (u [C],
    v [H]), fp32), r [C] fp32: cuBLAS's GEMM and a row-scale pass (``GemmConfig.cublas``, and always
    when accumulating or with a rank-1 term), or a persistent TMA GEMM scaling in its epilogue."""
    if not _tma_ready(out):
        raise ValueError("row_scaled_gemm: out must be contiguous with 16-byte aligned rows")
    cfg = _tiles("dh", e.device)
    if cfg.subtile:  # the dh epilogue has no halves (its output is [C, H], small)
        raise ValueError("GPU_TILES['dh'].subtile must be False: only the logits epilogue is subtiled")
    if cfg.cublas or accumulate or rank1 is not None:
        # cuBLAS's product (rounded to the operands' dtype), then its rows scaled (and added) in one pass.
        # Accumulation always goes this way: reading the output tile in the Triton GEMM's epilogue
        # needs more shared memory than an H100 has beside its pipeline (246-279 KB > 227 KB).
        product = out if not accumulate and out.dtype == e.dtype else torch.empty(out.shape, dtype=e.dtype,
                                                                                    device=out.device)
        torch.mm(e, w, out=product)
        block_m, block_n = 16, min(1024, next_power_of_2(out.shape[1]))
        grid = (triton.cdiv(out.shape[0], block_m), triton.cdiv(out.shape[1], block_n))
        u, v = (r, r) if rank1 is None else rank1
        _row_scale_kernel[grid](product, r, u, v, out, out.shape[0], out.shape[1], product.stride(0), out.stride(0),
                                ACCUMULATE=accumulate, RANK1=rank1 is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                                num_warps=8)
        return
    programs = multiprocessors(e.device) * cfg.programs_per_sm
    descriptors = [TensorDescriptor.from_tensor(e, [cfg.bm, cfg.bk]), TensorDescriptor.from_tensor(w, [cfg.bk, cfg.bn]),
                   TensorDescriptor.from_tensor(out, [cfg.bm, cfg.bn])]
    _row_scaled_gemm_kernel[(programs,)](*descriptors, r, e.shape[0], w.shape[1], e.shape[1], BM=cfg.bm, BN=cfg.bn,
                                         BK=cfg.bk, GROUP=cfg.group, WARP_SPECIALIZE=cfg.warp_specialize,
                                         NUM_PROGRAMS=programs, num_stages=cfg.stages, num_warps=cfg.warps)


def exp_operand_chunk(
    e: torch.Tensor, h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
    scale: torch.Tensor, row_loss: torch.Tensor, correct: torch.Tensor,
    dh: torch.Tensor | None, dh_accumulate: bool, w_acc: torch.Tensor | None, w_accumulate: bool,
    smoothing: float = 0.0, w_sum: torch.Tensor | None = None, w_common: torch.Tensor | None = None,
    z_loss: float = 0.0,
) -> None:
    """One chunk: loss, accuracy and every gradient, through the shifted-exponential operand.

    e:      [C, V] buffer for E (compute dtype, contiguous), overwritten
    h, w:   the chunk's hidden states [C, H] and the projection [V, H] (compute dtype)
    target, valid: [C] int64 targets (any value where not valid) and bool mask (cross_entropy.row_targets)
    scale:  one-element fp32 tensor, the head's gradient factor s
    row_loss, correct: [C] outputs (fp32 loss, int32 0/1)
    dh:     [C, H] hidden gradient, written (or added to with ``dh_accumulate``); None: not needed
    w_acc:  [V, H] weight-gradient accumulator, written (or added to with ``w_accumulate``); None: frozen
    smoothing: label smoothing eps; with eps > 0, ``w_sum`` [H] fp32 holds w's column sums and, when w
            trains, ``w_common`` [H] fp32 collects q = sum_i u_i h_i: the caller subtracts it from
            every row of the weight gradient after the last chunk (the accumulator lacks it)
    z_loss: the z-loss factor z (loss += z lse^2 per valid row)
    """
    C, H = h.shape
    V = w.shape[0]
    smooth = smoothing != 0.0
    if smooth and (w_sum is None or (w_acc is not None and w_common is None)):
        raise ValueError("exp_operand_chunk: label smoothing needs w_sum, and w_common when the weight trains")
    if not _tma_ready(h):  # a view off a 16-byte boundary, or strided: a fresh contiguous copy
        h = h.clone(memory_format=torch.contiguous_format)
    # Step 1: the target logits; they are the shift (+inf on ignored rows). Smoothing: the mean logits.
    t, x_t, shift, row_max, mean = target_logits(h, w, target, valid, w_sum if smooth else None)
    # Step 2: E and its statistics in the logits GEMM's epilogue.
    tile_sum = exp_logits(h, w, t, shift, e, row_max)
    # Step 3: rows whose max overflowed the shift are redone with the max as shift (usually none).
    _overflow_rows_kernel[(C,)](h, w, e, shift, row_max, tile_sum, t, V, H, tile_sum.shape[1], OVERFLOW_MARGIN,
                                BLOCK_V=64, BLOCK_H=min(256, next_power_of_2(H)))
    # Step 4: per-row loss (z-loss included), accuracy and gradient scale r; E's target column becomes
    # -Z (plus the smoothing and z-loss terms); and for dW the
    # rows of h scaled by r, which may borrow dh's storage (dh is written after dW's GEMM reads them).
    r = torch.empty(C, device=h.device, dtype=torch.float32)
    u = torch.empty(C, device=h.device, dtype=torch.float32) if smooth else None
    h_scaled = None
    if w_acc is not None:
        borrow = dh is not None and not dh_accumulate and dh.dtype == h.dtype and dh.is_contiguous()
        h_scaled = dh if borrow else torch.empty_like(h)
    rescale = torch.empty(C, device=h.device, dtype=torch.float32) if z_loss != 0.0 else None
    block_r = 16
    _row_results_kernel[(triton.cdiv(C, block_r),)](
        e, t, x_t, shift, row_max, tile_sum, scale, row_loss, correct, r, h, h if h_scaled is None else h_scaled,
        x_t if mean is None else mean, r if u is None else u, float(smoothing), float(z_loss),
        r if rescale is None else rescale, C, V, H, tile_sum.shape[1], BLOCK_R=block_r, BLOCK_T=128,
        SCALE_H=h_scaled is not None, BLOCK_H=min(256, next_power_of_2(H)), SMOOTH=smooth, ZLOSS=rescale is not None,
        MIN_SCALE=Z_LOSS_MIN_SCALE)
    if rescale is not None:  # z-loss rows with a small a (usually none)
        _rescale_rows_kernel[(C,)](e, rescale, t, V, BLOCK_V=1024)
    # Step 5: dW (+)= E^T (r h); smoothing: q += sum_i u_i h_i, with u_i = s eps / V on valid rows
    # (the valid rows of h summed in fp32 by a [1, C] x [C, H] product, then scaled).
    if w_acc is not None:
        mm_into(w_acc, e.t(), h_scaled, accumulate=w_accumulate)
        if smooth:
            valid_sum = torch.empty(1, H, device=h.device, dtype=torch.float32)
            mm_into(valid_sum, valid.to(h.dtype)[None], h, accumulate=False)
            w_common.add_(valid_sum[0] * (scale * (smoothing / V)))
    # Step 6: dh (+)= r * (E @ W) (- u w_sum): cuBLAS then a row-scale pass, or the scale in a Triton
    # GEMM's epilogue.
    if dh is not None:
        row_scaled_gemm(e, w, r, dh, dh_accumulate, None if u is None else (u, w_sum))
