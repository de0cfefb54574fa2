"""The fused loss's chunk planner and its mixed-dtype GEMM (``medusa_liger.kernels.chunking``)."""

from __future__ import annotations

import pytest
import torch

from medusa_liger.kernels import chunking
from medusa_liger.kernels import fused_linear_cross_entropy as flce


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
