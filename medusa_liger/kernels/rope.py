"""Rotary position embedding (HF rotate-half convention) for q and k in one Triton launch.

Each head vector ``x`` of width ``D`` is split into halves ``x1 = x[:D/2]``, ``x2 = x[D/2:]``, and
with ``c1, c2`` / ``s1, s2`` the halves of cos / sin at the token's position::

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2                    # = x * cos + rotate_half(x) * sin   (HF)

The map is linear in ``x``, so the backward applies its transpose::

    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1                 # the inverse rotation when c1 == c2, s1 == s2

i.e. the forward kernel with the sine halves swapped and negated (a constexpr flag, so no negated
copy of sin is ever made). Nothing but cos and sin is saved.

Work split: one program rotates a ``[HEADS, BLOCK_T, D]`` tile: ``HEADS`` heads of q (or of k)
at ``BLOCK_T`` consecutive positions of one batch row, with the tile's cos/sin loaded once and
shared by all its heads. q and k heads form one index space of head groups (a group never mixes
q and k), so GQA (``n_q != n_kv``) runs in a single launch. q/k are addressed through their
strides, so HF's transposed view of ``[B, T, n, D]`` storage and contiguous ``[B, n, T, D]`` are
both read in place; outputs keep the inputs' layout, and inputs / incoming gradients are never
written (out of place, unlike Liger's HF-layout path, which rotates q/k and dq/dk in place).

The tile shape and program order are launch parameters (``config=`` of :func:`rope_launch`),
swept by ``benchmarks/tune_rope.py``. On an H100 (bf16, Llama-3-8B sizes) the same tile won in
both layouts: 2 heads x 16 positions, programs walking positions first, cos/sin shared.
"""

from __future__ import annotations

import functools

import torch

from medusa_liger.kernels.utils import check_float, check_same_device, first_order_only, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the PyTorch path
    triton = None

# Default tile (benchmarks/tune_rope.py, H100 bf16 q[4, 32, 4096, 128]): DEFAULT_TILE elements per
# half (8 KiB of bf16 read and 8 KiB written per program), DEFAULT_HEADS heads x 16 positions, 4 warps,
# positions-first, cos/sin shared. It won in both layouts (HF layout 0.276 ms fwd+bwd vs 0.306 for
# 8 heads x 4 positions heads-first; contiguous 0.290 ms): one head's run of positions is
# contiguous in [B, n, T, D], and in HF's [B, T, n, D] two adjacent heads are a 512-byte run.
DEFAULT_TILE = 2048
DEFAULT_HEADS = 2
CONFIG_KEYS = ("heads", "block_t", "num_warps", "heads_fastest", "evict", "shared_cs")


