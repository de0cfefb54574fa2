"""Does a shifted-exponential operand remove the Medusa loss's row kernel at cuBLAS speed?

``triton_gemm_probe.py`` found that the cross-entropy gradient cannot be built inside the hidden-
gradient GEMM (a Triton operand rewritten in registers runs at 0.43-0.76 of cuBLAS), while a logits
GEMM with an epilogue runs at 0.96 of cuBLAS. This probe moves *all* the row work into that epilogue,
by writing an operand that does not depend on the log-sum-exp. With a per-row shift c_i known before
the GEMM, the target logit c_i = x_it (one fp32 dot product per row), and the target column set aside:

    E_ij = exp(x_ij - c_i)  for j != t_i,   E_it = 0            (x = h W^T, the logits; E in bf16)
    Z_i  = sum_j E_ij  (the epilogue's per-tile sums),   r_i = 1 / (1 + Z_i) = exp(c_i - lse_i)
    P_ij = E_ij * r_i  (j != t_i),   P_it - 1 = -Z_i r_i,   loss_i = lse_i - x_it = log(1 + Z_i)

so the gradient s_i (P_ij - [j = t_i]) of the loss splits into a row scale of E and one column:

    dh_i = s_i r_i (E W)_i + s_i (P_it - 1) W_t_i          (cuBLAS on E, fp32 out, then [M, H] work)
    dW  += E^T (s r h) + scatter of s_i (P_it - 1) h_i to row t_i       (cuBLAS on E, then index_add)

P_it - 1 and the loss come from fp32 sums, never from a difference with the lse, so a confident row's
small gradient keeps its digits (today's row kernel forms exp(x - lse) - 1 and loses some). The cuBLAS GEMMs run unchanged; the row
kernel's three passes over the [M, V] chunk disappear; the cost is the exp epilogue. A row whose
largest logit exceeds c_i by more than ~88 would overflow E; the probe counts such rows (a real op
would recompute them), it does not handle them.

Measured per [M, V] chunk at the issue's shapes (M = 4096, H = 4096, V = 128256, bf16): today's
pipeline (cuBLAS logits, our row kernel, cuBLAS dh and dW) against this one, frozen weight (setting
(b): logits + dh) and trainable (setting (a): + dW into an fp32 accumulator), median of ``do_bench``.

    python benchmarks/exp_operand_probe.py            # GPU
    python benchmarks/exp_operand_probe.py --quick    # CPU interpreter: correctness on small shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, installed or not

from benchmarks.common import CUDA, DEVICE, DTYPE, bench, write_table  # noqa: E402  (sets TRITON_INTERPRET on CPU)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from benchmarks.triton_gemm_probe import _tile_of  # noqa: E402
from medusa_liger.kernels.chunking import mm_into  # noqa: E402
from medusa_liger.kernels.cross_entropy import ce_rows  # noqa: E402


@triton.jit
def exp_logits_kernel(h_desc, w_desc, e_desc, shift_ptr, target_ptr, tile_max_ptr, tile_sum_ptr, M, N, K,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                      NUM_SMS: tl.constexpr):
    """E = exp(h W^T - c) with the target column at 0 (ignored rows: c = +inf, so E = 0), persistent
    over TMA descriptors; per tile and row: the largest non-target logit and the sum of E."""
    tiles_n = tl.cdiv(N, BN)
    tiles = tl.cdiv(M, BM) * tiles_n
    for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True):
        tm, tn = _tile_of(tile, M, N, BM, BN, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(h_desc.load([tm * BM, k]), w_desc.load([tn * BN, k]).T, acc)
        rows = tm * BM + tl.arange(0, BM)
        cols = tn * BN + tl.arange(0, BN)
        in_rows = rows < M
        shift2 = tl.load(shift_ptr + rows, mask=in_rows, other=float("inf")) * 1.4426950408889634
        target = tl.load(target_ptr + rows, mask=in_rows, other=-1)
        # The target column and columns past V (the TMA store clips them) at -inf: exp 0, never the max.
        x = tl.where((cols[None, :] == target[:, None]) | (cols[None, :] >= N), float("-inf"), acc)
        e = tl.exp2(x * 1.4426950408889634 - shift2[:, None])
        e_desc.store([tm * BM, tn * BN], e.to(e_desc.dtype))
        # Per-tile statistics, combined over the V / BN tiles afterwards ([M, V / BN], small).
        stat = rows * tiles_n + tn
        tl.store(tile_max_ptr + stat, tl.max(x, axis=1), mask=in_rows)
        tl.store(tile_sum_ptr + stat, tl.sum(e, axis=1), mask=in_rows)


CONFIG = (128, 256, 64, 3, 8)  # BM, BN, BK, stages, warps: the best TMA configuration of runs 50-54
QUICK_CONFIG = (16, 32, 16, 1, 4)


def exp_logits(h, w, target, shift, cfg, sms):
    """Launch ``exp_logits_kernel`` on h [M, H], w [V, H]; returns (E, tile max, tile sum)."""
    BM, BN, BK, stages, warps = cfg
    (M, H), V = h.shape, w.shape[0]
    tiles_n = triton.cdiv(V, BN)
    e = torch.empty(M, V, device=h.device, dtype=h.dtype)
    tile_max = torch.empty(M, tiles_n, device=h.device)
    tile_sum = torch.empty(M, tiles_n, device=h.device)
    descs = [TensorDescriptor.from_tensor(h, [BM, BK]), TensorDescriptor.from_tensor(w, [BN, BK]),
             TensorDescriptor.from_tensor(e, [BM, BN])]
    exp_logits_kernel[(sms,)](*descs, shift, target, tile_max, tile_sum, M, V, H,
                              BM=BM, BN=BN, BK=BK, GROUP=8, NUM_SMS=sms, num_stages=stages, num_warps=warps)
    return e, tile_max, tile_sum


def target_shift(h, w, target):
    """(valid [M], target clamped to [0, V), its weight rows w_t [M, H], shift c [M] fp32): c_i is
    row i's target logit x_it in fp32 (one dot product), +inf for ignored rows (their E is 0)."""
    valid = target >= 0
    t = target.clamp(min=0)
    w_t = w.index_select(0, t)
    shift = torch.linalg.vecdot(h.float(), w_t.float())
    return valid, t, w_t, torch.where(valid, shift, float("inf"))


