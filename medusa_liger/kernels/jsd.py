"""Generalized Jensen-Shannon divergence from a teacher, over logit rows [N, V], gradient in place.

For row n with student logits x and teacher logits x' (each plus its optional bias, then soft-capped
and divided by the temperature tau, as in kl_divergence.py: y and u), q = softmax(y) (the student),
p = softmax(u) (the teacher, a constant) and beta in (0, 1):

    m        = beta p + (1 - beta) q                                  (the mixture)
    loss_n   = tau^2 [beta KL(p || m) + (1 - beta) KL(q || m)] + z * lse_y^2
    dloss/dy = tau (1 - beta) q * (log(q / m) - KL(q || m)) + 2 z lse_y q     (w.r.t. undivided y)

(d/dq_j of the bracket is (1 - beta) log(q_j / m_j): the p / m terms cancel; the softmax's Jacobian
then subtracts the q-weighted mean.) This is the generalized JSD of on-policy distillation (GKD,
Agarwal et al. 2024; DistillSpec, Zhou et al. 2023); beta = 1/2 is the symmetric Jensen-Shannon
divergence. As beta -> 0 or 1 the divergence itself goes to 0, so the endpoints are refused here;
kl_divergence.py has the two KL directions that other libraries put there. It is bounded: at most
-beta log(beta) - (1 - beta) log(1 - beta) <= log 2 per row (times tau^2), reached when the two
supports are disjoint, so no -inf logit of either side makes it infinite. z-loss is for tau = 1 only,
as with the KL. Ignored rows (the rule of cross_entropy.py) have loss 0, gradient 0.

The mixture is taken without leaving log space and without cancellation: with dlt = log p - log q,

    dlt <= 0:  log m = log q + log(beta e^dlt + 1 - beta)
    dlt  > 0:  log m = log p + log(beta + (1 - beta) e^-dlt)

so both logs of the ratio are finite wherever their weight is not 0, and a student equal to its
teacher gives log(beta + (1 - beta)) = 0 exactly: loss and gradient exactly 0 (beta and 1 - beta
are summed in fp32 on the device, where that sum is exactly 1).

One Triton row kernel, three passes over both rows (the KL kernel needs two: here the log-ratio needs
both normalizers before its first use, and the gradient needs KL(q || m) of the whole row):
  pass 1: the online log-sum-exps of y and u and the student's first argmax;
  pass 2: the divergence and KL(q || m);
  pass 3 (optional): the student row <- the gradient times the row's factor (read from device
          memory: no host sync). The teacher row is only read.
"""

from __future__ import annotations

import torch

from medusa_liger.kernels.cross_entropy import L2_HINTS, row_targets
from medusa_liger.kernels.kl_divergence import (
    check_teacher_rows, logit_pair_torch, pair_launch_config, run_torch_rows,
)
from medusa_liger.kernels.utils import use_triton

try:
    import triton
    import triton.language as tl

    from medusa_liger.kernels.cross_entropy import online_logsumexp, row_target, running_argmax
    from medusa_liger.kernels.kl_divergence import load_logit_pair
except ImportError:  # pragma: no cover - CPU installs without triton use the PyTorch path
    triton = None


