"""Seeded randomized differential tests of every kernel's public function over random INPUT LAYOUTS.

Each case draws shapes, options and, for every tensor argument, a memory layout: contiguous, a
transposed-storage view, a row-strided slice of a wider tensor, a column-strided (step 2) slice, rows
expand()ed from one row (stride 0, overlapping rows), or one element expanded to the whole shape
(plus [B, T, n, D] vs [B, n, T, D] storage for RoPE, gate/up as halves of one fused tensor for
SwiGLU, and a non-contiguous grad_output). The tensor a layout views is the autograd leaf, so the
gradients checked are those that reach the storage (summed over expanded rows). Every result is
compared with a float64 reference (HF's LlamaRMSNorm / apply_rotary_pos_emb, F.silu,
F.cross_entropy, ``multi_head_linear_cross_entropy_reference``) run on the same (rounded) inputs;
forward outputs and EVERY gradient (inputs, weights, bias) are checked, inputs must stay unmodified
(except the documented in-place cases) and nothing may be NaN.

On CPU the "small" cases run fp32 through the Triton interpreter and the torch path, a few seeds.
The ``gpu`` cases run model-like sizes (H up to 4096, V up to 128256, ~1024 rows) in fp32/fp16/bf16
over many seeds (conftest skips them without CUDA).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_rope

from medusa_liger.kernels import (
    Teacher,
    cross_entropy,
    force_backend,
    head_by_head_linear_cross_entropy,
    multi_head_linear_cross_entropy,
    multi_head_linear_cross_entropy_reference,
)
from medusa_liger.kernels.rms_norm import rms_norm
from medusa_liger.kernels.rope import apply_rotary_pos_emb
from medusa_liger.kernels.scale import scale_
from medusa_liger.kernels.swiglu import swiglu
from tests.flce_helpers import _compare
from tests.test_cross_entropy import reference as ce_reference
from tests.utils import (
    DEVICE,
    HAS_CUDA,
    REL_NORM_TOLERANCES,
    TOLERANCES,
    assert_close,
    rel_norm_error,
)

BACKENDS = ["triton", "torch"]
SMALL = [pytest.param(seed, torch.float32, False, backend, id=f"cpu-{backend}-{seed}")
         for seed in range(6) for backend in BACKENDS]
LARGE = [pytest.param(seed, dtype, True, "triton", marks=pytest.mark.gpu, id=f"gpu-{str(dtype)[6:]}-{seed}")
         for seed in range(16) for dtype in (torch.float32, torch.float16, torch.bfloat16)]
CASES = pytest.mark.parametrize(("seed", "dtype", "large", "backend"), SMALL + LARGE)


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """The large cases' fp64 references reserve tens of GiB in this worker's caching allocator;
    hand them back after each case, since the suite's other workers share the GPU."""
    yield
    if HAS_CUDA:
        torch.cuda.empty_cache()
ANY = ("contiguous", "transposed", "row_slice", "col_step", "expand_rows", "expand_one")


