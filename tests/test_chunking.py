"""The fused loss's chunk planner and its mixed-dtype GEMM (``medusa_liger.kernels.chunking``)."""

from __future__ import annotations

import pytest
import torch

from medusa_liger.kernels import chunking
from medusa_liger.kernels import fused_linear_cross_entropy as flce
from tests.utils import DEVICE


def test_chunk_plan_budget_free_memory_and_balance(monkeypatch):
    V, bf16, cpu = 128256, torch.bfloat16, torch.device("cpu")
    # Budget rows (4096 trainable, 2048 frozen at V = 128256 bf16), then equal tile-sized chunks.
    assert flce.default_chunk_rows(V, bf16) == 4096 and flce.default_chunk_rows(V, bf16, False) == 2048
    assert flce.default_chunk_rows(V, bf16, budget_bytes=2**27) == 512
    assert flce.plan_chunk_rows(16384, V, bf16, True, cpu) == 4096
    assert flce.plan_chunk_rows(5000, V, bf16, True, cpu) == 2560  # not 4096 + 904
    assert flce.plan_chunk_rows(5000, V, bf16, False, cpu) == 1792  # 3 chunks
    assert flce.plan_chunk_rows(300, V, bf16, True, cpu) == 300
    assert flce.plan_chunk_rows(1000, 37, torch.float64, True, cpu, budget_bytes=37 * 8 * 60) == 59  # 17 chunks
    # Short of memory: half of what is free beyond the reserved bytes, never below 128 rows.
    row = V * 2
    monkeypatch.setattr(chunking, "free_device_bytes", lambda device: 2 * 1000 * row + 2**30)
    assert flce.plan_chunk_rows(16384, V, bf16, True, cpu, reserved_bytes=2**30) == 896
    monkeypatch.setattr(chunking, "free_device_bytes", lambda device: 10)
    assert flce.plan_chunk_rows(16384, V, bf16, True, cpu) == flce.MIN_CHUNK_ROWS


def _mm_operands(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g).to(dtype)
    b = torch.randn(7, 3, generator=g).to(dtype)
    return a, b, torch.zeros(5, 3), (a.float() @ b.float())


@pytest.mark.parametrize("rows_per_call", [None, 1, 2, 5, 7])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32])
def test_mm_into_rows_per_call(out_dtype, accumulate, rows_per_call):
    """Products split into calls of fewer rows equal one call: every row written once, (+)= kept."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    start = torch.randn(5, 3, generator=g, dtype=torch.float64)
    out = start.to(out_dtype).clone() if accumulate else torch.full((5, 3), float("nan"), dtype=out_dtype)
    chunking.mm_into(out, a.to(out_dtype), b.to(out_dtype), accumulate, rows_per_call)
    want = (start + a @ b) if accumulate else a @ b
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


def test_mm_into_rows_per_call_widens_bf16():
    """The mixed-dtype path (bf16 operands, fp32 out) also runs in row calls."""
    a, b, out, want = _mm_operands()
    chunking.mm_into(out, a, b, False, 2)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    chunking.mm_into(out, a, b, True, 3)
    torch.testing.assert_close(out, 2 * want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_into_out_of_memory_propagates(monkeypatch, accumulate):
    """A real failure of the out_dtype GEMM (here OOM) is raised, never hidden by the slab path."""
    monkeypatch.setattr(chunking, "_HAS_MM_OUT_DTYPE", True)
    monkeypatch.setattr(chunking, "_OUT_DTYPE_OK", {})

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "addmm" if accumulate else "mm", oom)
    a, b, out, _ = _mm_operands()
    with pytest.raises(torch.OutOfMemoryError):
        chunking.mm_into(out, a, b, accumulate=accumulate)
    assert chunking._OUT_DTYPE_OK == {}  # nothing learned from a failure that is not 'unsupported'


@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_into_unsupported_falls_back_and_probes_once(monkeypatch, accumulate):
    """An 'unsupported' out_dtype GEMM falls back to the slab path; the probe runs once per key."""
    monkeypatch.setattr(chunking, "_HAS_MM_OUT_DTYPE", True)
    monkeypatch.setattr(chunking, "_OUT_DTYPE_OK", {})
    name = "addmm" if accumulate else "mm"
    original, calls = getattr(torch, name), []

    def unsupported(*args, **kwargs):
        if "out_dtype" in kwargs:
            calls.append(1)
            raise NotImplementedError("Could not run 'aten::mm.dtype_out' with arguments from the 'CPU' backend")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, name, unsupported)
    a, b, out, want = _mm_operands()
    for step in range(3):
        chunking.mm_into(out, a, b, accumulate=accumulate)
        # The slab path rounds each product to bf16 before widening it.
        torch.testing.assert_close(out, want * (step + 1 if accumulate else 1), rtol=2e-2, atol=2e-2)
    assert len(calls) == 1
    assert chunking._OUT_DTYPE_OK == {(name, "cpu", torch.bfloat16, torch.float32): False}


def test_mm_into_error_after_a_working_probe_propagates(monkeypatch):
    """Once the out_dtype GEMM has worked for a key, a later error of any kind is a real one."""
    monkeypatch.setattr(chunking, "_HAS_MM_OUT_DTYPE", True)
    monkeypatch.setattr(chunking, "_OUT_DTYPE_OK", {("mm", "cpu", torch.bfloat16, torch.float32): True})

    for message in ("CUDA error: an illegal memory access was encountered",
                    "CUDA error: operation not supported on global/shared address space"):  # reads as unsupported
        def fails(*args, message=message, **kwargs):
            raise RuntimeError(message)

        monkeypatch.setattr(torch, "mm", fails)
        a, b, out, _ = _mm_operands()
        with pytest.raises(RuntimeError, match=message):
            chunking.mm_into(out, a, b, accumulate=False)


def test_chunk_plan_tiny_budget_and_the_128_row_floor(monkeypatch):
    """A budget below one row still gives one row; at exactly 128 rows the equal chunks stay 128
    (one GEMM tile), not the balanced 100 of a smaller budget."""
    cpu = torch.device("cpu")
    assert flce.default_chunk_rows(1000, torch.float32, budget_bytes=100) == 1
    assert flce.plan_chunk_rows(123, 1000, torch.float32, True, cpu, budget_bytes=100) == 1
    assert flce.plan_chunk_rows(200, 37, torch.float64, True, cpu, budget_bytes=37 * 8 * 128) == 128
    assert flce.plan_chunk_rows(200, 37, torch.float64, True, cpu, budget_bytes=37 * 8 * 127) == 100
    monkeypatch.setattr(chunking, "free_device_bytes", lambda device: 10)  # short of memory: the 128 floor
    assert flce.plan_chunk_rows(200, 128256, torch.bfloat16, True, cpu) == 128


def test_free_device_bytes(monkeypatch):
    """Free CUDA memory: the driver's free bytes plus what the caching allocator holds unused; None
    off CUDA, while capturing a graph, or when the runtime cannot tell (never 0: that would floor
    every chunk at 128 rows)."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    assert chunking.free_device_bytes(cuda) == 1200
    assert chunking.free_device_bytes(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert chunking.free_device_bytes(cuda) is None

    def cannot_tell(device=None):
        raise RuntimeError("mem_get_info is not supported here")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", cannot_tell)
    assert chunking.free_device_bytes(cuda) is None


@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_into_slab_fallback_over_several_slabs(monkeypatch, accumulate):
    """Without an out_dtype GEMM, the widened product runs in slabs of rows: 2 + 2 + 1 rows here,
    each slab its own rows (the last one partial), every row written once."""
    monkeypatch.setattr(chunking, "_HAS_MM_OUT_DTYPE", False)
    monkeypatch.setattr(chunking, "_SLAB_BYTES", 3 * 2 * 2)  # 2 rows of 3 bf16 columns
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 7, generator=g).to(DEVICE, torch.bfloat16)
    b = torch.randn(7, 3, generator=g).to(DEVICE, torch.bfloat16)
    start = torch.randn(5, 3, generator=g).to(DEVICE)
    out = start.clone() if accumulate else torch.full((5, 3), float("nan"), device=DEVICE)

    class SlabRows(torch.overrides.TorchFunctionMode):  # the rows of each product mm_into runs
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("__matmul__", "matmul"):
                self.rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    with SlabRows() as spy:
        chunking.mm_into(out, a, b, accumulate)
    assert spy.rows == [2, 2, 1]
    want = a.double() @ b.double() + (start.double() if accumulate else 0)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