if triton is not None:

    @triton.jit
    def _mixture_gaps(y, u, lse, lse_t, beta):
        """For one block of (y, u) at their log-normalizers: (q, p, log q - log m, log p - log m),
        each gap finite where its own weight is > 0 (and 0 or finite elsewhere: never NaN)."""
        log_q = y - lse
        log_p = u - lse_t
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        alive_q = q > 0.0
        alive_p = p > 0.0
        both = alive_q & alive_p
        # dlt = log p - log q: +inf where only p has mass, -inf where only q has, 0 where neither.
        dlt = tl.where(both, tl.where(alive_p, log_p, 0.0) - tl.where(alive_q, log_q, 0.0),
                       tl.where(alive_p, float("inf"), tl.where(alive_q, float("-inf"), 0.0)))
        below = dlt <= 0.0
        e = tl.exp(-tl.abs(dlt))  # in [0, 1]
        one_minus_beta = 1.0 - beta  # in fp32: beta + (1 - beta) == 1 exactly
        # w = log m - log q (dlt <= 0) or log m - log p (dlt > 0); the mix lies in [min(beta, 1 - beta), 1].
        w = tl.log(tl.where(below, beta * e + one_minus_beta, beta + one_minus_beta * e))
        finite_dlt = tl.where(both, dlt, 0.0)
        gap_q = tl.where(below, -w, -finite_dlt - w)
        gap_p = tl.where(below, finite_dlt - w, -w)
        return q, p, gap_q, gap_p

    @triton.jit
    def jsd_row_kernel(
        student_ptr, student_row_stride, teacher_ptr, teacher_row_stride, labels_ptr, segment_ptr, bias_ptr,
        teacher_bias_ptr, scale_ptr, loss_ptr, correct_ptr, row_ids_ptr,
        row_start, seq_len, shift, n_cols, ignore_index, z_loss, softcap, temperature, beta,
        HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, STORE_CORRECT: tl.constexpr, WRITE_GRAD: tl.constexpr,
        HAS_ROW_IDS: tl.constexpr, BLOCK: tl.constexpr, PASS1_EVICT: tl.constexpr, PASS2_EVICT: tl.constexpr,
        PASS3_EVICT: tl.constexpr,
    ):
        """One program per row (int64 offsets). PASS*_EVICT: the L2 eviction policy of each pass's loads
        (and pass 3's stores): keep the rows while another pass follows ("" for the default)."""
        pid = tl.program_id(0).to(tl.int64)
        y_row = student_ptr + pid * student_row_stride
        u_row = teacher_ptr + pid * teacher_row_stride
        target, valid = row_target(pid, labels_ptr, segment_ptr, row_ids_ptr, row_start, seq_len, shift, n_cols,
                                   ignore_index, HAS_SEGMENTS, HAS_ROW_IDS)

        # Pass 1: both log-sum-exps online (cross_entropy.online_logsumexp), the student's argmax.
        m = float("-inf")
        d = 0.0
        m_t = float("-inf")
        d_t = 0.0
        best = float("-inf")
        best_idx = 0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            y, u = load_logit_pair(y_row, u_row, bias_ptr, teacher_bias_ptr, cols, mask, softcap, temperature,
                                   HAS_BIAS, HAS_TEACHER_BIAS, HAS_SOFTCAP, PASS1_EVICT)
            m, d, block_max = online_logsumexp(m, d, y)
            m_t, d_t, _ = online_logsumexp(m_t, d_t, u)
            if STORE_CORRECT:
                best, best_idx = running_argmax(best, best_idx, y, block_max, start)
        lse = m + tl.log(d)
        lse_t = m_t + tl.log(d_t)

        # Pass 2: beta KL(p || m) + (1 - beta) KL(q || m), and KL(q || m) alone for the gradient.
        kl_pm = 0.0
        kl_qm = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            y, u = load_logit_pair(y_row, u_row, bias_ptr, teacher_bias_ptr, cols, mask, softcap, temperature,
                                   HAS_BIAS, HAS_TEACHER_BIAS, HAS_SOFTCAP, PASS2_EVICT)
            q, p, gap_q, gap_p = _mixture_gaps(y, u, lse, lse_t, beta)
            kl_qm += tl.sum(tl.where(q > 0.0, q * gap_q, 0.0), 0)
            kl_pm += tl.sum(tl.where(p > 0.0, p * gap_p, 0.0), 0)
        loss = temperature * temperature * (beta * kl_pm + (1.0 - beta) * kl_qm) + z_loss * lse * lse
        tl.store(loss_ptr + pid, tl.where(valid, loss, 0.0))
        if STORE_CORRECT:
            tl.store(correct_ptr + pid, (valid & (best_idx == target)).to(tl.int32))

        if WRITE_GRAD:
            # Pass 3: the student row <- (tau (1 - beta) q (log(q / m) - KL(q || m)) + 2 z lse q) * factor.
            scale = tl.load(scale_ptr).to(tl.float32)
            scale = tl.where(valid, scale, 0.0)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                y, u = load_logit_pair(y_row, u_row, bias_ptr, teacher_bias_ptr, cols, mask, softcap, temperature,
                                       HAS_BIAS, HAS_TEACHER_BIAS, HAS_SOFTCAP, PASS3_EVICT)
                q, p, gap_q, gap_p = _mixture_gaps(y, u, lse, lse_t, beta)
                g = tl.where(q > 0.0, q * (temperature * (1.0 - beta) * (gap_q - kl_qm) + 2.0 * z_loss * lse), 0.0)
                if HAS_SOFTCAP:  # the capped logit is y * tau
                    c = tl.where(mask, y, 0.0) * temperature / softcap
                    g = g * (1.0 - c * c)
                g = tl.where(valid, g * scale, 0.0)
                tl.store(y_row + cols, g.to(student_ptr.dtype.element_ty), mask=mask, eviction_policy=PASS3_EVICT)