class Arg:
    """A leaf tensor (the storage) and the view of it the op receives; a float64 twin for the reference."""

    def __init__(self, rng: random.Random, shape, dtype, kinds=ANY, scale=1.0, grad=True, clone=False, seed=None):
        shape, n = tuple(shape), len(shape)
        kinds = [k for k in kinds if n >= 2 or k not in ("transposed", "expand_rows", "perm12")]
        # seed given: the layout cycles with the seed (every layout covered by a few seeds)
        self.kind = kind = rng.choice(kinds) if seed is None else kinds[seed % len(kinds)]
        C = shape[-1]

        def rand(*s):
            return torch.randn(*s, device=DEVICE, dtype=torch.float64).mul(scale).to(dtype)

        if kind == "contiguous":
            leaf, self.fn = rand(*shape), lambda t: t
        elif kind == "transposed":  # storage [..., C, R]
            leaf, self.fn = rand(*shape[:-2], C, shape[-2]), lambda t: t.transpose(-1, -2)
        elif kind == "perm12":  # [B, n, T, D] <-> [B, T, n, D] storage
            leaf, self.fn = rand(shape[0], shape[2], shape[1], *shape[3:]), lambda t: t.transpose(1, 2)
        elif kind == "row_slice":  # rows of a wider tensor
            leaf, self.fn = rand(*shape[:-1], C + 3), lambda t: t[..., 1:C + 1]
        elif kind == "col_step":
            leaf, self.fn = rand(*shape[:-1], 2 * C), lambda t: t[..., ::2]
        elif kind == "expand_rows":  # every row the same memory
            leaf, self.fn = rand(*[1] * (n - 1), C), lambda t: t.expand(shape)
        else:  # expand_one: one element of storage
            leaf, self.fn = rand(*[1] * n), lambda t: t.expand(shape)
        self.leaf = leaf.requires_grad_(grad)
        self.before = leaf.detach().clone()
        self.ref_leaf = leaf.detach().double().requires_grad_(grad)
        self.clone = clone  # the op may write into its input (inplace_backward): give it a clone
        self._x = self._ref = None

    def x(self):
        """The op's input (made once; its gradient is kept to check it before autograd sums it)."""
        if self._x is None:
            self._x = self.fn(self.leaf.clone() if self.clone else self.leaf)
            if self._x.requires_grad:
                self._x.retain_grad()
        return self._x

    def ref(self):
        if self._ref is None:
            self._ref = self.fn(self.ref_leaf)
            if self._ref.requires_grad:
                self._ref.retain_grad()
        return self._ref

    def check_grad(self, dtype, msg, tol=None, view=True):
        """The gradient of the view (what the kernel wrote) and of the leaf (summed over expanded
        elements, where it may cancel to ~0: compared absolutely, on the view gradient's scale)."""
        msg = f"{msg} ({self.kind})"
        tol = REL_NORM_TOLERANCES[dtype] if tol is None else tol
        floor = TOLERANCES[dtype][0] / tol * self.ref().numel() ** 0.5  # a ~0 (cancelling) gradient: atol each
        if view and self._x is not None and self._x.requires_grad:
            check_grad(self._x.grad, self._ref.grad, tol, msg + " of the view", scale=floor)
        if view and self.kind.startswith("expand") and dtype != torch.float32:
            return  # autograd's sum over identical rows amplifies their identical fp16/bf16 rounding
        view_norm = self._ref.grad.double().norm().item() if self._ref.grad is not None else 0.0
        check_grad(self.leaf.grad, self.ref_leaf.grad, tol, msg, scale=max(floor, view_norm))

    def check_unchanged(self, msg):
        assert torch.equal(self.leaf.detach(), self.before), f"{msg} ({self.kind}) was modified"


def check_grad(actual, expected, tol, msg, scale=0.0):
    """||actual - expected|| <= tol * max(||expected||, scale); NaN fails."""
    assert actual is not None, f"{msg}: no gradient"
    assert not torch.isnan(actual).any(), f"{msg}: NaN in gradient"
    diff = (actual.double() - expected.double()).norm().item()
    bound = tol * max(expected.double().norm().item(), scale)
    assert diff <= bound, f"{msg}: error {diff:.3e} > {bound:.3e} (relative {rel_norm_error(actual, expected):.2e})"


def grad_output(rng, shape, dtype):
    """A grad_output of ``shape`` in a random (non-contiguous) layout; a constant, not a leaf."""
    return Arg(rng, shape, dtype, ("contiguous", "transposed", "col_step", "expand_rows"), grad=False).x()


@CASES
def test_rms_norm(seed, dtype, large, backend):
    rng = random.Random(seed)
    H = rng.choice([1024, 2048, 4096, 4097]) if large else rng.choice([7, 64, 130])
    shape = (rng.randint(1, 3), rng.choice([1, 333, 1024]) if large else rng.randint(1, 9), H)
    x = Arg(rng, shape, dtype, seed=seed)
    w = Arg(rng, (H,), dtype, ("contiguous", "col_step", "row_slice", "expand_one"))
    offset, eps = rng.choice([0.0, 1.0]), rng.choice([1e-6, 1e-5])
    dy = grad_output(rng, shape, dtype)
    with force_backend(backend):
        y = rms_norm(x.x(), w.x(), eps, offset)
        y.backward(dy)
    ref = LlamaRMSNorm(H, eps=eps).to(DEVICE, torch.float64)
    del ref.weight
    ref.weight = w.ref() + offset  # HF's module with the drawn weight view (a tensor, not a Parameter)
    y_ref = ref(x.ref())
    y_ref.backward(dy.double())
    assert y.shape == shape and y.dtype == dtype
    assert_close(y, y_ref, dtype, "rms_norm y")
    x.check_grad(dtype, "dx")
    w.check_grad(dtype, "dweight")
    x.check_unchanged("x")
    w.check_unchanged("weight")


