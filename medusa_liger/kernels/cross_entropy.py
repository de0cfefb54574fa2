"""Cross-entropy over logits [N, V] with an online log-sum-exp and the gradient written in place.

For row n with logits x (optionally plus a bias b, then soft-capped: y = cap * tanh((x + b) / cap))
and a target t (``ignore_index``, an out-of-range label or a row cut off by the caller's target map
makes the row *ignored*):

    lse      = log sum_j exp(y_j)                       (online: running max m, running sum d)
    loss_n   = (1 - eps) * (lse - y_t) + eps * (lse - mean_j y_j) + z * lse^2
    dloss/dy = softmax(y) * (1 + 2 z lse) - (1 - eps) * onehot(t) - eps / V
    dloss/dx = dloss/dy * (1 - (y / cap)^2)             (softcap chain rule; 1 without softcap)

``eps`` is PyTorch's ``label_smoothing`` (uniform over the V classes), ``z`` the z-loss weight.
Ignored rows have loss 0 and gradient 0.
Logits may be -inf (a masked or padded vocabulary, a -inf bias): they get probability 0 and
gradient 0 (``-eps / V`` with smoothing), as in F.cross_entropy; with label_smoothing > 0 the
loss of a row holding a -inf logit is +inf (mean_j y_j = -inf), again as F.cross_entropy gives.
"mean" divides by the number of valid rows, counted on the device (no host sync); with no valid
row the loss is 0, never NaN.

One Triton row kernel does every variant: pass 1 reads the row once (lse, target logit, smoothing
sum, argmax); pass 2 (optional) re-reads it and overwrites it with the gradient times a per-row
factor read from device memory. ``cross_entropy`` runs pass 1 in forward and pass 2 in backward
(factor = grad_output / count), so the logits cross memory three times in all and no second
[N, V] buffer exists. The fused multi-head loss runs both passes in one launch per chunk, with the
target read straight from un-shifted [B, T] labels (``row_start``, ``seq_len``, ``shift``,
``segment_ids``) and the factor head_weight[k] / count[k]. Pass 1 also sums the non-target part of
d, and the target column's gradient is formed with 1 - P_t = rest / d: a confident row (P_t ~ 1 -
1e-4) keeps the digits that exp(y_t - lse) - 1 loses to lse's rounding (~1e-2 relative). In one
launch rest / d stays in registers; ``cross_entropy`` saves it per row (``target_miss``, one fp32
per row beside lse) from forward for backward.

IMPORTANT: when the logits require grad, backward OVERWRITES the logits tensor with its gradient
(Liger does the same in forward; here the logits stay intact until backward). So run backward once
(no retain_graph re-runs), and do not feed logits that another autograd op saved (as its output,
like torch.tanh, or as its input, like a z-loss written by hand): use the ``softcap`` and ``z_loss``
options instead; autograd then raises its "modified by an inplace operation" error. Labels outside
[0, V) other than ``ignore_index`` raise ValueError for CPU tensors; on the GPU (no host sync
allowed) they are treated as ignored rows and never read out of bounds.
"""

from __future__ import annotations

import math

import torch

