"""In-place scale of a tensor by a factor that lives on the device: x <- x * f.

    x_i <- cast(float32(x_i) * float32(f))         f: a one-element tensor (never read on the host)

Backward of the fused losses multiplies every gradient computed in forward by grad_output. PyTorch's
``x.mul_(f)`` with a bf16 ``x`` and a 0-dim fp32 CUDA ``f`` takes its slow mixed-dtype broadcast path
(about a third of the copy bandwidth on an H100); this kernel reads f once per program and streams x
at the bandwidth of a copy, with the product in fp32 whatever x's dtype, and skips the pass when
f == 1 (a branch on the device). Reading f from device memory keeps the op free of host-device
synchronization.
"""

from __future__ import annotations

import torch

from medusa_liger.kernels.utils import check_float, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the PyTorch path
    triton = None

if triton is not None:

    @triton.jit
    def _scale_kernel(x_ptr, factor_ptr, n_elements, BLOCK: tl.constexpr):
        factor = tl.load(factor_ptr).to(tl.float32)
        # x * 1 == x exactly (NaN, inf and -0 included): with factor 1, the usual grad_output of
        # loss.backward(), every program returns without touching x. A branch on the device, so
        # the host never reads the factor.
        if factor != 1.0:
            # Programs stride over blocks of BLOCK elements (int64 offsets: gradients can exceed
            # 2**31 elements), so the no-op case is a small grid.
            for block in range(tl.program_id(0), tl.cdiv(n_elements, BLOCK), tl.num_programs(0)):
                offsets = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK)
                mask = offsets < n_elements
                x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                tl.store(x_ptr + offsets, (x * factor).to(x_ptr.dtype.element_ty), mask=mask)


def scale_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x *= factor in place and return x. x: any float tensor; factor: a one-element float tensor on
    x's device. Contiguous x runs the Triton kernel (the PyTorch product otherwise)."""
    check_float("x", x)
    if not isinstance(factor, torch.Tensor) or factor.numel() != 1 or factor.device != x.device:
        raise ValueError(f"factor must be a one-element tensor on {x.device}, got "
                         + (f"{list(factor.shape)} on {factor.device}" if isinstance(factor, torch.Tensor)
                            else type(factor).__name__))
    if x.numel() == 0:
        return x
    if not (use_triton(x) and x.is_contiguous() and x.dtype != torch.float64):
        # Not x.mul_(factor): for a bf16/fp16 x that rounds the factor to x's dtype first.
        work = torch.promote_types(x.dtype, torch.float32)
        return x.copy_(x.to(work) * factor.reshape(()).to(work))
    block, warps = (4096, 8) if x.is_cuda else (1024, 4)
    # Enough programs to keep the copy bandwidth busy (8 per SM), never more than there are blocks.
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    grid = min(triton.cdiv(x.numel(), block), 8 * sms)
    _scale_kernel[(grid,)](x, factor, x.numel(), BLOCK=block, num_warps=warps)
    return x