def exp_operand_chunk(h, w, target, scale, cfg, sms, w_acc=None):
    """One chunk of the loss through the shifted-exponential operand.

    h [M, H], w [V, H] (bf16), target [M] int64 (-1: ignored), scale [M] fp32 (s_i, 0 when ignored).
    Returns (row loss [M], correct [M], dh [M, H]); adds the weight gradient to ``w_acc`` [V, H] fp32.
    """
    valid, t, w_t, shift = target_shift(h, w, target)
    e, tile_max, tile_sum = exp_logits(h, w, target, shift, cfg, sms)
    # With c_i = x_it the target's own term is 1. No lse is formed: subtracting it from a logit near
    # it would cost the small gradients of confident rows their digits.
    z = tile_sum.sum(1)
    row_loss = torch.where(valid, torch.log1p(z), 0.0)  # lse - x_t
    correct = valid & (tile_max.max(1).values < shift)  # the target beats every other logit
    sr = scale / (1.0 + z)  # s_i r_i, where P_ij = E_ij r_i
    coef = torch.where(valid, -z * sr, 0.0)  # s_i (P_it - 1) = -s_i Z_i r_i, precise when P_it is near 1
    dh32 = torch.empty(h.shape, device=h.device, dtype=torch.float32)
    mm_into(dh32, e, w, accumulate=False)
    dh = (dh32 * sr[:, None] + coef[:, None] * w_t.float()).to(h.dtype)
    if w_acc is not None:
        mm_into(w_acc, e.t(), (h.float() * sr[:, None]).to(h.dtype), accumulate=True)
        w_acc.index_add_(0, t, coef[:, None] * h.float())
    return row_loss, correct, dh


