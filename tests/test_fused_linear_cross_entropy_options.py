"""multi_head_linear_cross_entropy options and edge cases: frozen inputs, all targets ignored,
bf16 autocast and accumulation dtypes on CPU, head weights, the module wrapper, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medusa_liger.kernels import (
    MultiHeadLinearCrossEntropy,
    multi_head_linear_cross_entropy,
)
from medusa_liger.kernels import fused_linear_cross_entropy as flce
from medusa_liger.kernels.reference import (
    multi_head_linear_cross_entropy_reference as reference,
)
from medusa_liger.kernels.utils import force_backend
from tests.flce_helpers import TOL, _compare, _leaves, _problem, _run, record_gemms
from tests.utils import DEVICE, assert_rel_close


def test_frozen_weight_and_hidden_without_grad():
    """A frozen projection gets no gradient; a hidden without grad still gives the weight its own."""
    hidden, weight, labels, shifts, head_weights, options = _problem(3)
    for t in _leaves(hidden, weight, options["bias"]):
        t.requires_grad_(False)
    H = (hidden[0] if isinstance(hidden, list) else hidden).shape[-1]
    V = (weight[0] if isinstance(weight, list) else weight).shape[-2]
    w = torch.randn(V, H, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ref, (ref_g,) = _run(reference, hidden, w, labels, shifts, head_weights, options, compute_dtype=torch.float64)
    with force_backend("torch"):
        out, (g,) = _run(multi_head_linear_cross_entropy, hidden, w, labels, shifts, head_weights, options, chunk_size=3)
    _compare(out, [g], ref, [ref_g], TOL["torch"])
    frozen = w.detach().cpu()
    h = torch.randn(2, 5, w.shape[1], dtype=torch.float64, requires_grad=True)
    out = multi_head_linear_cross_entropy(h, frozen, torch.randint(0, w.shape[0], (2, 5)), [1, 2])
    out.loss.backward()
    assert frozen.grad is None and h.grad is not None


def test_frozen_projection_does_no_weight_gradient_work(monkeypatch):
    """Only the hidden-gradient GEMM runs per chunk (4NHV FLOPs, not 6NHV) for a frozen weight."""
    calls = record_gemms(monkeypatch)
    h = torch.randn(2, 6, 8, requires_grad=True)
    w = torch.randn(30, 8)
    with force_backend("torch"):
        multi_head_linear_cross_entropy(h, w, torch.randint(0, 30, (2, 6)), [1, 2], chunk_size=5).loss.backward()
    # Logits [rows, V] and hidden gradients [rows, H] only, no [V, H] weight-gradient GEMM.
    assert calls and all(shape[0] <= 5 and shape[1] in (8, 30) for shape, _, _ in calls)
    calls.clear()
    w.requires_grad_(True)
    with force_backend("torch"):
        multi_head_linear_cross_entropy(h, w, torch.randint(0, 30, (2, 6)), [1, 2], chunk_size=5).loss.backward()
    assert (30, 8) in [shape for shape, _, _ in calls]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_targets_ignored_gives_zero_loss_and_grads(backend):
    h = torch.randn(2, 4, 6, requires_grad=True, device=DEVICE)
    w = torch.randn(3, 11, 6, requires_grad=True, device=DEVICE)
    labels = torch.full((2, 4), -100, device=DEVICE)
    labels[:, 0] = 3  # only reachable with shift 0, which no head uses
    with force_backend(backend):
        out = multi_head_linear_cross_entropy(h, w, labels, [1, 2, 9], z_loss=1e-2, label_smoothing=0.1)
        out.loss.backward()
    assert out.loss.item() == 0 and torch.equal(out.head_tokens.cpu(), torch.zeros(3, dtype=torch.long))
    assert not torch.isnan(out.head_accuracy).any()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_autocast_bf16_on_cpu_matches_fp32():
    h = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(2, 50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    ref = reference(h, w, labels, [1, 2])
    ref.loss.backward()
    ref_grads = [h.grad.clone(), w.grad.clone()]
    h.grad = w.grad = None
    with force_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = multi_head_linear_cross_entropy(h, w, labels, [1, 2], chunk_size=5)
    out.loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert_rel_close(out.loss, ref.loss, torch.bfloat16, "loss")
    assert_rel_close(h.grad, ref_grads[0], torch.bfloat16, "hidden grad")
    assert_rel_close(w.grad, ref_grads[1], torch.bfloat16, "weight grad")


@pytest.mark.parametrize("accum_dtype", [torch.float32, torch.bfloat16, None])
def test_bf16_parameters_and_accumulation_dtypes_cpu(accum_dtype):
    """bf16 GEMMs; a shared hidden (fp32 accumulation over heads) and a repeated projection."""
    h = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    w0 = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    problem = (h, [w0, w1, w0], labels, [1, 2, 3], [1.0, 0.8, 0.64], dict(bias=None, label_smoothing=0.1))
    ref, ref_grads = _run(reference, *problem)
    with force_backend("torch"):
        out, grads = _run(multi_head_linear_cross_entropy, *problem, accum_dtype=accum_dtype, chunk_size=4)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    _compare(out, grads, ref, ref_grads, 2e-2, acc_slack=2)


@pytest.mark.parametrize("accum_dtype", [torch.float32, None])
def test_weight_gradient_accumulator_dtype(monkeypatch, accum_dtype):
    """fp32 accumulates over chunks in an fp32 buffer; None accumulates in the bf16 gradient itself,
    the first chunk's GEMM writing it (no zero fill), later ones adding to it."""
    calls = record_gemms(monkeypatch)
    h = torch.randn(2, 9, 16, dtype=torch.bfloat16)
    w = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    with force_backend("torch"):
        multi_head_linear_cross_entropy(h, w, torch.randint(0, 40, (2, 9)), [1], accum_dtype=accum_dtype,
                                        chunk_size=4).loss.backward()
    dw = [(dtype, acc) for shape, dtype, acc in calls if shape == (40, 16)]
    want_dtype = torch.float32 if accum_dtype is not None else torch.bfloat16
    assert dw == [(want_dtype, False)] + [(want_dtype, True)] * 4  # 18 rows: 5 chunks
    assert w.grad.dtype == torch.bfloat16


