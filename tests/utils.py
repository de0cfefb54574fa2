"""Shared test helpers: the device and dtypes under test, tolerances (stated once), poisoning."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# fp32 everywhere; fp16/bf16 only on the GPU (the interpreter has no bf16 arithmetic).
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32]

# Real models' vocabulary sizes. Each is its own set of Triton specializations (V, and V over a tile,
# divisible by 16 or not); Triton 3.6 once failed to compile a kernel at V = 32768 only.
VOCABS = {"llama2": 32000, "mistral": 32768, "gpt2": 50257, "llama3": 128256, "nemo": 131072, "qwen2": 151936}

# Real models' layer shapes (hidden, intermediate, query heads, key/value heads, head dim): the patched
# kernels' specializations at the sizes users run (Llama 3.2 1B / 3 8B / 3 70B, Qwen2 0.5B / 7B, Qwen3 4B).
MODEL_SHAPES = {"llama3.2-1b": (2048, 8192, 32, 8, 64), "llama3-8b": (4096, 14336, 32, 8, 128),
                "llama3-70b": (8192, 28672, 64, 8, 128), "qwen2-0.5b": (896, 4864, 14, 2, 64),
                "qwen2-7b": (3584, 18944, 28, 4, 128), "qwen3-4b": (2560, 9728, 32, 8, 128)}

# Tolerances per dtype, in one place: (atol, rtol) for elementwise checks of outputs and gradients
# against a float64 reference evaluated on the same (rounded) inputs.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

# Relative-norm tolerances ||out - ref|| / ||ref|| for results of large reductions (matmul-based
# ops, losses): fp32 inputs may run through TF32 tensor cores on the GPU.
REL_NORM_TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-3 if HAS_CUDA else 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}

POISON = float("nan")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN so any element a kernel forgets to write shows up in the comparison."""
    return t.fill_(POISON)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """Elementwise comparison at ``dtype``'s tolerance; NaN anywhere fails."""
    atol, rtol = TOLERANCES[dtype]
    assert not torch.isnan(actual).any(), f"{msg}: NaN in result"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=msg or None)


def rel_norm_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0/0 counts as 0)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    assert not torch.isnan(actual).any(), f"{msg}: NaN in result"
    err = rel_norm_error(actual, expected)
    assert err <= REL_NORM_TOLERANCES[dtype], f"{msg}: relative error {err:.3e} > {REL_NORM_TOLERANCES[dtype]}"


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Every floating-point torch.empty / empty_like inside the block comes back filled with NaN.

    The kernels allocate their outputs with these, so an element a kernel forgets to write stays
    NaN and fails the comparison (the other kernel test files import this helper).
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _poison(t: torch.Tensor) -> torch.Tensor:
        return poison_(t) if t.is_floating_point() else t

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    with mock.patch.object(torch, "empty", empty), mock.patch.object(torch, "empty_like", empty_like):
        yield
