"""scale_: in-place x *= f with f a one-element device tensor (backward's grad_output scale)."""

from __future__ import annotations

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
