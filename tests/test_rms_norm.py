"""RMSNorm kernel vs HF's own LlamaRMSNorm evaluated in float64; both backends; every gradient."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from medusa_liger.kernels.rms_norm import RMSNorm, rms_norm
from medusa_liger.kernels.utils import force_backend
from tests.utils import DEVICE, DTYPES, MODEL_SHAPES, assert_close, poisoned_allocations, rel_norm_error

BACKENDS = ["triton", "torch"]
# (40, 300): several row blocks per backward program, so the dweight partial rows are exercised.
SHAPES = [(1, 64), (3, 123), (2, 5, 96), (37, 8), (4, 1000), (40, 300)]


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, dy: torch.Tensor):
    """HF LlamaRMSNorm on float64 copies (scale offset + w): output, dx, dweight."""
    ref = LlamaRMSNorm(x.shape[-1], eps=eps).to(device=x.device, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(weight.double() + offset)
    xd = x.detach().double().requires_grad_()
    y = ref(xd)
    y.backward(dy.double())
    return y.detach(), xd.grad, ref.weight.grad


def _check(shape, dtype, backend, offset=0.0, eps=1e-6):
    x = torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_()
    weight = (1.0 + 0.5 * torch.randn(shape[-1], device=DEVICE) - offset).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    with force_backend(backend), poisoned_allocations():
        y = rms_norm(x, weight, eps=eps, offset=offset)
        y.backward(dy)
    y_ref, dx_ref, dw_ref = _reference(x, weight, eps, offset, dy)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(x.grad, dx_ref, dtype, "dx")
    # dweight sums over rows: scale the tolerance with the row count via a relative comparison.
    assert weight.grad.dtype == weight.dtype
    n_rows = x.numel() // shape[-1]
    assert_close(weight.grad / n_rows**0.5, dw_ref / n_rows**0.5, dtype, "dweight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_hf(shape, dtype, backend):
    _check(shape, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1.0, -0.25])
def test_rms_norm_offset(offset, backend):
    _check((3, 123), DTYPES[0], backend, offset=offset, eps=1e-5)


def test_rms_norm_non_contiguous_rows():
    """A row-strided input (a slice of a wider tensor) is read in place and gives the same result."""
    base = torch.randn(6, 200, device=DEVICE)
    x = base[:, :77]
    weight = torch.randn(77, device=DEVICE)
    with force_backend("triton"):
        y = rms_norm(x, weight)
    assert_close(y, rms_norm(x.contiguous(), weight), torch.float32, "strided")


def test_rms_norm_module_is_a_drop_in():
    """Same attributes, state_dict keys and output as LlamaRMSNorm (fp32 weight, fp16-free CPU path)."""
    ours, hf = RMSNorm(123, eps=1e-5).to(DEVICE), LlamaRMSNorm(123, eps=1e-5).to(DEVICE)
    assert list(ours.state_dict()) == list(hf.state_dict()) == ["weight"]
    assert ours.variance_epsilon == hf.variance_epsilon == 1e-5
    with torch.no_grad():
        hf.weight.normal_()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 3, 123, device=DEVICE)
    with force_backend("triton"):
        assert_close(ours(x), hf(x).double(), torch.float32, "module")
    gemma = RMSNorm(8, offset=1.0)
    assert torch.all(gemma.weight == 0.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rms_norm_mixed_dtype_promotes_like_hf(backend):
    """fp32 weight on fp16 input gives an fp32 output, as HF's ``weight * x.to(input_dtype)``."""
    x = torch.randn(3, 40, device=DEVICE).half()
    weight = torch.randn(40, device=DEVICE)
    with force_backend(backend):
        y = rms_norm(x, weight)
    hf = LlamaRMSNorm(40).to(DEVICE)
    with torch.no_grad():
        hf.weight.copy_(weight)
    expected = hf(x) if DEVICE.type == "cuda" else rms_norm(x.float(), weight)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected.float(), atol=2e-3, rtol=2e-3)