@CASES
def test_rope(seed, dtype, large, backend):
    rng = random.Random(seed)
    B, T = rng.randint(1, 2), rng.choice([1, 512, 2048]) if large else rng.randint(1, 7)
    D = rng.choice([64, 128]) if large else rng.choice([2, 8, 16])
    n_q = rng.choice([8, 32]) if large else rng.randint(1, 4)
    n_kv = rng.choice([1, 8, n_q]) if large else rng.randint(1, 3)
    unsqueeze_dim = rng.choice([1, 2])
    qk_kinds = ("contiguous", "perm12", "row_slice", "expand_rows", "expand_one")
    q, k = (Arg(rng, (B, n, T, D) if unsqueeze_dim == 1 else (B, T, n, D), dtype, qk_kinds, seed=None if i else seed)
            for i, n in enumerate((n_q, n_kv)))
    cos_shape = rng.choice([(B, T, D), (1, T, D), (T, D)])
    cs_kinds = ("contiguous", "row_slice", "col_step", "expand_rows", "transposed")
    cos, sin = (Arg(rng, cos_shape, dtype, cs_kinds, grad=False) for _ in range(2))  # different strides
    dq, dk = grad_output(rng, q.x().shape, dtype), grad_output(rng, k.x().shape, dtype)
    with force_backend(backend):
        q_out, k_out = apply_rotary_pos_emb(q.x(), k.x(), cos.x(), sin.x(), unsqueeze_dim=unsqueeze_dim)
        torch.autograd.backward((q_out, k_out), (dq, dk))
    c_ref, s_ref = cos.ref(), sin.ref()
    if c_ref.dim() == 2:
        c_ref, s_ref = c_ref[None], s_ref[None]
    q_ref, k_ref = hf_rope(q.ref(), k.ref(), c_ref, s_ref, unsqueeze_dim=unsqueeze_dim)
    torch.autograd.backward((q_ref, k_ref), (dq.double(), dk.double()))
    assert q_out.shape == q_ref.shape and k_out.shape == k_ref.shape and q_out.dtype == dtype
    assert_close(q_out, q_ref, dtype, "q_embed")
    assert_close(k_out, k_ref, dtype, "k_embed")
    for a, name in ((q, "dq"), (k, "dk")):
        a.check_grad(dtype, name)
        a.check_unchanged(name)
    for a, name in ((cos, "cos"), (sin, "sin")):
        a.check_unchanged(name)


@CASES
def test_swiglu(seed, dtype, large, backend):
    rng = random.Random(seed)
    inplace = rng.random() < 0.5
    I = rng.choice([8192, 14336, 4097]) if large else rng.choice([5, 64, 300])
    shape = (rng.randint(1, 2), rng.choice([1, 256, 1024]) if large else rng.randint(1, 6), I)
    dc = grad_output(rng, shape, dtype)
    if rng.random() < 0.4:  # gate and up: halves of one fused [.., 2I] projection (one leaf)
        fused = Arg(rng, (*shape[:-1], 2 * I), dtype, ("contiguous", "row_slice", "expand_rows"), clone=inplace)
        gate_up, ref_gate_up, args = fused.x().chunk(2, -1), fused.ref().chunk(2, -1), [fused]
    else:
        g, u = Arg(rng, shape, dtype, clone=inplace, seed=seed), Arg(rng, shape, dtype, clone=inplace)
        gate_up, ref_gate_up, args = (g.x(), u.x()), (g.ref(), u.ref()), [g, u]
    with force_backend(backend):
        c = swiglu(*gate_up, inplace_backward=inplace)
        c.backward(dc)
    c_ref = F.silu(ref_gate_up[0]) * ref_gate_up[1]
    c_ref.backward(dc.double())
    assert c.shape == shape and c.dtype == dtype
    assert_close(c, c_ref, dtype, "swiglu")
    for i, a in enumerate(args):
        a.check_grad(dtype, f"grad {i}")
        a.check_unchanged(f"input {i}")  # inplace_backward writes only into the clones