def test_fp32_parameters_accumulate_in_their_gradient_with_none():
    """accum_dtype=None on fp32 parameters is fp32 accumulation: the same numbers as the default."""
    problem = _problem(3, dtype=torch.float32)
    with force_backend("torch"):
        want, want_grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=4)
        got, got_grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=4, accum_dtype=None)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_head_weights_as_a_list_of_tensors_stay_on_the_device(monkeypatch):
    """A list of 0-dim tensors is stacked (no float() per item: a host sync on CUDA) and matches floats."""
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: pytest.fail("float() on a head weight"))
    weights = [torch.tensor(1.0, device=DEVICE), torch.tensor(0.5, device=DEVICE, dtype=torch.float64)]
    hw = flce.as_head_weights(weights, 2, weights[0].device)  # "cuda:0", as labels.device reads
    assert hw.dtype == torch.float64 and hw.device.type == torch.device(DEVICE).type
    assert hw.tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="head_weights"):
        flce.as_head_weights([torch.tensor(1.0), 0.5], 2, torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("hw_dtype", [torch.float32, torch.float64])
def test_trainable_head_weights_get_the_head_losses_and_leave_them_alone(hw_dtype, backend):
    """d loss / d head_weights[k] = loss_k; backward scales that gradient in place, which must not reach
    the returned head_losses (an fp32 head_weights tensor once shared their memory)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 1, 7, 8, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(37, 8, generator=g) / 3).to(DEVICE)
    labels = torch.randint(0, 37, (1, 7), generator=g).to(DEVICE)
    hw = torch.tensor([1.0, 0.5], dtype=hw_dtype, device=DEVICE, requires_grad=True)
    with force_backend(backend):
        out = multi_head_linear_cross_entropy(h, w, labels, [1, 2], hw)
    head_losses = out.head_losses.clone()
    (out.loss * -2.0).backward()
    assert torch.equal(out.head_losses, head_losses)
    torch.testing.assert_close(hw.grad, (-2.0 * head_losses).to(hw_dtype))
    hw.grad.zero_()  # what an optimizer's zero_grad does
    assert torch.equal(out.head_losses, head_losses)


def test_module_wrapper():
    module = MultiHeadLinearCrossEntropy([2, 3], [1.0, 0.8], label_smoothing=0.1)
    h = torch.randn(2, 6, 8, dtype=torch.float64)
    w = torch.randn(2, 20, 8, dtype=torch.float64)
    labels = torch.randint(0, 20, (2, 6))
    out = module(h, w, labels)
    ref = reference(h, w, labels, [2, 3], [1.0, 0.8], label_smoothing=0.1, compute_dtype=torch.float64)
    assert torch.allclose(out.loss, ref.loss)


def test_bad_inputs():
    h = torch.randn(2, 4, 6)
    w = torch.randn(11, 6)
    labels = torch.randint(0, 11, (2, 4))
    f = multi_head_linear_cross_entropy
    cases = [
        (dict(hidden=torch.randn(3, 2, 4, 6)), "hidden"),          # K = 3 stacked vs 2 shifts
        (dict(weight=torch.randn(3, 11, 6)), "weight"),
        (dict(weight=torch.randn(11, 5)), "weight"),                # H mismatch
        (dict(head_weights=[1.0]), "head_weights"),
        (dict(bias=torch.randn(12)), "bias"),                       # V mismatch
        (dict(labels=labels.float()), "labels"),
        (dict(labels=torch.tensor([[0, 1, 11, 2], [0, 0, 0, 0]])), "labels"),  # out of [0, V)
        (dict(shifts=[]), "shifts"),
        (dict(shifts=[1, -1]), "shifts"),
        (dict(reduction="none"), "reduction"),
        (dict(segment_ids=torch.zeros(2, 5, dtype=torch.long)), "segment_ids"),
        (dict(shifts=[1.9, 2]), "shifts"),                         # not silently 1
        (dict(shifts=[True, 2]), "shifts"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(head_weights=[1.0, float("nan")]), "head_weights must be finite"),
        (dict(head_weights=[float("inf"), 1.0]), "head_weights must be finite"),
        (dict(head_weights=torch.ones(2, device="meta")), "head_weights is on meta but labels is on"),  # not torch's
        (dict(softcap=float("inf")), "softcap"),
        (dict(z_loss=float("nan")), "z_loss"),
        (dict(weight=torch.randn(0, 6), labels=torch.full((2, 4), -100)), "weight must have a vocabulary of V >= 1"),
    ]
    for change, name in cases:
        args = dict(hidden=h, weight=w, labels=labels, shifts=[1, 2])
        args.update(change)
        with pytest.raises(ValueError, match=name):
            f(**args)
    # The module wrapper refuses at construction what the function refuses (it made 1.9 a shift of 1).
    for shifts in ([1.9, 2], [True, 2], [], 2):
        with pytest.raises(ValueError, match="shifts"):
            MultiHeadLinearCrossEntropy(shifts)
    for shifts in (range(1, 3), np.array([1, 2]), (1, 2)):  # any sequence of ints, as before
        assert MultiHeadLinearCrossEntropy(shifts).shifts == [1, 2]
    with pytest.raises(ValueError, match="head_weights must be finite"):
        MultiHeadLinearCrossEntropy([1, 2], [1.0, float("nan")])(h, w, labels)
    # Options too, at construction (they failed only at the first call).
    for options, name in ((dict(reduction="bogus"), "reduction must be"), (dict(label_smoothing=2.0), "label_smoothing"),
                          (dict(chunk_size=0), "chunk_size"), (dict(accum_dtype=torch.int32), "accum_dtype"),
                          (dict(head_weights=[1.0]), r"head_weights must have one entry per shift \(2\), got 1"),
                          (dict(skip_ignored="yes"), "skip_ignored must be a bool")):
        with pytest.raises(ValueError, match=name):
            MultiHeadLinearCrossEntropy([1, 2], **options)


def test_module_head_weights_move_with_the_module():
    """A tensor of head weights was a plain attribute: .to(device) left it behind, and the next call on
    the new device failed. It is a buffer (not saved: the module's state_dict is unchanged)."""
    module = MultiHeadLinearCrossEntropy([1, 2], torch.tensor([1.0, 0.5]))
    assert [name for name, _ in module.named_buffers()] == ["head_weights"] and module.state_dict() == {}
    module.to(torch.bfloat16)  # a cast of the module does not round the weights (0.8 -> 0.8008)
    assert module.head_weights.dtype == torch.float32 and module.head_weights.tolist() == [1.0, 0.5]
    with torch.device("meta"):  # deferred initialization: built on the meta device, then to_empty()
        deferred = MultiHeadLinearCrossEntropy([1, 2], torch.tensor([1.0, 0.5]))
    assert deferred.to_empty(device="cpu").head_weights.device.type == "cpu"
    torch.manual_seed(0)
    h, w = torch.randn(2, 5, 6), torch.randn(11, 6)
    labels = torch.randint(0, 11, (2, 5))
    want = multi_head_linear_cross_entropy(h, w, labels, [1, 2], [1.0, 0.5])
    assert torch.allclose(module(h, w, labels).loss, want.loss)


@pytest.mark.gpu
def test_gpu_module_head_weights_move_to_the_device():
    module = MultiHeadLinearCrossEntropy([1, 2], torch.tensor([1.0, 0.5])).to("cuda")
    assert module.head_weights.device.type == "cuda"
    h, w = torch.randn(2, 5, 6, device="cuda"), torch.randn(11, 6, device="cuda")
    labels = torch.randint(0, 11, (2, 5), device="cuda")
    want = multi_head_linear_cross_entropy(h, w, labels, [1, 2], [1.0, 0.5])
    assert torch.allclose(module(h, w, labels).loss, want.loss)


def test_module_head_weights_that_learn_get_their_gradient():
    """A learnable tensor of head weights (d loss / d w_k = loss_k) stays a parameter of the module."""
    weights = torch.nn.Parameter(torch.tensor([1.0, 0.8]))
    module = MultiHeadLinearCrossEntropy([1, 2], weights)
    assert [name for name, _ in module.named_parameters()] == ["head_weights"]
    torch.manual_seed(0)
    h, w = torch.randn(2, 5, 6), torch.randn(11, 6)
    labels = torch.randint(0, 11, (2, 5))
    out = module(h, w, labels)
    out.loss.backward()
    assert torch.allclose(weights.grad, out.head_losses)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["strided", "stacked_transposed", "expanded_scalar"])
def test_bias_of_any_strides(layout, backend):
    """The row kernels read a head's bias at unit stride: a column of a matrix, a [V, K] matrix
    transposed, or one value expanded to [V] (stride 0, a one-element storage) is copied first."""
    K, B, T, H, V = 2, 2, 5, 8, 37
    hidden = torch.randn(B, T, H, device=DEVICE, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, device=DEVICE, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    if layout == "strided":
        base = torch.randn(V, 2, device=DEVICE, dtype=torch.float64, requires_grad=True)
        bias = base[:, 1]
    elif layout == "stacked_transposed":
        base = torch.randn(V, K, device=DEVICE, dtype=torch.float64, requires_grad=True)
        bias = base.t()
    else:
        base = torch.randn(1, device=DEVICE, dtype=torch.float64, requires_grad=True)
        bias = base.expand(V)
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, base)]
    views = {"strided": lambda b: b[:, 1], "stacked_transposed": lambda b: b.t(), "expanded_scalar": lambda b: b.expand(V)}
    with force_backend(backend):
        out = multi_head_linear_cross_entropy(inputs[0], inputs[1], labels, [1, 2], bias=views[layout](inputs[2]))
        out.loss.backward()
    ref = reference(hidden, weight, labels, [1, 2], bias=bias)
    ref.loss.backward()
    tol = torch.float32  # the row statistics are fp32 on both paths
    assert_rel_close(out.loss, ref.loss, tol, "loss")
    assert_rel_close(inputs[0].grad, hidden.grad, tol, "dhidden")
    assert_rel_close(inputs[1].grad, weight.grad, tol, "dweight")
    if layout == "expanded_scalar":  # one value added to every logit: its gradient is exactly 0
        assert inputs[2].grad.abs().max() < 1e-5
    else:
        assert_rel_close(inputs[2].grad, base.grad, tol, "dbias")
