"""scale_: in-place x *= f with f a one-element device tensor (backward's grad_output scale)."""

from __future__ import annotations

import importlib

import pytest
import torch

from medusa_liger.kernels.scale import scale_
from medusa_liger.kernels.utils import force_backend
from tests.utils import DEVICE, DTYPES

# fp16 runs in the interpreter too; bf16 only on the GPU (DTYPES).
SCALE_DTYPES = sorted(set(DTYPES) | {torch.float16}, key=str)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", SCALE_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (123,), (7, 1000), (4097,), (3, 4096)])
@pytest.mark.parametrize("factor", [1.5, 1.0 / 3.0, 0.0, 1.0])
def test_scale_matches_the_fp32_product(backend, dtype, shape, factor):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    f = torch.tensor(factor, device=DEVICE, dtype=torch.float32)
    expected = (x.float() * factor).to(dtype)  # the product in fp32, one rounding to dtype
    with force_backend(backend):
        out = scale_(x, f)
    assert out is x
    assert torch.equal(x, expected)


def test_scale_non_contiguous_and_float64_use_the_pytorch_product():
    x = torch.randn(6, 8, device=DEVICE).t()  # not contiguous
    want = x * 2.5
    scale_(x, torch.full((1,), 2.5, device=DEVICE))
    assert torch.equal(x, want)
    y = torch.randn(5, device=DEVICE, dtype=torch.float64)
    want = y * 0.1
    scale_(y, torch.tensor(0.1, device=DEVICE, dtype=torch.float64))
    assert torch.equal(y, want)


def test_scale_rejects_a_factor_that_is_not_one_element_on_the_device():
    x = torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="factor"):
        scale_(x, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="factor must be a one-element tensor on .*, got float"):
        scale_(x, 2.0)
    with pytest.raises(ValueError, match="x must be float32"):
        scale_(torch.ones(4, dtype=torch.int64, device=DEVICE), torch.ones((), device=DEVICE))
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="factor"):
            scale_(x, torch.ones(()))


def test_scale_strides_over_more_blocks_than_programs():
    # 2 programs in the interpreter (8 per SM on a GPU): each one loops over many blocks.
    x = torch.randn(70_001, device=DEVICE)
    want = (x * 0.75).clone()
    scale_(x, torch.tensor(0.75, device=DEVICE))
    assert torch.equal(x, want)


def test_scale_by_one_leaves_nan_inf_and_signed_zero_as_they_are():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 3.0], device=DEVICE)
    before = x.clone()
    scale_(x, torch.ones(1, device=DEVICE))
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x[1:], before[1:])
    assert torch.signbit(x[3])


class _KernelSpy:
    """Stands in for the Triton kernel object: counts launches and runs the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def kernel_spy(monkeypatch):
    module = importlib.import_module("medusa_liger.kernels.scale")
    spy = _KernelSpy(module._scale_kernel)
    monkeypatch.setattr(module, "_scale_kernel", spy)
    return spy


def test_the_triton_backend_runs_the_kernel_and_nested_backends_restore(kernel_spy):
    x = torch.randn(123, device=DEVICE)
    want = x * 0.5
    with force_backend("triton"):
        scale_(x, torch.tensor(0.5, device=DEVICE))
    assert kernel_spy.launches == 1 and torch.equal(x, want)
    with force_backend("torch"):
        with force_backend("triton"):
            pass
        scale_(x, torch.tensor(0.5, device=DEVICE))  # the outer "torch" again
    assert kernel_spy.launches == 1


def test_scale_touches_only_its_own_elements():
    """A contiguous slice of a larger buffer (the kernel's last block is partial) and a strided view
    (never handed to the flat kernel): the elements outside x keep their values."""
    buf = torch.randn(130, device=DEVICE)
    before = buf.clone()
    with force_backend("triton"):
        scale_(buf[:123], torch.tensor(3.0, device=DEVICE))
    assert torch.equal(buf[:123], before[:123] * 3.0) and torch.equal(buf[123:], before[123:])
    grid = torch.randn(5, 12, device=DEVICE)
    before = grid.clone()
    with force_backend("triton"):
        scale_(grid[:, ::2], torch.tensor(3.0, device=DEVICE))
    assert torch.equal(grid[:, ::2], before[:, ::2] * 3.0) and torch.equal(grid[:, 1::2], before[:, 1::2])


def test_scale_float64_is_exact_and_empty_is_a_no_op_on_either_backend():
    for backend in ("triton", "torch"):
        y = torch.randn(77, device=DEVICE, dtype=torch.float64)
        want = y * (1.0 / 3.0)
        with force_backend(backend):
            assert scale_(y, torch.tensor(1.0 / 3.0, device=DEVICE, dtype=torch.float64)) is y
            empty = torch.empty(0, 4, device=DEVICE)
            assert scale_(empty, torch.tensor(2.0, device=DEVICE)) is empty
        assert torch.equal(y, want), backend
