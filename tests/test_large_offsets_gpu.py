"""The Triton kernels on tensors past 2^31 elements (GPU only: each test needs 10-28 GiB of GPU memory).

A [16746, 128256] bf16 logits chunk (16k tokens of a Llama-3 vocabulary) holds 2.15e9 elements, as does
an 8B model's [524291, 4096] batch of hidden states. An element offset computed in int32 (a program id
times a row stride) wraps past 2^31 to a negative offset: the kernel then reads or writes before the
tensor (foreign memory, or a fault). Each test runs one kernel on such a tensor and checks rows on both
sides of the 2^31 boundary (the one below it, the one that straddles it where the width does not divide
2^31, the first past it) and the last row against float64 on those rows: those comparisons catch a
wrapped offset (benchmarks/int32_offset_mutants.sh shows each failing). Every other row's upstream
gradient is 0, and one of them is checked to get no gradient. The CPU interpreter cannot hold these sizes.
"""

from __future__ import annotations

import pytest
import torch

from medusa_liger.kernels.cross_entropy import cross_entropy
from medusa_liger.kernels.jsd import jsd_rows
from medusa_liger.kernels.kl_divergence import kl_rows
from medusa_liger.kernels.rms_norm import rms_norm
from medusa_liger.kernels.rope import apply_rotary_pos_emb
from medusa_liger.kernels.scale import scale_
from medusa_liger.kernels.swiglu import swiglu
from medusa_liger.kernels.utils import force_backend
from tests.test_cross_entropy import reference as cross_entropy_reference
from tests.test_rms_norm import _reference as rms_norm_reference
from tests.test_rope import _hf_cos_sin
from tests.test_self_distillation import divergence_definition
from tests.test_swiglu import _hf_activation
from tests.utils import HAS_CUDA, VOCABS, assert_close, assert_rel_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

LIMIT = 2**31
BF16 = torch.bfloat16


def _rows_around_the_limit(width: int, extra: int = 3) -> tuple[int, list[int]]:
    """(row count, rows to check) of a [rows, width] tensor just past 2^31 elements: row 0, the rows
    below, across and past the element 2^31, and the last row."""
    straddling = LIMIT // width  # starts below 2^31, ends past it (for a width that does not divide 2^31)
    rows = straddling + extra
    return rows, sorted({0, straddling - 1, straddling, straddling + 1, rows - 1})


def _needs_gpu_memory(gib: float) -> None:
    """Skip (not fail) where the GPU has less free memory than the test needs (a smaller card, or
    other test workers on the same card)."""
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def _upstream(shape: tuple[int, ...], rows: list[int], dim: int = 0) -> torch.Tensor:
    """A bf16 upstream gradient that is random at ``rows`` (along ``dim``) and 0 elsewhere."""
    grad = torch.zeros(shape, device="cuda", dtype=BF16)
    index = [slice(None)] * len(shape)
    index[dim] = rows
    grad[tuple(index)] = torch.randn(grad[tuple(index)].shape, device="cuda", dtype=BF16)
    return grad


def _first_unchecked(rows: list[int]) -> int:
    """A row between the checked ones (its upstream gradient is 0, so must be its gradient)."""
    return next(r for r in range(1, rows[-1]) if r not in rows)


def test_cross_entropy_rows_past_2_31_elements():
    """The row kernel's loss and in-place gradient, one ignored row among the checked ones."""
    V = VOCABS["llama3"]
    N, rows = _rows_around_the_limit(V)
    _needs_gpu_memory(2.5 * N * V * 2 / 2**30)
    logits = torch.randn(N, V, device="cuda", dtype=BF16) * 3
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[rows[1]] = -100
    picked = logits[rows].double().requires_grad_()
    ref_loss, _ = cross_entropy_reference(picked, labels[rows], reduction="none")
    grad_out = torch.zeros(N, device="cuda")
    grad_out[rows] = torch.rand(len(rows), device="cuda") + 0.5
    (ref_loss * grad_out[rows]).sum().backward()

    logits.requires_grad_()
    with force_backend("triton"):
        loss = cross_entropy(logits, labels, reduction="none")
        (loss * grad_out).sum().backward()
    assert_close(loss[rows], ref_loss, BF16, "row losses")
    assert_close(logits.grad[rows], picked.grad, BF16, "gradient rows")
    assert not logits.grad[_first_unchecked(rows)].any(), "a row with upstream gradient 0 got a gradient"


@pytest.mark.parametrize("name", ["kl", "jsd"])
def test_distillation_rows_past_2_31_elements(name):
    """KL / JSD row kernels: row losses and the student gradient written in place."""
    V = VOCABS["llama3"]
    N, rows = _rows_around_the_limit(V)
    _needs_gpu_memory(2.5 * 2 * N * V * 2 / 2**30)
    student = torch.randn(N, V, device="cuda", dtype=BF16) * 3
    teacher = torch.randn(N, V, device="cuda", dtype=BF16) * 3
    labels = torch.randint(0, V, (N,), device="cuda")
    valid = torch.ones(len(rows), dtype=torch.bool, device="cuda")
    beta = dict(jsd_beta=0.5) if name == "jsd" else {}
    ref_loss, ref_grad = divergence_definition(student[rows], teacher[rows], None, None, None, 0.0, valid, 0.5, **beta)
    loss = torch.full((N,), float("nan"), device="cuda")
    scale = torch.tensor([0.5], device="cuda")
    with force_backend("triton"):
        if name == "jsd":
            jsd_rows(student, teacher, labels, beta=0.5, scale=scale, loss=loss, write_grad=True)
        else:
            kl_rows(student, teacher, labels, scale=scale, loss=loss, write_grad=True)
    assert not loss.isnan().any(), "a row loss was not written"
    assert_rel_close(loss[rows], ref_loss, BF16, "row losses")
    assert_rel_close(student[rows], ref_grad, BF16, "gradient rows")