if triton is not None:  # (without triton, e.g. macOS/Windows CPU wheels: the PyTorch path)

    @triton.jit
    def _load_streamed(ptr, mask, EVICT: tl.constexpr):
        # q/k are read exactly once: an evict-first hint keeps the reused cos/sin rows in L2 instead.
        if EVICT:
            value = tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            value = tl.load(ptr, mask=mask, other=0.0)
        return value.to(tl.float32)

    @triton.jit
    def _rotate_tile(
        x_ptr, x_sh, x_st, y_ptr, y_sh, y_st, heads_left, t_left, c1, c2, s1, s2,
        HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, HEADS: tl.constexpr, BLOCK_T: tl.constexpr,
        EVICT: tl.constexpr,
    ):
        # Tile coordinates relative to the (int64) tile origin, so the int32 offsets stay small.
        h = tl.arange(0, HEADS)[:, None, None]
        t = tl.arange(0, BLOCK_T)[None, :, None]
        col = tl.arange(0, HALF_BLOCK)[None, None, :]
        # Row mask only ([HEADS, BLOCK_T, 1]): constant along D, so loads stay 16-byte vectors.
        mask = (h < heads_left) & (t < t_left)
        if HALF_BLOCK != HALF:
            mask = mask & (col < HALF)
        x_off = h * x_sh + t * x_st + col
        x1 = _load_streamed(x_ptr + x_off, mask, EVICT)
        x2 = _load_streamed(x_ptr + x_off + HALF, mask, EVICT)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
        y_off = h * y_sh + t * y_st + col
        tl.store(y_ptr + y_off, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + y_off + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr, q_sb, q_sh, q_st, k_ptr, k_sb, k_sh, k_st,
        qo_ptr, qo_sb, qo_sh, qo_st, ko_ptr, ko_sb, ko_sh, ko_st,
        cos_ptr, sin_ptr, cs_sb, cs_st,
        seq_len, n_q, n_kv, n_q_groups, n_groups, n_t_blocks,
        HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, HEADS: tl.constexpr, BLOCK_T: tl.constexpr,
        HEADS_FASTEST: tl.constexpr, BACKWARD: tl.constexpr, EVICT: tl.constexpr, SHARED_CS: tl.constexpr,
    ):
        # Program -> (batch, position block, head group), in the order memory is laid out.
        pid = tl.program_id(0)
        if HEADS_FASTEST:
            group = pid % n_groups
            t_block = (pid // n_groups) % n_t_blocks
            b = pid // (n_groups * n_t_blocks)
        else:
            t_block = pid % n_t_blocks
            group = (pid // n_t_blocks) % n_groups
            b = pid // (n_t_blocks * n_groups)
        b = b.to(tl.int64)
        t0 = t_block.to(tl.int64) * BLOCK_T
        t_left = seq_len - t0

        # cos/sin of the tile's positions, loaded once for all its heads (batch stride 0 broadcasts a
        # [1, T, D] table), into the registers of the q/k elements they multiply. Two ways:
        # SHARED_CS loads one [BLOCK_T, D/2] tile and broadcasts it over the heads (Triton routes that
        # through shared memory: fewer registers, a few barriers); otherwise the pointers are built at
        # the full [HEADS, BLOCK_T, D/2] shape with head stride 0, and each copy is its own load
        # (L1 hits: more registers, no barriers). Identical when HEADS == 1.
        if SHARED_CS:
            t = tl.arange(0, BLOCK_T)[:, None]
            col = tl.arange(0, HALF_BLOCK)[None, :]
            cs_off = b * cs_sb + t0 * cs_st + t * cs_st + col
        else:
            t = tl.arange(0, BLOCK_T)[None, :, None]
            col = tl.arange(0, HALF_BLOCK)[None, None, :]
            cs_off = b * cs_sb + t0 * cs_st + t * cs_st + col + tl.zeros([HEADS, 1, 1], dtype=tl.int32)
        cs_mask = t < t_left
        if HALF_BLOCK != HALF:
            cs_mask = cs_mask & (col < HALF)
        c1 = tl.load(cos_ptr + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cs_off + HALF, mask=cs_mask, other=0.0).to(tl.float32)
        if BACKWARD:
            # Transpose of the rotation: swap the sine halves and negate them.
            s1 = -tl.load(sin_ptr + cs_off + HALF, mask=cs_mask, other=0.0).to(tl.float32)
            s2 = -tl.load(sin_ptr + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
        else:
            s1 = tl.load(sin_ptr + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + cs_off + HALF, mask=cs_mask, other=0.0).to(tl.float32)
        if SHARED_CS:
            c1, c2, s1, s2 = c1[None, :, :], c2[None, :, :], s1[None, :, :], s2[None, :, :]

        # The first n_q_groups groups are q's heads, the rest k's.
        if group < n_q_groups:
            h0 = group.to(tl.int64) * HEADS
            _rotate_tile(q_ptr + b * q_sb + h0 * q_sh + t0 * q_st, q_sh, q_st,
                         qo_ptr + b * qo_sb + h0 * qo_sh + t0 * qo_st, qo_sh, qo_st,
                         n_q - h0, t_left, c1, c2, s1, s2,
                         HALF=HALF, HALF_BLOCK=HALF_BLOCK, HEADS=HEADS, BLOCK_T=BLOCK_T, EVICT=EVICT)
        else:
            h0 = (group - n_q_groups).to(tl.int64) * HEADS
            _rotate_tile(k_ptr + b * k_sb + h0 * k_sh + t0 * k_st, k_sh, k_st,
                         ko_ptr + b * ko_sb + h0 * ko_sh + t0 * ko_st, ko_sh, ko_st,
                         n_kv - h0, t_left, c1, c2, s1, s2,
                         HALF=HALF, HALF_BLOCK=HALF_BLOCK, HEADS=HEADS, BLOCK_T=BLOCK_T, EVICT=EVICT)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _cos_sin_strides(cos: torch.Tensor) -> tuple[int, int]:
    """(batch stride, position stride) of a [B|1, T, D] table; batch 1 broadcasts with stride 0."""
    return (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)


@functools.lru_cache(maxsize=256)
def _default_config_for(n_q: int, n_kv: int, seq_len: int, head_dim: int) -> tuple:
    # Cached: the launch path runs twice per training step per layer, and host time before the
    # first kernel shows up in short-kernel timings (and in small-batch steps).
    half_block = next_power_of_2(head_dim // 2)
    heads = min(DEFAULT_HEADS, next_power_of_2(max(n_q, n_kv)))
    block_t = min(max(1, DEFAULT_TILE // (heads * half_block)), next_power_of_2(seq_len))
    return tuple({"heads": heads, "block_t": block_t, "num_warps": 4, "heads_fastest": False,
                  "evict": False, "shared_cs": True}.items())


def default_config(q: torch.Tensor, k: torch.Tensor) -> dict:
    """The launch config for q/k's shapes (keys: see :func:`rope_launch`).

    ``DEFAULT_HEADS`` heads x a run of positions (``DEFAULT_TILE`` elements per half when the sizes
    allow), programs positions-first, in either memory layout (the sweep's winner in both).
    """
    return dict(_default_config_for(q.shape[1], k.shape[1], q.shape[2], q.shape[3]))


def _resolve_config(config: dict | None, q: torch.Tensor, k: torch.Tensor) -> dict:
    """The default config for q/k, overridden by the keys given in ``config`` (validated)."""
    resolved = default_config(q, k)
    if not config:
        return resolved
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"config keys must be among {list(CONFIG_KEYS)}, got unknown {unknown}")
    resolved.update(config)
    for key in ("heads", "block_t", "num_warps"):
        value = resolved[key]
        if not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"config[{key!r}] must be a power of two >= 1, got {value!r}")
    return resolved


def rope_launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
    q_dtype: torch.dtype | None = None, k_dtype: torch.dtype | None = None, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (or, with ``backward``, un-rotate) q [B, n_q, T, D] and k [B, n_kv, T, D] out of place.

    cos/sin are [B|1, T, D] with unit last stride (copied when their strides differ). Outputs keep
    the inputs' memory layout.
    ``config`` overrides the tuned launch parameters (benchmarks/tune_rope.py sweeps them):
    ``heads`` and ``block_t`` (tile = heads x positions, powers of two), ``num_warps``,
    ``heads_fastest`` (program order), ``evict`` (evict-first hint on q/k loads) and ``shared_cs``
    (broadcast one cos/sin tile over the heads through shared memory, else per-head loads).
    """
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cfg = _resolve_config(config, q, k)
    batch, n_q, seq_len, head_dim = q.shape
    n_kv = k.shape[1]
    # empty_like keeps the strides of a dense tensor, so HF's [B, T, n, D] storage stays that way.
    q_out = torch.empty_like(q, dtype=q_dtype or q.dtype)
    k_out = torch.empty_like(k, dtype=k_dtype or k.dtype)
    heads, block_t = cfg["heads"], cfg["block_t"]
    n_q_groups = triton.cdiv(n_q, heads)
    n_groups = n_q_groups + triton.cdiv(n_kv, heads)
    n_t_blocks = triton.cdiv(seq_len, block_t)
    cs_sb, cs_st = _cos_sin_strides(cos)
    if _cos_sin_strides(sin) != (cs_sb, cs_st):  # the kernel reads both tables with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
        cs_sb, cs_st = _cos_sin_strides(cos)
    if batch * seq_len > 0:
        _rope_kernel[(batch * n_t_blocks * n_groups,)](
            q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
            q_out, q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out, k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos, sin, cs_sb, cs_st, seq_len, n_q, n_kv, n_q_groups, n_groups, n_t_blocks,
            HALF=head_dim // 2, HALF_BLOCK=next_power_of_2(head_dim // 2), HEADS=heads, BLOCK_T=block_t,
            HEADS_FASTEST=bool(cfg["heads_fastest"]), BACKWARD=backward, EVICT=bool(cfg["evict"]),
            SHARED_CS=bool(cfg["shared_cs"]) and heads > 1,
            num_warps=cfg["num_warps"],
        )
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper: saves cos/sin only; backward is the transposed (inverse) rotation."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                config: dict | None = None):
        # HF's output dtype: q * cos + rotate_half(q) * sin promotes (cos and sin usually have q's dtype).
        cs_dtype = torch.promote_types(cos.dtype, sin.dtype)
        q_out, k_out = rope_launch(
            q, k, cos, sin, backward=False,
            q_dtype=torch.promote_types(q.dtype, cs_dtype), k_dtype=torch.promote_types(k.dtype, cs_dtype),
            config=config,
        )
        ctx.save_for_backward(cos, sin)
        ctx.in_dtypes = (q.dtype, k.dtype)
        ctx.config = config
        return q_out, k_out

    @staticmethod
    @first_order_only("rope")  # create_graph=True must raise, not give wrong 2nd-order grads
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        # Autograd materializes a missing output gradient as zeros, so both are tensors here.
        cos, sin = ctx.saved_tensors
        q_dtype, k_dtype = ctx.in_dtypes
        dq, dk = rope_launch(dq_out, dk_out, cos, sin, backward=True, q_dtype=q_dtype, k_dtype=k_dtype,
                             config=ctx.config)
        return dq, dk, None, None, None


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


__all__ = ["RoPEFunction", "apply_rotary_pos_emb", "default_config", "rope_launch", "rope_torch"]
