"""Chunked fused linear + cross-entropy for K Medusa heads, never holding more than one logit chunk.

For head k with hidden states h_k [N = B*T, H], projection W_k [V, H], optional bias b_k and shift
s_k (row n at position t predicts labels[b, t + s_k]; ignored past the row's end, across a segment
boundary, at ignore_index or out of [0, V)):

    loss_k = reduce_n CE(softcap(h_k W_k^T + b_k)[n], target_k[n])      (cross_entropy.py options)
    loss   = sum_k head_weights[k] * loss_k           ("mean": divide by head k's count c_k)

Algorithm (forward does all the work; backward only multiplies by grad_output, skipped on the
device when it is 1, see scale.py):

    scale_k = head_weights[k] / max(c_k, 1)   (or head_weights[k] for "sum"), counted on the device
    for each head k, grouped so that heads sharing a projection run back to back:
        for each chunk of C rows (C from a memory budget: thousands of rows, big GEMMs):
            Z   = h_c @ W_k^T                    cuBLAS, compute dtype, into one reused [C, V] buffer
                                                 (in calls of chunking.GEMM_ROWS rows if set)
            row kernel on Z: lse, loss, argmax == target, then Z <- scale_k * dloss/dZ in place
            dh_c  (+)= Z @ W_k                   if hidden needs grad
            dW_k  (+)= Z^T @ h_c                 if W_k needs grad: fp32 accumulator by default
            db_k  += column sums of Z            if the bias needs grad
        after the last head using W_k: cast its accumulator into W_k's gradient and free it

On an H100-class GPU (TMA, bf16), chunks with hard labels and no bias or softcap take
exp_operand.py's path instead: the logits GEMM's epilogue writes E = exp(Z - target logit) and its row
sums, the gradient is E with a per-row scale (dh in a Triton GEMM's epilogue, dW on the rows of h_c),
and no row kernel runs; frozen projections then take DEFAULT_CHUNK_BYTES chunks. Label smoothing
adds a term common to every column of a row there, which the op subtracts from dW's rows after the
group's last chunk; z-loss scales each row's gradient there and changes its target column.

Soft targets (``teacher``): head k may learn a teacher's distribution instead of its labels,
loss_k = reduce_n KL(softmax(u_n) || softmax(y_n)) with teacher logits u = h'_k W'_k^T (+ b'_k, same
softcap) of row n + offset_k, computed chunk by chunk beside Z into a second buffer (kl_divergence.py's
row kernel; the labels then only decide which rows count and the accuracy). Medusa-2's
self-distillation: the backbone learns the original model's distribution (teacher = the backbone with
its LoRA adapters off, or a frozen copy of it); Medusa heads can learn the backbone's own distribution
of their token (the backbone's row t + shift - 1) instead of the token in the data.

FLOPs: 2NHV (logits) + 2NHV (dh) + 2NHV (dW, only for a trainable projection) per head. Memory
beyond the outputs: one [C, V] logit chunk, one weight-gradient accumulator at a time (none when
``accum_dtype`` is None or the parameter's dtype, or when a projection's gradient is a single GEMM),
and the gradients themselves, which are computed here and held until backward. C = ``chunk_size``,
or by default: DEFAULT_CHUNK_BYTES worth of rows (4096 at V = 128256 in bf16; half that when every
projection is frozen), fewer when the device has less than twice that free beyond what is alive
(the gradients just allocated and the accumulator to come), then balanced so the chunks have equal
multiple-of-128 sizes (N = 5000 runs 2 x 2560 rows, not 4096 + 904: no thin, slow last GEMM).
bf16 x bf16 -> fp32 GEMMs use torch's ``out_dtype`` where it runs (probed once), else slabs.
No host-device sync anywhere (counts and scales stay on the device), so the op can be captured in a
CUDA graph. CPU tensors run the same algorithm with the row computation in
PyTorch (or the Triton kernel under TRITON_INTERPRET=1).

Backward can run only once per forward (the gradients are handed to autograd, not copied), unless
``reentrant_backward()`` is active (tests, gradcheck), which keeps them and scales out of place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# The chunk planner and the GEMM live in chunking.py; re-exported here (benchmarks, patching).
from medusa_liger.kernels.chunking import (  # noqa: F401
    DEFAULT_CHUNK_BYTES,
    FROZEN_CHUNK_BYTES,
    MIN_CHUNK_ROWS,
    default_chunk_rows,
    plan_chunk_rows,
)
from medusa_liger.kernels.chunking import GEMM_ROWS
from medusa_liger.kernels.chunking import mm_into as _mm_into
from medusa_liger.kernels import exp_operand
from medusa_liger.kernels.cross_entropy import ce_rows, check_ce_options, row_targets
from medusa_liger.kernels.head_inputs import as_head_weights, check_shifts, check_teacher, region, sources
from medusa_liger.kernels.jsd import jsd_rows
from medusa_liger.kernels.kl_divergence import kl_rows
from medusa_liger.kernels.reference import MultiHeadLossOutput, Teacher
from medusa_liger.kernels.scale import scale_
from medusa_liger.kernels.utils import check_float, check_labels, check_same_device, first_order_only

_ACCUM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_reentrant = False


@contextlib.contextmanager
def reentrant_backward() -> Iterator[None]:
    """Let backward run several times per forward (retain_graph, gradcheck) at the cost of a copy."""
    global _reentrant
    previous, _reentrant = _reentrant, True
    try:
        yield
    finally:
        _reentrant = previous


@dataclass
class _Plan:
    """Everything the autograd Function needs besides the tensors (static: no data dependence)."""

    shifts: list[int]
    hidden_heads: list[tuple[int, int | None]]
    weight_heads: list[tuple[int, int | None]]
    bias_heads: list[tuple[int, int | None]] | None
    n_hidden: int
    n_weight: int
    needs_grad: list[bool]  # per tensor input of the Function
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    reduction: str
    accum_dtype: torch.dtype | None  # None: each gradient's own dtype
    compute_dtype: torch.dtype
    chunk_size: int | None
    skip_ignored: bool
    # skip_ignored with each head's valid-target count already on the host (no sync in forward).
    known_counts: list[int] | None
    # Per head: None (hard labels) or its Teacher (detached tensors).
    teacher: list[Teacher | None]


class MultiHeadLinearCrossEntropyFunction(torch.autograd.Function):
    """Inputs: plan, labels, segment_ids, head_weights, *hidden sources, *weight sources, *bias sources."""

    @staticmethod
    def forward(ctx, plan: _Plan, labels, segment_ids, head_weights, *tensors):
        K = len(plan.shifts)
        hid_srcs = tensors[: plan.n_hidden]
        w_srcs = tensors[plan.n_hidden : plan.n_hidden + plan.n_weight]
        b_srcs = tensors[plan.n_hidden + plan.n_weight :]
        needs = plan.needs_grad[3:]
        hid_need, w_need = needs[: plan.n_hidden], needs[plan.n_hidden : plan.n_hidden + plan.n_weight]
        b_need = needs[plan.n_hidden + plan.n_weight :]
        B, T = labels.shape
        N, V, H = B * T, w_srcs[0].shape[-2], w_srcs[0].shape[-1]
        dev, cdt = labels.device, plan.compute_dtype
        # Row statistics in fp32 (fp64 when computing in fp64, so the CPU gradcheck is exact).
        sdt = torch.float64 if cdt == torch.float64 else torch.float32

        def acc_dtype(t: torch.Tensor) -> torch.dtype:
            # Accumulator of t's gradient: accum_dtype, or t's own dtype when it is None.
            return torch.promote_types(t.dtype if plan.accum_dtype is None else plan.accum_dtype, cdt)

        any_grad = any(needs)
        labels_flat = labels.reshape(-1)
        seg_flat = None if segment_ids is None else segment_ids.reshape(-1)
        opts = dict(ignore_index=plan.ignore_index, label_smoothing=plan.label_smoothing,
                    z_loss=plan.z_loss, softcap=plan.softcap)

        # Each head's targets (0 where invalid) and valid mask [K, N], its valid-target count and
        # gradient factor, on the device (no sync).
        targets, valid = (torch.stack(x) for x in zip(*[
            row_targets(labels_flat, seg_flat, T, s, 0, N, plan.ignore_index, V) for s in plan.shifts]))
        counts = valid.sum(1)
        hw = head_weights.to(sdt)
        denom = counts.clamp(min=1).to(sdt)
        scale = (hw / denom if plan.reduction == "mean" else hw).contiguous()

        # Rows each head computes: all N, or (skip_ignored) its valid rows, gathered. Their number
        # is the op's one host sync; a stable sort puts each head's valid rows first, in order.
        if plan.skip_ignored:
            if plan.known_counts is None:
                kept = counts.tolist()
            else:  # the caller's counts, checked on the device (an asynchronous assert: no sync)
                kept = plan.known_counts
                torch._assert_async((counts == torch.tensor(kept, device=dev)).all(),
                                    "skip_ignored: the given valid-target counts do not match the labels")
            rows_of = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        else:
            kept, rows_of = [N] * K, None
        # Buffers that skipped rows never write start at zero: the per-row results (only summed,
        # indexed by computed row) and, below, the hidden gradients.
        new_buffer = torch.zeros if plan.skip_ignored else torch.empty
        row_loss = new_buffer(K, N, dtype=sdt, device=dev)
        correct = new_buffer(K, N, dtype=torch.int32, device=dev)

        # Gradient buffers. Hidden: written directly in the compute dtype when each region is read
        # by one head, else accumulated in acc_dtype. Weight: final gradients in the parameter dtype.
        hid_uses = {key: plan.hidden_heads.count(key) for key in plan.hidden_heads}
        hid_grad_dtype = [acc_dtype(hid_srcs[j]) if any(hid_uses[(i, s)] > 1 for (i, s) in hid_uses if i == j)
                          else cdt for j in range(plan.n_hidden)]
        hid_grads = [new_buffer(t.shape, dtype=hid_grad_dtype[j], device=dev) if hid_need[j] else None
                     for j, t in enumerate(hid_srcs)]
        w_grads = [torch.empty_like(t) if w_need[j] else None for j, t in enumerate(w_srcs)]
        b_grads = [torch.zeros(t.shape, dtype=sdt, device=dev) if b_need[j] else None for j, t in enumerate(b_srcs)]

        # Chunk rows, planned after the gradients exist: the free-memory check then sees them, and
        # counts the largest weight accumulator still to come (one [V, H] at a time).
        if plan.chunk_size is not None:
            chunk = min(plan.chunk_size, N)
        else:
            reserved = max([V * H * torch.empty((), dtype=acc_dtype(t)).element_size()
                            for j, t in enumerate(w_srcs) if w_need[j] and acc_dtype(t) != t.dtype], default=0)
            budget = chunk_budget(any(w_need), any(t is not None for t in plan.teacher), cdt, dev,
                                  bias=bool(b_srcs), label_smoothing=plan.label_smoothing, z_loss=plan.z_loss,
                                  softcap=plan.softcap)
            chunk = plan_chunk_rows(max(max(kept), 1), V, cdt, any(w_need), dev, reserved, budget)
        logits_buf = torch.empty(chunk, V, dtype=cdt, device=dev)
        teacher_buf = (torch.empty(chunk, V, dtype=cdt, device=dev)
                       if any(t is not None for t in plan.teacher) else None)
        lse_buf = torch.empty(chunk, dtype=sdt, device=dev)
        # Gathered rows: their hidden-gradient GEMM lands here, then is scattered to its rows.
        dh_bufs: dict[torch.dtype, torch.Tensor] = {}

        # Heads grouped by projection region, so one weight accumulator is alive at a time.
        order = sorted(range(K), key=lambda k: plan.weight_heads.index(plan.weight_heads[k]))
        hid_written: set = set()
        w_acc, w_written = None, False
        smoothing = plan.label_smoothing
        with torch.autocast(device_type=dev.type, enabled=False):
            for pos, k in enumerate(order):
                wi, wsub = plan.weight_heads[k]
                hi, hsub = plan.hidden_heads[k]
                first_of_group = pos == 0 or plan.weight_heads[order[pos - 1]] != (wi, wsub)
                last_of_group = pos == K - 1 or plan.weight_heads[order[pos + 1]] != (wi, wsub)
                if first_of_group:
                    w_k = region(w_srcs[wi], wsub).to(cdt)  # one cast per group (a no-op if cdt)
                    # The exp-operand path's label-smoothing terms: W's column sums and (trained W) the
                    # part of the weight gradient common to every row, made by the group's first fast head.
                    w_sum = w_common = None
                    if w_need[wi]:
                        # A single dW GEMM (one head, one chunk) accumulates in fp32 inside cuBLAS
                        # and can write the gradient directly; otherwise accumulate in acc_dtype
                        # (the first chunk's GEMM writes it: no zero fill).
                        w_out = region(w_grads[wi], wsub)
                        w_adt = acc_dtype(w_srcs[wi])
                        single = last_of_group and kept[k] <= chunk
                        acc_is_grad = single or w_out.dtype == w_adt
                        w_acc = w_out if acc_is_grad else torch.empty(w_out.shape, dtype=w_adt, device=dev)
                        w_written = False
                h_k = region(hid_srcs[hi], hsub).reshape(N, H)
                teacher_k = plan.teacher[k]
                if teacher_k is not None:
                    t_h = teacher_k.hidden.reshape(N, H)
                    # The teacher's weight is often the student's (self-distillation): reuse its cast.
                    t_w = w_k if _same_tensor(teacher_k.weight, region(w_srcs[wi], wsub)) else teacher_k.weight.to(cdt)
                gh_k = None if hid_grads[hi] is None else region(hid_grads[hi], hsub).reshape(N, H)
                h_accumulate = (hi, hsub) in hid_written
                hid_written.add((hi, hsub))
                b_k = None
                if plan.bias_heads is not None:
                    bi, bsub = plan.bias_heads[k]
                    b_k = region(b_srcs[bi], bsub)
                # Hard labels without bias or softcap on a TMA device: the row work moves into the GEMMs.
                fast = exp_operand.eligible(logits_buf, w_k, teacher=teacher_k is not None, bias=b_k is not None,
                                            label_smoothing=plan.label_smoothing, z_loss=plan.z_loss,
                                            softcap=plan.softcap) and (gh_k is None or gh_k.is_contiguous())
                if fast and smoothing and w_sum is None:
                    w_sum = torch.sum(w_k, dim=0, dtype=torch.float32)
                    w_common = torch.zeros(H, dtype=torch.float32, device=dev) if w_need[wi] else None
                for r0 in range(0, kept[k], chunk):
                    r1 = min(kept[k], r0 + chunk)
                    # This chunk's global rows: r0..r1, or the gathered valid rows of head k.
                    ids = None if rows_of is None else rows_of[k, r0:r1]
                    h_c = (h_k[r0:r1] if ids is None else h_k.index_select(0, ids)).to(cdt)
                    z = logits_buf[: r1 - r0]
                    # The chunk's hidden gradient lands in its rows of gh_k, or (gathered rows) in a
                    # buffer scattered to them below.
                    dh_c = None
                    if gh_k is not None and ids is None:
                        dh_c = gh_k[r0:r1]
                    elif gh_k is not None:
                        dh_c = _dh_buffer(dh_bufs, gh_k.dtype, chunk, H, dev)[: r1 - r0]
                    dh_accumulate = h_accumulate and ids is None
                    if fast:
                        target_c, valid_c = ((x[k, r0:r1] if ids is None else x[k].index_select(0, ids))
                                             for x in (targets, valid))
                        exp_operand.exp_operand_chunk(
                            z, h_c, w_k, target_c, valid_c, scale[k : k + 1], row_loss[k, r0:r1], correct[k, r0:r1],
                            dh_c, dh_accumulate, w_acc if w_need[wi] else None, w_written, smoothing, w_sum, w_common,
                            plan.z_loss)
                    else:
                        _mm_into(z, h_c, w_k.t(), accumulate=False, rows_per_call=GEMM_ROWS["logits"])
                        if teacher_k is None:
                            ce_rows(z, labels_flat, row_start=r0, seq_len=T, shift=plan.shifts[k],
                                    segment_ids=seg_flat, bias=b_k, scale=scale[k : k + 1], lse=lse_buf[: r1 - r0],
                                    loss=row_loss[k, r0:r1], correct=correct[k, r0:r1], compute_lse=True,
                                    write_grad=any_grad, row_ids=ids, **opts)
                        else:
                            u = teacher_buf[: r1 - r0]
                            if teacher_k.offset == 0:
                                t_c = t_h[r0:r1] if ids is None else t_h.index_select(0, ids)
                            else:
                                # Row n reads teacher row n + offset; rows clamped at the end have no
                                # valid target (offset < shift), so they only need to stay in bounds.
                                t_ids = torch.arange(r0, r1, device=dev) if ids is None else ids
                                t_c = t_h.index_select(0, (t_ids + teacher_k.offset).clamp_(max=N - 1))
                            _mm_into(u, t_c.to(cdt), t_w.t(), accumulate=False, rows_per_call=GEMM_ROWS["logits"])
                            # KL in either direction, or the generalized JSD: the same row arguments.
                            divergence_rows, divergence = ((kl_rows, dict(reverse=teacher_k.reverse))
                                                           if teacher_k.jsd_beta is None else
                                                           (jsd_rows, dict(beta=teacher_k.jsd_beta)))
                            divergence_rows(
                                z, u, labels_flat, row_start=r0, seq_len=T, shift=plan.shifts[k],
                                segment_ids=seg_flat, bias=b_k, teacher_bias=teacher_k.bias,
                                scale=scale[k : k + 1], loss=row_loss[k, r0:r1], correct=correct[k, r0:r1],
                                ignore_index=plan.ignore_index, z_loss=plan.z_loss, softcap=plan.softcap,
                                temperature=teacher_k.temperature, write_grad=any_grad, row_ids=ids, **divergence)
                        # z now holds scale_k * dloss/dz for the chunk.
                        if dh_c is not None:
                            _mm_into(dh_c, z, w_k, accumulate=dh_accumulate, rows_per_call=GEMM_ROWS["dh"])
                        if w_need[wi]:
                            _mm_into(w_acc, z.t(), h_c, accumulate=w_written, rows_per_call=GEMM_ROWS["dw"])
                        if b_k is not None and b_need[bi]:
                            region(b_grads[bi], bsub).add_(z.sum(0, dtype=sdt))
                    if dh_c is not None and ids is not None:
                        (gh_k.index_add_ if h_accumulate else gh_k.index_copy_)(0, ids, dh_c)
                    w_written = w_written or w_need[wi]
                if last_of_group:
                    if w_need[wi] and not w_written:
                        w_acc.zero_()  # every head of the group skipped all its rows
                    if w_need[wi] and not acc_is_grad:
                        # The one cast to the parameter dtype (minus the smoothing term q in every row).
                        if w_common is None:
                            region(w_grads[wi], wsub).copy_(w_acc)
                        else:
                            torch.sub(w_acc, w_common, out=region(w_grads[wi], wsub))
                    elif w_common is not None:
                        w_acc.sub_(w_common)
                    w_acc = w_k = w_sum = w_common = None  # free the accumulator before the next group's
                t_h = t_w = None

        head_losses = row_loss.sum(1)
        if plan.reduction == "mean":
            head_losses = head_losses / denom
        loss = (hw * head_losses).sum()
        head_accuracy = (correct.sum(1).to(torch.float32) / counts.clamp(min=1).to(torch.float32))

        # d loss / d head_weights[k] = loss_k (when head_weights is a tensor that requires grad): a copy,
        # since backward scales it in place and the returned head_losses must not change with it.
        grads = [None, None, head_losses.detach().to(head_weights.dtype, copy=True) if plan.needs_grad[2] else None]
        grads += [None if g is None else g.to(t.dtype) for g, t in zip(hid_grads, hid_srcs)]
        grads += w_grads
        grads += [None if g is None else g.to(t.dtype) for g, t in zip(b_grads, b_srcs)]
        ctx.grads = grads
        ctx.reentrant = _reentrant
        head_losses = head_losses.detach().to(torch.float32)
        ctx.mark_non_differentiable(head_losses, head_accuracy, counts)
        return loss, head_losses, head_accuracy, counts

    @staticmethod
    @first_order_only("multi_head_linear_cross_entropy")  # gradients computed in forward
    def backward(ctx, grad_loss, *_):
        return (None, *scaled_forward_grads(ctx, grad_loss, "multi_head_linear_cross_entropy"))


def chunk_budget(weight_grad: bool, teacher: bool, dtype: torch.dtype, device: torch.device, *, bias: bool,
                 label_smoothing: float, z_loss: float, softcap: float | None) -> int | None:
    """Byte budget of the op's logit chunk, or None for chunking's default (DEFAULT_CHUNK_BYTES with a
    weight gradient, FROZEN_CHUNK_BYTES without)."""
    if teacher:
        # A teacher's logits take a second [C, V] buffer: half the rows per chunk, same bytes.
        return (DEFAULT_CHUNK_BYTES if weight_grad else FROZEN_CHUNK_BYTES) // 2
    if not weight_grad and exp_operand.supported(dtype, device, teacher=False, bias=bias,
                                                 label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap):
        # Frozen projections on the exp-operand path: 4096-row chunks (at V = 128256) beat 2048
        # there, 262 vs 266 ms at (b) N=16384 (NOTES.md run 58); the row kernel prefers 2048.
        return DEFAULT_CHUNK_BYTES
    return None


def _dh_buffer(buffers: dict[torch.dtype, torch.Tensor], dtype: torch.dtype, rows: int, H: int,
               device: torch.device) -> torch.Tensor:
    """The [rows, H] buffer of ``dtype`` where gathered rows' hidden gradients land, made once."""
    if dtype not in buffers:
        buffers[dtype] = torch.empty(rows, H, dtype=dtype, device=device)
    return buffers[dtype]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b view the same elements (a detached copy of a parameter is b itself)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def scaled_forward_grads(ctx, grad_loss: torch.Tensor, op: str) -> list[torch.Tensor | None]:
    """Backward of a Function that computed its gradients in forward (``ctx.grads``): each times
    grad_loss (a 0-dim fp32 tensor; the product keeps each gradient's dtype, computed in fp32).

    They are scaled in place and handed to autograd, which may adopt them without a copy; under
    ``reentrant_backward()`` (``ctx.reentrant``) they are kept and scaled out of place instead.
    """
    if ctx.grads is None:
        raise RuntimeError(f"{op}: backward ran twice; use reentrant_backward()")
    grads = ctx.grads
    if ctx.reentrant:
        return [None if g is None else g * grad_loss for g in grads]
    ctx.grads = None
    return [None if g is None else scale_(g, grad_loss) for g in grads]


