"""The head-by-head multi-head loss: same values and gradients as the all-heads op, one head alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from medusa_liger.heads import MedusaConfig, MedusaModel
from medusa_liger.kernels import (
    force_backend,
    head_by_head_linear_cross_entropy,
    multi_head_linear_cross_entropy,
)
from medusa_liger.kernels import fused_linear_cross_entropy as flce
from medusa_liger.kernels.fused_linear_cross_entropy import reentrant_backward
from tests.test_generate import tiny_backbone
from tests.utils import DEVICE, assert_rel_close


def residual_heads(K: int, H: int, dtype: torch.dtype, layers: int = 1,
                   device: torch.device | str = DEVICE) -> tuple[list, list[torch.Tensor]]:
    """K functions x -> x + silu(A x + b) (``layers`` deep) with random A, b; and their parameters."""
    blocks = [[torch.nn.Linear(H, H, device=device, dtype=dtype) for _ in range(layers)] for _ in range(K)]

    def head(stack):
        def run(x):
            for linear in stack:
                x = x + F.silu(linear(x))
            return x
        return run

    return [head(stack) for stack in blocks], [p for stack in blocks for lin in stack for p in lin.parameters()]


def all_grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("weights_kind", "hidden_grad"), [("per_head", False), ("shared_trainable", True),
                                                           ("shared_frozen", True), ("per_head", True)])
def test_matches_the_all_heads_op(backend, weights_kind, hidden_grad):
    torch.manual_seed(1)
    B, T, H, V, K = 2, 19, 16, 123, 3
    dtype = torch.float32
    x = torch.randn(B, T, H, device=DEVICE, dtype=dtype, requires_grad=hidden_grad)
    head_inputs, block_params = residual_heads(K, H, dtype, layers=2 if weights_kind == "per_head" else 1)
    if weights_kind == "per_head":
        weights = [torch.randn(V, H, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(K)]
    else:
        shared = torch.randn(V, H, device=DEVICE, dtype=dtype, requires_grad=weights_kind == "shared_trainable")
        weights = [shared] * K
    bias = torch.randn(V, device=DEVICE, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[0, :7] = -100
    segment_ids = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    segment_ids[1, 11:] = 2
    args = (labels, [2, 3, 4], [1.0, 0.8, 0.64])
    options = {"bias": [bias] * K, "segment_ids": segment_ids, "label_smoothing": 0.1, "z_loss": 1e-3}
    params = [*block_params, *weights, bias]
    wanted = [t for t in [x, *block_params, *dict.fromkeys(weights), bias] if t.requires_grad]
    with force_backend(backend):
        ref = multi_head_linear_cross_entropy([f(x) for f in head_inputs], weights, *args, **options)
        ref_grads = all_grads(ref.loss * 1.5, wanted)
        out = head_by_head_linear_cross_entropy(x, head_inputs, weights, *args, params=params, **options)
        grads = all_grads(out.loss * 1.5, wanted)
    assert_rel_close(out.loss, ref.loss, dtype, "loss")
    assert_rel_close(out.head_losses, ref.head_losses, dtype, "head_losses")
    assert torch.equal(out.head_accuracy, ref.head_accuracy) and torch.equal(out.head_tokens, ref.head_tokens)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(g, r, dtype, f"gradient {i}")


def test_one_head_is_alive_at_a_time():
    """Head k's input to its projection (and so its blocks' graph) is gone when head k + 1 starts."""
    H, K = 8, 4
    x = torch.randn(2, 5, H)
    head_inputs, params = residual_heads(K, H, torch.float32, device="cpu")
    alive: list[weakref.ref] = []

    def tracked(k):
        def run(h):
            gc.collect()
            assert all(ref() is None for ref in alive), f"an earlier head's output is alive when head {k} starts"
            z = head_inputs[k](h)
            alive.append(weakref.ref(z))
            return z
        return run

    weights = [torch.randn(11, H, requires_grad=True) for _ in range(K)]
    labels = torch.randint(0, 11, (2, 5))
    with force_backend("torch"):
        out = head_by_head_linear_cross_entropy(x, [tracked(k) for k in range(K)], weights, labels, [1, 2, 3, 4],
                                                params=params + weights)
    out.loss.backward()
    assert len(alive) == K and all(w.grad is not None for w in weights) and all(p.grad is not None for p in params)


def test_gradcheck_fp64():
    torch.manual_seed(0)
    H, V = 4, 7
    x = torch.randn(1, 6, H, dtype=torch.float64, requires_grad=True)
    head_inputs, params = residual_heads(2, H, torch.float64, device="cpu")
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (1, 6))

    def loss(x, w, *block_params):
        return head_by_head_linear_cross_entropy(x, head_inputs, [w, w], labels, [1, 2], [1.0, 0.5],
                                                 params=[*params, w], accum_dtype=torch.float64).loss

    with force_backend("torch"), reentrant_backward():
        assert torch.autograd.gradcheck(loss, (x, w, *params))


def test_backward_twice_raises_and_frozen_inputs_give_no_graph():
    head_inputs, params = residual_heads(2, 4, torch.float32, device="cpu")
    x, w = torch.randn(1, 5, 4), torch.randn(9, 4, requires_grad=True)
    labels = torch.randint(0, 9, (1, 5))
    with force_backend("torch"):
        out = head_by_head_linear_cross_entropy(x, head_inputs, [w, w], labels, [1, 2], params=[*params, w])
        out.loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="backward ran twice"):
            out.loss.backward()
        for p in (*params, w):
            p.requires_grad_(False)
        frozen = head_by_head_linear_cross_entropy(x, head_inputs, [w, w], labels, [1, 2], params=[*params, w])
    assert not frozen.loss.requires_grad and torch.allclose(frozen.loss, out.loss)


def test_skip_ignored_reads_every_heads_row_count_in_one_sync(monkeypatch):
    """Head by head with skip_ignored: the K row counts are read once (valid_target_counts) and each
    head's call gets its own, so K calls cost one host sync; results equal the all-heads op's."""
    torch.manual_seed(3)
    B, T, H, V, K = 2, 13, 8, 37, 3
    x = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    head_inputs, block_params = residual_heads(K, H, torch.float32)
    weights = [torch.randn(V, H, device=DEVICE, requires_grad=True) for _ in range(K)]
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[:, :5] = -100
    segment_ids = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    segment_ids[0, 9:] = 2
    args = (labels, [2, 3, 4], [1.0, 0.8, 0.64])
    wanted = [x, *block_params, *weights]
    counted, plans = [], []
    original_counts, original_apply = flce.valid_target_counts, flce.MultiHeadLinearCrossEntropyFunction.apply
    monkeypatch.setattr(flce, "valid_target_counts", lambda *a, **k: counted.append(original_counts(*a, **k)) or counted[-1])
    monkeypatch.setattr(flce.MultiHeadLinearCrossEntropyFunction, "apply",
                        lambda plan, *a: (plans.append(plan), original_apply(plan, *a))[1])
    ref = multi_head_linear_cross_entropy([f(x) for f in head_inputs], weights, *args, segment_ids=segment_ids)
    ref_grads = all_grads(ref.loss, wanted)
    plans.clear()
    out = head_by_head_linear_cross_entropy(x, head_inputs, weights, *args, params=[*block_params, *weights],
                                            segment_ids=segment_ids, skip_ignored=True)
    grads = all_grads(out.loss, wanted)
    assert counted == [ref.head_tokens.tolist()]  # one read, of every head's count
    assert [p.known_counts for p in plans] == [[c] for c in counted[0]] and all(p.skip_ignored for p in plans)
    assert_rel_close(out.loss, ref.loss, torch.float32, "loss")
    assert torch.equal(out.head_tokens, ref.head_tokens) and torch.equal(out.head_accuracy, ref.head_accuracy)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_rel_close(g, r, torch.float32, f"gradient {i}")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"shifts": [1]}, "shifts must have one entry per head"),
    ({"head_weights": [1.0, torch.tensor(0.5)]}, "head_weights must be 2 floats"),
    ({"bias": [None]}, "bias must have one entry per head"),
    ({"skip_ignored": True, "segment_ids": torch.zeros(1, 4, dtype=torch.long)}, "segment_ids must have the shape"),
])
def test_bad_arguments(kwargs, message):
    head_inputs, params = residual_heads(2, 4, torch.float32, device="cpu")
    w = torch.randn(9, 4)
    call = {"shifts": [1, 2], **kwargs}
    with pytest.raises(ValueError, match=message):
        head_by_head_linear_cross_entropy(torch.randn(1, 5, 4), head_inputs, [w, w], torch.zeros(1, 5, dtype=torch.long),
                                          call.pop("shifts"), params=params, **call)


@pytest.mark.parametrize("mode", ["heads", "joint"])
@pytest.mark.parametrize("shared_lm_head", [False, True])
def test_medusa_model_head_by_head_equals_all_heads(mode, shared_lm_head):
    """The model's two loss paths: same loss, metrics and every parameter's gradient."""
    results = []
    for head_by_head in (True, False):
        torch.manual_seed(0)
        backbone = tiny_backbone(vocab=97, seed=2).to(DEVICE)
        cfg = MedusaConfig(num_heads=3, num_layers=2, shared_lm_head=shared_lm_head, mode=mode,
                           head_by_head=head_by_head)
        model = MedusaModel.from_backbone(backbone, cfg).to(DEVICE)
        with torch.no_grad():
            for p in model.heads.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.train()
        input_ids = torch.randint(0, 97, (2, 23), device=DEVICE)
        labels = input_ids.clone()
        labels[:, :6] = -100
        with force_backend("torch"):
            out = model(input_ids, labels=labels)
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    assert_rel_close(a.loss, b.loss, torch.float32, "loss")
    assert torch.equal(a.head_tokens, b.head_tokens) and torch.equal(a.head_accuracy, b.head_accuracy)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    if mode == "joint":
        assert any(n.startswith("backbone.") and "layers" in n for n in grads_a)  # the backbone trains
    for name in grads_a:
        assert_rel_close(grads_a[name], grads_b[name], torch.float32, name)


@pytest.mark.gpu
def test_head_by_head_bf16_autocast_on_gpu():
    torch.manual_seed(0)
    B, T, H, V, K = 2, 256, 64, 1000, 3
    x = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head_inputs, params = residual_heads(K, H, torch.float32)
    weights = [torch.randn(V, H, device="cuda", requires_grad=True) for _ in range(K)]
    labels = torch.randint(0, V, (B, T), device="cuda")
    wanted = [x, *params, *weights]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = multi_head_linear_cross_entropy([f(x) for f in head_inputs], weights, labels, [2, 3, 4])
        ref_grads = all_grads(ref.loss, wanted)
        out = head_by_head_linear_cross_entropy(x, head_inputs, weights, labels, [2, 3, 4], params=params + weights)
        grads = all_grads(out.loss, wanted)
    assert_rel_close(out.loss, ref.loss, torch.bfloat16, "loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == r.dtype
        assert_rel_close(g, r, torch.bfloat16, f"gradient {i}")


@pytest.mark.parametrize("head_by_head", [True, False])
def test_the_heads_call_returns_tensors_fsdp_can_see(head_by_head):
    """FSDP2 hooks a unit's gradient reduction on the tensors its forward returns: a dataclass output
    hid them, and on 2 x H100 (NCCL) the heads' and backbone's gradients were lost (run 39)."""
    from torch.utils._pytree import tree_leaves

    model = MedusaModel.from_backbone(tiny_backbone(vocab=97).to(DEVICE),
                                      MedusaConfig(num_heads=2, mode="joint", head_by_head=head_by_head)).to(DEVICE)
    seen = []
    model.heads.register_forward_hook(lambda module, args, output: seen.append(output))
    with force_backend("torch"):
        out = model(torch.randint(0, 97, (1, 9), device=DEVICE))
    leaves = tree_leaves(seen[0])
    assert len(seen) == 1 and leaves and all(isinstance(t, torch.Tensor) for t in leaves)
    assert any(t is out.loss for t in leaves) and out.loss.requires_grad
