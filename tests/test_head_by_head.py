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
from medusa_liger.kernels import head_inputs as per_head
from medusa_liger.kernels.fused_linear_cross_entropy import reentrant_backward
from medusa_liger.kernels.reference import Teacher
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
    ({"weight": [torch.randn(9, 4)]}, "weight must have one entry per head \\(2\\), got 1"),
    ({"head_weights": [1.0]}, "head_weights must be 2 floats"),
    ({"teacher": [None]}, "teacher must have one entry per head \\(2\\), got 1"),
    ({"params": [torch.randn(4, 4), "w"]}, "params must be tensors"),
])
def test_bad_arguments(kwargs, message):
    head_inputs, params = residual_heads(2, 4, torch.float32, device="cpu")
    w = torch.randn(9, 4)
    call = {"shifts": [1, 2], "weight": [w, w], "params": params, **kwargs}
    with pytest.raises(ValueError, match=message):
        head_by_head_linear_cross_entropy(torch.randn(1, 5, 4), head_inputs, call.pop("weight"),
                                          torch.zeros(1, 5, dtype=torch.long), call.pop("shifts"), **call)


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


def test_earlier_heads_activations_are_freed_and_frozen_hidden_gets_no_gradient():
    """Head k's blocks' saved activations (not just its output) are gone when head k + 1 starts: the
    summed loss keeps no head's graph. A frozen hidden state is handed to the heads without a gradient."""
    H, K = 8, 3
    x = torch.randn(2, 5, H, device=DEVICE)
    blocks = [torch.nn.Linear(H, H, device=DEVICE) for _ in range(K)]
    alive: list[weakref.ref] = []
    hidden_grad: list[bool] = []

    def head(k):
        def run(h):
            gc.collect()
            assert all(ref() is None for ref in alive), f"an earlier head's activation is alive when head {k} starts"
            hidden_grad.append(h.requires_grad)
            a = blocks[k](h)  # saved by silu for backward
            alive.append(weakref.ref(a))
            return h + F.silu(a)
        return run

    weights = [torch.randn(11, H, device=DEVICE, requires_grad=True) for _ in range(K)]
    labels = torch.randint(0, 11, (2, 5), device=DEVICE)
    params = [p for b in blocks for p in b.parameters()] + weights
    with force_backend("torch"):
        out = head_by_head_linear_cross_entropy(x, [head(k) for k in range(K)], weights, labels, [1, 2, 3],
                                                params=params)
    out.loss.backward()
    assert len(alive) == K and hidden_grad == [False] * K and all(p.grad is not None for p in params)


