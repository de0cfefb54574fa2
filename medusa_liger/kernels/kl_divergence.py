"""KL divergence from a teacher's distribution, over logit rows [N, V], the gradient written in place.

For row n with student logits x and teacher logits x' (each plus its optional bias, b and b', then
soft-capped: y = cap * tanh((x + b) / cap), u = cap * tanh((x' + b') / cap)) and the row's hard target
t, which only decides whether the row counts (the rule of cross_entropy.py: ``ignore_index``, past
the end of the sequence, across a segment boundary) and whether its top-1 is correct:

    p = softmax(u)  (teacher, a constant),   q = softmax(y)  (student)
    loss_n   = KL(p || q) + z * lse_y^2 = sum_j p_j (u_j - lse_u - y_j + lse_y) + z * lse_y^2
    dloss/dy = q * (1 + 2 z lse_y) - p
    dloss/dx = dloss/dy * (1 - (y / cap)^2)                  (softcap chain rule; 1 without softcap)
    correct  = argmax_j y_j == t

At a temperature tau != 1 (no z-loss then), y and u above are the capped logits divided by tau, the
loss is tau^2 KL(p || q) and dloss/dy (w.r.t. the undivided logits) is tau (q - p): Hinton's scaling.

``reverse=True`` takes the other direction, KL(q || p), which is mode-seeking: the student puts its
mass on the teacher's likeliest tokens rather than covering all of them (for draft heads judged by
acceptance, either may be the better target; DistillSpec, Zhou et al. 2023):

    loss_n   = KL(q || p) + z * lse_y^2 = sum_j q_j (y_j - lse_y - u_j + lse_u) + z * lse_y^2
    dloss/dy = q * (log q - log p - KL(q || p) + 2 z lse_y)          (0 where q_j = 0)

A teacher -inf where the student has mass makes this divergence +inf; that row's gradient is then +inf
on those columns (KL taken as 0 in the formula), finite elsewhere, never NaN.

KL(p || q) is the cross-entropy against the soft targets p minus the teacher's entropy, a constant:
the gradient is that of soft-target cross-entropy, and the loss is 0 when the student equals the
teacher. Columns where the teacher has probability 0 (u_j = -inf) add nothing; a student -inf where
the teacher has mass makes the loss +inf, as the divergence is. Ignored rows: loss 0, gradient 0.

One Triton row kernel, two passes over the row, as cross_entropy.py's:
  pass 1 reads the student and the teacher row once: the online log-sum-exp of y (running max m,
         running sum d), of u (m', d'), and the numerator A = sum_j exp(u_j - m') (u_j - y_j),
         rescaled with d' whenever m' grows; then KL = A / d' - lse_u + lse_y (a p-weighted mean
         of u - y, minus the log-normalizers); reversed, A = sum_j exp(y_j - m) (y_j - u_j) on the
         student's running max, and KL = A / d - lse_y + lse_u;
  pass 2 (optional) re-reads both rows and overwrites the student row with the gradient times the
         row's factor (read from device memory: no host sync). The teacher row is only read.
"""

from __future__ import annotations

import math

import torch

from medusa_liger.kernels.cross_entropy import L2_HINTS, launch_config, row_targets
from medusa_liger.kernels.utils import use_triton

try:
    import triton
    import triton.language as tl

    from medusa_liger.kernels.cross_entropy import load_row_block, online_logsumexp, row_target, running_argmax
except ImportError:  # pragma: no cover - CPU installs without triton use the PyTorch path
    triton = None

_TORCH_ROWS_PER_STEP = 2048  # rows per step of the PyTorch path (bounds its fp32 temporaries)


