"""Shared helpers of the fused linear cross-entropy tests: random problems, runs with gradients,
comparison with the reference and the tolerances per backend."""

from __future__ import annotations

import random

import torch

from tests.utils import DEVICE

TOL = {"torch": 1e-9, "triton": 2e-5}  # relative-norm error: fp64 path vs the fp32 Triton kernel


def _problem(seed: int, dtype=torch.float64, device=DEVICE):
    """A random multi-head problem: inputs (as leaves) and the keyword options."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    K = rng.randint(1, 6)
    B, T = rng.randint(1, 3), rng.choice([1, 6, 9, 13])
    H, V = rng.choice([8, 19]), rng.choice([5, 37, 123, 700])
    # A common direction c in every hidden state and a large row 0 along it make token 0 the
    # argmax of most rows; 40% of the labels are 0, so head_accuracy is far from 0 and 1.
    c = torch.randn(H, generator=g, dtype=torch.float64)

    def leaf(*shape, scale=1.0, grad=True):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        if shape[-1] == H and len(shape) >= 3 and shape[-2] == T:
            x += c
        elif shape[-1] == H:
            x[..., 0, :] = 4.0 * c / c.norm()
        return x.to(device, dtype).requires_grad_(grad)

    hidden_mode = rng.choice(["shared", "stacked", "list"])
    hidden = {"shared": lambda: leaf(B, T, H), "stacked": lambda: leaf(K, B, T, H),
              "list": lambda: [leaf(B, T, H, grad=rng.random() < 0.8) for _ in range(K)]}[hidden_mode]()
    weight_mode = rng.choice(["shared", "stacked", "list_repeat", "frozen"])
    if weight_mode == "shared":
        weight = leaf(V, H, scale=0.7)
    elif weight_mode == "stacked":
        weight = leaf(K, V, H, scale=0.7)
    elif weight_mode == "frozen":
        weight = leaf(V, H, scale=0.7, grad=False)
    else:  # a list where one tensor (say a backbone lm_head) serves several heads
        shared = leaf(V, H, scale=0.7)
        weight = [shared if rng.random() < 0.5 else leaf(V, H, scale=0.7) for _ in range(K)]
    bias = rng.choice([None, "shared", "stacked"])
    bias = None if bias is None else leaf(V) if bias == "shared" else leaf(K, V)

    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.4] = 0
    labels[torch.rand(B, T, generator=g) < 0.2] = -100
    segment_ids = None
    if rng.random() < 0.5:
        segment_ids = torch.cumsum((torch.rand(B, T, generator=g) < 0.25).long(), dim=1)
    options = dict(
        bias=bias,
        segment_ids=None if segment_ids is None else segment_ids.to(device),
        label_smoothing=rng.choice([0.0, 0.1]),
        z_loss=rng.choice([0.0, 1e-3]),
        softcap=rng.choice([None, 3.0]),
        reduction=rng.choice(["mean", "sum"]),
    )
    shifts = [rng.choice([0, 1, 2, 3, T + 1]) for _ in range(K)]  # T + 1: every target past the end
    head_weights = [0.8**k for k in range(K)] if rng.random() < 0.5 else None
    return hidden, weight, labels.to(device), shifts, head_weights, options


def _leaves(hidden, weight, bias):
    items = []
    for x in (hidden, weight, bias):
        for t in (x if isinstance(x, list) else [x]):
            if t is not None and t.requires_grad and all(t is not s for s in items):
                items.append(t)
    return items


def _run(fn, hidden, weight, labels, shifts, head_weights, options, **extra):
    leaves = _leaves(hidden, weight, options["bias"])
    for t in leaves:
        t.grad = None
    out = fn(hidden, weight, labels, shifts, head_weights, **options, **extra)
    if leaves:
        (out.loss * 1.5).backward()  # a grad_output != 1 checks the backward scale
    return out, [t.grad for t in leaves]


def _compare(out, grads, ref, ref_grads, tol, acc_slack=None):
    for name in ("loss", "head_losses"):
        a, e = getattr(out, name), getattr(ref, name)
        err = ((a.double() - e.double()).abs() / e.double().abs().clamp(min=1)).max().item()
        assert err <= tol, f"{name}: {a} vs {e}"
    assert torch.equal(out.head_tokens.cpu(), ref.head_tokens.cpu())
    # Accuracy may differ by one near-tied argmax per head on the fp32 path.
    diff = (out.head_accuracy.double() - ref.head_accuracy.double()).abs() * ref.head_tokens.double()
    slack = acc_slack if acc_slack is not None else 0.5 if tol < 1e-6 else 1.5
    assert (diff.cpu() <= slack).all(), f"{out.head_accuracy} vs {ref.head_accuracy}"
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g is not None and g.dtype == r.dtype, f"gradient {i}"
        if r.abs().max() == 0:
            assert torch.equal(g, torch.zeros_like(g)), f"gradient {i} should be zero"
        else:
            err = ((g.double() - r.double()).norm() / r.double().norm()).item()
            assert err <= tol, f"gradient {i}: relative error {err:.2e}"


def record_gemms(monkeypatch) -> list[tuple[tuple[int, ...], torch.dtype, bool]]:
    """(out shape, out dtype, accumulate) of every GEMM the fused loss's PyTorch path runs, in order."""
    from medusa_liger.kernels import fused_linear_cross_entropy as flce

    calls = []
    original = flce._mm_into

    def mm_into(out, a, b, accumulate, rows_per_call=None):
        calls.append((tuple(out.shape), out.dtype, accumulate))
        return original(out, a, b, accumulate, rows_per_call)

    monkeypatch.setattr(flce, "_mm_into", mm_into)
    return calls