from medusa_liger.kernels.utils import (
    check_float, check_labels, check_shape, first_order_only, multiprocessors, next_power_of_2, use_triton,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the PyTorch path
    triton = None

_REDUCTIONS = ("mean", "sum", "none")
_TORCH_ROWS_PER_STEP = 4096  # rows per step of the PyTorch path (bounds its fp32 temporaries)
# Row-kernel grid: 0 launches one program per row; k > 0 launches k programs per SM that stride over
# the rows (fewer rows in flight, so pass 2 may re-read them from L2). An experiment the profile
# (benchmarks/profile_medusa_loss.py) measures both ways; the default stays one program per row.
PERSISTENT_PROGRAMS_PER_SM = 0
# L2 hints: pass 1 loads the row evict-last (pass 2 reads it again), pass 2 loads and stores it
# evict-first (never read again here). Bit-identical results; on an H100 the one-launch row kernel
# runs 4.5-5.7% faster with them at 2048-4096 rows of V = 128256 (results/tune_row_kernel_h100.md).
L2_HINTS = True


def launch_config(n_cols: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) of the row kernel: wide blocks on the GPU, small ones in the interpreter."""
    if device.type == "cuda":
        block = min(next_power_of_2(n_cols), 8192)
        return block, (16 if block >= 8192 else 8 if block >= 2048 else 4)
    return min(next_power_of_2(n_cols), 512), 4


if triton is not None:

    @triton.jit
    def _tanh(x):
        # tanh from exp (no libdevice, so the interpreter runs it): 1 - 2 / (e^{2x} + 1) saturates
        # to +-1 cleanly for large |x| (e^{2x} -> inf or 0).
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def load_row_block(row_ptr, bias_ptr, cols, mask, other, softcap,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVICT: tl.constexpr):
        # One block of the row in fp32: x (+ bias), soft-capped; masked columns get ``other``.
        # EVICT: the load's L2 eviction policy ("" for the default).
        x = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        return tl.where(mask, x, other)

    @triton.jit
    def _rescaled_exp(m, y):
        """For block y and the running max m: (new max, block max, exp(y - new max), the factor
        exp(m - new max) that moves sums taken at m to the new max)."""
        block_max = tl.max(y, 0)
        m_new = tl.maximum(m, block_max)
        # Safe max: while every value so far is -inf (masked or padded vocabulary, a -inf bias),
        # m_new is -inf and exp(-inf - -inf) would be NaN; shifting by 0 instead gives exp(-inf) = 0
        # for both the old sum and the block.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        return m_new, block_max, tl.exp(y - m_safe), tl.exp(m - m_safe)

    @triton.jit
    def online_logsumexp(m, d, y):
        """One block y of an online log-sum-exp: the running max m and sum d = sum exp(x - m) of the
        blocks so far, updated; returns (m, d, the block's max)."""
        m_new, block_max, e, rescale = _rescaled_exp(m, y)
        return m_new, d * rescale + tl.sum(e, 0), block_max

    @triton.jit
    def online_logsumexp_rest(m, d, rest, y, cols, target, start, BLOCK: tl.constexpr):
        """online_logsumexp that also keeps rest = sum over the columns other than ``target`` of
        exp(x - m), so that 1 - P_t = rest / d has no cancellation (exp(x_t - lse) - 1 loses a
        confident row's digits to lse's rounding). Returns (m, d, rest, the block's max)."""
        m_new, block_max, e, rescale = _rescaled_exp(m, y)
        block_sum = tl.sum(e, 0)
        # Only the target's block (one of V / BLOCK) sums its other columns separately.
        if (target >= start) & (target < start + BLOCK):
            block_rest = tl.sum(tl.where(cols == target, 0.0, e), 0)
        else:
            block_rest = block_sum
        return m_new, d * rescale + block_sum, rest * rescale + block_rest, block_max

    @triton.jit
    def running_argmax(best, best_idx, y, block_max, start):
        """The first argmax over the blocks so far, with block y (its max block_max) at column start."""
        # Strictly greater keeps the first maximum, like torch.argmax.
        block_idx = start + tl.argmax(y, 0)
        return tl.maximum(best, block_max), tl.where(block_max > best, block_idx, best_idx)

    @triton.jit
    def row_target(pid, labels_ptr, segment_ptr, row_ids_ptr, row_start, seq_len, shift, n_cols, ignore_index,
                   HAS_SEGMENTS: tl.constexpr, HAS_ROW_IDS: tl.constexpr):
        """(target, valid) of chunk row ``pid``: global row n = row_ids[pid] if given, else
        row_start + pid; target 0 where invalid (the rule of ``row_targets``)."""
        # Target of global row n (position t of its sequence): labels[n + shift] when t + shift
        # stays inside the sequence (and, packed, inside the same segment). Masked loads keep an
        # invalid row from ever touching memory outside labels or the logits row.
        if HAS_ROW_IDS:
            n = tl.load(row_ids_ptr + pid).to(tl.int64)
        else:
            n = row_start + pid
        inside = (n % seq_len) + shift < seq_len
        target = tl.load(labels_ptr + n + shift, mask=inside, other=ignore_index).to(tl.int64)
        valid = inside & (target != ignore_index) & (target >= 0) & (target < n_cols)
        if HAS_SEGMENTS:
            here = tl.load(segment_ptr + n)
            there = tl.load(segment_ptr + n + shift, mask=inside, other=0)
            valid = valid & (here == there)
        return tl.where(valid, target, 0), valid

    @triton.jit
    def _ce_row(
        pid, logits_ptr, logits_row_stride, labels_ptr, segment_ptr, bias_ptr, scale_ptr, scale_stride,
        lse_ptr, loss_ptr, correct_ptr, row_ids_ptr, miss_ptr,
        row_start, seq_len, shift, n_cols, ignore_index, label_smoothing, z_loss, softcap,
        HAS_BIAS: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
        COMPUTE_LSE: tl.constexpr, STORE_CORRECT: tl.constexpr, WRITE_GRAD: tl.constexpr,
        HAS_ROW_IDS: tl.constexpr, HAS_MISS: tl.constexpr, BLOCK: tl.constexpr, PASS1_EVICT: tl.constexpr,
        PASS2_EVICT: tl.constexpr,
    ):
        """Row ``pid`` (int64) of the logits; global row n = row_ids[pid] if given, else row_start + pid.
        HAS_MISS: 1 - P_t of the row is stored at miss_ptr by pass 1 (COMPUTE_LSE) or read from it by
        pass 2 (not COMPUTE_LSE). PASS1_EVICT / PASS2_EVICT: the L2 eviction policies of pass 1's loads
        and pass 2's loads and stores ("" for the default)."""
        row_ptr = logits_ptr + pid * logits_row_stride
        target, valid = row_target(pid, labels_ptr, segment_ptr, row_ids_ptr, row_start, seq_len, shift, n_cols,
                                   ignore_index, HAS_SEGMENTS, HAS_ROW_IDS)

        if COMPUTE_LSE:
            # Pass 1: online log-sum-exp (running max m, running sum d rescaled when m grows),
            # plus the sum of y (label smoothing) and the first argmax (accuracy). With pass 2 in
            # the same launch or a saved miss, also the non-target part of d (rest), for pass 2's
            # target column.
            m = float("-inf")
            d = 0.0
            rest = 0.0
            sum_y = 0.0
            best = float("-inf")
            best_idx = 0
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                y = load_row_block(row_ptr, bias_ptr, cols, mask, float("-inf"), softcap, HAS_BIAS, HAS_SOFTCAP,
                                    PASS1_EVICT)
                if WRITE_GRAD or HAS_MISS:
                    m, d, rest, block_max = online_logsumexp_rest(m, d, rest, y, cols, target, start, BLOCK)
                else:
                    m, d, block_max = online_logsumexp(m, d, y)
                if HAS_SMOOTHING:
                    sum_y += tl.sum(tl.where(mask, y, 0.0), 0)
                if STORE_CORRECT:
                    best, best_idx = running_argmax(best, best_idx, y, block_max, start)
            lse = m + tl.log(d)  # an all -inf row: -inf + log(0) = -inf, as torch.logsumexp
            # Target logit: one scalar load (column 0 exists, so an ignored row reads in bounds).
            y_t = tl.load(row_ptr + target).to(tl.float32)
            if HAS_BIAS:
                y_t += tl.load(bias_ptr + target).to(tl.float32)
            if HAS_SOFTCAP:
                y_t = softcap * _tanh(y_t / softcap)
            loss = (1.0 - label_smoothing) * (lse - y_t) + label_smoothing * (lse - sum_y / n_cols)
            loss += z_loss * lse * lse
            tl.store(lse_ptr + pid, lse)
            tl.store(loss_ptr + pid, tl.where(valid, loss, 0.0))
            miss = rest / d  # 1 - P_t without cancellation
            if HAS_MISS:
                tl.store(miss_ptr + pid, miss)
            if STORE_CORRECT:
                tl.store(correct_ptr + pid, (valid & (best_idx == target)).to(tl.int32))
        else:
            lse = tl.load(lse_ptr + pid).to(tl.float32)
            if HAS_MISS:
                miss = tl.load(miss_ptr + pid).to(tl.float32)

        if WRITE_GRAD:
            # Pass 2: overwrite the row with d(loss)/d(x) times the row's factor (0 if ignored).
            scale = tl.load(scale_ptr + pid * scale_stride).to(tl.float32)
            scale = tl.where(valid, scale, 0.0)
            # lse is finite unless the whole row is -inf (NaN then, as in F.cross_entropy; an
            # ignored row is zeroed by the where below): exp(-inf - lse) = 0 needs no safe shift.
            p_scale = 1.0 + 2.0 * z_loss * lse
            if COMPUTE_LSE or HAS_MISS:
                # The target column, P_t p_scale - eps / V - (1 - eps), written with 1 - P_t = rest / d
                # from pass 1 (measured cost: 7% of this one-launch kernel on an H100, run 83).
                g_t = (p_scale - 1.0) - miss * p_scale + label_smoothing * (1.0 - 1.0 / n_cols)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                y = load_row_block(row_ptr, bias_ptr, cols, mask, 0.0, softcap, HAS_BIAS, HAS_SOFTCAP,
                                    PASS2_EVICT)
                g = tl.exp(y - lse) * p_scale - label_smoothing / n_cols
                if COMPUTE_LSE or HAS_MISS:
                    g = tl.where(cols == target, g_t, g)
                else:
                    g = tl.where(cols == target, g - (1.0 - label_smoothing), g)
                if HAS_SOFTCAP:
                    c = y / softcap
                    g = g * (1.0 - c * c)
                g = tl.where(valid, g * scale, 0.0)
                tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask, eviction_policy=PASS2_EVICT)

    @triton.jit
    def ce_row_kernel(
        logits_ptr, logits_row_stride, labels_ptr, segment_ptr, bias_ptr, scale_ptr, scale_stride,
        lse_ptr, loss_ptr, correct_ptr, row_ids_ptr, miss_ptr,
        n_rows, row_start, seq_len, shift, n_cols, ignore_index, label_smoothing, z_loss, softcap,
        HAS_BIAS: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
        COMPUTE_LSE: tl.constexpr, STORE_CORRECT: tl.constexpr, WRITE_GRAD: tl.constexpr,
        HAS_ROW_IDS: tl.constexpr, HAS_MISS: tl.constexpr, BLOCK: tl.constexpr, PERSISTENT: tl.constexpr,
        PASS1_EVICT: tl.constexpr, PASS2_EVICT: tl.constexpr,
    ):
        """One program per row, or (PERSISTENT) a grid of few programs striding over the rows, so
        fewer rows are in flight and pass 2's re-read of a row can still find it in L2."""
        if PERSISTENT:
            for pid in range(tl.program_id(0), n_rows, tl.num_programs(0)):
                _ce_row(tl.cast(pid, tl.int64), logits_ptr, logits_row_stride, labels_ptr, segment_ptr, bias_ptr,
                        scale_ptr, scale_stride, lse_ptr, loss_ptr, correct_ptr, row_ids_ptr, miss_ptr,
                        row_start, seq_len, shift, n_cols, ignore_index, label_smoothing, z_loss, softcap,
                        HAS_BIAS, HAS_SEGMENTS, HAS_SOFTCAP, HAS_SMOOTHING, COMPUTE_LSE, STORE_CORRECT,
                        WRITE_GRAD, HAS_ROW_IDS, HAS_MISS, BLOCK, PASS1_EVICT, PASS2_EVICT)
        else:
            _ce_row(tl.program_id(0).to(tl.int64), logits_ptr, logits_row_stride, labels_ptr, segment_ptr,
                    bias_ptr, scale_ptr, scale_stride, lse_ptr, loss_ptr, correct_ptr, row_ids_ptr, miss_ptr,
                    row_start, seq_len, shift, n_cols, ignore_index, label_smoothing, z_loss, softcap,
                    HAS_BIAS, HAS_SEGMENTS, HAS_SOFTCAP, HAS_SMOOTHING, COMPUTE_LSE, STORE_CORRECT,
                    WRITE_GRAD, HAS_ROW_IDS, HAS_MISS, BLOCK, PASS1_EVICT, PASS2_EVICT)


def row_targets(
    labels: torch.Tensor, segment_ids: torch.Tensor | None, seq_len: int, shift: int,
    row_start: int, rows: int, ignore_index: int, vocab_size: int, row_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of global rows [row_start, row_start + rows) of flat [B*T] labels (or of the global
    rows ``row_ids`` [rows] when given), on the device.

    Row n (position t = n % seq_len) targets labels[n + shift] if t + shift < seq_len, the segment
    matches and the label is in [0, vocab_size); returns (target with 0 where invalid, valid mask).
    The same rule as the kernel's; it also counts each head's valid targets up front.
    """
    n = row_ids if row_ids is not None else torch.arange(row_start, row_start + rows, device=labels.device)
    inside = (n % seq_len) + shift < seq_len
    idx = torch.where(inside, n + shift, n)
    target = labels[idx].long()
    valid = inside & (target != ignore_index) & (target >= 0) & (target < vocab_size)
    if segment_ids is not None:
        valid &= segment_ids[n] == segment_ids[idx]
    return torch.where(valid, target, torch.zeros_like(target)), valid


def _rows_torch(logits, labels, *, row_start, seq_len, shift, segment_ids, bias, scale, lse, loss,
                correct, ignore_index, label_smoothing, z_loss, softcap, compute_lse, write_grad, row_ids,
                target_miss):
    """The kernel's math in PyTorch (same arguments as ``ce_rows``), on a bounded number of rows."""
    rows, V = logits.shape
    target, valid = row_targets(labels, segment_ids, seq_len, shift, row_start, rows, ignore_index, V, row_ids)
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    y = logits.to(work)
    if bias is not None:
        y = y + bias.to(work)
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    if compute_lse:
        lse_rows = torch.logsumexp(y, dim=-1)
        y_t = y.gather(1, target[:, None]).squeeze(1)
        row_loss = (1.0 - label_smoothing) * (lse_rows - y_t)
        if label_smoothing > 0.0:  # skipped at 0: 0 * (lse - mean y) is NaN when a logit is -inf
            row_loss = row_loss + label_smoothing * (lse_rows - y.mean(-1))
        if z_loss > 0.0:  # skipped at 0: lse^2 overflows to inf for |lse| > 1.8e19, and 0 * inf is NaN
            row_loss = row_loss + z_loss * lse_rows.square()
        lse.copy_(lse_rows)
        loss.copy_(torch.where(valid, row_loss, torch.zeros_like(row_loss)))
        if correct is not None:
            correct.copy_((y.argmax(-1) == target) & valid)
        if target_miss is not None:
            target_miss.copy_(_target_miss(torch.exp(y - lse_rows[:, None]), target))
    else:
        lse_rows = lse.to(work)
    if write_grad:
        p_scale = 1.0 + 2.0 * z_loss * lse_rows
        p = torch.exp(y - lse_rows[:, None])  # one [rows, V] temporary, worked in place from here
        precise_target = compute_lse or target_miss is not None
        if compute_lse:
            miss = _target_miss(p, target)
        elif target_miss is not None:
            miss = target_miss.to(work)
        g = p.mul_(p_scale[:, None]).sub_(label_smoothing / V)
        if precise_target:
            g_t = (p_scale - 1.0) - miss * p_scale + label_smoothing * (1.0 - 1.0 / V)
            g.scatter_(1, target[:, None], g_t[:, None])
        else:
            g.scatter_add_(1, target[:, None], torch.full((rows, 1), label_smoothing - 1.0, dtype=work,
                                                          device=g.device))
        if softcap is not None:
            g = g * (1.0 - (y / softcap).square())
        factor = scale.to(work).reshape(-1, 1).expand(rows, 1)
        logits.copy_(torch.where(valid[:, None], g * factor, torch.zeros_like(g)))


def _target_miss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - P_t of each row of p = exp(y - lse) [rows, V], as the kernel forms it: the non-target mass
    over the total (the ratio cancels lse's rounding, which a difference with 1 would keep).
    Zeroes p's target column in place (callers overwrite it or drop p)."""
    total = p.sum(-1)
    p.scatter_(1, target[:, None], 0.0)
    return p.sum(-1) / total


def ce_rows(
    logits: torch.Tensor, labels: torch.Tensor, *, row_start: int = 0, seq_len: int | None = None,
    shift: int = 0, segment_ids: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None, lse: torch.Tensor, loss: torch.Tensor | None = None,
    correct: torch.Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, compute_lse: bool = True, write_grad: bool = False,
    row_ids: torch.Tensor | None = None, target_miss: torch.Tensor | None = None,
) -> None:
    """Run the row computation on ``logits`` [rows, V] (last dim contiguous), in place.

    labels:  flat [B*T] integer labels (contiguous); row i is global row ``row_start + i``.
    seq_len: T (rows never look past the end of their sequence); default labels.numel().
    scale:   fp32 factor for the gradient, 1 element (all rows) or [rows]; needed if write_grad.
    lse:     [rows] float, written if compute_lse else read. loss/correct: [rows] outputs.
    row_ids: optional int64 [rows]: the global row of each logits row (gathered rows), instead of
             row_start + i.
    target_miss: optional fp32 [rows], 1 - P_t of each row: written with lse (compute_lse), read by a
             later gradient pass (compute_lse=False, write_grad) for a target column that keeps a
             confident row's digits; without it that pass uses exp(y_t - lse) - 1.
    """
    rows, V = logits.shape
    seq_len = labels.numel() if seq_len is None else seq_len
    if compute_lse and loss is None:
        raise ValueError("ce_rows: loss (a [rows] output) is required when compute_lse=True")
    if write_grad and scale is None:
        raise ValueError("ce_rows: scale (1 or [rows] elements) is required when write_grad=True")
    if rows == 0:
        return
    if not use_triton(logits):
        for r0 in range(0, rows, _TORCH_ROWS_PER_STEP):
            r1 = min(rows, r0 + _TORCH_ROWS_PER_STEP)
            per_row = scale is not None and scale.numel() > 1
            _rows_torch(
                logits[r0:r1], labels, row_start=row_start + r0, seq_len=seq_len, shift=shift,
                segment_ids=segment_ids, bias=bias, scale=scale[r0:r1] if per_row else scale,
                lse=lse[r0:r1], loss=None if loss is None else loss[r0:r1],
                correct=None if correct is None else correct[r0:r1], ignore_index=ignore_index,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                compute_lse=compute_lse, write_grad=write_grad,
                row_ids=None if row_ids is None else row_ids[r0:r1],
                target_miss=None if target_miss is None else target_miss[r0:r1],
            )
        return
    block, num_warps = launch_config(V, logits.device)
    # L2 hints: keep the row for pass 2 when it follows in this launch; pass 2 is its last reader.
    pass1_evict = "evict_last" if L2_HINTS and write_grad else ""
    pass2_evict = "evict_first" if L2_HINTS else ""
    programs = rows
    if PERSISTENT_PROGRAMS_PER_SM > 0:
        programs = min(rows, PERSISTENT_PROGRAMS_PER_SM * multiprocessors(logits.device))
    dummy = lse
    ce_row_kernel[(programs,)](
        logits, logits.stride(0), labels,
        dummy if segment_ids is None else segment_ids, dummy if bias is None else bias,
        dummy if scale is None else scale, 0 if scale is None or scale.numel() == 1 else 1,
        lse, dummy if loss is None else loss, dummy if correct is None else correct,
        dummy if row_ids is None else row_ids, dummy if target_miss is None else target_miss,
        rows, row_start, seq_len, shift, V, ignore_index, float(label_smoothing), float(z_loss),
        1.0 if softcap is None else float(softcap),
        HAS_BIAS=bias is not None, HAS_SEGMENTS=segment_ids is not None, HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        COMPUTE_LSE=compute_lse, STORE_CORRECT=correct is not None, WRITE_GRAD=write_grad,
        HAS_ROW_IDS=row_ids is not None, HAS_MISS=target_miss is not None, BLOCK=block, PERSISTENT=programs < rows,
        PASS1_EVICT=pass1_evict, PASS2_EVICT=pass2_evict, num_warps=num_warps,
    )


def check_ce_options(ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    """ValueError for options outside their domain (shared with the fused multi-head loss)."""
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 <= float(z_loss) < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not 0.0 < float(softcap) < math.inf:  # inf * tanh(x / inf) is NaN
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")


class CrossEntropyFunction(torch.autograd.Function):
    """Forward: pass 1 (lse, 1 - P_t, row losses). Backward: pass 2 over the saved logits, in place."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, z_loss, softcap, reduction):
        N, V = logits.shape
        out_dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(N, dtype=out_dtype, device=logits.device)
        row_loss = torch.empty(N, dtype=out_dtype, device=logits.device)
        # 1 - P_t per row, for backward's target column (N floats beside lse; see the module docstring).
        target_miss = torch.empty(N, dtype=out_dtype, device=logits.device)
        opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        ce_rows(logits, labels, lse=lse, loss=row_loss, compute_lse=True, target_miss=target_miss, **opts)
        # Valid rows counted on the device (the kernel's rule), so "mean" needs no host sync.
        _, valid = row_targets(labels, None, N, 0, 0, N, ignore_index, V)
        count = valid.sum().to(out_dtype)
        if reduction == "mean":
            loss = row_loss.sum() / count.clamp(min=1)
        elif reduction == "sum":
            loss = row_loss.sum()
        else:
            loss = row_loss
        ctx.save_for_backward(logits, labels, lse, target_miss, count)
        ctx.opts, ctx.reduction = opts, reduction
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    @first_order_only("cross_entropy")  # its gradient is the saved logits, overwritten by a kernel
    def backward(ctx, grad_loss, grad_lse):
        logits, labels, lse, target_miss, count = ctx.saved_tensors
        if ctx.reduction == "mean":
            scale = (grad_loss.to(count.dtype) / count.clamp(min=1)).reshape(1)
        else:
            scale = grad_loss.to(count.dtype).contiguous().reshape(-1)
        # The gradient replaces the logits (documented): no second [N, V] buffer.
        ce_rows(logits, labels, scale=scale, lse=lse, compute_lse=False, write_grad=True, target_miss=target_miss,
                **ctx.opts)
        # A Triton kernel wrote it, unseen by autograd: bump the version (the PyTorch path's in-place
        # writes do), so an op that saved these logits as its input and runs its backward later raises
        # autograd's "modified by an inplace operation" error instead of reading gradients as logits.
        torch.autograd.graph.increment_version(logits)
        # Detached: the saved logits keep their forward history, which autograd would otherwise take
        # for the gradient's under create_graph=True.
        return logits.detach(), None, None, None, None, None, None


@torch.compiler.disable  # runs eagerly inside torch.compile graphs (its kernels are already fused)
def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``logits`` [N, V] against integer ``labels`` [N] (see module docstring).

    Returns the loss (scalar for "mean"/"sum", [N] for "none"; float32, or float64 for float64
    logits) and, with ``return_lse``, also lse [N] (float32, float64 for float64 logits; every
    row, ignored ones included; not differentiable). Backward overwrites ``logits`` with its gradient.
    """
    check_float("logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape [N, V] with V >= 1, got {list(logits.shape)}")
    check_shape("labels", labels, [logits.shape[0]])
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_ce_options(ignore_index, label_smoothing, z_loss, softcap)
    check_labels("labels", labels, logits.shape[1], ignore_index, check_values=not logits.is_cuda)
    N, V = logits.shape
    if logits.stride(-1) != 1 or (N > 1 and logits.stride(0) < V):  # backward writes every row's own gradient
        logits = logits.contiguous()
    labels = labels.contiguous() if labels.dtype == torch.int64 else labels.long()
    loss, lse = CrossEntropyFunction.apply(
        logits, labels, ignore_index, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), reduction,
    )
    return (loss, lse) if return_lse else loss