def test_rms_norm_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(torch.ones(2, 8, dtype=torch.int64), torch.ones(8))
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number"):
            rms_norm(x, torch.ones(8), eps=eps)
    with pytest.raises(ValueError, match="offset must be a finite number"):
        rms_norm(x, torch.ones(8), offset=float("nan"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight is on"):
            rms_norm(x.cuda(), torch.ones(8))


@pytest.mark.gpu
def test_rms_norm_gpu_bf16_mid_size():
    _check((4096, 4096), torch.bfloat16, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_rms_norm_gpu_bf16_model_sizes(model):
    hidden = MODEL_SHAPES[model][0]
    _check((2, 37, hidden), torch.bfloat16, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_layout", ["strided", "expanded"])
def test_rms_norm_weight_of_any_strides(weight_layout, backend):
    """A weight that is a strided column of a matrix, or one value expanded to [H] (stride 0), is
    read at its own strides (the kernels read a unit-stride copy); its gradient is a plain [H]."""
    x = torch.randn(5, 9, device=DEVICE).requires_grad_()
    if weight_layout == "strided":
        base = torch.randn(9, 2, device=DEVICE).requires_grad_()
        weight = base[:, 0]
    else:
        base = torch.randn(1, device=DEVICE).requires_grad_()
        weight = base.expand(9)
    dy = torch.randn(5, 9, device=DEVICE)
    with force_backend(backend), poisoned_allocations():
        y = rms_norm(x, weight)
        y.backward(dy)
    y_ref, dx_ref, dw_ref = _reference(x, weight.detach(), 1e-6, 0.0, dy)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(x.grad, dx_ref, torch.float32, "dx")
    dbase_ref = torch.stack([dw_ref, torch.zeros_like(dw_ref)], 1) if weight_layout == "strided" else dw_ref.sum(0, keepdim=True)
    assert_close(base.grad, dbase_ref, torch.float32, "dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_zero_width_rows(backend):
    x, weight = torch.randn(3, 0, device=DEVICE).requires_grad_(), torch.ones(0, device=DEVICE).requires_grad_()
    with force_backend(backend):
        y = rms_norm(x, weight)
        y.sum().backward()
    assert y.shape == (3, 0) and x.grad.shape == (3, 0) and weight.grad.shape == (0,)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # eps 0: 1 / sqrt(0) in the interpreter's padding rows
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_rms_norm_eps_inside_the_sqrt(eps, backend):
    """Small activations (mean(x^2) ~ 1e-6): eps must sit inside the sqrt, and eps = 0 is allowed."""
    x = (1e-3 * torch.randn(3, 123, device=DEVICE)).requires_grad_()
    weight = torch.randn(123, device=DEVICE).requires_grad_()
    dy = torch.randn(3, 123, device=DEVICE)
    with force_backend(backend), poisoned_allocations():
        y = rms_norm(x, weight, eps=eps)
        y.backward(dy)
    y_ref, dx_ref, dw_ref = _reference(x, weight, eps, 0.0, dy)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(x.grad / 1e3, dx_ref / 1e3, torch.float32, "dx")
    assert_close(weight.grad, dw_ref, torch.float32, "dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_fp16_input_rounds_like_hf(backend):
    """fp16 x, fp32 weight: HF rounds x * rstd to fp16 before the weight multiply (forward and dweight)."""
    x = torch.randn(40, 123, device=DEVICE).half().requires_grad_()
    weight = (1.0 + 0.5 * torch.randn(123, device=DEVICE)).requires_grad_()
    dy = torch.randn(40, 123, device=DEVICE)
    with force_backend(backend):
        y = rms_norm(x, weight)
        y.backward(dy)
    hf = LlamaRMSNorm(123).to(DEVICE)
    with torch.no_grad():
        hf.weight.copy_(weight)
    x_hf = x.detach().clone().requires_grad_()
    y_hf = hf(x_hf)
    y_hf.backward(dy)
    assert y.dtype == y_hf.dtype == torch.float32 and x.grad.dtype == torch.float16
    # Unrounded n differs from HF's in almost every element (by up to 2^-11 relative, ~2e-4 in norm);
    # rounded n agrees but for rare one-ulp fp16 flips where the kernel's 1 / sqrt and torch.rsqrt
    # differ in the last fp32 bit (under 0.1% of the elements).
    assert (y != y_hf).float().mean() < 0.02, (y != y_hf).float().mean()
    assert rel_norm_error(weight.grad, hf.weight.grad) < 1e-4, rel_norm_error(weight.grad, hf.weight.grad)
    assert_close(x.grad, x_hf.grad.double(), torch.float16, "dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_sliced", "transposed"])
def test_rms_norm_strided_inputs_forward_and_backward(layout, backend):
    """x and dy as row slices of wider tensors, or column-strided (transposed) views: both directions."""
    if layout == "row_sliced":
        x = torch.randn(6, 200, device=DEVICE)[:, 5:128].requires_grad_()
        dy = torch.randn(6, 300, device=DEVICE)[:, :123]
    else:
        x = torch.randn(123, 6, device=DEVICE).t().requires_grad_()
        dy = torch.randn(123, 6, device=DEVICE).t()
    weight = torch.randn(123, device=DEVICE).requires_grad_()
    with force_backend(backend), poisoned_allocations():
        y = rms_norm(x, weight)
        y.backward(dy)
    y_ref, dx_ref, dw_ref = _reference(x, weight, 1e-6, 0.0, dy)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(x.grad, dx_ref, torch.float32, "dx")
    assert_close(weight.grad, dw_ref, torch.float32, "dweight")


def test_rms_norm_more_bad_inputs():
    with pytest.raises(ValueError, match="at least one dimension"):
        rms_norm(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.int32))
    for offset in (float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="offset must be a finite number"):
            rms_norm(torch.randn(2, 8), torch.ones(8), offset=offset)
