"""Chunk planning and the mixed-dtype GEMM of the fused linear cross-entropy.

Chunk rows C of a [N, V] logit matrix in ``dtype`` (element size e):

    C_budget = tile(budget_bytes // (V * e))                   (DEFAULT_CHUNK_BYTES, FROZEN_CHUNK_BYTES)
    C_free   = max(MIN_CHUNK_ROWS, tile((free - reserved) // (2 V e)))   on CUDA, outside graph capture
    C        = N if N <= min(C_budget, C_free), else equal chunks: ceil(N / ceil(N / C)) rounded up to 128

where tile(r) rounds r down to a multiple of 128 when r >= 128 (GEMM tiles). The GEMM

    out (+)= a @ b          (out may be fp32 while a, b are bf16/fp16)

uses torch's ``out_dtype`` overloads (cuBLAS accumulates in fp32 and writes fp32, no temporary)
where they work, found by one probe per (op, device type, input dtype, output dtype) and cached;
elsewhere the product runs in row slabs widened into ``out``.
"""

from __future__ import annotations

import torch

# Logit chunk budget: 4096 rows of a 128k vocabulary in bf16 when a weight gradient accumulates over
# chunks (each dW GEMM reads and writes the fp32 accumulator, so fewer, bigger chunks are faster);
# 2048 rows when every projection is frozen (the GEMMs are already big). chunk_size overrides both.
DEFAULT_CHUNK_BYTES = 2**30
FROZEN_CHUNK_BYTES = 2**29
MIN_CHUNK_ROWS = 128  # floor when free memory is short (a thinner GEMM would waste the tensor cores)
_SLAB_BYTES = 64 * 2**20  # temporary of the fallback mixed-dtype GEMM
# Rows of ``out`` per GEMM call for the chunk loop's three products (None: one call), a tuning knob.
# cuBLAS picks its kernel per shape; on an H100 at H = 4096, V = 128256 a [4096, V] logits GEMM ran
# 6-7% faster alone as two [2048, V] calls, but the whole Medusa loss did not get faster that way
# (results/gemm_split_sweep_h100.md, benchmarks/NOTES.md runs 18-19), so every product is one call.
GEMM_ROWS: dict[str, int | None] = {"logits": None, "dh": None, "dw": None}
# The out_dtype overloads exist (torch >= 2.8); whether a backend runs them is probed per key.
_HAS_MM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads() and "dtype_out" in torch.ops.aten.mm.overloads()
_OUT_DTYPE_OK: dict[tuple[str, str, torch.dtype, torch.dtype], bool] = {}


def _is_unsupported(err: Exception) -> bool:
    """True for the errors meaning 'no out_dtype GEMM for these dtypes/backend' (fall back), False
    for real failures (out of memory, asynchronous CUDA errors, ...), which must propagate."""
    if isinstance(err, torch.OutOfMemoryError) or type(err).__name__ == "AcceleratorError":
        return False
    if isinstance(err, (NotImplementedError, TypeError)):  # no backend kernel / no such keyword
        return True
    text = str(err).lower()  # (cuBLAS says CUBLAS_STATUS_NOT_SUPPORTED)
    return isinstance(err, RuntimeError) and ("out_dtype" in text or "dtype_out" in text or "support" in text)


def _mm_out_dtype(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> bool:
    """out (+)= a @ b through the out_dtype overload; False (nothing written) where unsupported."""
    op = "addmm" if accumulate else "mm"
    key = (op, out.device.type, a.dtype, out.dtype)
    if not _HAS_MM_OUT_DTYPE or _OUT_DTYPE_OK.get(key) is False:
        return False
    try:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    except (RuntimeError, TypeError, NotImplementedError) as err:
        # Only the first call per key may fall back: once the overload has worked, any later error
        # is a real one. An unsupported combination is remembered, so it is never tried again.
        if key in _OUT_DTYPE_OK or not _is_unsupported(err):
            raise
        _OUT_DTYPE_OK[key] = False
        return False
    _OUT_DTYPE_OK[key] = True
    return True


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool,
            rows_per_call: int | None = None) -> None:
    """out (+)= a @ b for a [M, K], b [K, N], out [M, N], where ``out`` may be wider (fp32) than
    a and b (bf16/fp16); in calls of ``rows_per_call`` rows of ``out`` when given."""
    if rows_per_call is not None and out.shape[0] > rows_per_call:
        for s in range(0, out.shape[0], rows_per_call):
            mm_into(out[s : s + rows_per_call], a[s : s + rows_per_call], b, accumulate)
        return
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if _mm_out_dtype(out, a, b, accumulate):
        return
    # No out_dtype GEMM here: the product in slabs of rows, widened into ``out`` (small temporary).
    slab = max(1, _SLAB_BYTES // max(1, b.shape[1] * a.element_size()))
    for s in range(0, out.shape[0], slab):
        part = a[s : s + slab] @ b
        out[s : s + slab].add_(part) if accumulate else out[s : s + slab].copy_(part)


def _tile_rows(rows: int) -> int:
    # A multiple of 128 rows when that large (GEMM tiles), at least one row.
    rows = max(1, rows)
    return rows - rows % 128 if rows >= 128 else rows


def default_chunk_rows(vocab_size: int, dtype: torch.dtype, weight_grad: bool = True,
                       budget_bytes: int | None = None) -> int:
    """Rows per logit chunk within ``budget_bytes`` (default: DEFAULT_CHUNK_BYTES, or
    FROZEN_CHUNK_BYTES without a weight gradient), a multiple of 128 when that large."""
    budget = budget_bytes or (DEFAULT_CHUNK_BYTES if weight_grad else FROZEN_CHUNK_BYTES)
    return _tile_rows(budget // (vocab_size * torch.empty((), dtype=dtype).element_size()))


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes the next allocations can still get on a CUDA device (None elsewhere or while capturing).

    The driver's free memory plus what the caching allocator holds unused; host-side queries that
    never wait for the stream, skipped during CUDA-graph capture (the plan must then be static).
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except RuntimeError:  # a runtime that cannot tell: keep the static budget
        return None
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def plan_chunk_rows(n_rows: int, vocab_size: int, dtype: torch.dtype, weight_grad: bool,
                    device: torch.device, reserved_bytes: int = 0, budget_bytes: int | None = None) -> int:
    """Default rows per chunk for ``n_rows`` rows: the byte budget (``default_chunk_rows``), shrunk
    to half of the device's free memory beyond ``reserved_bytes`` (allocations still to come),
    balanced over the chunks. Pass the result as ``chunk_size`` to use another budget."""
    rows = default_chunk_rows(vocab_size, dtype, weight_grad, budget_bytes)
    free = free_device_bytes(device)
    if free is not None:
        row_bytes = vocab_size * torch.empty((), dtype=dtype).element_size()
        rows = min(rows, max(MIN_CHUNK_ROWS, _tile_rows((free - reserved_bytes) // (2 * row_bytes))))
    if n_rows <= rows:
        return n_rows
    # Equal chunks: ceil(n / count) rounded up to the tile (never above ``rows``, itself tiled).
    count = -(-n_rows // rows)
    per = -(-n_rows // count)
    return min(rows, -(-per // 128) * 128) if rows >= 128 else per
