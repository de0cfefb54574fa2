"""multi_head_linear_cross_entropy on the GPU in bf16: reference comparisons, out-of-range labels,
CUDA graph capture, no host syncs, tensor-core GEMM accumulation and skip_ignored."""

from __future__ import annotations

import pytest
import torch

from medusa_liger.kernels import exp_operand, multi_head_linear_cross_entropy
from medusa_liger.kernels.reference import (
    multi_head_linear_cross_entropy_reference as reference,
)
from tests.flce_helpers import _compare, _problem, _run
from tests.utils import MODEL_SHAPES, VOCABS


@pytest.mark.gpu
@pytest.mark.parametrize("accum_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_gpu_bf16_matches_reference(seed, accum_dtype):
    hidden, weight, labels, shifts, head_weights, options = _problem(seed, dtype=torch.bfloat16)
    ref, ref_grads = _run(reference, hidden, weight, labels, shifts, head_weights, options)
    out, grads = _run(multi_head_linear_cross_entropy, hidden, weight, labels, shifts, head_weights, options,
                      chunk_size=5, accum_dtype=accum_dtype)
    # bf16 logits may reorder near-tied top tokens: allow 10% of each head's tokens to flip.
    _compare(out, grads, ref, ref_grads, 3e-2, acc_slack=0.1 * max(1, int(ref.head_tokens.max())))


@pytest.mark.gpu
def test_gpu_out_of_range_labels_are_ignored_and_cuda_graph_capture():
    K, B, T, H, V = 3, 2, 64, 64, 1000
    h = torch.randn(K, B, T, H, device="cuda", requires_grad=True)
    w = torch.randn(V, H, device="cuda")
    labels = torch.randint(0, V, (B, T), device="cuda")
    bad = labels.clone()
    bad[0, 5], bad[1, 7] = V + 3, -4
    masked = bad.clone()
    masked[0, 5] = masked[1, 7] = -100
    hw = torch.tensor([1.0, 0.8, 0.64], device="cuda")
    a = multi_head_linear_cross_entropy(h, w, bad, [1, 2, 3], hw)
    b = multi_head_linear_cross_entropy(h, w, masked, [1, 2, 3], hw)
    torch.testing.assert_close(a.loss, b.loss)
    # No host sync anywhere: the whole forward (which computes the gradients) captures in a graph.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        multi_head_linear_cross_entropy(h, w, labels, [1, 2, 3], hw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = multi_head_linear_cross_entropy(h, w, labels, [1, 2, 3], hw)
    labels.copy_(masked)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured.loss, b.loss)


@pytest.mark.gpu
def test_gpu_no_host_sync_in_forward_or_backward():
    from medusa_liger.kernels import cross_entropy

    h = [torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, 500, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 500, (2, 32), device="cuda")
    logits = torch.randn(64, 500, device="cuda", requires_grad=True)
    for _ in range(2):  # the first round compiles the kernels
        torch.cuda.set_sync_debug_mode("error" if _ else 0)
        try:
            out = multi_head_linear_cross_entropy(h, w, labels, [1, 2, 3], [1.0, 0.8, 0.64], chunk_size=24)
            out.loss.backward()
            cross_entropy(logits.clone(), labels.reshape(-1)).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def _gpu_bf16_problem(T: int, V: int, g: torch.Generator):
    """K=3 stacked bf16 hidden [3, 2, T, 64] and projections [3, V, 64] (leaves), labels [2, T]."""
    h = torch.randn(3, 2, T, 64, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(3, V, 64, device="cuda", generator=g) * 0.3).bfloat16().requires_grad_()
    return h, w, torch.randint(0, V, (2, T), device="cuda", generator=g)


@pytest.mark.gpu
@pytest.mark.parametrize("accum_dtype", [torch.float32, torch.bfloat16])
def test_gpu_aligned_shapes_weight_gradient_accumulation(accum_dtype):
    """Tensor-core friendly sizes, so the bf16 x bf16 -> fp32 accumulating GEMM path really runs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h, w, labels = _gpu_bf16_problem(48, 256, g)
    shared = (torch.randn(256, 64, device="cuda", generator=g) * 0.3).bfloat16().requires_grad_()
    for weight in (w, [shared, w[1].detach().requires_grad_(), shared]):
        problem = (h, weight, labels, [1, 2, 3], [1.0, 0.8, 0.64], dict(bias=None, z_loss=1e-3))
        ref, ref_grads = _run(reference, *problem)
        out, grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=32, accum_dtype=accum_dtype)
        _compare(out, grads, ref, ref_grads, 2e-2, acc_slack=10)


@pytest.mark.gpu
@pytest.mark.parametrize("accum_dtype", [torch.float32, torch.bfloat16])
def test_gpu_skip_ignored_matches_all_rows_and_refuses_graph_capture(accum_dtype):
    h, w, labels = _gpu_bf16_problem(256, 1000, torch.Generator(device="cuda").manual_seed(0))
    labels.view(2, 4, 64)[:, :, :32] = -100  # masked prompt spans: about half the targets ignored
    problem = (h, w, labels, [1, 2, 3], [1.0, 0.8, 0.64], dict(bias=None, z_loss=1e-3))
    ref, ref_grads = _run(reference, *problem)
    out, grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=128, accum_dtype=accum_dtype,
                      skip_ignored=True)
    _compare(out, grads, ref, ref_grads, 2e-2, acc_slack=10)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="skip_ignored"):
        with torch.cuda.graph(graph):
            multi_head_linear_cross_entropy(h.detach(), w.detach(), labels, [1, 2, 3], skip_ignored=True)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["exp operand", "row kernel"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("vocab", list(VOCABS.values()), ids=list(VOCABS))
def test_gpu_real_vocab_sizes(vocab, frozen, path, monkeypatch):
    """Every chunk path compiles and agrees with the reference at real models' vocabulary sizes."""
    _check_model_size(vocab, 128, frozen, path, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["exp operand", "row kernel"])
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_gpu_real_hidden_sizes(model, path, monkeypatch):
    _check_model_size(VOCABS["mistral"], MODEL_SHAPES[model][0], False, path, monkeypatch)


def _check_model_size(vocab, hidden, frozen, path, monkeypatch):
    chunks = []
    if path == "row kernel":
        monkeypatch.setattr(exp_operand, "ENABLED", False)
    else:
        original = exp_operand.exp_operand_chunk
        monkeypatch.setattr(exp_operand, "exp_operand_chunk", lambda *a: chunks.append(a[0].shape) or original(*a))
    g = torch.Generator(device="cuda").manual_seed(vocab)
    h = torch.randn(2, 2, 48, hidden, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * 2.3 / hidden**0.5).bfloat16().requires_grad_(not frozen)
    labels = torch.randint(0, vocab, (2, 48), device="cuda", generator=g)
    problem = (h, w, labels, [1, 2], None, dict(bias=None))
    ref, ref_grads = _run(reference, *problem)
    out, grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=64)
    _compare(out, grads, ref, ref_grads, 2e-2, acc_slack=10)
    # The exp path needs 16-byte rows for its TMA descriptors: V a multiple of 8 (not GPT-2's).
    can_take = torch.cuda.get_device_capability() >= (9, 0) and vocab % 8 == 0
    assert bool(chunks) == (path == "exp operand" and can_take)
