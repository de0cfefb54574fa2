"""RMSNorm with Hugging Face Llama semantics, fused forward and backward in Triton.

For a row ``x`` of ``H`` elements (any leading shape is flattened to rows)::

    r  = 1 / sqrt(mean(x**2) + eps)            # in fp32
    n  = cast_to_input_dtype(x * r)            # HF: ``hidden_states.to(input_dtype)``
    y  = (offset + w) * n                      # product in fp32, stored in promote(x, w) dtype

``offset = 0`` is exactly ``LlamaRMSNorm`` (same cast order); ``offset = 1`` gives the Gemma-style
``(1 + w)`` scale (applied with the Llama cast order, i.e. ``n`` is rounded before the multiply).

Backward, with ``g = dy * (offset + w)`` in fp32::

    dx = r * g - r**3 * x * mean(g * x)        # = r * (g - n * mean(g * n))
    dw = sum over rows of dy * n

The forward saves ``x`` and the per-row ``r`` (one fp32 per row) and nothing else. ``dw`` is reduced
without a ``[rows, H]`` fp32 temporary: the backward grid is persistent (a few programs per SM),
each program walks a strided set of rows, accumulates its share of ``dw`` in registers and writes one
fp32 partial row into a ``[programs, H]`` buffer, which one small ``sum(0)`` finishes.
"""

from __future__ import annotations

import functools
import math

import torch