@CASES
def test_cross_entropy(seed, dtype, large, backend):
    rng = random.Random(seed)
    N = rng.choice([1, 511, 1024]) if large else rng.randint(1, 9)  # (fp64 references: ~1 GiB a copy at V=128256)
    V = rng.choice([32000, 50257, 128256]) if large else rng.choice([5, 123, 1100])
    logits = Arg(rng, (N, V), dtype, scale=3.0, seed=seed)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.rand(N, device=DEVICE) < 0.3] = -100
    opts = {"label_smoothing": rng.choice([0.0, 0.1]), "z_loss": rng.choice([0.0, 1e-3]),
            "softcap": rng.choice([None, 4.0]), "reduction": rng.choice(["mean", "sum", "none"])}
    g = torch.tensor(1.5, device=DEVICE) if opts["reduction"] != "none" else grad_output(rng, (N,), torch.float32)
    with force_backend(backend):
        loss, lse = cross_entropy(logits.x(), labels, return_lse=True, **opts)
        loss.backward(g)  # overwrites the logits' storage with its gradient where it can (documented)
    loss_ref, lse_ref = ce_reference(logits.ref(), labels, **opts)
    loss_ref.backward(g.double())
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(lse, lse_ref.detach(), torch.float32, "lse")
    check_grad(loss, loss_ref.detach(), REL_NORM_TOLERANCES[dtype], "loss")
    logits.check_grad(dtype, "dlogits")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_(seed, backend):
    rng = random.Random(seed)
    for dtype in [torch.float32] + ([torch.float16, torch.bfloat16] if HAS_CUDA else []):
        shape = rng.choice([(5,), (3, 7), (2, 3, 1100), (4097,)])
        kinds = ("contiguous", "transposed", "row_slice", "col_step")  # no expand: in-place on shared memory
        x = Arg(rng, shape, dtype, kinds, grad=False, seed=seed)
        base = torch.randn(4, device=DEVICE).to(rng.choice([torch.float32, dtype]))
        base[1] = rng.choice([1.0, 0.5, -3.0])
        factor = rng.choice([base[1:2], base[1], base[1:2].view(1, 1), base[1:2].expand(1)])
        view = x.x()
        with force_backend(backend):
            out = scale_(view, factor)
        assert out is view
        expected = x.before.double() * factor.double().item()
        assert_close(x.fn(x.leaf), x.fn(expected), dtype, "scale_")
        mask = torch.ones_like(x.before, dtype=torch.bool)
        x.fn(mask).fill_(False)  # True: storage outside the view
        assert torch.equal(x.leaf[mask], x.before[mask]), "scale_ wrote outside its view"


