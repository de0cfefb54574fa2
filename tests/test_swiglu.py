"""SwiGLU kernel vs HF LlamaMLP's activation path (silu(gate) * up) in float64; both gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP

from medusa_liger.kernels.swiglu import SwiGLUMLP, swiglu
from medusa_liger.kernels.utils import force_backend
from tests.utils import DEVICE, DTYPES, MODEL_SHAPES, assert_close, assert_rel_close, poisoned_allocations

BACKENDS = ["triton", "torch"]
SHAPES = [(1, 64), (3, 123), (2, 5, 96), (4, 1000), (2, 5000)]


def _hf_activation(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The activation path of HF's LlamaMLP: ``act_fn(gate_proj(x)) * up_proj(x)``."""
    return ACT2FN["silu"](gate) * up


def _check(shape, dtype, backend, inplace_backward):
    gate = (2.0 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    up = torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_()
    dc = torch.randn(shape, device=DEVICE, dtype=dtype)
    with force_backend(backend), poisoned_allocations():
        # Non-leaf inputs (as in the MLP) so an in-place backward overwrites scratch, not the leaves.
        gate_in, up_in = gate * 1, up * 1
        c = swiglu(gate_in, up_in, inplace_backward=inplace_backward)
        c.backward(dc)
    gd, ud = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    c_ref = _hf_activation(gd, ud)
    c_ref.backward(dc.double())
    assert c.shape == gate.shape and c.dtype == dtype
    assert_close(c, c_ref, dtype, "c")
    assert_close(gate.grad, gd.grad, dtype, "dgate")
    assert_close(up.grad, ud.grad, dtype, "dup")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_hf(shape, dtype, backend):
    _check(shape, dtype, backend, inplace_backward=False)


@pytest.mark.parametrize("shape", [(3, 123), (2, 5, 96)])
def test_swiglu_inplace_backward(shape):
    _check(shape, DTYPES[0], "triton", inplace_backward=True)


def test_swiglu_default_backward_leaves_inputs_alone():
    gate = torch.randn(3, 50, device=DEVICE, requires_grad=True)
    up = torch.randn(3, 50, device=DEVICE, requires_grad=True)
    before = (gate.detach().clone(), up.detach().clone())
    with force_backend("triton"):
        swiglu(gate, up).sum().backward()
    assert torch.equal(gate.detach(), before[0]) and torch.equal(up.detach(), before[1])


def test_swiglu_row_strided_halves_of_a_fused_projection():
    """gate/up as the two halves of one [rows, 2I] tensor are read in place."""
    fused = torch.randn(4, 2 * 77, device=DEVICE, requires_grad=True)
    gate, up = fused.chunk(2, dim=-1)
    dc = torch.randn(4, 77, device=DEVICE)
    with force_backend("triton"):
        swiglu(gate, up).backward(dc)
    grad = fused.grad.clone()
    fused.grad = None
    _hf_activation(gate, up).backward(dc)
    assert_close(grad, fused.grad.double(), torch.float32, "fused grad")


def test_swiglu_mlp_matches_llama_mlp():
    """Same state_dict keys as LlamaMLP and the same output and input gradient."""
    config = LlamaConfig(hidden_size=32, intermediate_size=88, hidden_act="silu")
    hf = LlamaMLP(config).to(DEVICE)
    ours = SwiGLUMLP(32, 88).to(DEVICE)
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 3, 32, device=DEVICE, requires_grad=True)
    with force_backend("triton"):
        y = ours(x)
        y.sum().backward()
    grad_ours, w_grad = x.grad.clone(), ours.gate_proj.weight.grad.clone()
    x.grad = None
    y_ref = hf(x)
    y_ref.sum().backward()
    assert_rel_close(y, y_ref, torch.float32, "mlp out")
    assert_rel_close(grad_ours, x.grad, torch.float32, "mlp dx")
    assert_rel_close(w_grad, hf.gate_proj.weight.grad, torch.float32, "mlp dgate_proj.weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aliasing", ["same_buffer", "expanded_rows"])
