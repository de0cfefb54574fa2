"""Second-order gradients through the kernels' autograd Functions: a clear error, never wrong numbers.

Each op's backward runs a kernel (or hands back gradients computed in forward), so its gradients are
no differentiable function of its inputs: a backward pass with ``create_graph=True`` (a gradient
penalty, MAML) must raise, naming the op. ``@once_differentiable`` only marked the gradients when the
incoming gradient required grad, and a loss's incoming gradient (1) does not: they came back as
constants, so a penalty with a differentiable part beside them silently lost the op's second-order
terms, and ``cross_entropy`` handed back its saved logits with their forward history, which autograd
then differentiated (wrong numbers on the Triton path).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medusa_liger.kernels import cross_entropy, head_by_head_linear_cross_entropy, multi_head_linear_cross_entropy
from medusa_liger.kernels.rms_norm import rms_norm
from medusa_liger.kernels.rope import apply_rotary_pos_emb
from medusa_liger.kernels.swiglu import swiglu
from medusa_liger.kernels.utils import force_backend
from tests.utils import DEVICE

BACKENDS = ["triton", "torch"]
PLAIN_ON_TORCH = ("rms_norm", "rope", "swiglu")  # their PyTorch path is plain ops, no autograd Function


def _ops():
    """name -> (function of w returning a scalar loss, the same loss in plain PyTorch)."""
    x = torch.randn(4, 6, 8, device=DEVICE)
    labels = torch.randint(0, 11, (4, 6), device=DEVICE)
    h = torch.randn(5, 8, device=DEVICE)
    y = torch.randint(0, 11, (5,), device=DEVICE)
    cos, sin = torch.randn(4, 6, 8, device=DEVICE), torch.randn(4, 6, 8, device=DEVICE)

    def rope(w, fn):
        q = (x @ w).reshape(4, 1, 6, 8)
        out_q, out_k = fn(q, q.clone(), cos, sin)
        return out_q.square().sum() + out_k.sum()

    def rope_ref(q, k, c, s):
        half = lambda t: torch.cat((-t[..., 4:], t[..., :4]), dim=-1)  # noqa: E731
        c, s = c.unsqueeze(1), s.unsqueeze(1)
        return q * c + half(q) * s, k * c + half(k) * s

    return {
        "rms_norm": (lambda w: rms_norm(x @ w, torch.ones(8, device=DEVICE)).square().sum(),
                     lambda w: ((x @ w) * torch.rsqrt((x @ w).square().mean(-1, keepdim=True) + 1e-6)).square().sum()),
        "rope": (lambda w: rope(w, apply_rotary_pos_emb), lambda w: rope(w, rope_ref)),
        "swiglu": (lambda w: swiglu(x @ w, (x @ w).cos()).square().sum(),
                   lambda w: (F.silu(x @ w) * (x @ w).cos()).square().sum()),
        "cross_entropy": (lambda w: cross_entropy(h @ w, y), lambda w: F.cross_entropy(h @ w, y)),
        "multi_head_linear_cross_entropy": (
            lambda w: multi_head_linear_cross_entropy(x, w.t(), labels, [1, 2]).loss,
            lambda w: sum(F.cross_entropy((x[:, :-s] @ w).reshape(-1, 11), labels[:, s:].reshape(-1)) for s in (1, 2))),
        "head_by_head_linear_cross_entropy": (
            lambda w: head_by_head_linear_cross_entropy(x, [lambda t: t] * 2, [w.t()] * 2, labels, [1, 2],
                                                        params=[w]).loss,
            lambda w: sum(F.cross_entropy((x[:, :-s] @ w).reshape(-1, 11), labels[:, s:].reshape(-1)) for s in (1, 2))),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(_ops()))
def test_create_graph_raises_naming_the_op_and_first_order_stays_right(op, backend):
    loss_fn, reference_fn = _ops()[op]
    w = torch.randn(8, 11 if "cross_entropy" in op else 8, device=DEVICE, requires_grad=True)
    (expected,) = torch.autograd.grad(reference_fn(w), w)
    with force_backend(backend):
        if backend == "torch" and op in PLAIN_ON_TORCH:  # differentiable PyTorch ops: the right Hessian terms
            (g,) = torch.autograd.grad(loss_fn(w), w, create_graph=True)
            (ref,) = torch.autograd.grad(reference_fn(w), w, create_graph=True)
            second, expected_second = (torch.autograd.grad(t.square().sum(), w)[0] for t in (g, ref))
            torch.testing.assert_close(second, expected_second, rtol=1e-4, atol=1e-4)
        else:
            for loss in (loss_fn(w), loss_fn(w) + w.pow(3).sum()):  # alone, and beside a differentiable term
                with pytest.raises(RuntimeError, match=f"{op} has no second derivative"):
                    torch.autograd.grad(loss, w, create_graph=True)
        (g,) = torch.autograd.grad(loss_fn(w), w)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_compiled_callers_get_the_same_first_order_gradients(compiler):
    # The check reads grad mode inside backward: it must not fire while torch.compile traces the backward.
    x = torch.randn(2, 1, 64, 128, device="cuda", requires_grad=True)
    w = torch.rand(128, device="cuda", requires_grad=True)
    cos, sin = torch.randn(2, 64, 128, device="cuda"), torch.randn(2, 64, 128, device="cuda")
    labels = torch.randint(0, 128, (128,), device="cuda")

    def f(x):
        q, k = apply_rotary_pos_emb(x * 2, x.cos(), cos, sin)
        y = swiglu(rms_norm(q, w), k)
        return cross_entropy(y.reshape(128, 128), labels) + y.square().mean()

    with force_backend("triton"):
        want = torch.autograd.grad(f(x), (x, w))
        torch._dynamo.reset()
        got = torch.autograd.grad(torch.compile(f, backend=compiler)(x), (x, w))
    for g, expected in zip(got, want):
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)