def test_scale_past_2_31_elements():
    """scale_'s grid-strided blocks reach the last element, and only the tensor's own."""
    _needs_gpu_memory(3 * LIMIT * 2 / 2**30)
    store = torch.ones(LIMIT + 4096 + 8, device="cuda", dtype=BF16)
    x = store[: LIMIT + 4096 + 5]  # an odd tail, in a buffer with elements after it
    scale_(x, torch.tensor([0.5], device="cuda"))
    assert int((x != 0.5).sum()) == 0, "an element was not scaled"
    assert store[-3:].tolist() == [1.0, 1.0, 1.0], "scale_ wrote past its tensor"


def test_rms_norm_rows_past_2_31_elements():
    """Forward, dx on the checked rows and dweight (only they have upstream gradient)."""
    H = 4096 + 64  # 2^31 / H is not a whole row count: one row straddles the limit
    R, rows = _rows_around_the_limit(H)
    _needs_gpu_memory(4.5 * R * H * 2 / 2**30)
    x = torch.randn(R, H, device="cuda", dtype=BF16).requires_grad_()
    weight = (1.0 + 0.5 * torch.randn(H, device="cuda")).to(BF16).requires_grad_()
    dy = _upstream((R, H), rows)
    with force_backend("triton"):
        y = rms_norm(x, weight, eps=1e-6)
        y.backward(dy)
    y_ref, dx_ref, dw_ref = rms_norm_reference(x[rows], weight, 1e-6, 0.0, dy[rows])
    assert_close(y[rows], y_ref, BF16, "y rows")
    assert_close(x.grad[rows], dx_ref, BF16, "dx rows")
    assert not x.grad[_first_unchecked(rows)].any(), "a row with upstream gradient 0 got a gradient"
    assert_rel_close(weight.grad, dw_ref, BF16, "dweight")


def test_swiglu_rows_past_2_31_elements():
    """c = silu(gate) * up and both gradients at a Llama-3-8B intermediate width."""
    C = 14336
    R, rows = _rows_around_the_limit(C)
    _needs_gpu_memory(6.5 * R * C * 2 / 2**30)
    gate = (2.0 * torch.randn(R, C, device="cuda", dtype=BF16)).requires_grad_()
    up = torch.randn(R, C, device="cuda", dtype=BF16).requires_grad_()
    dc = _upstream((R, C), rows)
    with force_backend("triton"):
        c = swiglu(gate, up)
        c.backward(dc)
    gd, ud = gate[rows].detach().double().requires_grad_(), up[rows].detach().double().requires_grad_()
    c_ref = _hf_activation(gd, ud)
    c_ref.backward(dc[rows].double())
    assert_close(c[rows], c_ref, BF16, "c rows")
    assert_close(gate.grad[rows], gd.grad, BF16, "dgate rows")
    assert_close(up.grad[rows], ud.grad, BF16, "dup rows")
    other = _first_unchecked(rows)
    assert not gate.grad[other].any() and not up.grad[other].any(), "a row with upstream gradient 0 got a gradient"


@pytest.mark.parametrize("hf_layout", [False, True])
def test_rope_positions_past_2_31_elements(hf_layout):
    """q of 32 heads x 128 dims over 524k positions (one batch row): embeddings and gradients at the
    positions around element 2^31 (GQA k of 8 heads beside it)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

    n_q, n_kv, D = 32, 8, 128
    T, positions = _rows_around_the_limit(n_q * D)
    _needs_gpu_memory(5.5 * T * (n_q + n_kv) * D * 2 / 2**30)
    if hf_layout:  # HF's [B, n, T, D] view of [B, T, n, D] storage
        q = torch.randn(1, T, n_q, D, device="cuda", dtype=BF16).transpose(1, 2).requires_grad_()
        k = torch.randn(1, T, n_kv, D, device="cuda", dtype=BF16).transpose(1, 2).requires_grad_()
    else:
        q = torch.randn(1, n_q, T, D, device="cuda", dtype=BF16).requires_grad_()
        k = torch.randn(1, n_kv, T, D, device="cuda", dtype=BF16).requires_grad_()
    cos, sin = _hf_cos_sin(1, T, D, BF16)
    dq_out, dk_out = _upstream(q.shape, positions, dim=2), _upstream(k.shape, positions, dim=2)
    with force_backend("triton"):
        q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
        torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    at = (slice(None), slice(None), positions)
    qd = q[at].detach().double().requires_grad_()
    kd = k[at].detach().double().requires_grad_()
    q_ref, k_ref = hf_apply_rotary_pos_emb(qd, kd, cos[:, positions].double(), sin[:, positions].double())
    torch.autograd.backward((q_ref, k_ref), (dq_out[at].double(), dk_out[at].double()))
    assert_close(q_out[at], q_ref, BF16, "q_embed")
    assert_close(k_out[at], k_ref, BF16, "k_embed")
    assert_close(q.grad[at], qd.grad, BF16, "dq")
    assert_close(k.grad[at], kd.grad, BF16, "dk")
    other = _first_unchecked(positions)
    assert not q.grad[:, :, other].any(), "a position with upstream gradient 0 got a gradient"