def valid_target_counts(labels: torch.Tensor, shifts: Sequence[int], vocab_size: int, *, ignore_index: int = -100,
                        segment_ids: torch.Tensor | None = None) -> list[int]:
    """Each head's number of valid targets (the rule of ``multi_head_linear_cross_entropy``), read to
    the host in one sync: pass them as ``skip_ignored`` to several calls over the same labels.

    labels: [B, T] integer ids, NOT shifted; shifts: K ints >= 0; segment_ids: None or [B, T]."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError("labels must be a [B, T] integer tensor")
    if segment_ids is not None and (not isinstance(segment_ids, torch.Tensor) or segment_ids.shape != labels.shape):
        raise ValueError(f"segment_ids must have the shape of labels {list(labels.shape)}")
    if labels.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError("skip_ignored gathers rows by counts read on the host: it cannot run inside CUDA graph "
                         "capture (use skip_ignored=False there)")
    B, T = labels.shape
    flat = labels.reshape(-1)
    seg = None if segment_ids is None else segment_ids.reshape(-1)
    valid = torch.stack([row_targets(flat, seg, T, int(s), 0, B * T, ignore_index, vocab_size)[1] for s in shifts])
    return valid.sum(1).tolist()


# torch.compile runs this op eagerly (a graph break): its chunk loop and Triton launches are already
# the fused form, and it never synchronizes, so CUDA graphs can still capture it.
@torch.compiler.disable
def multi_head_linear_cross_entropy(
    hidden: torch.Tensor | Sequence[torch.Tensor],
    weight: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    shifts: Sequence[int],
    head_weights: Sequence[float] | torch.Tensor | None = None,
    *,
    bias: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    segment_ids: torch.Tensor | None = None,
    reduction: str = "mean",
    accum_dtype: torch.dtype | None = torch.float32,
    chunk_size: int | None = None,
    skip_ignored: bool | Sequence[int] = False,
    teacher: Sequence[Teacher | tuple | None] | None = None,
) -> MultiHeadLossOutput:
    """Every Medusa head's loss in one chunked op (see the module docstring for the math).

    hidden:  [K, B, T, H], [B, T, H] (read by every head) or a list of K [B, T, H] tensors.
    weight:  [V, H] shared, [K, V, H], or a list of K [V, H] tensors (may repeat one tensor).
    labels:  [B, T] integer token ids, NOT shifted; head k at position t predicts labels[b, t + shifts[k]].
    bias:    None, [V], [K, V] or a list of K [V] tensors.
    segment_ids: [B, T] integer document ids of packed rows (targets across a boundary are ignored).
    accum_dtype: dtype of the gradient accumulators over chunks (weight) and heads (a shared hidden):
             float32 (default), float64, bfloat16/float16, or None for each gradient's own dtype
             (bf16 parameters then accumulate in the bf16 gradient itself: no [V, H] fp32 buffer,
             one rounding per chunk, as Liger's fused loss and HF's unfused backward do).
    chunk_size: rows per logit chunk (default: about 1 GiB of logits, 512 MiB when every projection
             is frozen, less when the device is short of memory; balanced, see the module docstring).
    skip_ignored: run the GEMMs only on each head's rows with a valid target (gathered), so ignored
             targets (prompt tokens of chat data, padding) cost nothing. Same results; costs one
             host-device sync per call (the row counts), so it cannot be captured in a CUDA graph.
             Or each head's count of valid targets, when the caller has them (``valid_target_counts``:
             one sync for several calls over the same labels); checked on the device, without a sync.
    teacher: None, or one entry per head: None (that head learns its labels), a ``Teacher``
             (hidden [B, T, H], weight [V, H], bias [V] or None, offset, temperature, reverse, jsd_beta) or
             a (hidden, weight[, bias]) tuple (offset 0, temperature 1): that head's loss is then KL(teacher
             || head) (reverse: KL(head || teacher); jsd_beta: the generalized Jensen-Shannon divergence,
             kernels/jsd.py; at temperature tau: tau^2 times the divergence of both distributions at
             logits / tau) at every position t with a
             valid target (labels, shift and segments decide which positions count, and the accuracy
             is still against the labels), the teacher's logits softcap(hidden @ weight^T + bias) taken
             at position t + offset (0 <= offset < shift). Constants: no gradient flows to them. Not
             with label_smoothing.
    Returns MultiHeadLossOutput(loss (differentiable), head_losses, head_accuracy, head_tokens).
    """
    shifts = check_shifts(shifts)
    K = len(shifts)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError("labels must be a [B, T] integer tensor")
    check_labels("labels", labels, 1 << 62, ignore_index, check_values=False)
    B, T = labels.shape
    if B * T == 0:
        raise ValueError(f"labels must hold at least one token, got shape {list(labels.shape)}")
    check_loss_options(reduction, accum_dtype, chunk_size, ignore_index, label_smoothing, z_loss, softcap)
    known_counts = None
    if isinstance(skip_ignored, (list, tuple)):
        known_counts = [int(c) for c in skip_ignored]
        if len(known_counts) != K or any(not 0 <= c <= labels.numel() for c in known_counts):
            raise ValueError(f"skip_ignored must be a bool or {K} valid-target counts in [0, B*T], got {skip_ignored!r}")
    elif not isinstance(skip_ignored, bool):
        raise ValueError(f"skip_ignored must be a bool or a list of {K} valid-target counts, got {skip_ignored!r}")
    if skip_ignored and labels.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError("skip_ignored gathers rows by counts read on the host: it cannot run inside CUDA graph "
                         "capture (use skip_ignored=False there)")

    hid_srcs, hid_heads = sources("hidden", hidden, K, 3)
    w_srcs, w_heads = sources("weight", weight, K, 2)
    b_srcs, b_heads = ([], None) if bias is None else sources("bias", bias, K, 1)
    V, H = w_srcs[0].shape[-2], w_srcs[0].shape[-1]
    if V < 1:  # (the chunk budget divides by V)
        raise ValueError(f"weight must have a vocabulary of V >= 1 rows, got shape {list(w_srcs[0].shape)}")
    for name, srcs, tail in (("hidden", hid_srcs, (B, T, H)), ("weight", w_srcs, (V, H)), ("bias", b_srcs, (V,))):
        for t in srcs:
            check_float(name, t)
            if tuple(t.shape[-len(tail):]) != tail:
                raise ValueError(f"{name} must end in shape {list(tail)} (labels {list(labels.shape)}: [B, T]; "
                                 f"weight {list(w_srcs[0].shape)}: [V, H] last), got {list(t.shape)}")
    # The row kernels read a head's bias at unit stride (the GEMMs take any strides): a strided or
    # expanded [V] is copied (autograd routes the gradient back through the copy).
    b_srcs = [b if b.stride(-1) == 1 or V == 1 else b.contiguous() for b in b_srcs]
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.shape != labels.shape:
            raise ValueError(f"segment_ids must have the shape of labels {list(labels.shape)}")
        check_labels("segment_ids", segment_ids, 0, 0, check_values=False)
        segment_ids = segment_ids.contiguous()
    check_same_device(labels=labels, hidden=hid_srcs[0], weight=w_srcs[0], segment_ids=segment_ids,
                      **{f"hidden[{i}]": t for i, t in enumerate(hid_srcs)},
                      **{f"weight[{i}]": t for i, t in enumerate(w_srcs)},
                      **{f"bias[{i}]": t for i, t in enumerate(b_srcs)})
    check_labels("labels", labels, V, ignore_index, check_values=not labels.is_cuda)
    labels = labels.contiguous() if labels.dtype == torch.int64 else labels.long()
    hw = as_head_weights(head_weights, K, labels.device)
    teacher = check_teacher(teacher, shifts, (B, T, H), (V, H), labels.device, label_smoothing, z_loss)

    # Compute dtype: autocast's when active (the GEMMs then run in it), else the inputs' common one.
    dev_type = labels.device.type
    if torch.is_autocast_enabled(dev_type):
        compute_dtype = torch.get_autocast_dtype(dev_type)
    else:
        compute_dtype = hid_srcs[0].dtype
        for t in hid_srcs + w_srcs:
            compute_dtype = torch.promote_types(compute_dtype, t.dtype)
    grad_on = torch.is_grad_enabled()
    tensors = [*hid_srcs, *w_srcs, *b_srcs]
    plan = _Plan(
        shifts=shifts, hidden_heads=hid_heads, weight_heads=w_heads, bias_heads=b_heads,
        n_hidden=len(hid_srcs), n_weight=len(w_srcs),
        needs_grad=[False, False, grad_on and hw.requires_grad] + [grad_on and t.requires_grad for t in tensors],
        ignore_index=ignore_index, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap), reduction=reduction, accum_dtype=accum_dtype,
        compute_dtype=compute_dtype, chunk_size=chunk_size, skip_ignored=bool(skip_ignored),
        known_counts=known_counts, teacher=teacher,
    )
    loss, head_losses, head_accuracy, head_tokens = MultiHeadLinearCrossEntropyFunction.apply(
        plan, labels, segment_ids, hw, *tensors
    )
    return MultiHeadLossOutput(loss=loss, head_losses=head_losses, head_accuracy=head_accuracy,
                               head_tokens=head_tokens)


def check_loss_options(reduction: str, accum_dtype: torch.dtype | None, chunk_size: int | None, ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    """ValueError naming the first option of ``multi_head_linear_cross_entropy`` outside its domain."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if accum_dtype is not None and accum_dtype not in _ACCUM_DTYPES:
        raise ValueError(f"accum_dtype must be None or one of {_ACCUM_DTYPES}, got {accum_dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    check_ce_options(ignore_index, label_smoothing, z_loss, softcap)


class MultiHeadLinearCrossEntropy(nn.Module):
    """Module form of ``multi_head_linear_cross_entropy`` with the options fixed (and checked) at
    construction. A tensor ``head_weights`` [K] is a (non-persistent) buffer, so ``.to(device)`` moves it."""

    def __init__(
        self,
        shifts: Sequence[int],
        head_weights: Sequence[float] | None = None,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        reduction: str = "mean",
        accum_dtype: torch.dtype | None = torch.float32,
        chunk_size: int | None = None,
        skip_ignored: bool = False,
    ) -> None:
        super().__init__()
        self.shifts = check_shifts(shifts)  # here, not at the first call: int(1.9) would make it 1
        check_loss_options(reduction, accum_dtype, chunk_size, ignore_index, label_smoothing, z_loss, softcap)
        if not isinstance(skip_ignored, bool):  # (valid-target counts depend on each call's labels)
            raise ValueError(f"skip_ignored must be a bool, got {skip_ignored!r}")
        if head_weights is not None and len(head_weights) != len(self.shifts):
            raise ValueError(f"head_weights must have one entry per shift ({len(self.shifts)}), "
                             f"got {len(head_weights)}")
        if isinstance(head_weights, torch.Tensor) and not head_weights.requires_grad:
            # A buffer, so .to(device) moves it (values checked by each call); its dtype is kept (_apply).
            self.register_buffer("head_weights", head_weights.detach().clone(), persistent=False)
        elif isinstance(head_weights, torch.Tensor):  # learnable (an nn.Parameter registers itself): as given
            self.head_weights = head_weights
        else:
            self.head_weights = None if head_weights is None else list(head_weights)
        self.options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                            softcap=softcap, reduction=reduction, accum_dtype=accum_dtype, chunk_size=chunk_size,
                            skip_ignored=skip_ignored)

    def forward(self, hidden: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor | Sequence[torch.Tensor],
                labels: torch.Tensor, *, bias: torch.Tensor | Sequence[torch.Tensor] | None = None,
                segment_ids: torch.Tensor | None = None,
                teacher: Sequence[Teacher | tuple | None] | None = None) -> MultiHeadLossOutput:
        """hidden [K, B, T, H] / [B, T, H] / K x [B, T, H], weight [V, H] / [K, V, H] / K x [V, H], labels
        [B, T], bias, segment_ids [B, T] and teacher as in ``multi_head_linear_cross_entropy``."""
        return multi_head_linear_cross_entropy(hidden, weight, labels, self.shifts, self.head_weights,
                                               bias=bias, segment_ids=segment_ids, teacher=teacher, **self.options)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the head weights' buffer, but .to(bfloat16) must not round them (0.8 -> 0.8008).
        kept = self._buffers.get("head_weights")
        result = super()._apply(fn, recurse)
        if kept is not None:
            device = self._buffers["head_weights"].device
            # (a module built on the meta device has no values to copy: to_empty() gets an empty buffer)
            self._buffers["head_weights"] = torch.empty_like(kept, device=device) if kept.is_meta else kept.to(device)
        return result

    def extra_repr(self) -> str:
        return f"shifts={self.shifts}, head_weights={self.head_weights}"