def _loss_problem(rng, seed, dtype, large, by_head):
    K = rng.randint(1, 3 if large else 4)
    # Large: up to 1024 rows a head, so the fp64 reference's K logit matrices stay a few GiB beside
    # the other test processes sharing the GPU.
    B, T = (1, rng.choice([256, 1024])) if large else (rng.randint(1, 2), rng.choice([1, 6, 9]))
    if large:
        H, V = rng.choice([1024, 4096]), rng.choice([32000, 128256])
    else:
        H, V = rng.choice([8, 19]), rng.choice([5, 123, 700])
    hid_shape = (B, T, H) if by_head else rng.choice([(B, T, H), (K, B, T, H), "list"])
    w_shape = rng.choice([(V, H), (K, V, H), "list"])
    hs = 1.0 / H ** 0.5  # unit-variance logits
    if hid_shape == "list":
        hidden = [Arg(rng, (B, T, H), dtype, grad=rng.random() < 0.8) for _ in range(K)]
    else:
        hidden = Arg(rng, hid_shape, dtype, seed=seed)
    if w_shape == "list":  # may repeat one tensor (a shared lm_head)
        shared = Arg(rng, (V, H), dtype, scale=hs)
        weight = [shared if rng.random() < 0.5 else Arg(rng, (V, H), dtype, scale=hs) for _ in range(K)]
    else:
        weight = Arg(rng, w_shape, dtype, scale=hs, grad=rng.random() < 0.8)
    bias = rng.choice([None, (V,)] + ([] if by_head else [(K, V)]))
    bias = None if bias is None else Arg(rng, bias, dtype, ("contiguous", "col_step", "row_slice", "expand_rows",
                                                            "expand_one", "transposed"))
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[torch.rand(B, T, device=DEVICE) < 0.2] = -100
    shifts = [rng.choice([0, 1, 2, 3, T + 1]) for _ in range(K)]
    opts = {"label_smoothing": rng.choice([0.0, 0.1]), "z_loss": rng.choice([0.0, 1e-3]),
            "softcap": rng.choice([None, 30.0]), "reduction": rng.choice(["mean", "sum"])}
    if rng.random() < 0.5:
        opts["segment_ids"] = torch.cumsum((torch.rand(B, T, device=DEVICE) < 0.25).long(), dim=1)
    teachers = None
    if opts["label_smoothing"] == 0.0 and rng.random() < 0.5:
        teachers = []
        for s in shifts:
            if rng.random() < 0.5 or s == 0:
                teachers.append(None)
                continue
            th, tw = Arg(rng, (B, T, H), dtype, grad=False), Arg(rng, (V, H), dtype, scale=hs, grad=False)
            teachers.append((th, tw, rng.randint(0, s - 1), rng.choice([False, True]), rng.choice([None, 0.5])))
    head_weights = [0.8 ** k for k in range(K)] if rng.random() < 0.5 else None
    return hidden, weight, bias, labels, shifts, head_weights, opts, teachers


def _view(obj, ref):
    if obj is None:
        return None
    if isinstance(obj, list):
        return [a.ref() if ref else a.x() for a in obj]
    return obj.ref() if ref else obj.x()


def _teacher(teachers, ref):
    if teachers is None:
        return None
    return [None if t is None else Teacher(_view(t[0], ref), _view(t[1], ref), None, t[2], 1.0, t[3] and t[4] is None,
                                           t[4]) for t in teachers]


@CASES
def test_multi_head_linear_cross_entropy(seed, dtype, large, backend):
    rng = random.Random(seed)
    by_head = seed % 3 == 2  # heads that transform hidden first (here: the identity), one head at a time
    hidden, weight, bias, labels, shifts, head_weights, opts, teachers = _loss_problem(rng, seed, dtype, large, by_head)
    args = [a for x in (hidden, weight, bias) for a in (x if isinstance(x, list) else [x]) if a is not None]
    args = list({id(a): a for a in args}.values())
    K = len(shifts)
    with force_backend(backend):
        if by_head:
            ws = _view(weight, False)
            ws = ws if isinstance(ws, list) else list(ws.unbind(0)) if ws.dim() == 3 else [ws] * K
            bs = None if bias is None else [bias.x()] * K
            out = head_by_head_linear_cross_entropy(
                hidden.x(), [lambda x: x] * K, ws, labels, shifts, head_weights or [1.0] * K,
                params=[a.leaf for a in args if a.leaf.requires_grad], bias=bs, teacher=_teacher(teachers, False),
                **opts)
        else:
            out = multi_head_linear_cross_entropy(_view(hidden, False), _view(weight, False), labels, shifts,
                                                  head_weights, bias=_view(bias, False),
                                                  teacher=_teacher(teachers, False), **opts)
        out.loss.mul(1.5).backward()
    ref = multi_head_linear_cross_entropy_reference(_view(hidden, True), _view(weight, True), labels, shifts,
                                                    head_weights, bias=_view(bias, True), compute_dtype=torch.float64,
                                                    teacher=_teacher(teachers, True), **opts)
    ref.loss.mul(1.5).backward()
    assert out.head_losses.dtype == torch.float32
    tol = 2e-5 if not large else REL_NORM_TOLERANCES[dtype]
    _compare(out, [], ref, [], tol, acc_slack=max(1.5, 0.01 * labels.numel()))
    for i, a in enumerate(args):
        if a.leaf.requires_grad:
            a.check_grad(dtype, f"gradient {i}", tol, view=not by_head)  # by head: grads go to params
        a.check_unchanged(f"input {i}")
    for t in teachers or []:
        if t is not None:
            t[0].check_unchanged("teacher hidden")
            t[1].check_unchanged("teacher weight")
