"""Parsing of the fused multi-head loss's per-head arguments (hidden, weight, bias, head_weights, teacher).

Each of hidden, weight and bias is one tensor shared by every head, one tensor stacked over the K
heads, or a list of K tensors in which the same tensor may repeat (its gradient then accumulates
once). ``sources`` reduces any form to the unique tensors (the autograd Function's inputs) plus,
per head, which tensor and which slice of it the head reads.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

from medusa_liger.kernels.jsd import check_jsd_beta
from medusa_liger.kernels.reference import Teacher
from medusa_liger.kernels.utils import check_float


def sources(name: str, x, K: int, single_dim: int) -> tuple[list[torch.Tensor], list[tuple[int, int | None]]]:
    """Unique tensors behind a per-head argument and, per head, (source index, sub-index or None).

    A tensor with ``single_dim`` dims is shared by every head; one more dim is stacked over K;
    a list holds one tensor per head (the same object may repeat: its gradient accumulates once).
    """
    if isinstance(x, torch.Tensor):
        if x.dim() == single_dim:
            return [x], [(0, None)] * K
        if x.dim() == single_dim + 1:
            if x.shape[0] != K:
                raise ValueError(f"{name} stacks {x.shape[0]} heads but len(shifts) = {K}")
            return [x], [(0, k) for k in range(K)]
        raise ValueError(f"{name} must have {single_dim} or {single_dim + 1} dims, got shape {list(x.shape)}")
    if not isinstance(x, (list, tuple)) or len(x) != K:
        raise ValueError(f"{name} must be a tensor or a list of len(shifts) = {K} tensors")
    srcs: list[torch.Tensor] = []
    index: dict[int, int] = {}
    heads = []
    for t in x:
        if not isinstance(t, torch.Tensor) or t.dim() != single_dim:
            raise ValueError(f"each entry of {name} must be a {single_dim}-dim tensor")
        if id(t) not in index:
            index[id(t)] = len(srcs)
            srcs.append(t)
        heads.append((index[id(t)], None))
    return srcs, heads


def region(src: torch.Tensor, sub: int | None) -> torch.Tensor:
    return src if sub is None else src[sub]


def check_shifts(shifts) -> list[int]:
    """``shifts`` as a list of ints, or a ValueError: a non-empty sequence (list, tuple, range, array, CPU
    tensor) of ints >= 0."""
    if isinstance(shifts, torch.Tensor):
        if shifts.device.type != "cpu":  # (the head plan is built on the host: reading it would synchronize)
            raise ValueError(f"shifts must be ints on the host (a list, or a CPU tensor), got a tensor on "
                             f"{shifts.device}")
        if shifts.dim() != 1:  # (a 0-d one failed iterating: a TypeError)
            raise ValueError(f"shifts must be a non-empty list of ints >= 0 (or a 1-D CPU tensor), got a tensor of "
                             f"shape {list(shifts.shape)}")
        shifts = shifts.tolist()
    if not isinstance(shifts, (list, tuple, str, bytes, dict)) and isinstance(shifts, Iterable):
        shifts = list(shifts)
    if not isinstance(shifts, (list, tuple)) or len(shifts) == 0:
        raise ValueError(f"shifts must be a non-empty list of ints >= 0, got {shifts!r}")
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shifts):
        raise ValueError(f"shifts must be ints >= 0, got {shifts!r}")  # 1.9 would silently become 1
    return [int(s) for s in shifts]


def as_head_weights(head_weights, K: int, device: torch.device) -> torch.Tensor:
    if head_weights is None:
        return torch.ones(K, dtype=torch.float64, device=device)
    if isinstance(head_weights, torch.Tensor):
        if head_weights.shape != (K,) or not head_weights.is_floating_point():
            raise ValueError(f"head_weights must be a float tensor of shape [{K}], got {head_weights.dtype} "
                             f"{list(head_weights.shape)}")
        if head_weights.device != device:
            raise ValueError(f"head_weights is on {head_weights.device} but labels is on {device}")
        return head_weights
    values = list(head_weights)
    if len(values) != K:
        raise ValueError(f"head_weights must hold len(shifts) = {K} values, got {len(values)}")
    if any(isinstance(w, torch.Tensor) for w in values):
        # Tensors (say 0-dim CUDA scalars) are stacked where they live: float(w) would sync.
        if not all(isinstance(w, torch.Tensor) and w.numel() == 1 and w.is_floating_point() for w in values):
            raise ValueError("head_weights must be K numbers or K one-element float tensors, not a mix")
        if any(w.device != device for w in values):
            raise ValueError(f"head_weights tensors must be on {device} (the labels' device)")
        return torch.stack([w.reshape(()).to(torch.float64) for w in values])
    values = [float(w) for w in values]
    if not all(math.isfinite(w) for w in values):  # (tensor weights are not read on the host: no sync)
        raise ValueError(f"head_weights must be finite numbers, got {values}")
    # Filled on the device value by value: a host-to-device copy of a list would synchronize.
    out = torch.empty(K, dtype=torch.float64, device=device)
    for k, value in enumerate(values):
        out[k].fill_(value)
    return out


def check_teacher(teacher, shifts: list[int], hidden_shape: tuple[int, ...], weight_shape: tuple[int, ...],
                  device: torch.device, label_smoothing: float, z_loss: float = 0.0) -> list[Teacher | None]:
    """The ``teacher`` argument as one ``Teacher`` (detached tensors) or None per head; ValueError
    naming what is wrong otherwise."""
    K = len(shifts)
    if teacher is None:
        return [None] * K
    if not isinstance(teacher, (list, tuple)) or len(teacher) != K:
        raise ValueError(f"teacher must be None or a list of len(shifts) = {K} entries (None, a Teacher or a "
                         f"(hidden, weight[, bias]) tuple), got {type(teacher).__name__}")
    checked: list[Teacher | None] = []
    for k, entry in enumerate(teacher):
        if entry is None:
            checked.append(None)
            continue
        if isinstance(entry, (list, tuple)) and len(entry) in (2, 3):
            entry = Teacher(*entry)
        if not isinstance(entry, Teacher):
            raise ValueError(f"teacher[{k}] must be None, a Teacher or a (hidden, weight[, bias]) tuple of tensors")
        parts = [("hidden", entry.hidden, hidden_shape), ("weight", entry.weight, weight_shape)]
        if entry.bias is not None:
            parts.append(("bias", entry.bias, weight_shape[:1]))
        for name, t, shape in parts:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"teacher[{k}] {name} must be a tensor, got {type(t).__name__}")
            check_float(f"teacher[{k}] {name}", t)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"teacher[{k}] {name} must have shape {list(shape)}, got {list(t.shape)}")
            if t.device != device:
                raise ValueError(f"teacher[{k}] {name} is on {t.device} but labels is on {device}")
        offset = entry.offset
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < max(shifts[k], 1):
            raise ValueError(f"teacher[{k}] offset must be an int in [0, shift = {shifts[k]}) (0 when the shift is 0), "
                             f"got {offset!r}")
        tau = entry.temperature
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"teacher[{k}] temperature must be a finite number > 0, got {tau!r}")
        if tau != 1 and float(z_loss) != 0.0:
            raise ValueError(f"z_loss must be 0 with a teacher temperature other than 1 (teacher[{k}]: {tau}), "
                             f"got {z_loss}")
        if not isinstance(entry.reverse, bool):
            raise ValueError(f"teacher[{k}] reverse must be True or False, got {entry.reverse!r}")
        beta = entry.jsd_beta
        if beta is not None:
            beta = check_jsd_beta(f"teacher[{k}] jsd_beta", beta)
            if entry.reverse:
                raise ValueError(f"teacher[{k}] reverse must be False with jsd_beta (the divergence is the "
                                 f"generalized JSD), got reverse=True")
        checked.append(Teacher(entry.hidden.detach(), entry.weight.detach(),
                               None if entry.bias is None else entry.bias.detach().contiguous(), offset, float(tau),
                               entry.reverse, beta))
    if any(t is not None for t in checked) and float(label_smoothing) != 0.0:
        raise ValueError(f"label_smoothing must be 0 with a teacher (it smooths hard labels), got {label_smoothing}")
    return checked