def row_kernel_chunk(h, w, labels, scale, w_acc=None):
    """Today's chunk: cuBLAS logits, the row kernel (loss, accuracy, gradient in place), cuBLAS dh
    (and dW into ``w_acc``). ``labels`` are the chunk's targets with shift 0 (-100: ignored)."""
    M = h.shape[0]
    z = torch.empty(M, w.shape[0], device=h.device, dtype=h.dtype)
    mm_into(z, h, w.t(), accumulate=False)
    lse = torch.empty(M, device=h.device)
    loss = torch.empty(M, device=h.device)
    correct = torch.empty(M, device=h.device, dtype=torch.int32)
    ce_rows(z, labels, seq_len=M, scale=scale[:1], lse=lse, loss=loss, correct=correct, write_grad=True)
    dh = torch.empty_like(h)
    mm_into(dh, z, w, accumulate=False)
    if w_acc is not None:
        mm_into(w_acc, z.t(), h, accumulate=True)
    return loss, correct, dh


def make_inputs(M, H, V, ignored=0.1, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(M, H, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(V, H, generator=g) * 2.0 / H**0.5).to(DEVICE, DTYPE)  # logits ~ N(0, 4): peaked rows
    target = torch.randint(0, V, (M,), generator=g)
    target[torch.rand(M, generator=g) < ignored] = -1
    target = target.to(DEVICE)
    n_valid = int((target >= 0).sum())
    scale = torch.where(target >= 0, 1.0 / n_valid, 0.0).float()
    return h, w, target, scale


def check(M, H, V, cfg, sms) -> str:
    """Both pipelines against an fp32 reference on (M, H, V): loss, accuracy, dh, dW."""
    h, w, target, scale = make_inputs(M, H, V)
    # Plant one confident row (its target logit ~16, the rest ~N(0, 4)): its small gradient must survive.
    target[0] = 5
    w[5] = h[0] * (16.0 / H)
    scale = torch.where(target >= 0, 1.0 / int((target >= 0).sum()), 0.0).float()
    valid = target >= 0
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()  # fp64: the small gradient is exact
    logits = hr @ wr.T
    ref_rows = torch.nn.functional.cross_entropy(logits, target.clamp(min=0), reduction="none")
    (ref_rows * scale.double()).sum().backward()
    ref_correct = (logits.argmax(1) == target) & valid
    out = []
    for name, run in [("exp operand", lambda acc: exp_operand_chunk(h, w, target, scale, cfg, sms, acc)),
                      ("row kernel", lambda acc: row_kernel_chunk(h, w, torch.where(valid, target, -100), scale, acc))]:
        w_acc = torch.zeros(V, H, device=DEVICE)
        loss, correct, dh = run(w_acc)
        torch.testing.assert_close(torch.where(valid, loss, 0.0), torch.where(valid, ref_rows, 0.0).float().detach(),
                                   rtol=2e-2, atol=2e-2)
        # Top-1 near-ties may split differently on rounded logits (the row kernel reads bf16 ones).
        flips = int((correct.bool() != ref_correct).sum())
        assert flips <= 0.02 * M, f"{name}: {flips} of {M} rows' accuracy differs from the reference"
        tol = dict(rtol=5e-2, atol=5e-2 * float(hr.grad.abs().max()))
        torch.testing.assert_close(dh.float(), hr.grad.float(), **tol)
        torch.testing.assert_close(w_acc, wr.grad.float(), rtol=5e-2, atol=5e-2 * float(wr.grad.abs().max()))
        # The confident row: relative error of its gradient (the case that needs P_t - 1 in fp32).
        rel = float((dh[0].double() - hr.grad[0]).norm() / hr.grad[0].norm())
        out.append(f"{name}: confident row's dh relative error {rel:.2e}")
    return "; ".join(out)


def measure(M, H, V, cfg, sms) -> list[list[str]]:
    h, w, target, scale = make_inputs(M, H, V)
    labels = torch.where(target >= 0, target, -100)
    w_acc = torch.zeros(V, H, device=DEVICE)
    valid, _, _, shift = target_shift(h, w, target)
    z = torch.empty(M, V, device=DEVICE, dtype=DTYPE)
    # The shift's overflow risk on these logits: how far each row's max lies above its target logit.
    tile_max = exp_logits(h, w, target, shift, cfg, sms)[1]
    above = (tile_max.max(1).values - shift)[valid]
    # The two gradient operands as the pipelines leave them: today's in place over the logits, and E.
    mm_into(z, h, w.t(), accumulate=False)
    lse, loss, correct = (torch.empty(M, device=DEVICE) for _ in range(3))
    ce_rows(z, labels, seq_len=M, scale=scale[:1], lse=lse, loss=loss, correct=correct, write_grad=True)
    e = exp_logits(h, w, target, shift, cfg, sms)[0]
    h_scaled = (h.float() * scale[:, None]).to(DTYPE)
    dh, dh32 = torch.empty_like(h), torch.empty(M, H, device=DEVICE)
    timed = [
        ("logits GEMM alone", "cuBLAS", lambda: mm_into(z, h, w.t(), accumulate=False)),
        ("logits GEMM alone", "Triton TMA + exp epilogue", lambda: exp_logits(h, w, target, shift, cfg, sms)),
        ("dh GEMM alone", "cuBLAS on today's gradient, bf16 out", lambda: mm_into(dh, z, w, accumulate=False)),
        ("dh GEMM alone", "cuBLAS on today's gradient, fp32 out", lambda: mm_into(dh32, z, w, accumulate=False)),
        ("dh GEMM alone", "cuBLAS on E, fp32 out", lambda: mm_into(dh32, e, w, accumulate=False)),
        ("dW GEMM alone (fp32 acc)", "cuBLAS on today's gradient", lambda: mm_into(w_acc, z.t(), h, accumulate=True)),
        ("dW GEMM alone (fp32 acc)", "cuBLAS on E", lambda: mm_into(w_acc, e.t(), h_scaled, accumulate=True)),
        ("(b) frozen: logits + row work + dh", "today: cuBLAS + row kernel + cuBLAS",
         lambda: row_kernel_chunk(h, w, labels, scale)),
        ("(b) frozen: logits + row work + dh", "exp operand + cuBLAS",
         lambda: exp_operand_chunk(h, w, target, scale, cfg, sms)),
        ("(a) trainable: + dW (fp32 acc)", "today: cuBLAS + row kernel + cuBLAS",
         lambda: row_kernel_chunk(h, w, labels, scale, w_acc)),
        ("(a) trainable: + dW (fp32 acc)", "exp operand + cuBLAS",
         lambda: exp_operand_chunk(h, w, target, scale, cfg, sms, w_acc)),
    ]
    rows, base = [], {}
    for what, name, fn in timed:
        ms = bench(fn, warmup=20, rep=200)
        base.setdefault(what, ms)
        rows.append([what, name, f"{ms:.3f}", f"{base[what] / ms:.3f}"])
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
    rows.append(["logits of this run", f"row max - target logit: mean {float(above.mean()):.1f}, "
                 f"max {float(above.max()):.1f}; rows above 80 (overflow risk): {int((above > 80).sum())}", "", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the CPU interpreter): correctness only")
    args = parser.parse_args()
    if args.quick or not CUDA:
        print(check(40, 32, 200, QUICK_CONFIG, sms=4))
        return
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(check(512, 256, 4096, CONFIG, sms), flush=True)
    write_table("exp_operand_probe", "One chunk of the Medusa loss: row kernel vs shifted-exponential operand "
                "(M=4096, H=4096, V=128256, bf16)", ["work", "pipeline", "median ms", "speed vs first"],
                measure(4096, 4096, 128256, CONFIG, sms))


if __name__ == "__main__":
    main()