def _jsd_rows_torch(student, teacher, labels, *, row_start, seq_len, shift, segment_ids, bias, teacher_bias, scale,
                    loss, correct, ignore_index, z_loss, softcap, temperature, beta, write_grad, row_ids):
    """The kernel's math in PyTorch (same arguments as ``jsd_rows``), on a bounded number of rows."""
    rows, V = student.shape
    target, valid = row_targets(labels, segment_ids, seq_len, shift, row_start, rows, ignore_index, V, row_ids)
    y, u = logit_pair_torch(student, teacher, bias, teacher_bias, softcap)
    work = y.dtype
    lse = torch.logsumexp(y / temperature, dim=-1, keepdim=True)
    log_q = y / temperature - lse
    log_p = u / temperature - torch.logsumexp(u / temperature, dim=-1, keepdim=True)
    q, p = log_q.exp(), log_p.exp()
    both = (q > 0) & (p > 0)
    # The kernel's _mixture_gaps, vectorized (see the module docstring).
    inf = torch.tensor(float("inf"), dtype=work, device=y.device)
    dlt = torch.where(both, torch.where(p > 0, log_p, 0.0) - torch.where(q > 0, log_q, 0.0),
                      torch.where(p > 0, inf, torch.where(q > 0, -inf, 0.0)))
    below = dlt <= 0
    e = torch.exp(-dlt.abs())
    # As the kernel: beta and 1 - beta in the working dtype, where their sum is exactly 1.
    beta_w = torch.tensor(beta, dtype=work)
    one_minus_beta = 1.0 - beta_w
    w = torch.log(torch.where(below, beta_w * e + one_minus_beta, beta_w + one_minus_beta * e))
    finite_dlt = torch.where(both, dlt, 0.0)
    gap_q = torch.where(below, -w, -finite_dlt - w)
    gap_p = torch.where(below, finite_dlt - w, -w)
    kl_qm = torch.where(q > 0, q * gap_q, 0.0).sum(-1, keepdim=True)
    kl_pm = torch.where(p > 0, p * gap_p, 0.0).sum(-1, keepdim=True)
    row_loss = (temperature**2 * (beta_w * kl_pm + one_minus_beta * kl_qm) + z_loss * lse.square()).squeeze(1)
    loss.copy_(torch.where(valid, row_loss, torch.zeros_like(row_loss)))
    if correct is not None:
        correct.copy_((y.argmax(-1) == target) & valid)
    if write_grad:
        g = torch.where(q > 0, q * (temperature * one_minus_beta * (gap_q - kl_qm) + 2.0 * z_loss * lse), 0.0)
        if softcap is not None:
            g = g * (1.0 - (y / softcap).square())
        student.copy_(torch.where(valid[:, None], g * scale.to(work).reshape(1, 1), torch.zeros_like(g)))


def check_jsd_beta(name: str, beta: object) -> float:
    """``beta`` as a float in (0, 1), else ValueError naming ``name`` (shared with the configs)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < float(beta) < 1.0):
        raise ValueError(f"{name} must be a number in (0, 1) (0 and 1 give a zero divergence: use forward or "
                         f"reverse KL there), got {beta!r}")
    return float(beta)


def jsd_rows(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, beta: float, row_start: int = 0,
    seq_len: int | None = None, shift: int = 0, segment_ids: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None, loss: torch.Tensor,
    correct: torch.Tensor | None = None, ignore_index: int = -100, z_loss: float = 0.0,
    softcap: float | None = None, temperature: float = 1.0, write_grad: bool = False,
    row_ids: torch.Tensor | None = None,
) -> None:
    """Run the row computation on ``student`` [rows, V] against ``teacher`` [rows, V], in place.

    beta: in (0, 1), the teacher's weight in the mixture m = beta p + (1 - beta) q (1/2: symmetric JSD).
    Every other argument is ``kl_divergence.kl_rows``'s (without ``reverse``): the labels decide which
    rows count and the accuracy, not the loss; temperature tau > 0 divides both rows' logits (loss
    times tau^2, z_loss 0 unless tau is 1); scale: one fp32 element, needed if ``write_grad``.
    """
    rows, V = student.shape
    beta = check_jsd_beta("jsd_rows: beta", beta)
    check_teacher_rows("jsd_rows", student, teacher, temperature, z_loss, write_grad, scale)
    seq_len = labels.numel() if seq_len is None else seq_len
    if rows == 0:
        return
    if not use_triton(student):
        run_torch_rows(_jsd_rows_torch, student, teacher, labels=labels, row_start=row_start, seq_len=seq_len,
                       shift=shift, segment_ids=segment_ids, bias=bias, teacher_bias=teacher_bias, scale=scale,
                       loss=loss, correct=correct, ignore_index=ignore_index, z_loss=z_loss, softcap=softcap,
                       temperature=float(temperature), beta=beta, write_grad=write_grad, row_ids=row_ids)
        return
    block, num_warps = pair_launch_config(V, student.device)
    # L2 hints: every pass but the last keeps the rows (evict-last); the last reader lets them go.
    keep, last = ("evict_last", "evict_first") if L2_HINTS else ("", "")
    dummy = loss
    jsd_row_kernel[(rows,)](
        student, student.stride(0), teacher, teacher.stride(0), labels,
        dummy if segment_ids is None else segment_ids, dummy if bias is None else bias,
        dummy if teacher_bias is None else teacher_bias, dummy if scale is None else scale, loss,
        dummy if correct is None else correct, dummy if row_ids is None else row_ids,
        row_start, seq_len, shift, V, ignore_index, float(z_loss), 1.0 if softcap is None else float(softcap),
        float(temperature), beta,
        HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher_bias is not None, HAS_SEGMENTS=segment_ids is not None,
        HAS_SOFTCAP=softcap is not None, STORE_CORRECT=correct is not None, WRITE_GRAD=write_grad,
        HAS_ROW_IDS=row_ids is not None, BLOCK=block, PASS1_EVICT=keep, PASS2_EVICT=keep if write_grad else last,
        PASS3_EVICT=last, num_warps=num_warps,
    )