from medusa_liger.kernels.utils import (
    check_float,
    check_same_device,
    first_order_only,
    check_shape,
    num_warps_for,
    row_block_size,
    use_triton,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the PyTorch path
    triton = None

# Rows per program in the forward pass: enough elements per program to keep the loads wide when
# the hidden size is small, one row per program once a row alone fills a block.
_MIN_ELEMENTS_PER_PROGRAM = 2048
# Persistent backward: as many programs as fit on the GPU at once (one full wave, no tail). Until a
# kernel variant has run once we assume this many per SM; then its register count decides.
_BWD_DEFAULT_PROGRAMS_PER_SM = 2
_bwd_programs_per_sm: dict[tuple, int] = {}


if triton is not None:  # (without triton, e.g. macOS/Windows CPU wheels: the PyTorch path)

    @triton.jit
    def _rms_norm_fwd_kernel(
        x_ptr, x_row_stride, w_ptr, y_ptr, y_row_stride, rstd_ptr,
        n_rows, n_cols, eps, offset,
        BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # A tile of BLOCK_ROWS whole rows: the row reduction stays in registers.
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)

        x_raw = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        x = x_raw.to(tl.float32)
        # Variance in fp32 over the true width (padding lanes loaded as zero).
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        # HF rounds the normalized row to the input dtype before the weight multiply.
        n = (x * rstd[:, None]).to(x_raw.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        y = n * w[None, :]
        tl.store(y_ptr + rows64[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        # One fp32 per row, so the backward never recomputes the reduction.
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _rms_norm_bwd_kernel(
        dy_ptr, dy_row_stride, x_ptr, x_row_stride, w_ptr, rstd_ptr, dx_ptr, dx_row_stride, dw_partial_ptr,
        n_rows, n_cols, offset,
        BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # Persistent program: row blocks pid, pid + P, pid + 2P, ... ; dw accumulates in registers.
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        dw_acc = tl.zeros((BLOCK_ROWS, BLOCK), dtype=tl.float32)
        n_row_blocks = tl.cdiv(n_rows, BLOCK_ROWS)
        for block in range(pid, n_row_blocks, n_programs):
            rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            rows64 = rows.to(tl.int64)
            x_raw = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
            x = x_raw.to(tl.float32)
            dy = tl.load(dy_ptr + rows64[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            n = x * rstd[:, None]
            # dw sees the normalized row exactly as the forward used it (rounded to the input dtype).
            dw_acc += dy * n.to(x_raw.dtype).to(tl.float32)
            g = dy * w[None, :]
            # dx = r * (g - n * mean(g * n)); padding lanes are zero in g and n.
            mean_gn = tl.sum(g * n, axis=1) / n_cols
            dx = rstd[:, None] * (g - n * mean_gn[:, None])
            tl.store(dx_ptr + rows64[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask)
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _resident_programs_per_sm(compiled, num_warps: int, device_index: int) -> int:
    """Programs of a compiled kernel that one SM holds at once (limited by registers and threads)."""
    props = torch.cuda.get_device_properties(device_index)
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    regs_per_thread = -(-max(int(compiled.n_regs), 1) // 8) * 8  # allocation granularity
    by_regs = regs_per_sm // (regs_per_thread * 32 * num_warps)
    return max(1, min(by_regs, threads_per_sm // (32 * num_warps)))


def _launch_params(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK, BLOCK_ROWS, num_warps) for rows of ``n_cols`` elements."""
    block = row_block_size(n_cols)
    block_rows = max(1, _MIN_ELEMENTS_PER_PROGRAM // block)
    return block, block_rows, num_warps_for(block * block_rows)


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """View ``t`` as [rows, n_cols] with unit column stride (copies only if it must)."""
    rows = t.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. x [..., H], weight [H] -> (y [..., H], rstd [rows] fp32)."""
    weight = weight.contiguous()  # the kernel reads it at unit stride
    n_cols = x.shape[-1]
    x2 = _as_rows(x, n_cols)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, block_rows, num_warps = _launch_params(n_cols)
    if n_rows > 0:
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            x2, x2.stride(0), weight, y, y.stride(0), rstd, n_rows, n_cols, float(eps), float(offset),
            BLOCK_ROWS=block_rows, BLOCK=block, num_warps=num_warps,
        )
    return y.view(x.shape), rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward. dy, x [..., H] -> (dx [..., H] in x.dtype, dweight [H] in weight.dtype)."""
    weight = weight.contiguous()  # the kernel reads it at unit stride
    n_cols = x.shape[-1]
    x2, dy2 = _as_rows(x, n_cols), _as_rows(dy, n_cols)
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block, block_rows, num_warps = _launch_params(n_cols)
    n_row_blocks = triton.cdiv(n_rows, block_rows)
    device_index = x.device.index or 0
    key = (device_index, block, block_rows, num_warps, x.dtype, dy.dtype, weight.dtype)
    if x.is_cuda:
        max_programs = _sm_count(device_index) * _bwd_programs_per_sm.get(key, _BWD_DEFAULT_PROGRAMS_PER_SM)
    else:
        max_programs = 4  # interpreter: a few programs still exercise the partial-row reduction
    n_programs = max(1, min(n_row_blocks, max_programs))
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
    compiled = _rms_norm_bwd_kernel[(n_programs,)](
        dy2, dy2.stride(0), x2, x2.stride(0), weight, rstd, dx, dx.stride(0), dw_partial,
        n_rows, n_cols, float(offset),
        BLOCK_ROWS=block_rows, BLOCK=block, num_warps=num_warps,
    )
    if x.is_cuda and key not in _bwd_programs_per_sm:
        try:  # size later launches to exactly one wave of this compiled variant
            _bwd_programs_per_sm[key] = _resident_programs_per_sm(compiled, num_warps, device_index)
        except (AttributeError, TypeError, RuntimeError):
            _bwd_programs_per_sm[key] = _BWD_DEFAULT_PROGRAMS_PER_SM
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x and the per-row rstd; backward returns dx and dweight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        y, rstd = rms_norm_forward(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    @first_order_only("rms_norm")  # create_graph=True must raise, not give wrong 2nd-order grads
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd, ctx.offset)
        return dx, dw, None, None


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """Plain PyTorch RMSNorm, the same math and cast order as the kernel (HF ``LlamaRMSNorm``)."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    scale = weight + offset if offset != 0.0 else weight
    return scale * h.to(input_dtype)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the hidden size), got a scalar")
    check_shape("weight", weight, [x.shape[-1]])
    check_same_device(x=x, weight=weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of ``x [..., H]`` scaled by ``offset + weight [H]``; returns ``[..., H]``.

    The output dtype is ``promote(x.dtype, weight.dtype)`` as in HF. Runs the Triton kernels where
    ``utils.use_triton(x)`` says so, else the plain PyTorch version.
    """
    _check_inputs(x, weight)
    if not (isinstance(eps, (int, float)) and 0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    if use_triton(x) and x.shape[-1] > 0:  # (zero-width rows: nothing to launch, the torch path is exact)
        return RMSNormFunction.apply(x, weight, float(eps), float(offset))
    return rms_norm_torch(x, weight, eps, offset)


class RMSNorm(torch.nn.Module):
    """Drop-in for ``LlamaRMSNorm`` (same ``weight`` / ``variance_epsilon`` attributes and state_dict).

    ``offset`` adds a constant to the weight (Gemma-style ``1 + w``); the weight is initialised to
    ``1 - offset`` so a fresh module scales by exactly one.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 1.0 - offset))
        self.variance_epsilon = eps
        self.offset = offset

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, self.offset)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, offset={self.offset}"


__all__ = ["RMSNorm", "RMSNormFunction", "rms_norm", "rms_norm_torch"]
