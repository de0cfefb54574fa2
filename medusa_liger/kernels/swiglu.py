"""SwiGLU activation ``silu(gate) * up`` (the Llama MLP), fused forward and recomputing backward.

With ``a = gate``, ``b = up``, ``s = sigmoid(a) = 1 / (1 + exp(-a))`` (all in fp32)::

    c  = a * s * b
    da = dc * b * s * (1 + a * (1 - s))       # d silu(a) / da = s + a * s * (1 - s)
    db = dc * a * s

The forward saves only ``gate`` and ``up``; the backward recomputes ``s`` from them. With
``inplace_backward=True`` (what ``SwiGLUMLP`` uses) the backward writes ``da`` over ``gate``'s buffer
and ``db`` over ``up``'s, so it allocates nothing: safe only when nothing else needs gate/up after
this op (true inside the MLP, where they are private outputs of the projections), and only for a
single backward pass.

Inputs of any leading shape are viewed as rows ``[rows, I]``; a row stride other than ``I`` (e.g.
gate and up as two halves of one fused projection) is read in place.
"""

from __future__ import annotations

import torch

from medusa_liger.kernels.utils import check_float, check_same_device, first_order_only, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the PyTorch path
    triton = None

# Elements per program along a row: wide enough for 16-byte vector loads on every warp.
_MAX_BLOCK = 4096


if triton is not None:  # (without triton, e.g. macOS/Windows CPU wheels: the PyTorch path)

    @triton.jit
    def _sigmoid_f32(a):
        # exp-based sigmoid (the interpreter has no libdevice); a is fp32.
        return 1.0 / (1.0 + tl.exp(-a))

    @triton.jit
    def _swiglu_fwd_kernel(
        a_ptr, a_row_stride, b_ptr, b_row_stride, c_ptr, c_row_stride, n_cols, BLOCK: tl.constexpr
    ):
        # Grid: (row, block of columns); every element is independent.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        a = tl.load(a_ptr + row * a_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * b_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        c = a * _sigmoid_f32(a) * b
        tl.store(c_ptr + row * c_row_stride + cols, c.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        dc_ptr, dc_row_stride, a_ptr, a_row_stride, b_ptr, b_row_stride,
        da_ptr, da_row_stride, db_ptr, db_row_stride, n_cols, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dc = tl.load(dc_ptr + row * dc_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + row * a_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * b_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # Recompute the activation instead of having saved it.
        s = _sigmoid_f32(a)
        silu = a * s
        da = dc * b * (s + silu * (1.0 - s))
        db = dc * silu
        # da/db may alias a/b (in-place backward): each element is read above before it is written.
        tl.store(da_ptr + row * da_row_stride + cols, da.to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + row * db_row_stride + cols, db.to(db_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as [rows, I] with unit column stride (copies only if no such view exists)."""
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError:
        rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _launch_config(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int]:
    # Prefer a block that tiles the row exactly (e.g. 14336 = 7 x 2048) so no program is half idle.
    block = min(_MAX_BLOCK, next_power_of_2(n_cols))
    while block > 1024 and n_cols % block:
        block //= 2
    if n_cols % block:
        block = min(_MAX_BLOCK, next_power_of_2(n_cols))
    num_warps = 8 if block >= 2048 else 4
    return (n_rows, triton.cdiv(n_cols, block)), block, num_warps


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton forward: c = silu(gate) * up, shape and dtype of gate."""
    a, b = _as_rows(gate), _as_rows(up)
    c = torch.empty(a.shape, dtype=gate.dtype, device=gate.device)
    if c.numel() > 0:
        grid, block, num_warps = _launch_config(*a.shape)
        _swiglu_fwd_kernel[grid](
            a, a.stride(0), b, b.stride(0), c, c.stride(0), a.shape[1], BLOCK=block, num_warps=num_warps
        )
    return c.view(gate.shape)


def swiglu_backward(
    dc: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward: (dgate, dup); with ``inplace`` they are written over gate's and up's storage."""
    a, b, dc2 = _as_rows(gate), _as_rows(up), _as_rows(dc)
    # In place only when the row views share gate's/up's storage (no copy was needed) and every
    # element has its own memory: not gate and up in one buffer, no rows overlapping (an expand()).
    inplace = (inplace and a.data_ptr() == gate.data_ptr() and b.data_ptr() == up.data_ptr()
               and a.data_ptr() != b.data_ptr() and all(r.shape[0] <= 1 or r.stride(0) >= r.shape[1] for r in (a, b)))
    da = a if inplace else torch.empty(a.shape, dtype=gate.dtype, device=gate.device)
    db = b if inplace else torch.empty(b.shape, dtype=up.dtype, device=up.device)
    if a.numel() > 0:
        grid, block, num_warps = _launch_config(*a.shape)
        _swiglu_bwd_kernel[grid](
            dc2, dc2.stride(0), a, a.stride(0), b, b.stride(0), da, da.stride(0), db, db.stride(0), a.shape[1],
            BLOCK=block, num_warps=num_warps,
        )
    return da.view(gate.shape) if not inplace else gate, db.view(up.shape) if not inplace else up


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate and up only; backward recomputes the sigmoid."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.inplace_backward = inplace_backward
        return swiglu_forward(gate, up)

    @staticmethod
    @first_order_only("swiglu")  # create_graph=True must raise, not give wrong 2nd-order grads
    def backward(ctx, dc: torch.Tensor):
        gate, up = ctx.saved_tensors
        # Returning the saved buffers as gradients: detach so autograd treats them as plain tensors.
        dgate, dup = swiglu_backward(dc, gate.detach(), up.detach(), ctx.inplace_backward)
        # Gradients written over the saved buffers: bump their versions, so a second backward through
        # this graph (retain_graph=True) raises autograd's "modified by an inplace operation" error
        # instead of reading gradients as activations.
        for saved, grad in ((gate, dgate), (up, dup)):
            if grad.data_ptr() == saved.data_ptr():
                torch.autograd.graph.increment_version(saved)
        return dgate, dup, None


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch SwiGLU, as HF's LlamaMLP computes it."""
    return torch.nn.functional.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` for gate, up of the same shape ``[..., I]`` and dtype; returns ``[..., I]``.

    ``inplace_backward=True`` lets the backward overwrite gate/up with their gradients (no extra
    memory); only use it when gate and up are not needed by anything else (see module docstring).
    """
    check_float("gate", gate)
    check_float("up", up)
    if gate.dim() < 1:
        raise ValueError("gate must have at least one dimension, got a scalar")
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {list(gate.shape)}, got {list(up.shape)}")
    if up.dtype != gate.dtype:
        raise ValueError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    check_same_device(gate=gate, up=up)
    if use_triton(gate) and gate.shape[-1] > 0:  # (zero-width rows: nothing to launch)
        return SwiGLUFunction.apply(gate, up, bool(inplace_backward))
    return swiglu_torch(gate, up)


class SwiGLUMLP(torch.nn.Module):
    """Llama MLP ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the fused activation.

    Same attribute names and state_dict keys as HF's ``LlamaMLP``. The activation's backward runs in
    place over the projections' outputs, which nothing else keeps.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), inplace_backward=True))


__all__ = ["SwiGLUFunction", "SwiGLUMLP", "swiglu", "swiglu_torch"]