def test_mm_into_probe_that_worked_is_remembered(monkeypatch):
    """A first out_dtype GEMM that works is recorded, so a later 'unsupported'-looking error for the
    same key is raised instead of silently switching to the slab path."""
    monkeypatch.setattr(chunking, "_HAS_MM_OUT_DTYPE", True)
    monkeypatch.setattr(chunking, "_OUT_DTYPE_OK", {})
    original, fail = torch.mm, []

    def mm(a, b, *args, out_dtype=None, out=None, **kwargs):
        if out_dtype is None:
            return original(a, b, *args, out=out, **kwargs)
        if fail:
            raise RuntimeError("CUDA error: operation not supported on global/shared address space")
        return out.copy_(original(a.to(out_dtype), b.to(out_dtype)))

    monkeypatch.setattr(torch, "mm", mm)
    a, b, out, want = _mm_operands()
    a, b, out, want = a.to(DEVICE), b.to(DEVICE), out.to(DEVICE), want.to(DEVICE)
    chunking.mm_into(out, a, b, accumulate=False)
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)  # (TF32 on a GPU)
    assert chunking._OUT_DTYPE_OK == {("mm", DEVICE.type, torch.bfloat16, torch.float32): True}
    fail.append(1)
    with pytest.raises(RuntimeError, match="operation not supported"):
        chunking.mm_into(out, a, b, accumulate=False)


class AcceleratorError(RuntimeError):  # named as torch's (torch >= 2.8): an asynchronous CUDA error
    pass


@pytest.mark.parametrize(("err", "unsupported"), [
    (TypeError("mm() got an unexpected keyword argument 'out_dtype'"), True),  # a torch without the overload
    (NotImplementedError("Could not run 'aten::mm.dtype_out' with arguments from the 'CPU' backend"), True),
    (RuntimeError("addmm: out_dtype bf16 -> fp32 is not supported on this device"), True),
    (RuntimeError("a bf16 x bf16 -> fp32 GEMM is not supported on this backend"), True),
    (RuntimeError("Input dtypes must be the same, got: input Half, mat1: Float (dtype_out)"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx( handle, opa, opb, m, n, k, "
                  "&falpha, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb, &fbeta, c, CUDA_R_32F, ldc, ...)`"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (AcceleratorError("CUDA error: operation not supported on global/shared address space"), False),
    (torch.OutOfMemoryError("CUDA out of memory: out_dtype GEMM not supported"), False),
    (ValueError("out_dtype not supported"), False),
])
def test_which_out_dtype_errors_fall_back(err, unsupported):
    """Only 'no such overload or kernel' errors fall back to the slab path; OOM and asynchronous CUDA
    errors (even when their text says 'not supported') propagate."""
    assert chunking._is_unsupported(err) is unsupported
