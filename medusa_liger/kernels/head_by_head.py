"""The multi-head loss when each head first transforms the hidden state: one head at a time.

Medusa head k reads the backbone's hidden state x [B, T, H] through its own blocks f_k (residual
blocks) and then projects:

    loss = sum_k w_k * CE(f_k(x) @ W_k^T, labels shifted by s_k)

Every term depends on x and on head k's own parameters only, so every gradient is a sum over heads
of that head's gradient. ``multi_head_linear_cross_entropy`` already computes a head's projection
gradients in forward; this op goes one step further and runs the backward of f_k there too, right
after head k's loss:

    for k:  z_k = f_k(x);  loss_k, (dx_k, dtheta_k) = loss and gradients of head k
            free z_k and f_k's activations;  dx += dx_k;  dtheta += dtheta_k

so only one head's activations and hidden-state gradient [B, T, H] are alive at a time, instead of
all K heads' (the K outputs z_k handed to the loss, their blocks' saved activations and the K
gradients dL/dz_k kept from forward to backward). Backward scales the summed gradients by
grad_output. The FLOPs are those of the plain forward + backward: nothing is recomputed.

``params`` must list every tensor the heads read that may need a gradient (the blocks' parameters,
the projection weights and biases): autograd routes gradients to this op's inputs only. A tensor
listed or read by several heads (a shared projection) gets one summed gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from medusa_liger.kernels import fused_linear_cross_entropy as flce
from medusa_liger.kernels.reference import MultiHeadLossOutput
from medusa_liger.kernels.utils import first_order_only


class HeadByHeadLinearCrossEntropy(torch.autograd.Function):
    """Forward computes every gradient head by head (see the module docstring)."""

    @staticmethod
    def forward(ctx, run_head: Callable[[int, torch.Tensor], MultiHeadLossOutput], num_heads: int,
                hidden: torch.Tensor, *params: torch.Tensor):
        x = hidden.detach().requires_grad_(ctx.needs_input_grad[2])
        trainable = [i for i, p in enumerate(params) if ctx.needs_input_grad[3 + i]]
        inputs = ([x] if x.requires_grad else []) + [params[i] for i in trainable]
        summed: list[torch.Tensor | None] = [None] * len(inputs)
        loss = None
        metrics = []
        for k in range(num_heads):
            # No graph at all when nothing needs a gradient (evaluation under no_grad).
            with torch.enable_grad() if inputs else contextlib.nullcontext():
                out = run_head(k, x)
                grads = (torch.autograd.grad(out.loss, inputs, allow_unused=True)
                         if inputs and out.loss.requires_grad else [None] * len(inputs))
            # Head k's graph (its blocks' activations, its input to the projection) is freed here.
            for j, g in enumerate(grads):
                if g is not None:
                    summed[j] = g if summed[j] is None else summed[j].add_(g)
            loss = out.loss.detach() if loss is None else loss + out.loss.detach()
            metrics.append((out.head_losses, out.head_accuracy, out.head_tokens))
        head_losses, head_accuracy, head_tokens = (torch.cat(column) for column in zip(*metrics))
        grad_hidden = summed.pop(0) if x.requires_grad else None
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        for i, g in zip(trainable, summed):
            param_grads[i] = g
        ctx.grads = [grad_hidden, *param_grads]
        ctx.reentrant = flce._reentrant
        ctx.mark_non_differentiable(head_losses, head_accuracy, head_tokens)
        return loss, head_losses, head_accuracy, head_tokens

    @staticmethod
    @first_order_only("head_by_head_linear_cross_entropy")  # gradients computed in forward
    def backward(ctx, grad_loss, *_):
        return (None, None, *flce.scaled_forward_grads(ctx, grad_loss, "head_by_head_linear_cross_entropy"))


def head_by_head_linear_cross_entropy(
    hidden: torch.Tensor,
    head_inputs: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    weight: Sequence[torch.Tensor],
    labels: torch.Tensor,
    shifts: Sequence[int],
    head_weights: Sequence[float] | None = None,
    *,
    params: Sequence[torch.Tensor],
    bias: Sequence[torch.Tensor | None] | None = None,
    teacher: Sequence[flce.Teacher | tuple | None] | None = None,
    **options,
) -> MultiHeadLossOutput:
    """``multi_head_linear_cross_entropy`` of heads that transform ``hidden`` first, one head at a time.

    hidden:       [B, T, H], read by every head.
    head_inputs:  K functions, [B, T, H] -> head k's input to its projection [B, T, H'] (the
                  identity for the backbone's own lm_head).
    weight:       K projection weights [V, H'] (may repeat one tensor); bias: None or K [V] or None.
    params:       every tensor the heads read that may need a gradient (see the module docstring).
    teacher:      None or K entries: None, or head k's ``Teacher`` or (hidden [B, T, H'], weight [V, H'][, bias]),
                  whose distribution head k then learns (KL); see ``multi_head_linear_cross_entropy``.
    labels, shifts, head_weights (K floats) and ``options`` (ignore_index, segment_ids, reduction,
    accum_dtype, skip_ignored, ...): as in ``multi_head_linear_cross_entropy``; with skip_ignored, the
    heads' row counts are read in one host sync for all K heads.
    Returns the same ``MultiHeadLossOutput``: ``loss`` is differentiable with respect to ``hidden`` and
    ``params``.
    """
    K = len(head_inputs)
    for name, value in (("weight", weight), ("shifts", shifts)):
        if len(value) != K:
            raise ValueError(f"{name} must have one entry per head ({K}), got {len(value)}")
    head_weights = [1.0] * K if head_weights is None else list(head_weights)
    if len(head_weights) != K or any(isinstance(w, torch.Tensor) for w in head_weights):
        raise ValueError(f"head_weights must be {K} floats, got {head_weights!r}")
    bias = [None] * K if bias is None else list(bias)
    if len(bias) != K:
        raise ValueError(f"bias must have one entry per head ({K}), got {len(bias)}")
    teacher = [None] * K if teacher is None else list(teacher)
    if len(teacher) != K:
        raise ValueError(f"teacher must have one entry per head ({K}), got {len(teacher)}")
    unique = list({id(p): p for p in params}.values())
    if any(not isinstance(p, torch.Tensor) for p in unique):
        raise ValueError("params must be tensors")

    # skip_ignored: every head's row count read in one host sync here, instead of one per head.
    # Counts given by the caller, one per head, go to their heads.
    skip_ignored = options.get("skip_ignored")
    counts = list(skip_ignored) if isinstance(skip_ignored, (list, tuple)) and len(skip_ignored) == K else None
    if skip_ignored is True and isinstance(weight[0], torch.Tensor):  # (a bad weight: the op's message)
        counts = flce.valid_target_counts(labels, shifts, weight[0].shape[-2], segment_ids=options.get("segment_ids"),
                                          ignore_index=options.get("ignore_index", -100))

    def run_head(k: int, x: torch.Tensor) -> MultiHeadLossOutput:
        head_options = options if counts is None else {**options, "skip_ignored": [counts[k]]}
        return flce.multi_head_linear_cross_entropy(
            [head_inputs[k](x)], [weight[k]], labels, [shifts[k]], [head_weights[k]],
            bias=None if bias[k] is None else [bias[k]], teacher=[teacher[k]], **head_options)

    loss, head_losses, head_accuracy, head_tokens = HeadByHeadLinearCrossEntropy.apply(
        run_head, K, hidden, *unique)
    return MultiHeadLossOutput(loss, head_losses, head_accuracy, head_tokens)