if triton is not None:

    @triton.jit
    def _add_weighted_gap(numer, rescale, e, a, b):
        """numer * rescale + sum_j e_j (a_j - b_j): the divergence's numerator, online. Columns of
        weight e_j = 0 are dropped before multiplying, so -inf * 0 never makes NaN; an infinite
        numerator (an a_j or b_j of -inf under weight) stays infinite."""
        numer = tl.where(numer == float("inf"), numer, numer * rescale)
        mass = e > 0.0
        return numer + tl.sum(e * (tl.where(mass, a, 0.0) - tl.where(mass, b, 0.0)), 0)

    @triton.jit
    def load_logit_pair(y_row, u_row, bias_ptr, teacher_bias_ptr, cols, mask, softcap, temperature,
                        HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        EVICT: tl.constexpr):
        """One block of the student's and the teacher's rows in fp32, each plus its bias, soft-capped and
        divided by the temperature (exact for 1; -inf stays -inf); masked columns are -inf."""
        y = load_row_block(y_row, bias_ptr, cols, mask, float("-inf"), softcap, HAS_BIAS, HAS_SOFTCAP, EVICT)
        u = load_row_block(u_row, teacher_bias_ptr, cols, mask, float("-inf"), softcap, HAS_TEACHER_BIAS,
                           HAS_SOFTCAP, EVICT)
        return y / temperature, u / temperature

    @triton.jit
    def kl_row_kernel(
        student_ptr, student_row_stride, teacher_ptr, teacher_row_stride, labels_ptr, segment_ptr, bias_ptr,
        teacher_bias_ptr, scale_ptr, loss_ptr, correct_ptr, row_ids_ptr,
        row_start, seq_len, shift, n_cols, ignore_index, z_loss, softcap, temperature,
        REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        STORE_CORRECT: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_ROW_IDS: tl.constexpr,
        BLOCK: tl.constexpr, PASS1_EVICT: tl.constexpr, PASS2_EVICT: tl.constexpr,
    ):
        """One program per row (int64 offsets: rows of a 128k vocabulary pass 2^31 elements)."""
        pid = tl.program_id(0).to(tl.int64)
        y_row = student_ptr + pid * student_row_stride
        u_row = teacher_ptr + pid * teacher_row_stride
        target, valid = row_target(pid, labels_ptr, segment_ptr, row_ids_ptr, row_start, seq_len, shift, n_cols,
                                   ignore_index, HAS_SEGMENTS, HAS_ROW_IDS)

        # Pass 1: both log-sum-exps online, the KL numerator, the student's first argmax.
        m = float("-inf")
        d = 0.0
        m_t = float("-inf")
        d_t = 0.0
        numer = 0.0
        best = float("-inf")
        best_idx = 0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            y, u = load_logit_pair(y_row, u_row, bias_ptr, teacher_bias_ptr, cols, mask, softcap, temperature,
                                   HAS_BIAS, HAS_TEACHER_BIAS, HAS_SOFTCAP, PASS1_EVICT)
            if REVERSE:
                # The numerator weighs y - u by the student's exp, rescaled with the student's max (a
                # teacher -inf under student mass makes it, and the divergence, +inf).
                m_new = tl.maximum(m, tl.max(y, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                numer = _add_weighted_gap(numer, tl.exp(m - m_safe), tl.exp(y - m_safe), y, u)
            m, d, block_max = online_logsumexp(m, d, y)
            # Teacher: the same online sum (cross_entropy.online_logsumexp, written out: the forward
            # numerator, u - y weighed by the teacher's exp, is rescaled alongside it; masked columns
            # have u = -inf, weight 0).
            m_t_new = tl.maximum(m_t, tl.max(u, 0))
            m_t_safe = tl.where(m_t_new == float("-inf"), 0.0, m_t_new)
            rescale = tl.exp(m_t - m_t_safe)
            e_t = tl.exp(u - m_t_safe)
            d_t = d_t * rescale + tl.sum(e_t, 0)
            if not REVERSE:
                numer = _add_weighted_gap(numer, rescale, e_t, u, y)
            m_t = m_t_new
            if STORE_CORRECT:
                best, best_idx = running_argmax(best, best_idx, y, block_max, start)
        lse = m + tl.log(d)
        lse_t = m_t + tl.log(d_t)
        if REVERSE:
            kl = numer / d - lse + lse_t
        else:
            kl = numer / d_t - lse_t + lse
        loss = temperature * temperature * kl + z_loss * lse * lse
        tl.store(loss_ptr + pid, tl.where(valid, loss, 0.0))
        if STORE_CORRECT:
            tl.store(correct_ptr + pid, (valid & (best_idx == target)).to(tl.int32))

        if WRITE_GRAD:
            # Pass 2: the student row <- tau (q * (1 + 2 z lse) - p) * factor (0 for an ignored row), or
            # reversed, tau q (log q - log p - KL + 2 z lse) * factor.
            scale = tl.load(scale_ptr).to(tl.float32) * temperature
            scale = tl.where(valid, scale, 0.0)
            q_scale = 1.0 + 2.0 * z_loss * lse
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                y = load_row_block(y_row, bias_ptr, cols, mask, 0.0, softcap, HAS_BIAS, HAS_SOFTCAP, PASS2_EVICT)
                u = load_row_block(u_row, teacher_bias_ptr, cols, mask, float("-inf"), softcap, HAS_TEACHER_BIAS,
                                   HAS_SOFTCAP, PASS2_EVICT)
                if REVERSE:
                    log_q = y / temperature - lse
                    q = tl.exp(log_q)
                    # Where q is 0 (and past the row's end) the logs are read as 0, so no lane, used or
                    # not, computes 0 * inf.
                    alive = (q > 0.0) & mask
                    log_ratio = tl.where(alive, log_q, 0.0) - tl.where(alive, u / temperature - lse_t, 0.0)
                    # An infinite divergence (teacher -inf under student mass) leaves +inf on those
                    # columns and finite values elsewhere, never inf - inf.
                    g = q * (log_ratio - tl.where(kl == float("inf"), 0.0, kl) + 2.0 * z_loss * lse)
                else:
                    g = tl.exp(y / temperature - lse) * q_scale - tl.exp(u / temperature - lse_t)
                if HAS_SOFTCAP:
                    c = y / softcap
                    g = g * (1.0 - c * c)
                g = tl.where(valid, g * scale, 0.0)
                tl.store(y_row + cols, g.to(student_ptr.dtype.element_ty), mask=mask, eviction_policy=PASS2_EVICT)


def logit_pair_torch(student: torch.Tensor, teacher: torch.Tensor, bias: torch.Tensor | None,
                     teacher_bias: torch.Tensor | None, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch paths' (y, u): both rows in fp32 (fp64 for fp64), each plus its bias, soft-capped."""
    work = torch.float64 if student.dtype == torch.float64 else torch.float32
    y, u = student.to(work), teacher.to(work)
    if bias is not None:
        y = y + bias.to(work)
    if teacher_bias is not None:
        u = u + teacher_bias.to(work)
    if softcap is not None:
        y, u = softcap * torch.tanh(y / softcap), softcap * torch.tanh(u / softcap)
    return y, u


def _kl_rows_torch(student, teacher, labels, *, row_start, seq_len, shift, segment_ids, bias, teacher_bias, scale,
                   loss, correct, ignore_index, z_loss, softcap, temperature, reverse, write_grad, row_ids):
    """The kernel's math in PyTorch (same arguments as ``kl_rows``), on a bounded number of rows."""
    rows, V = student.shape
    target, valid = row_targets(labels, segment_ids, seq_len, shift, row_start, rows, ignore_index, V, row_ids)
    y, u = logit_pair_torch(student, teacher, bias, teacher_bias, softcap)
    y_t, u_t = y / temperature, u / temperature
    lse = torch.logsumexp(y_t, dim=-1, keepdim=True)
    log_p = u_t - torch.logsumexp(u_t, dim=-1, keepdim=True)
    log_q = y_t - lse
    p, q = log_p.exp(), log_q.exp()
    # p log(p / q) is 0 where p is 0 (the product itself would be 0 * -inf = NaN there); reversed, the same
    # with q.
    if reverse:
        kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    else:
        kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    row_loss = temperature**2 * kl + z_loss * lse.squeeze(1).square()
    loss.copy_(torch.where(valid, row_loss, torch.zeros_like(row_loss)))
    if correct is not None:
        correct.copy_((y.argmax(-1) == target) & valid)
    if write_grad:
        if reverse:
            finite_kl = torch.where(kl == float("inf"), torch.zeros_like(kl), kl)  # as the kernel: no inf - inf
            inner = log_q - log_p - finite_kl[:, None] + 2.0 * z_loss * lse
            g = temperature * torch.where(q > 0, q * inner, torch.zeros_like(q))
        else:
            g = temperature * (q * (1.0 + 2.0 * z_loss * lse) - p)
        if softcap is not None:
            g = g * (1.0 - (y / softcap).square())
        student.copy_(torch.where(valid[:, None], g * scale.to(y.dtype).reshape(1, 1), torch.zeros_like(g)))


def check_teacher_rows(op: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float, z_loss: float,
                       write_grad: bool, scale: torch.Tensor | None) -> None:
    """ValueError, naming ``op``, for the arguments a teacher-row op (KL, JSD) refuses."""
    if teacher.shape != student.shape:
        raise ValueError(f"{op}: teacher must have the student's shape {list(student.shape)}, "
                         f"got {list(teacher.shape)}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    if temperature != 1.0 and z_loss != 0.0:
        raise ValueError(f"{op}: z_loss must be 0 at a temperature other than 1, got z_loss={z_loss}")
    if write_grad and (scale is None or scale.numel() != 1):
        raise ValueError(f"{op}: scale (one element) is required when write_grad=True")


def run_torch_rows(rows_torch, student: torch.Tensor, teacher: torch.Tensor, *, row_start: int, loss: torch.Tensor,
                   correct: torch.Tensor | None, row_ids: torch.Tensor | None, **options) -> None:
    """``rows_torch`` (a PyTorch path) over the rows, _TORCH_ROWS_PER_STEP at a time (bounds its fp32
    temporaries); ``options``: its other arguments, the same for every step."""
    for r0 in range(0, student.shape[0], _TORCH_ROWS_PER_STEP):
        r1 = min(student.shape[0], r0 + _TORCH_ROWS_PER_STEP)
        rows_torch(student[r0:r1], teacher[r0:r1], row_start=row_start + r0, loss=loss[r0:r1],
                   correct=None if correct is None else correct[r0:r1],
                   row_ids=None if row_ids is None else row_ids[r0:r1], **options)


def pair_launch_config(n_cols: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) of a teacher-row kernel: two rows per block in registers, so half the
    cross-entropy kernel's block on the GPU."""
    block, num_warps = launch_config(n_cols, device)
    return (max(16, block // 2) if device.type == "cuda" else block), num_warps


def kl_rows(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, row_start: int = 0,
    seq_len: int | None = None, shift: int = 0, segment_ids: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None, loss: torch.Tensor,
    correct: torch.Tensor | None = None, ignore_index: int = -100, z_loss: float = 0.0,
    softcap: float | None = None, temperature: float = 1.0, reverse: bool = False, write_grad: bool = False,
    row_ids: torch.Tensor | None = None,
) -> None:
    """Run the row computation on ``student`` [rows, V] against ``teacher`` [rows, V], in place.

    Both: last dim contiguous, the same dtype family (any float; computed in fp32, fp64 for fp64).
    labels:  flat [B*T] integer labels (contiguous); row i is global row ``row_start + i`` (or
             ``row_ids[i]``); they decide which rows count and the accuracy, not the loss.
    bias, teacher_bias: optional [V] biases added to the student's and the teacher's logits.
    scale:   one fp32 element, the gradient's factor; needed if ``write_grad``.
    temperature: tau > 0 dividing both rows' logits (loss times tau^2); with tau != 1, z_loss must be 0.
    reverse: KL(student || teacher) instead of KL(teacher || student).
    loss:    [rows] output (0 for ignored rows). correct: optional [rows] int32 output.
    The other arguments are ``cross_entropy.ce_rows``'s.
    """
    rows, V = student.shape
    check_teacher_rows("kl_rows", student, teacher, temperature, z_loss, write_grad, scale)
    seq_len = labels.numel() if seq_len is None else seq_len
    if rows == 0:
        return
    if not use_triton(student):
        run_torch_rows(_kl_rows_torch, student, teacher, labels=labels, row_start=row_start, seq_len=seq_len,
                       shift=shift, segment_ids=segment_ids, bias=bias, teacher_bias=teacher_bias, scale=scale,
                       loss=loss, correct=correct, ignore_index=ignore_index, z_loss=z_loss, softcap=softcap,
                       temperature=float(temperature), reverse=bool(reverse), write_grad=write_grad, row_ids=row_ids)
        return
    block, num_warps = pair_launch_config(V, student.device)
    pass1_evict = "evict_last" if L2_HINTS and write_grad else ""
    pass2_evict = "evict_first" if L2_HINTS else ""
    dummy = loss
    kl_row_kernel[(rows,)](
        student, student.stride(0), teacher, teacher.stride(0), labels,
        dummy if segment_ids is None else segment_ids, dummy if bias is None else bias,
        dummy if teacher_bias is None else teacher_bias, dummy if scale is None else scale, loss, dummy if correct is None else correct,
        dummy if row_ids is None else row_ids,
        row_start, seq_len, shift, V, ignore_index, float(z_loss), 1.0 if softcap is None else float(softcap),
        float(temperature), REVERSE=bool(reverse), HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher_bias is not None, HAS_SEGMENTS=segment_ids is not None,
        HAS_SOFTCAP=softcap is not None, STORE_CORRECT=correct is not None, WRITE_GRAD=write_grad, HAS_ROW_IDS=row_ids is not None,
        BLOCK=block, PASS1_EVICT=pass1_evict, PASS2_EVICT=pass2_evict, num_warps=num_warps,
    )