def test_swiglu_inplace_backward_falls_back_when_elements_share_memory(aliasing, backend):
    """inplace_backward writes dgate over gate and dup over up: when gate and up are one buffer,
    or rows of an expand() share memory, the gradients go to new buffers instead."""
    if aliasing == "same_buffer":
        base = torch.randn(3, 9, device=DEVICE, requires_grad=True)
        gate = up = base * 1.0  # one non-leaf buffer
    else:
        base = torch.randn(1, 9, device=DEVICE, requires_grad=True)
        gate, up = base.expand(3, 9), torch.randn(3, 9, device=DEVICE)
    dy = torch.randn(3, 9, device=DEVICE)
    with force_backend(backend):
        swiglu(gate, up, inplace_backward=True).backward(dy)
    ref_base = base.detach().double().requires_grad_()
    ref_gate = ref_base * 1.0 if aliasing == "same_buffer" else ref_base.expand(3, 9)
    ref_up = ref_gate if aliasing == "same_buffer" else up.double()
    (torch.nn.functional.silu(ref_gate) * ref_up).backward(dy.double())
    assert_close(base.grad, ref_base.grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_zero_width_rows(backend):
    gate, up = (torch.randn(3, 0, device=DEVICE).requires_grad_() for _ in range(2))
    with force_backend(backend):
        y = swiglu(gate, up)
        y.sum().backward()
    assert y.shape == (3, 0) and gate.grad.shape == up.grad.shape == (3, 0)


def test_swiglu_bad_inputs():
    gate = torch.randn(2, 8)
    with pytest.raises(ValueError, match="up must have gate's shape"):
        swiglu(gate, torch.randn(2, 7))
    with pytest.raises(ValueError, match="up must have gate's dtype"):
        swiglu(gate, torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate must be"):
        swiglu(torch.ones(2, 8, dtype=torch.int32), gate)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="up is on"):
            swiglu(gate.cuda(), gate)


@pytest.mark.gpu
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_swiglu_gpu_bf16_mid_size(inplace_backward):
    _check((4096, 4096), torch.bfloat16, "triton", inplace_backward)


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_swiglu_gpu_bf16_model_sizes(model):
    intermediate = MODEL_SHAPES[model][1]
    _check((2, 37, intermediate), torch.bfloat16, "triton", inplace_backward=False)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_second_backward_after_an_inplace_one_raises(backend):
    # It read the gradients written over gate/up as activations: silently wrong second gradients.
    a = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    with force_backend(backend):
        c = swiglu(a * 1.0, b * 1.0, inplace_backward=True)
        c.sum().backward(retain_graph=True)
        first = (a.grad.clone(), b.grad.clone())
        expected = torch.autograd.grad(swiglu(a * 1.0, b * 1.0).sum(), (a, b))
        assert_close(first[0], expected[0], torch.float32)
        assert_close(first[1], expected[1], torch.float32)
        wrote_in_place = True
        try:
            c.sum().backward()
        except RuntimeError as error:
            assert "modified by an inplace operation" in str(error)
        else:  # a backend that did not write in place must give the right (doubled) gradients
            wrote_in_place = False
            assert_close(a.grad, 2 * expected[0], torch.float32)
    assert wrote_in_place or backend == "torch"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("layout", ["up_row_sliced", "transposed"])
def test_swiglu_gate_and_up_with_different_strides(layout, inplace_backward, backend):
    """gate contiguous and up a row slice of a wider tensor (different row strides), or both
    column-strided (transposed, copied for the kernel): output and both gradients, in place or not."""
    gate = (2.0 * torch.randn(5, 123, device=DEVICE)).requires_grad_()
    up = torch.randn(5, 200, device=DEVICE)[:, 7:130].requires_grad_()
    dc = torch.randn(5, 123, device=DEVICE)
    with force_backend(backend), poisoned_allocations():
        if layout == "up_row_sliced":  # (non-leaf inputs: an in-place backward overwrites scratch)
            gate_in, up_in = gate * 1, torch.nn.functional.pad(up, (7, 70))[:, 7:130]  # row stride 200
        else:  # non-leaf, column-strided views (as after a transpose)
            gate_in, up_in = gate.t().contiguous().t(), up.t().contiguous().t()  # strides (1, 5)
        want = ((200, 1), (123, 1)) if layout == "up_row_sliced" else ((1, 5), (1, 5))
        assert (up_in.stride(), gate_in.stride()) == want
        c = swiglu(gate_in, up_in, inplace_backward=inplace_backward)
        c.backward(dc)
    gd, ud = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    c_ref = _hf_activation(gd, ud)
    c_ref.backward(dc.double())
    assert_close(c, c_ref, torch.float32, "c")
    assert_close(gate.grad, gd.grad, torch.float32, "dgate")
    assert_close(up.grad, ud.grad, torch.float32, "dup")


def test_swiglu_scalar_inputs_raise():
    with pytest.raises(ValueError, match="at least one dimension"):
        swiglu(torch.tensor(1.0), torch.tensor(2.0))
