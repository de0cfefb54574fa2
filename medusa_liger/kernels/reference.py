"""Naive reference for the multi-head linear cross-entropy: materializes every head's logits.

This is the definition the fused op must match, written the plain way: for each head ``k``

    logits_k = softcap(hidden_k @ weight_k.T + bias_k)          # [B, T, V], in ``compute_dtype``
    target_k[b, t] = labels[b, t + shifts[k]]                    # ignored past the end of the row,
                                                                 # across a segment boundary, or
                                                                 # where it equals ignore_index
    loss_k = reduce(CE(logits_k, target_k; label_smoothing) + z_loss * lse_k**2)
    loss = sum_k head_weights[k] * loss_k

With a teacher for head k, CE(logits_k, target_k) becomes KL(softmax(teacher logits) || softmax(logits_k))
at the positions whose target is valid, the teacher's logits read ``offset`` positions further on. At a
teacher temperature tau both sets of logits are divided by tau and the divergence is multiplied by
tau^2 (Hinton et al.'s scaling, which keeps the gradient's size about the same as tau changes):

    loss_k = tau^2 KL(softmax(teacher logits / tau) || softmax(logits_k / tau))

and a reversed teacher swaps the two distributions: tau^2 KL(softmax(logits_k / tau) || softmax(teacher ...)).
A teacher with ``jsd_beta`` = beta takes the generalized Jensen-Shannon divergence instead, with
p = softmax(teacher logits / tau), q = softmax(logits_k / tau) and m = beta p + (1 - beta) q:

    loss_k = tau^2 (beta KL(p || m) + (1 - beta) KL(q || m))

It is used by the tests (in float64) and as the "naive PyTorch" baseline in the benchmarks. It costs
K x B x T x V memory, which is exactly what the fused op exists to avoid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Teacher:
    """Soft targets of one head: the distribution softcap(hidden @ weight^T + bias) of a teacher.

    hidden: [B, T, H] (or a detached view of the student's own hidden states), weight: [V, H],
    bias: [V] or None. All constants: no gradient flows to them.
    offset: the head's row at position t learns the teacher's row at position t + offset of the same
            sequence (0 <= offset < the head's shift). A Medusa head with shift s learning the
            backbone's own next-token distribution of the same token uses offset s - 1.
    temperature: tau > 0: the head learns softmax(teacher logits / tau) through its own logits / tau,
            the divergence times tau^2 (1: plain KL).
    reverse: False: KL(teacher || head) (mass-covering); True: KL(head || teacher) (mode-seeking).
    jsd_beta: None for a KL; beta in (0, 1) for the generalized Jensen-Shannon divergence
            beta KL(teacher || m) + (1 - beta) KL(head || m), m = beta teacher + (1 - beta) head
            (1/2: the symmetric JSD; reverse must then be False).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    offset: int = 0
    temperature: float = 1.0
    reverse: bool = False
    jsd_beta: float | None = None


@dataclass
class MultiHeadLossOutput:
    """Result of a multi-head loss.

    loss:          scalar, differentiable: sum_k head_weights[k] * loss_k
    head_losses:   [K] float32, detached: loss_k (cross-entropy plus z-loss, reduced)
    head_accuracy: [K] float32, detached: top-1 accuracy over head k's valid targets (0 if none)
    head_tokens:   [K] int64, detached: number of valid targets of head k
    """

    loss: torch.Tensor
    head_losses: torch.Tensor
    head_accuracy: torch.Tensor
    head_tokens: torch.Tensor


def shifted_targets(
    labels: torch.Tensor,
    shift: int,
    ignore_index: int = -100,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Targets of a head with ``shift``: [B, T] with target[b, t] = labels[b, t + shift].

    Positions whose target lies past the end of the row, or in another segment than position t,
    get ``ignore_index``.
    """
    B, T = labels.shape
    target = torch.full_like(labels, ignore_index)
    if shift < T:
        target[:, : T - shift] = labels[:, shift:]
        if segment_ids is not None:
            crosses = segment_ids[:, : T - shift] != segment_ids[:, shift:]
            target[:, : T - shift][crosses] = ignore_index
    return target


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Per row: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, from log-probabilities.

    A term whose weight (p_j or q_j) is 0 adds 0, and its logs are replaced before any arithmetic, so
    autograd never multiplies 0 by an infinite or NaN derivative there (the double-where rule)."""
    alive_p, alive_q = log_p.exp() > 0, log_q.exp() > 0
    safe_p = torch.where(alive_p, log_p, torch.zeros_like(log_p))
    safe_q = torch.where(alive_q, log_q, torch.zeros_like(log_q))
    # log m where either side has mass (its -inf side then adds exp(-inf) = 0 to the mixture).
    log_m = torch.logaddexp(math.log(beta) + torch.where(alive_p, log_p, torch.full_like(log_p, -math.inf)),
                            math.log1p(-beta) + torch.where(alive_q, log_q, torch.full_like(log_q, -math.inf)))
    safe_m = torch.where(alive_p | alive_q, log_m, torch.zeros_like(log_m))
    kl_pm = torch.where(alive_p, safe_p.exp() * (safe_p - safe_m), torch.zeros_like(safe_p)).sum(-1)
    kl_qm = torch.where(alive_q, safe_q.exp() * (safe_q - safe_m), torch.zeros_like(safe_q)).sum(-1)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def _as_list(x, count: int) -> list:
    if x is None:
        return [None] * count
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x] * count


def multi_head_linear_cross_entropy_reference(
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
    compute_dtype: torch.dtype = torch.float32,
    teacher: Sequence[Teacher | tuple | None] | None = None,
) -> MultiHeadLossOutput:
    """Materialized-logits version of ``multi_head_linear_cross_entropy`` (see module docstring).

    hidden: [K, B, T, H], [B, T, H] (read by every head) or a list of K [B, T, H] tensors.
    weight: [V, H] shared, [K, V, H] or a list of K [V, H] tensors.
    bias:   None, [V], [K, V] or a list of K [V] tensors.
    teacher: None or per head None, a ``Teacher`` or a (hidden, weight[, bias]) tuple.
    """
    K = len(shifts)
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 4:
        hiddens = list(hidden.unbind(0))
    else:
        hiddens = _as_list(hidden, K)
    if isinstance(weight, torch.Tensor) and weight.dim() == 3:
        weights = list(weight.unbind(0))
    else:
        weights = _as_list(weight, K)
    if isinstance(bias, torch.Tensor) and bias.dim() == 2:
        biases = list(bias.unbind(0))
    else:
        biases = _as_list(bias, K)
    if head_weights is None:
        head_weights = [1.0] * K
    head_weights = torch.as_tensor(head_weights, dtype=compute_dtype, device=labels.device)

    teachers = [t if t is None or isinstance(t, Teacher) else Teacher(*t)
                for t in ([None] * K if teacher is None else teacher)]

    def head_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        logits = h.to(compute_dtype) @ w.to(compute_dtype).T
        if b is not None:
            logits = logits + b.to(compute_dtype)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return logits

    losses, accuracies, counts = [], [], []
    for k in range(K):
        logits = head_logits(hiddens[k], weights[k], biases[k])
        target = shifted_targets(labels, int(shifts[k]), ignore_index, segment_ids).reshape(-1)
        logits = logits.reshape(-1, logits.shape[-1])
        valid = target != ignore_index
        count = valid.sum()
        safe_target = torch.where(valid, target, torch.zeros_like(target))

        lse = torch.logsumexp(logits, dim=-1)
        if teachers[k] is None:
            nll = lse - logits.gather(1, safe_target[:, None]).squeeze(1)
            row_loss = (1.0 - label_smoothing) * nll
            if label_smoothing > 0:  # guarded: 0 * inf would turn rows with -inf logits into NaN
                row_loss = row_loss + label_smoothing * (lse - logits.mean(dim=-1))
        else:
            t = teachers[k]
            t_logits = head_logits(t.hidden, t.weight, t.bias).detach()  # a constant
            # Position t reads the teacher's position t + offset; the rows this wraps around have no
            # valid target (offset < shift).
            t_logits = t_logits.roll(-t.offset, dims=1)
            tau = float(t.temperature)
            log_p = torch.log_softmax(t_logits.reshape(logits.shape) / tau, dim=-1)
            p = log_p.exp()
            log_q = torch.log_softmax(logits / tau, dim=-1)
            # p log(p / q), 0 where p is 0 (the product would be 0 * -inf there); reversed, q log(q / p).
            if t.jsd_beta is not None:
                row_loss = tau**2 * generalized_jsd(log_p, log_q, float(t.jsd_beta))
            elif t.reverse:  # (log q read as 0 where q is 0: its gradient there is then 0, not 0 * inf)
                q = log_q.exp()
                safe_log_q = torch.where(q > 0, log_q, torch.zeros_like(log_q))
                row_loss = tau**2 * torch.where(q > 0, q * (safe_log_q - log_p), torch.zeros_like(q)).sum(-1)
            else:
                row_loss = tau**2 * torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
        row_loss = row_loss + z_loss * lse.square()
        row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))
        total = row_loss.sum()
        if reduction == "mean":
            total = total / count.clamp(min=1).to(compute_dtype)
        elif reduction != "sum":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        correct = (logits.argmax(dim=-1) == target) & valid
        losses.append(total)
        accuracies.append(correct.sum().to(torch.float32) / count.clamp(min=1).to(torch.float32))
        counts.append(count)

    head_losses = torch.stack(losses)
    return MultiHeadLossOutput(
        loss=(head_weights * head_losses).sum(),
        head_losses=head_losses.detach().float(),
        head_accuracy=torch.stack(accuracies).detach(),
        head_tokens=torch.stack(counts).to(torch.int64),
    )
