"""The fused loss's shifted-exponential chunk path (kernels/exp_operand.py) against the fp64 reference:
every gradient, accuracy, ignored and overflowing rows, and when the path is taken."""

from __future__ import annotations

import random

import pytest
import torch

from medusa_liger.kernels import exp_operand, force_backend, multi_head_linear_cross_entropy
from medusa_liger.kernels.reference import multi_head_linear_cross_entropy_reference as reference
from tests.flce_helpers import TOL, _compare, _run
from tests.utils import DEVICE, HAS_CUDA

# The path runs in the interpreter on CPU tensors (fp32) and on TMA GPUs in bf16; CPU tests need the first.
interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="fp32 problems take the row kernel on the GPU")
OPTIONS = dict(bias=None, segment_ids=None, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean")


@pytest.fixture
def taken(monkeypatch):
    """Counts the chunks that went through the path."""
    calls = []
    original = exp_operand.exp_operand_chunk

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(exp_operand, "exp_operand_chunk", counted)
    return calls


def _eligible_problem(seed: int, dtype=torch.float32, device=DEVICE, vocab: int | None = None,
                     smoothing: float | None = None, z_loss: float | None = None):
    """A random problem the path accepts: H and V multiples of 8, hard labels, no bias or softcap,
    random label smoothing and z-loss (``vocab``, ``smoothing``, ``z_loss``: these instead of random ones)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    K, B, T = rng.randint(1, 4), rng.randint(1, 3), rng.choice([7, 13, 21])
    H, V = rng.choice([8, 24]), rng.choice([40, 136, 264])
    V = vocab or V

    def leaf(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(grad)

    hidden = rng.choice([lambda: leaf(B, T, H), lambda: leaf(K, B, T, H),
                         lambda: [leaf(B, T, H, grad=rng.random() < 0.8) for _ in range(K)]])()
    weight = rng.choice([lambda: leaf(V, H, scale=0.7), lambda: leaf(K, V, H, scale=0.7),
                         lambda: leaf(V, H, scale=0.7, grad=False)])()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.2] = -100
    options = dict(OPTIONS, reduction=rng.choice(["mean", "sum"]), label_smoothing=rng.choice([0.0, 0.0, 0.1, 0.3]))
    if smoothing is not None:
        options["label_smoothing"] = smoothing
    if rng.random() < 0.5:
        options["segment_ids"] = torch.cumsum((torch.rand(B, T, generator=g) < 0.25).long(), dim=1).to(device)
    shifts = [rng.choice([0, 1, 2, 3, T + 1]) for _ in range(K)]
    head_weights = [0.8**k for k in range(K)] if rng.random() < 0.5 else None
    options["z_loss"] = rng.choice([0.0, 0.0, 1e-3, 0.2]) if z_loss is None else z_loss
    return hidden, weight, labels.to(device), shifts, head_weights, options


def _reference(hidden, weight, labels, shifts, head_weights, options):
    def f64(x):
        if isinstance(x, list):
            return [f64(t) for t in x]
        return x.detach().double().requires_grad_(x.requires_grad)

    return _run(reference, f64(hidden), f64(weight), labels, shifts, head_weights, options,
                compute_dtype=torch.float64)


@interpreter_only
@pytest.mark.parametrize("skip_ignored", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_matches_reference(seed, skip_ignored, taken):
    problem = _eligible_problem(seed)
    ref, ref_grads = _reference(*problem)
    with force_backend("triton"):
        out, grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=16, skip_ignored=skip_ignored)
    # (skip_ignored runs no chunk at all for heads without a valid target)
    assert taken or (skip_ignored and int(ref.head_tokens.sum()) == 0), "the exp-operand path was not taken"
    _compare(out, [g.double() for g in grads], ref, ref_grads, TOL["triton"])


def _planted(max_above_target: float, device=DEVICE, dtype=torch.float32):
    """One head, one row per case: logits of 0 except a chosen column. Row 0: another column
    ``max_above_target`` above the target's (the shift overflows past 88); row 1: the target column
    far above the rest (a confident row, P_t - 1 ~ -4e-5); row 2: an ordinary row."""
    H, V = 8, 40
    w = torch.zeros(V, H)
    w[: H] = torch.eye(H)
    h = torch.zeros(1, 3, H)
    h[0, 0, 1] = max_above_target  # logit max_above_target at column 1; the target (column 5) at 0
    h[0, 1, 2] = 14.0  # the target (column 2) at 14, the other 39 columns at 0
    h[0, 2] = torch.randn(H)
    labels = torch.tensor([[5, 2, 7]])
    return h.to(device, dtype).requires_grad_(), w.to(device, dtype).requires_grad_(), labels.to(device)


@interpreter_only
@pytest.mark.parametrize("z_loss", [0.0, 0.05])
@pytest.mark.parametrize("max_above_target", [70.0, 120.0])
def test_overflowing_and_confident_rows(max_above_target, z_loss, taken):
    h, w, labels = _planted(max_above_target)
    options = dict(OPTIONS, z_loss=z_loss)
    ref, ref_grads = _reference(h, w, labels, [0], None, options)
    with force_backend("triton"):
        out, grads = _run(multi_head_linear_cross_entropy, h, w, labels, [0], None, options)
    assert taken
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    _compare(out, [g.double() for g in grads], ref, ref_grads, TOL["triton"])
    # The confident row's small gradient keeps its digits (no exp(x - lse) - 1 cancellation), checked
    # against plain fp64 autograd: P_t - 1 = -39 e^-14 / (1 + 39 e^-14) there.
    h64 = h.detach().double().requires_grad_()
    logits = (h64 @ w.detach().double().T)[0]
    loss = torch.nn.functional.cross_entropy(logits, labels[0]) + z_loss * logits.logsumexp(-1).square().mean()
    (loss * 1.5).backward()
    err = (grads[0][0, 1].double() - h64.grad[0, 1]).norm() / h64.grad[0, 1].norm()
    assert err < 1e-5, f"confident row: relative error {err:.2e}"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("lse_offset", [0.0, 1e-5, -1e-5, 0.5, -3.0])
def test_z_loss_where_it_cancels_the_softmax_gradient(lse_offset, smoothing, taken):
    """z-loss scales a row's probabilities' gradient by a = 1 + 2 z lse, which the path divides E_it
    by: rows with lse at and around -1 / (2 z) (a ~ 0: the row is rescaled instead) and past it
    (a < 0) stay finite and match fp64."""
    if HAS_CUDA and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs TMA (sm90+)")
    z, H, V = 0.5, 8, 40
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, H, generator=g) * 0.1
    w[:, 0] = 1.0  # h[..., 0] adds the same amount to every logit: it sets lse
    h = torch.randn(1, 4, H, generator=g) * 0.5
    with torch.no_grad():
        lse = (h @ w.T).logsumexp(-1)
        h[..., 0] += -1.0 / (2 * z) + lse_offset - lse  # lse = -1 / (2 z) + lse_offset
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32  # (bf16 rounding moves lse by ~1e-2)
    h, w = h.to(DEVICE, dtype).requires_grad_(), w.to(DEVICE, dtype).requires_grad_()
    labels = torch.tensor([[3, 17, 0, 39]], device=DEVICE)
    options = dict(OPTIONS, z_loss=z, label_smoothing=smoothing)
    ref, ref_grads = _reference(h, w, labels, [0], None, options)
    with force_backend("triton"):
        out, grads = _run(multi_head_linear_cross_entropy, h, w, labels, [0], None, options)
    assert taken
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    _compare(out, [g.double() for g in grads], ref, ref_grads, 3e-2 if HAS_CUDA else TOL["triton"])


@interpreter_only
def test_all_targets_ignored_give_zero(taken):
    h, w, labels, shifts, _, options = _eligible_problem(1)
    labels = torch.full_like(labels, -100)
    with force_backend("triton"):
        out, grads = _run(multi_head_linear_cross_entropy, h, w, labels, shifts, None, options, chunk_size=16)
    assert taken
    assert float(out.loss) == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@interpreter_only
def test_same_result_as_the_row_kernel_path(monkeypatch):
    problem = _eligible_problem(3)
    with force_backend("triton"):
        fast, fast_grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=16)
        monkeypatch.setattr(exp_operand, "ENABLED", False)
        rows, row_grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=16)
    torch.testing.assert_close(fast.loss, rows.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast.head_tokens, rows.head_tokens)
    for a, b in zip(fast_grads, row_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["ok", "smoothing", "disabled", "odd_vocab", "fp64", "bias", "softcap",
                                  "z_loss", "teacher"])
def test_eligibility(case, monkeypatch):
    if DEVICE.type == "cuda" and case in ("ok", "smoothing", "z_loss"):
        pytest.skip("fp32 on the GPU takes the row kernel (the path is bf16 there)")
    V = 37 if case == "odd_vocab" else 40
    dtype = torch.float64 if case == "fp64" else torch.float32
    buf, w = torch.empty(16, V, dtype=dtype, device=DEVICE), torch.empty(V, 8, dtype=dtype, device=DEVICE)
    if case == "disabled":
        monkeypatch.setattr(exp_operand, "ENABLED", False)
    options = dict(teacher=case == "teacher", bias=case == "bias", label_smoothing=0.1 if case == "smoothing" else 0.0,
                   z_loss=1e-3 if case == "z_loss" else 0.0, softcap=3.0 if case == "softcap" else None)
    with force_backend("triton"):
        assert exp_operand.eligible(buf, w, **options) == (case in ("ok", "smoothing", "z_loss"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0), reason="needs TMA (sm90+)")
@pytest.mark.parametrize("seed", range(3))
def test_gpu_bf16_matches_reference_and_the_row_kernel(seed, taken, monkeypatch):
    problem = _eligible_problem(seed, dtype=torch.bfloat16)
    ref, ref_grads = _reference(*problem)
    out, grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=16)
    assert taken
    _compare(out, [g.double() for g in grads], ref, ref_grads, 3e-2, acc_slack=0.1 * max(1, int(ref.head_tokens.max())))
    monkeypatch.setattr(exp_operand, "ENABLED", False)
    rows, row_grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=16)
    for i, (a, b) in enumerate(zip(grads, row_grads)):
        err = float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))  # 0 when both are 0
        assert err < 5e-2, f"gradient {i}: {err:.2e} from the row kernel's"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0), reason="needs TMA (sm90+)")
@pytest.mark.parametrize("z_loss", [0.0, 0.05])
@pytest.mark.parametrize("max_above_target", [70.0, 120.0])
def test_gpu_bf16_overflowing_rows(max_above_target, z_loss, taken):
    h, w, labels = _planted(max_above_target, dtype=torch.bfloat16)
    options = dict(OPTIONS, z_loss=z_loss)
    ref, ref_grads = _reference(h, w, labels, [0], None, options)
    out, grads = _run(multi_head_linear_cross_entropy, h, w, labels, [0], None, options)
    assert taken
    _compare(out, [g.double() for g in grads], ref, ref_grads, 3e-2)


@interpreter_only
def test_hidden_off_a_16_byte_boundary(taken):
    # A view one element into its storage cannot back a TMA descriptor: the path copies it.
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 2, 9, 8, 40
    base = torch.randn(1 + B * T * H, generator=g).requires_grad_()
    hidden = base[1:].view(B, T, H)
    weight = torch.randn(V, H, generator=g).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    ref, ref_grads = _reference(hidden.detach().clone().requires_grad_(), weight, labels, [1], None, OPTIONS)
    with force_backend("triton"):
        out = multi_head_linear_cross_entropy(hidden, weight, labels, [1], None)
        (out.loss * 1.5).backward()
    assert taken
    _compare(out, [base.grad[1:].view(B, T, H).double(), weight.grad.double()], ref, ref_grads, TOL["triton"])


# Every GEMM option the configuration table offers (kernels/exp_operand.GemmConfig), one change each.
CONFIG_CHANGES = [dict(logits=dict(subtile=True)), dict(logits=dict(warp_specialize=True, subtile=True)),
                  dict(dh=dict(warp_specialize=True)), dict(logits=dict(group=1), dh=dict(group=2)),
                  dict(dh=dict(cublas=True)), dict(dh=dict(cublas=False)),
                  dict(logits=dict(programs_per_sm=2), dh=dict(cublas=False, programs_per_sm=2)),
                  # The ping-pong Gluon logits GEMM: compiled for the GPU only (no interpreter).
                  pytest.param(dict(logits=dict(gluon=True, bn=128, stages=4)), marks=pytest.mark.gpu),
                  pytest.param(dict(logits=dict(gluon=True, bn=128, stages=2, group=1)), marks=pytest.mark.gpu)]


@pytest.mark.parametrize("change", CONFIG_CHANGES, ids=lambda c: str(c).replace(" ", ""))
def test_gemm_configurations(change, taken, monkeypatch):
    if HAS_CUDA and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs TMA (sm90+)")
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    base = exp_operand.GPU_TILES if HAS_CUDA else dict.fromkeys(("logits", "dh"), exp_operand.INTERPRETER_TILES)
    changed = {gemm: cfg._replace(**change.get(gemm, {})) for gemm, cfg in base.items()}
    if HAS_CUDA:
        monkeypatch.setattr(exp_operand, "GPU_TILES", changed)
    else:
        monkeypatch.setattr(exp_operand, "_tiles", lambda gemm, device: changed[gemm])
    # 4 heads, V = 264: a partial last tile. Without smoothing: its rank-1 term would send dh to cuBLAS.
    _check_on_the_path(_eligible_problem(11, dtype=dtype, smoothing=0.0), taken)


def _check_on_the_path(problem, taken):
    """The problem through the fused loss on the Triton backend: it takes the path and matches fp64."""
    ref, ref_grads = _reference(*problem)
    with force_backend("triton"):
        out, grads = _run(multi_head_linear_cross_entropy, *problem, chunk_size=16)
    assert taken
    tol = 3e-2 if HAS_CUDA else TOL["triton"]
    _compare(out, [g.double() for g in grads], ref, ref_grads, tol,
             **(dict(acc_slack=0.1 * max(1, int(ref.head_tokens.max()))) if HAS_CUDA else {}))


@pytest.mark.parametrize("column_tiles", [1, 3, 16])
def test_vocab_a_multiple_of_the_column_tile(column_tiles, taken):
    # The other tests' vocabularies end in a partial column tile. 16 tiles: the row-results kernel's
    # tile count is then a multiple of 16, which Triton 3.6 specializes on (V = 32768 on the GPU).
    if HAS_CUDA and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs TMA (sm90+)")
    tile = exp_operand._tiles("logits", DEVICE)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    _check_on_the_path(_eligible_problem(11, dtype=dtype, vocab=column_tiles * tile.bn), taken)


@interpreter_only
def test_cublas_logits_configuration_is_refused(monkeypatch):
    monkeypatch.setattr(exp_operand, "_tiles", lambda gemm, device: exp_operand.INTERPRETER_TILES._replace(cublas=True))
    with pytest.raises(ValueError, match="cublas"):
        exp_operand.exp_logits(torch.zeros(16, 8), torch.zeros(32, 8), torch.zeros(16, dtype=torch.int32),
                               torch.zeros(16), torch.zeros(16, 32), torch.zeros(16))


@interpreter_only
def test_subtiled_dh_configuration_is_refused(monkeypatch):
    # Only the logits epilogue has halves; a dh configuration asking for them must not be ignored.
    monkeypatch.setattr(exp_operand, "_tiles", lambda gemm, device: exp_operand.INTERPRETER_TILES._replace(subtile=True))
    with pytest.raises(ValueError, match="subtile"):
        exp_operand.row_scaled_gemm(torch.zeros(16, 32), torch.zeros(32, 8), torch.zeros(16), torch.zeros(16, 8), False)


@pytest.mark.parametrize("cublas", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_row_scaled_gemm_matches_torch(accumulate, cublas, monkeypatch):
    """dh (+)= r * (E @ W) over tile counts below, at, and between multiples of the program count, a
    partial last K step and partial last row and column tiles; the output's other rows are untouched."""
    if HAS_CUDA and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs TMA (sm90+)")
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    cfg = exp_operand._tiles("dh", DEVICE)._replace(cublas=cublas)
    monkeypatch.setattr(exp_operand, "_tiles", lambda gemm, device: cfg)
    programs = exp_operand.multiprocessors(torch.device(DEVICE))
    g = torch.Generator().manual_seed(0)
    K, N = 5 * cfg.bk - 8, 2 * cfg.bn - 8
    for row_tiles in (1, -(-programs // 2) + 1, programs // 2, 2 * programs // 2 + 1):
        M = row_tiles * cfg.bm - 3 if row_tiles > 1 else cfg.bm
        e = torch.rand(M, K, generator=g).to(DEVICE, dtype)
        w = torch.randn(K, N, generator=g).to(DEVICE, dtype)
        r = torch.rand(M, generator=g).to(DEVICE)
        base = torch.randn(M + 2, N, generator=g).to(DEVICE, dtype)
        out = base.clone()
        exp_operand.row_scaled_gemm(e, w, r, out[1:-1], accumulate)
        want = r[:, None].double() * (e.double() @ w.double()) + (base[1:-1].double() if accumulate else 0)
        tol = (3e-2 if cublas else 2e-2) if dtype == torch.bfloat16 else 1e-5  # cuBLAS: two roundings
        torch.testing.assert_close(out[1:-1].double(), want, rtol=tol, atol=tol * want.abs().max().item())
        assert torch.equal(out[0], base[0]) and torch.equal(out[-1], base[-1])


def test_gluon_gemm_refuses_what_it_cannot_run():
    """The ping-pong Gluon GEMM (opt-in) names what is wrong instead of failing inside the launch."""
    from medusa_liger.kernels import exp_operand_gluon

    if exp_operand_gluon.gluon is None:
        pytest.skip("this Triton has no Gluon")
    a, b, c = torch.zeros(8, 16), torch.zeros(4, 16), torch.zeros(8, 4)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        exp_operand_gluon.matmul(a, b, c)
    if HAS_CUDA:
        bf = dict(device="cuda", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="all be bf16 or all fp16"):
            exp_operand_gluon.matmul(a.cuda(), b.to(**bf), c.to(**bf))
        with pytest.raises(ValueError, match=r"expected a \[M, K\]"):
            exp_operand_gluon.matmul(a.to(**bf), b.to(**bf), torch.zeros(8, 5, **bf))


def _model_scale_problem(seed: int):
    """A random bf16 problem at model scale on the GPU: many 128 x 256 tiles in both directions,
    several chunks with a partial last one, real vocabulary sizes, every option the path takes."""
    rng = random.Random(seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    K, B, T = rng.randint(1, 3), rng.randint(1, 2), rng.randint(300, 1100)
    H, V = rng.choice([256, 512, 1024]), rng.choice([32000, 50304, 128256])

    def leaf(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).bfloat16().requires_grad_(grad)

    w_scale = rng.choice([1.0, 2.3, 5.0]) / H**0.5  # logit spreads from flat to confident
    hidden = rng.choice([lambda: leaf(B, T, H), lambda: leaf(K, B, T, H)])()
    weight = rng.choice([lambda: leaf(V, H, scale=w_scale), lambda: leaf(K, V, H, scale=w_scale),
                         lambda: leaf(V, H, scale=w_scale, grad=False)])()
    labels = torch.randint(0, V, (B, T), generator=g, device="cuda")
    labels[torch.rand(B, T, generator=g, device="cuda") < rng.choice([0.0, 0.2, 0.6])] = -100
    options = dict(OPTIONS, reduction=rng.choice(["mean", "sum"]), label_smoothing=rng.choice([0.0, 0.1]),
                   z_loss=rng.choice([0.0, 1e-4]))
    if rng.random() < 0.5:
        options["segment_ids"] = torch.cumsum(torch.rand(B, T, generator=g, device="cuda") < 0.01, dim=1)
    shifts = [k + rng.randint(0, 2) for k in range(K)]
    head_weights = [0.8**k for k in range(K)] if rng.random() < 0.5 else None
    extra = dict(chunk_size=rng.choice([None, 512, 1000]), accum_dtype=rng.choice([torch.float32, torch.bfloat16]))
    return (hidden, weight, labels, shifts, head_weights, options), extra


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0), reason="needs TMA (sm90+)")
@pytest.mark.parametrize("seed", range(8))
def test_gpu_bf16_model_scale_random_problems(seed, taken, monkeypatch):
    """The other GPU tests' problems fit in one or two tiles; these take the persistent GEMMs through
    several waves of tiles and chunks, and must agree with fp64 and with the row-kernel path."""
    problem, extra = _model_scale_problem(seed)
    ref, ref_grads = _reference(*problem)
    out, grads = _run(multi_head_linear_cross_entropy, *problem, **extra)
    assert taken
    _compare(out, [g.double() for g in grads], ref, ref_grads, 3e-2, acc_slack=0.02 * max(1, int(ref.head_tokens.max())))
    monkeypatch.setattr(exp_operand, "ENABLED", False)
    rows, row_grads = _run(multi_head_linear_cross_entropy, *problem, **extra)
    torch.testing.assert_close(out.loss.double(), rows.loss.double(), rtol=1e-2, atol=1e-4)
    for i, (a, b) in enumerate(zip(grads, row_grads)):
        err = float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
        assert err < 3e-2, f"gradient {i}: {err:.2e} from the row kernel's"
