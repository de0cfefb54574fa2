"""Rotary position embedding (HF rotate-half convention) for q and k in one Triton launch.

Each head vector ``x`` of width ``D`` is split into halves ``x1 = x[:D/2]``, ``x2 = x[D/2:]``, and
with ``c1, c2`` / ``s1, s2`` the halves of cos / sin at the token's position::

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2                    # = x * cos + rotate_half(x) * sin   (HF)

The map is linear in ``x``, so the backward applies its transpose::

    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1                 # the inverse rotation when c1 == c2, s1 == s2

i.e. the forward kernel with the sine halves swapped and negated. Nothing but cos and sin is saved.

One program handles one (batch, position): it loads that position's cos/sin once and rotates every
q head and every k head there (GQA: ``n_q != n_kv``). q/k are addressed through their strides, so
HF's transposed ``[B, T, n, D]`` storage is read in place (only the last dim must be contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medusa_liger.kernels.utils import check_float, check_same_device, next_power_of_2, use_triton


@triton.jit
def _rotate_heads(
    x_ptr, x_stride_h, y_ptr, y_stride_h, n_heads, c1, c2, s1, s2, half,
    HEADS: tl.constexpr, HALF: tl.constexpr,
):
    # All heads of one (batch, position) as a [HEADS, HALF] tile per half; one load and store each.
    heads = tl.arange(0, HEADS)
    cols = tl.arange(0, HALF)
    mask = (heads < n_heads)[:, None] & (cols < half)[None, :]
    x_off = heads[:, None] * x_stride_h + cols[None, :]
    y_off = heads[:, None] * y_stride_h + cols[None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + half, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(y_ptr + y_off, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + y_off + half, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, q_sb, q_sh, q_st, k_ptr, k_sb, k_sh, k_st,
    qo_ptr, qo_sb, qo_sh, qo_st, ko_ptr, ko_sb, ko_sh, ko_st,
    cos_ptr, sin_ptr, cs_sb, cs_st,
    seq_len, n_q, n_kv, half,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr, BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    t = (pid % seq_len).to(tl.int64)
    cols = tl.arange(0, HALF)
    col_ok = cols < half
    # cos/sin of this position, loaded once for every q and k head (batch stride 0 = broadcast).
    cs = cos_ptr + b * cs_sb + t * cs_st
    ss = sin_ptr + b * cs_sb + t * cs_st
    c1 = tl.load(cs + cols, mask=col_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cs + half + cols, mask=col_ok, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of the rotation: swap the sine halves and negate them.
        s1 = -tl.load(ss + half + cols, mask=col_ok, other=0.0).to(tl.float32)
        s2 = -tl.load(ss + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        s1 = tl.load(ss + cols, mask=col_ok, other=0.0).to(tl.float32)
        s2 = tl.load(ss + half + cols, mask=col_ok, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + b * q_sb + t * q_st, q_sh, qo_ptr + b * qo_sb + t * qo_st, qo_sh,
                  n_q, c1, c2, s1, s2, half, HEADS=Q_HEADS, HALF=HALF)
    _rotate_heads(k_ptr + b * k_sb + t * k_st, k_sh, ko_ptr + b * ko_sb + t * ko_st, ko_sh,
                  n_kv, c1, c2, s1, s2, half, HEADS=K_HEADS, HALF=HALF)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _cos_sin_strides(cos: torch.Tensor) -> tuple[int, int]:
    """(batch stride, position stride) of a [B|1, T, D] table; batch 1 broadcasts with stride 0."""
    return (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)


def rope_launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
    q_dtype: torch.dtype | None = None, k_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (or, with ``backward``, un-rotate) q [B, n_q, T, D] and k [B, n_kv, T, D] out of place.

    cos/sin are [B|1, T, D] with unit last stride. Outputs keep the inputs' memory layout.
    """
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    batch, n_q, seq_len, head_dim = q.shape
    n_kv = k.shape[1]
    # empty_like keeps the strides of a dense tensor, so HF's [B, T, n, D] storage stays that way.
    q_out = torch.empty_like(q, dtype=q_dtype or q.dtype)
    k_out = torch.empty_like(k, dtype=k_dtype or k.dtype)
    half = head_dim // 2
    half_block = next_power_of_2(half)
    tile = (next_power_of_2(n_q) + next_power_of_2(n_kv)) * half_block
    num_warps = 8 if tile >= 4096 else 4
    cs_sb, cs_st = _cos_sin_strides(cos)
    if batch * seq_len > 0:
        _rope_kernel[(batch * seq_len,)](
            q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
            q_out, q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out, k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos, sin, cs_sb, cs_st, seq_len, n_q, n_kv, half,
            Q_HEADS=next_power_of_2(n_q), K_HEADS=next_power_of_2(n_kv), HALF=half_block,
            BACKWARD=backward, num_warps=num_warps,
        )
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper: saves cos/sin only; backward is the transposed (inverse) rotation."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # HF's output dtype: q * cos promotes (cos usually already has q's dtype).
        q_out, k_out = rope_launch(
            q, k, cos, sin, backward=False,
            q_dtype=torch.promote_types(q.dtype, cos.dtype), k_dtype=torch.promote_types(k.dtype, cos.dtype),
        )
        ctx.save_for_backward(cos, sin)
        ctx.in_dtypes = (q.dtype, k.dtype)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        # Autograd materializes a missing output gradient as zeros, so both are tensors here.
        cos, sin = ctx.saved_tensors
        q_dtype, k_dtype = ctx.in_dtypes
        dq, dk = rope_launch(dq_out, dk_out, cos, sin, backward=True, q_dtype=q_dtype, k_dtype=k_dtype)
        return dq, dk, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_torch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch RoPE on q [B, n_q, T, D], k [B, n_kv, T, D] with cos/sin [B|1, T, D] (HF math)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _normalize_cos_sin(name: str, t: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Bring cos/sin to [B|1, T, D]: a [T, D] table (or [max_pos, D] with position_ids) is accepted."""
    check_float(name, t)
    if t.dim() == 2 and position_ids is not None:
        t = t[position_ids]  # old HF signature: gather the table rows at the positions
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape [B, T, D] or [T, D], got {list(t.shape)}")
    return _last_dim_contiguous(t)


def _check_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, heads, T, D], got {list(t.shape)}")
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    batch, _, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim:
        raise ValueError(f"k must have shape [{batch}, n_kv, {seq_len}, {head_dim}] to match q, got {list(k.shape)}")
    if head_dim % 2:
        raise ValueError(f"q's head dim must be even for rotate-half RoPE, got {head_dim}")
    if cos.shape != sin.shape:
        raise ValueError(f"sin must have cos's shape {list(cos.shape)}, got {list(sin.shape)}")
    if cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len or cos.shape[2] != head_dim:
        raise ValueError(f"cos must have shape [{batch} or 1, {seq_len}, {head_dim}], got {list(cos.shape)}")


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-compatible RoPE: returns ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``.

    Args:
        q: ``[B, n_q, T, D]`` (or ``[B, T, n_q, D]`` with ``unsqueeze_dim=2``), any strides.
        k: ``[B, n_kv, T, D]`` likewise; ``n_kv`` may differ from ``n_q`` (GQA).
        cos, sin: ``[B, T, D]`` as HF's rotary embedding returns them, or ``[1, T, D]`` / ``[T, D]``.
        position_ids: only used with a 2-D cos/sin table (old HF signature): rows are gathered at
            ``position_ids [B, T]``; ignored for 3-D cos/sin, as in HF. An int here is taken as
            ``unsqueeze_dim`` (HF 5 passes that as the fifth positional argument).
        unsqueeze_dim: 1 for the head axis at dim 1, 2 for ``[B, T, heads, D]`` inputs.

    Returns q_embed, k_embed shaped (and, for dense inputs, strided) like q and k. cos and sin
    receive no gradient (HF's rotary embedding never trains them).
    """
    if isinstance(position_ids, int):
        # HF 5's signature has no position_ids: a fifth positional int is its unsqueeze_dim.
        unsqueeze_dim, position_ids = position_ids, None
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 ([B, n, T, D]) or 2 ([B, T, n, D]), got {unsqueeze_dim}")
    cos = _normalize_cos_sin("cos", cos, position_ids)
    sin = _normalize_cos_sin("sin", sin, position_ids)
    # [B, T, n, D] inputs are viewed as [B, n, T, D] (strides only), then viewed back.
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    _check_qk(q, k, cos, sin)
    if use_triton(q):
        q_out, k_out = RoPEFunction.apply(q, k, cos, sin)
    else:
        q_out, k_out = rope_torch(q, k, cos, sin)
    if unsqueeze_dim == 2:
        q_out, k_out = q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


__all__ = ["RoPEFunction", "apply_rotary_pos_emb", "rope_torch"]