@pytest.mark.parametrize("given_counts", [False, True])
def test_skip_ignored_with_another_ignore_index_and_given_counts(given_counts):
    """skip_ignored=True counts each head's rows with the caller's ignore_index; K counts given by the
    caller go one to each head. Both equal the all-heads op (fp64)."""
    torch.manual_seed(4)
    B, T, H, V, K = 2, 11, 6, 23, 3
    x = torch.randn(B, T, H, device=DEVICE, dtype=torch.float64, requires_grad=True)
    head_inputs, block_params = residual_heads(K, H, torch.float64)
    weights = [torch.randn(V, H, device=DEVICE, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[:, :2] = 5  # ignored (as is any other 5): the heads' counts differ
    args = (labels, [1, 3, 5], [1.0, 0.7, 0.4])
    options = {"ignore_index": 5, "accum_dtype": torch.float64}
    wanted = [x, *block_params, *weights]
    with force_backend("torch"):
        ref = multi_head_linear_cross_entropy([f(x) for f in head_inputs], weights, *args, **options)
        ref_grads = all_grads(ref.loss, wanted)
        skip = flce.valid_target_counts(labels, [1, 3, 5], V, ignore_index=5) if given_counts else True
        out = head_by_head_linear_cross_entropy(x, head_inputs, weights, *args, params=[*block_params, *weights],
                                                skip_ignored=skip, **options)
        grads = all_grads(out.loss, wanted)
    assert len(set(ref.head_tokens.tolist())) == K
    assert torch.equal(out.head_tokens, ref.head_tokens) and torch.equal(out.head_accuracy, ref.head_accuracy)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


# The per-head argument parsing both ops share (kernels/head_inputs.py).
def test_sources_keep_each_repeated_tensor_once():
    """A list that repeats a tensor (a projection shared by heads 0 and 2) gives it one source, so one
    gradient buffer and one accumulator; a stacked tensor gives head k its slice k."""
    a, b = torch.randn(5, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    srcs, heads = per_head.sources("weight", [a, b, a, b], 4, 2)
    assert len(srcs) == 2 and srcs[0] is a and srcs[1] is b
    assert heads == [(0, None), (1, None), (0, None), (1, None)]
    stacked = torch.randn(3, 5, 3, device=DEVICE)
    srcs, heads = per_head.sources("weight", stacked, 3, 2)
    assert len(srcs) == 1 and srcs[0] is stacked and heads == [(0, 0), (0, 1), (0, 2)]
    srcs, heads = per_head.sources("bias", a[0], 3, 1)  # one tensor shared by every head
    assert len(srcs) == 1 and srcs[0].shape == (3,) and heads == [(0, None)] * 3


def test_head_weights_checks():
    """Head weights: floats, one float tensor [K] or K one-element float tensors, all on the labels'
    device, in head order; an integer or misshapen tensor, a mix, or tensors elsewhere are refused."""
    dev = torch.empty(0, device=DEVICE).device  # "cuda:0", as labels.device reads
    hw = per_head.as_head_weights([torch.tensor(v, device=dev) for v in (1.0, 0.5, 0.25)], 3, dev)
    assert hw.tolist() == [1.0, 0.5, 0.25]
    assert per_head.as_head_weights([1.0, 0.5, 0.25], 3, dev).tolist() == [1.0, 0.5, 0.25]
    bad = [(torch.tensor([1, 2], device=DEVICE), "float tensor of shape \\[2\\]"),
           (torch.ones(2, 1, device=DEVICE), "float tensor of shape \\[2\\]"),
           ([torch.tensor(1.0, device=DEVICE), 0.5], "not a mix"),
           ([torch.tensor(1.0, device=DEVICE), torch.tensor([0.5, 0.5], device=DEVICE)], "not a mix"),
           ([torch.tensor(1.0, device="meta"), torch.tensor(0.5, device="meta")], "head_weights tensors must be on")]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            per_head.as_head_weights(value, 2, dev)


def test_shifts_may_be_a_cpu_integer_tensor():
    # A tensor of shifts was refused with "shifts must be ints >= 0, got [tensor(2), tensor(3)]".
    assert per_head.check_shifts(torch.tensor([2, 3])) == [2, 3]
    with pytest.raises(ValueError, match="shifts must be ints >= 0"):
        per_head.check_shifts(torch.tensor([2.0, 3.5]))
    with pytest.raises(ValueError, match="shifts must be a non-empty list .* got a tensor of shape \\[\\]"):
        per_head.check_shifts(torch.tensor(2))  # (a TypeError: iteration over a 0-d tensor)
    if torch.cuda.is_available():  # reading them would synchronize the host with the device
        with pytest.raises(ValueError, match="shifts must be ints on the host .* got a tensor on cuda"):
            per_head.check_shifts(torch.tensor([2, 3], device="cuda"))


def test_shift_zero_and_its_teacher_offset_zero_are_allowed():
    """A shift of 0 (labels already aligned) is a valid head, and its teacher may read offset 0 (the
    only offset in [0, max(shift, 1))); offset 1 is refused there."""
    assert per_head.check_shifts((0, 2)) == [0, 2] and per_head.check_shifts(range(3)) == [0, 1, 2]
    h, w = torch.randn(1, 4, 3, device=DEVICE), torch.randn(7, 3, device=DEVICE)
    (checked,) = per_head.check_teacher([(h, w)], [0], (1, 4, 3), (7, 3), h.device, 0.0)
    assert checked.offset == 0 and checked.hidden.shape == h.shape
    with pytest.raises(ValueError, match="teacher\\[0\\] offset must be an int in \\[0, shift = 0\\)"):
        per_head.check_teacher([Teacher(h, w, offset=1)], [0], (1, 4, 3), (7, 3), h.device, 0.0)


def test_teacher_z_loss_refused_only_at_another_temperature():
    h, w = torch.randn(1, 4, 3, device=DEVICE), torch.randn(7, 3, device=DEVICE)
    (checked,) = per_head.check_teacher([Teacher(h, w)], [1], (1, 4, 3), (7, 3), h.device, 0.0, z_loss=1e-3)
    assert checked.temperature == 1.0
    (checked,) = per_head.check_teacher([Teacher(h, w, temperature=2)], [1], (1, 4, 3), (7, 3), h.device, 0.0)
    assert checked.temperature == 2.0
    with pytest.raises(ValueError, match="z_loss must be 0 with a teacher temperature other than 1"):
        per_head.check_teacher([Teacher(h, w, temperature=2)], [1], (1, 4, 3), (7, 3), h.device, 0.0, z_loss=1e-3)


def test_a_frozen_head_beside_trainable_ones():
    """Heads mode: the frozen backbone's own lm_head (identity input, frozen weight, frozen hidden) is
    head 0, whose loss has no graph while the next heads' do; it adds to the loss and takes no
    gradient. Same loss, metrics and gradients as the all-heads op (fp64)."""
    torch.manual_seed(5)
    B, T, H, V = 2, 9, 5, 17
    x = torch.randn(B, T, H, device=DEVICE, dtype=torch.float64)
    blocks, block_params = residual_heads(2, H, torch.float64)
    lm_head = torch.randn(V, H, device=DEVICE, dtype=torch.float64)
    heads = torch.randn(V, H, device=DEVICE, dtype=torch.float64, requires_grad=True)
    head_inputs, weights = [lambda h: h, *blocks], [lm_head, heads, heads]
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    args = (labels, [1, 2, 3], [1.0, 0.5, 0.25])
    wanted = [*block_params, heads]
    with force_backend("torch"):
        ref = multi_head_linear_cross_entropy([f(x) for f in head_inputs], weights, *args, accum_dtype=torch.float64)
        out = head_by_head_linear_cross_entropy(x, head_inputs, weights, *args, params=[*block_params, lm_head, heads],
                                                accum_dtype=torch.float64)
        ref_grads, grads = all_grads(ref.loss, wanted), all_grads(out.loss, wanted)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.head_losses, ref.head_losses, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.head_tokens, ref.head_tokens) and torch.equal(out.head_accuracy, ref.head_accuracy)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
