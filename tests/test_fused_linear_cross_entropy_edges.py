"""multi_head_linear_cross_entropy at its edges: cases a mutation audit found untested.

An ignore_index inside the vocabulary (counts, mean, accuracy and skip_ignored all follow it), autocast's
dtype deciding the GEMMs, mixed input dtypes computing in the widest, backward's grad_output under
reentrant_backward() and the single-backward guard, skip_ignored when no head has a valid target (default
chunk plan), the accumulator dtypes (accum_dtype promoted with the compute dtype, a shared hidden or a
projection shared by single-chunk heads accumulating wider than bf16), no gradient work under no_grad,
and bad inputs refused by name.
"""

from __future__ import annotations

import pytest
import torch

from medusa_liger.kernels import multi_head_linear_cross_entropy
from medusa_liger.kernels import fused_linear_cross_entropy as flce
from medusa_liger.kernels.fused_linear_cross_entropy import reentrant_backward
from medusa_liger.kernels.reference import (
    multi_head_linear_cross_entropy_reference as reference,
)
from medusa_liger.kernels.utils import force_backend
from tests.flce_helpers import TOL, _compare, _problem, _run, record_gemms
from tests.utils import DEVICE, HAS_CUDA, rel_norm_error


def _small(seed=0, K=2, B=2, T=9, H=8, V=37, dtype=torch.float64, device=DEVICE, shared_hidden=True):
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H) if shared_hidden else (K, B, T, H)
    h = torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (0.7 * torch.randn(V, H, generator=g, dtype=torch.float64)).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.2] = -100
    return h, w, labels.to(device)


@pytest.mark.parametrize("skip_ignored", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("seed", [5, 7, 9])
def test_ignore_index_inside_the_vocabulary(seed, backend, skip_ignored):
    """ignore_index = 0, a real token id (a pad id) and the argmax of most rows: targets equal to it are not
    counted (head_tokens, the mean's denominator), not scored, not counted correct; valid_target_counts agrees.
    With -100 in its place every mutant that hard-codes the default ignore_index passed the other tests."""
    hidden, weight, labels, shifts, head_weights, options = _problem(seed)
    labels = labels.masked_fill(labels == -100, 0)  # -100 is out of range once ignore_index is 0
    problem = (hidden, weight, labels, shifts, head_weights, options)
    ref, ref_grads = _run(reference, *problem, compute_dtype=torch.float64, ignore_index=0)
    assert (labels == 0).any()
    with force_backend(backend):
        out, grads = _run(multi_head_linear_cross_entropy, *problem, ignore_index=0, chunk_size=5,
                          skip_ignored=skip_ignored)
    _compare(out, grads, ref, ref_grads, TOL[backend])
    V = (weight[0] if isinstance(weight, list) else weight).shape[-2]
    counts = flce.valid_target_counts(labels, shifts, V, ignore_index=0, segment_ids=options["segment_ids"])
    assert counts == ref.head_tokens.tolist()


def test_autocast_dtype_decides_the_gemms():
    """Under autocast the op computes in autocast's dtype: fp32 inputs give what bf16 inputs give (the
    same GEMMs), gradients in the inputs' fp32. Computing in fp32 instead only showed within bf16 tolerance."""
    backend = None if HAS_CUDA else "torch"  # (the CPU interpreter has no bf16 arithmetic)
    h, w, labels = _small(1, T=7, H=16, V=50, dtype=torch.float32, shared_hidden=False)
    h16, w16 = (t.detach().to(torch.bfloat16).requires_grad_() for t in (h, w))
    with force_backend(backend):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = multi_head_linear_cross_entropy(h, w, labels, [1, 2], chunk_size=5)
        want = multi_head_linear_cross_entropy(h16, w16, labels, [1, 2], chunk_size=5)
    out.loss.backward()
    want.loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.head_losses, want.head_losses, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad, h16.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(w.grad.to(torch.bfloat16), w16.grad, rtol=0, atol=0)


@pytest.mark.parametrize("wide", ["hidden", "weight"])
def test_mixed_input_dtypes_compute_in_the_widest(wide):
    """fp32 and fp64 inputs together compute in fp64 (exact against the fp64 reference), each gradient
    in its own input's dtype."""
    h, w, labels = _small(2, K=3, T=11, V=123)
    h32 = h.detach().float().requires_grad_() if wide == "weight" else h
    w32 = w.detach().float().requires_grad_() if wide == "hidden" else w
    ref, ref_grads = _run(reference, h32.detach().double().requires_grad_(), w32.detach().double().requires_grad_(),
                          labels, [0, 1, 3], [1.0, 0.8, 0.5], dict(bias=None, z_loss=1e-3),
                          compute_dtype=torch.float64)
    with force_backend("torch"):
        out, grads = _run(multi_head_linear_cross_entropy, h32, w32, labels, [0, 1, 3], [1.0, 0.8, 0.5],
                          dict(bias=None, z_loss=1e-3), chunk_size=7)
    assert [g.dtype for g in grads] == [h32.dtype, w32.dtype]
    for name in ("loss", "head_losses"):
        assert rel_norm_error(getattr(out, name), getattr(ref, name)) <= TOL["torch"], name
    for g, r in zip(grads, ref_grads):  # the fp32 input's gradient is rounded to fp32 once, at the end
        assert rel_norm_error(g, r) <= (TOL["torch"] if g.dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reentrant_backward_scales_each_pass_by_its_grad_output(backend):
    """Under reentrant_backward() each backward multiplies the kept gradients by its own grad_output."""
    h, w, labels = _small(3, K=2, shared_hidden=False)
    hw = [1.0, 0.6]
    ref = reference(h, w, labels, [1, 2], hw, compute_dtype=torch.float64).loss
    ref_grads = torch.autograd.grad(ref, [h, w])
    with force_backend(backend), reentrant_backward():
        loss = multi_head_linear_cross_entropy(h, w, labels, [1, 2], hw, chunk_size=4).loss
        for factor in (1.5, -2.0, 1.5):
            grads = torch.autograd.grad(loss * factor, [h, w], retain_graph=True)
            for g, r in zip(grads, ref_grads):
                assert rel_norm_error(g, factor * r) <= TOL[backend]


def test_backward_twice_without_reentrant_raises():
    """The gradients are handed to autograd (scaled in place): a second backward must refuse, not reuse them."""
    h, w, labels = _small(4)
    with force_backend("torch"):
        loss = multi_head_linear_cross_entropy(h, w, labels, [1, 2]).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_skip_ignored_when_no_head_has_a_valid_target(backend, chunk_size):
    """skip_ignored with every target ignored (a batch of prompts only) and the default chunk plan: zero
    loss and gradients (the plan must not get 0 rows: range(0, 0, 0) raised)."""
    h, w, _ = _small(5, K=3, shared_hidden=False)
    labels = torch.full((2, 9), -100, device=DEVICE)
    labels[:, 0] = 3  # reachable with shift 0 only, which no head uses
    with force_backend(backend):
        out = multi_head_linear_cross_entropy(h, w, labels, [1, 2, 12], skip_ignored=True, chunk_size=chunk_size)
        out.loss.backward()
    assert out.loss.item() == 0 and out.head_tokens.tolist() == [0, 0, 0]
    assert out.head_accuracy.tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize(("param_dtype", "accum_dtype", "want"), [
    (torch.float32, torch.float64, torch.float64),   # a wider accumulator is honoured
    (torch.float32, torch.bfloat16, torch.float32),  # never narrower than the compute dtype
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # (None and fp32: test_weight_gradient_accumulator_dtype)
])
def test_weight_accumulator_is_accum_dtype_promoted_with_the_compute_dtype(monkeypatch, param_dtype, accum_dtype,
                                                                           want):
    """The dW accumulator over chunks (CPU tensors: the torch path's GEMMs are observable)."""
    calls = record_gemms(monkeypatch)
    h, w, labels = _small(6, H=16, V=40, dtype=param_dtype, device="cpu")
    with force_backend("torch"):
        multi_head_linear_cross_entropy(h, w, labels, [1], accum_dtype=accum_dtype, chunk_size=4).loss.backward()
    assert [(dt, acc) for shape, dt, acc in calls if shape == (40, 16)] == [(want, False)] + [(want, True)] * 4
    assert w.grad.dtype == param_dtype


@pytest.mark.parametrize("accum_dtype", [torch.bfloat16, torch.float16, torch.float32, None])
def test_fp64_parameters_stay_exact_with_a_narrow_accum_dtype(accum_dtype):
    """accum_dtype is promoted with the compute dtype: fp64 parameters never accumulate in bf16/fp16."""
    problem = _problem(7)
    ref, ref_grads = _run(reference, *problem, compute_dtype=torch.float64)
    with force_backend("torch"):
        out, grads = _run(multi_head_linear_cross_entropy, *problem, accum_dtype=accum_dtype, chunk_size=3)
    _compare(out, grads, ref, ref_grads, TOL["torch"])


def test_bf16_sums_over_heads_and_chunks_accumulate_in_fp32(monkeypatch):
    """A hidden read by two heads accumulates its gradient in fp32 (not in bf16), and a projection shared by
    two heads of one chunk each accumulates dW in fp32 too (only a lone single-chunk head writes it directly)."""
    calls = record_gemms(monkeypatch)
    h, w, labels = _small(8, H=16, V=40, dtype=torch.bfloat16, device="cpu")
    with force_backend("torch"):
        multi_head_linear_cross_entropy(h, w, labels, [1, 2], chunk_size=64).loss.backward()
    assert [(dt, acc) for shape, dt, acc in calls if shape == (18, 16)] == [(torch.float32, False),
                                                                           (torch.float32, True)]
    assert [(dt, acc) for shape, dt, acc in calls if shape == (40, 16)] == [(torch.float32, False),
                                                                           (torch.float32, True)]
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    calls.clear()
    with force_backend("torch"):  # one head, one chunk: the GEMM writes the bf16 gradient itself
        multi_head_linear_cross_entropy(h, w, labels, [1], chunk_size=64).loss.backward()
    assert [(dt, acc) for shape, dt, acc in calls if shape == (40, 16)] == [(torch.bfloat16, False)]


def test_no_grad_does_no_gradient_work(monkeypatch):
    """Under torch.no_grad (evaluation) the leaves' requires_grad must not start the dh/dW GEMMs or the row
    kernel's gradient pass; the loss is the same."""
    calls = record_gemms(monkeypatch)
    write_grad = []
    original = flce.ce_rows
    monkeypatch.setattr(flce, "ce_rows", lambda *a, **k: (write_grad.append(k["write_grad"]), original(*a, **k))[1])
    h, w, labels = _small(9, device="cpu")
    with force_backend("torch"):
        want = multi_head_linear_cross_entropy(h, w, labels, [1, 2], chunk_size=5).loss
        calls.clear()
        write_grad.clear()
        with torch.no_grad():
            got = multi_head_linear_cross_entropy(h, w, labels, [1, 2], chunk_size=5).loss
    assert not got.requires_grad and got.item() == pytest.approx(want.item(), rel=1e-12)
    assert calls and all(shape[1] == 37 for shape, _, _ in calls)  # logits [rows, V] only
    assert write_grad and not any(write_grad)


def test_bad_inputs_are_refused_by_name():
    """(CPU tensors: label values are checked on the host only there.)"""
    h = torch.randn(2, 4, 6)
    w = torch.randn(11, 6)
    labels = torch.randint(0, 11, (2, 4))
    cases = [
        (dict(labels=labels[0]), "labels must be a"),                                    # [T], not [B, T]
        (dict(labels=labels[:0]), "labels must hold at least one token"),
        (dict(hidden=torch.randn(2, 5, 6)), "hidden must end in shape"),  # T mismatch
        (dict(hidden=torch.randn(3, 4, 6)), "hidden must end in shape"),  # B mismatch
        # H mismatch: the message shows the weight's shape too (it read as though hidden alone were wrong)
        (dict(hidden=torch.randn(2, 4, 7)), r"hidden must end in shape \[2, 4, 6\] \(labels \[2, 4\]: \[B, T\]; "
                                            r"weight \[\d+, 6\]: \[V, H\] last\), got \[2, 4, 7\]"),
        (dict(weight=[w, torch.randn(12, 6)]), "weight must end in shape"),
        (dict(segment_ids=torch.zeros(2, 4)), "segment_ids"),              # float ids
        (dict(labels=torch.tensor([[0, 1, -1, 2], [0, 0, 0, 0]])), "labels holds -1"),
    ]
    for change, name in cases:
        args = dict(hidden=h, weight=w, labels=labels, shifts=[1, 2])
        args.update(change)
        with pytest.raises(ValueError, match=name):
            multi_head_linear_cross_entropy(**args)


@pytest.mark.parametrize("shared_hidden", [True, False])
def test_hidden_without_grad_does_no_hidden_gradient_work(monkeypatch, shared_hidden):
    """A hidden state without grad (a frozen backbone's output) still gives the projection its exact
    gradient, and no dh GEMM [rows, H] runs (only logits [rows, V] and dW [V, H])."""
    calls = record_gemms(monkeypatch)
    h, w, labels = _small(10, K=3, shared_hidden=shared_hidden, device="cpu")
    h.requires_grad_(False)
    problem = (h, w, labels, [0, 1, 2], [1.0, 0.7, 0.4], dict(bias=None, label_smoothing=0.1))
    ref, ref_grads = _run(reference, *problem, compute_dtype=torch.float64)
    calls.clear()
    with force_backend("torch"):
        out, grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=5)
    _compare(out, grads, ref, ref_grads, TOL["torch"])
    assert calls and all(shape[1] == 37 or shape == (37, 8) for shape, _, _ in calls)


@pytest.mark.parametrize(("param_dtype", "accum_dtype", "extra"), [
    (torch.float32, torch.float32, False), (torch.bfloat16, None, False), (torch.bfloat16, torch.float32, True)])
def test_no_separate_weight_accumulator_in_the_gradients_own_dtype(monkeypatch, param_dtype, accum_dtype, extra):
    """A [V, H] accumulator is allocated only when its dtype differs from the gradient's (the memory the
    module docstring promises: none when accum_dtype is None or the parameter's dtype)."""
    shapes = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    h, w, labels = _small(11, H=16, V=40, dtype=param_dtype, device="cpu")
    monkeypatch.setattr(torch, "empty", empty)
    with force_backend("torch"):
        out = multi_head_linear_cross_entropy(h, w, labels, [1, 2], accum_dtype=accum_dtype, chunk_size=4)
    monkeypatch.undo()
    out.loss.backward()
    assert ((40, 16) in shapes) == extra
    assert w.grad.dtype == param_dtype and torch.isfinite(w.grad).all()
