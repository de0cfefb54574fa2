"""cross_entropy against torch.nn.functional.cross_entropy in float64 (plus z-loss and softcap).

Both backends run: the Triton kernel (through the interpreter on CPU) and the PyTorch fallback.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from medusa_liger.kernels.cross_entropy import ce_rows, cross_entropy, launch_config
from medusa_liger.kernels.utils import force_backend
from tests.utils import DEVICE, DTYPES, HAS_CUDA, VOCABS, assert_close

BACKENDS = ["triton", "torch"]
SHAPES = [(1, 5), (3, 123), (9, 1100)]  # 1100 > the interpreter's block: the online loop runs 3 blocks
OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 4.0},
    {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 2.5, "ignore_index": 7},
]


def reference(x, labels, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean"):
    """The definition in float64: F.cross_entropy on soft-capped logits plus z * lse^2 on valid rows."""
    y = x.double()
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    valid = labels != ignore_index
    rows = F.cross_entropy(y, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    lse = torch.logsumexp(y, -1)
    rows = torch.where(valid, rows + z_loss * lse.square(), torch.zeros_like(rows))
    if reduction == "mean":
        return rows.sum() / valid.sum().clamp(min=1), lse
    return (rows.sum() if reduction == "sum" else rows), lse


def _labels(N, V, ignore_index=-100):
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.rand(N, device=DEVICE) < 0.3] = ignore_index
    return labels


def _check(backend, N, V, dtype, reduction, options):
    x = (torch.randn(N, V, device=DEVICE) * 3).to(dtype)
    labels = _labels(N, V, options.get("ignore_index", -100))
    ref_x = x.double().requires_grad_()
    ref, ref_lse = reference(ref_x, labels, reduction=reduction, **options)
    grad_out = torch.randn_like(ref)
    (ref * grad_out).sum().backward()

    xx = x.clone().requires_grad_()
    with force_backend(backend):
        out, lse = cross_entropy(xx, labels, reduction=reduction, return_lse=True, **options)
        assert out.shape == ref.shape
        (out * grad_out.to(out.dtype)).sum().backward()
    assert_close(out, ref, torch.float32 if dtype == torch.float32 else dtype, "loss")
    assert_close(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")
    assert_close(xx.grad, ref_x.grad, dtype, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_options(backend, N, V, options):
    _check(backend, N, V, torch.float32, "mean", options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_and_dtypes(backend, reduction, dtype):
    if backend == "torch" and dtype != torch.float32 and not HAS_CUDA:
        pytest.skip("half precision runs on the GPU only")
    _check(backend, 5, 301, dtype, reduction, {"label_smoothing": 0.05, "z_loss": 1e-3})


@pytest.mark.parametrize("backend", [*BACKENDS, None])
def test_float64_exact_on_torch_path(backend):
    """backend None: the automatic choice, which gives float64 the PyTorch path (the kernel computes in fp32)."""
    x = torch.randn(4, 77, device=DEVICE, dtype=torch.float64)
    labels = _labels(4, 77)
    ref_x = x.clone().requires_grad_()
    ref, _ = reference(ref_x, labels, softcap=3.0)
    ref.backward()
    xx = x.clone().requires_grad_()
    with force_backend(backend):
        cross_entropy(xx, labels, softcap=3.0).backward()
    dtype = torch.float32 if backend == "triton" else torch.float64
    assert_close(xx.grad, ref_x.grad, dtype, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_op_that_saved_the_logits_raises_instead_of_reading_their_gradient(backend):
    """Backward writes the gradient over the logits; an op that saved them as its input (a z-loss by
    hand) and runs its backward later must get autograd's in-place error, on both paths, not gradients."""
    h = torch.randn(5, 3, device=DEVICE)
    w = torch.randn(11, 3, device=DEVICE, requires_grad=True)
    labels = _labels(5, 11)
    logits = h @ w.t()
    with force_backend(backend):
        # square saves its input; made first, its backward runs after cross_entropy's
        regularizer = 0.1 * logits.square().mean()
        loss = regularizer + cross_entropy(logits, labels)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_are_written_in_place_and_padding_untouched(backend):
    """Logits that are a view with padded rows: the gradient lands in place, padding stays NaN."""
    N, V = 6, 200
    buf = torch.full((N, V + 9), float("nan"), device=DEVICE)
    buf[:, :V] = torch.randn(N, V, device=DEVICE)
    labels = _labels(N, V)
    ref_x = buf[:, :V].clone().double().requires_grad_()
    reference(ref_x, labels)[0].backward()
    view = buf[:, :V].detach().requires_grad_()
    with force_backend(backend):
        cross_entropy(view, labels).backward()
    assert torch.isnan(buf[:, V:]).all()
    assert_close(buf[:, :V], ref_x.grad, torch.float32, "in-place gradient")
    assert_close(view.grad, ref_x.grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_not_nan(backend, reduction):
    x = torch.randn(4, 50, device=DEVICE, requires_grad=True)
    labels = torch.full((4,), -100, device=DEVICE)
    with force_backend(backend):
        out = cross_entropy(x, labels, reduction=reduction, z_loss=1e-2, label_smoothing=0.1)
        out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.skipif(HAS_CUDA, reason="CPU raises; the GPU behaviour is tested below")
def test_out_of_range_labels_raise_on_cpu():
    x = torch.randn(3, 10)
    for bad in (10, -3):
        with pytest.raises(ValueError, match="labels"):
            cross_entropy(x, torch.tensor([0, bad, 1]))


@pytest.mark.parametrize(("dtype", "V", "values"), [(torch.int16, 40000, [5, 20000, -100]),
                                                    (torch.int8, 300, [5, 100, -100]), (torch.uint8, 300, [5, 250, 0])])
def test_small_integer_labels_are_range_checked_in_int64(dtype, V, values):
    # Compared in their own dtype, vocab_size wrapped (40000 as int16 is negative): every label was
    # "outside [0, V)" on the CPU, in cross_entropy and the multi-head loss alike.
    from medusa_liger.kernels import multi_head_linear_cross_entropy

    x = torch.randn(3, V, dtype=torch.float64)
    labels = torch.tensor(values, dtype=dtype)
    with force_backend("torch"):
        loss = cross_entropy(x, labels)
        out = multi_head_linear_cross_entropy(torch.eye(3, dtype=torch.float64)[None], x.t(), labels[None], [0])
    expected = F.cross_entropy(x, labels.long())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(out.loss, expected)
    # A label past a smaller vocabulary is still refused, by its value.
    with pytest.raises(ValueError, match=rf"labels holds {values[1]}, outside \[0, {values[1]}\)"):
        cross_entropy(torch.randn(3, values[1]), labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_without_z_loss_give_the_loss_not_nan(backend):
    # The PyTorch path added z_loss * lse^2 at z_loss = 0: lse^2 overflows past |lse| ~ 1.8e19, and 0 * inf is NaN.
    x = torch.randn(6, 11, device=DEVICE) * 1e20
    labels = _labels(6, 11)
    with force_backend(backend):
        loss = cross_entropy(x, labels)
    torch.testing.assert_close(loss.double(), F.cross_entropy(x.double(), labels), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_are_ignored_rows_in_the_row_op(backend):
    """What the GPU does (no host check there): an out-of-range label is an ignored row."""
    N, V = 5, 30
    x = torch.randn(N, V, device=DEVICE)
    labels = torch.tensor([V + 5, 3, -7, 1, V], device=DEVICE)
    lse = torch.empty(N, device=DEVICE)
    loss = torch.full((N,), float("nan"), device=DEVICE)
    correct = torch.full((N,), -1, dtype=torch.int32, device=DEVICE)
    with force_backend(backend):
        ce_rows(x, labels, scale=torch.ones(1, device=DEVICE), lse=lse, loss=loss, correct=correct,
                write_grad=True)
    assert loss[0] == 0 and loss[2] == 0 and correct[0] == 0 and correct[2] == 0
    assert torch.equal(x[0], torch.zeros(V, device=DEVICE)) and torch.equal(x[2], torch.zeros(V, device=DEVICE))
    assert loss[4] == 0 and correct[4] == 0 and torch.equal(x[4], torch.zeros(V, device=DEVICE))  # label V
    assert (x[1].abs().sum() > 0) and loss[1] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 30.0}],
                         ids=["plain", "smoothing-zloss-softcap"])
@pytest.mark.parametrize("launches", ["one launch", "cross_entropy forward + backward"])
def test_confident_rows_keep_the_digits_of_their_target_gradient(backend, options, launches):
    """P_t within 1e-4 .. 1e-8 of 1: the gradient at the target, -(1 - P_t) for plain rows, must come
    from the other columns' mass, both with the two passes in one launch (as the fused multi-head loss
    runs them) and in cross_entropy's forward and backward (1 - P_t saved between them).
    exp(y_t - lse) - 1 loses it to lse's rounding (1e-2 .. 1 relative)."""
    N, V = 6, 1100  # three of the interpreter's blocks; the targets fall in any of them
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    x[torch.arange(N), labels] = torch.tensor([16.0, 18.0, 20.0, 22.0, 24.0, 17.0])
    x, labels = x.to(DEVICE), labels.to(DEVICE)
    ref_x = x.double().requires_grad_()
    ref, _ = reference(ref_x, labels, reduction="sum", **options)
    ref.backward()
    grad = x.clone()
    with force_backend(backend):
        if launches == "one launch":
            lse, loss = torch.empty(N, device=DEVICE), torch.empty(N, device=DEVICE)
            ce_rows(grad, labels, scale=torch.ones(1, device=DEVICE), lse=lse, loss=loss, write_grad=True,
                    **options)
        else:
            grad.requires_grad_()
            cross_entropy(grad, labels, reduction="sum", **options).backward()
            grad = grad.grad
    rows = torch.arange(N, device=DEVICE)
    expected = ref_x.grad[rows, labels]
    err = ((grad[rows, labels].double() - expected).abs() / expected.abs()).max().item()
    assert err < 1e-4, f"target-column gradient {err:.1e} relative off"


@pytest.mark.gpu
def test_gpu_out_of_range_labels_are_ignored():
    x = torch.randn(3, 40, device="cuda", requires_grad=True)
    out = cross_entropy(x, torch.tensor([1, 99, -5], device="cuda"), reduction="none")
    out.sum().backward()
    assert out[1] == 0 and out[2] == 0 and torch.equal(x.grad[1:], torch.zeros_like(x.grad[1:]))


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", list(VOCABS.values()), ids=list(VOCABS))
def test_gpu_real_vocab_bf16(vocab):
    x = torch.randn(64, vocab, device="cuda", dtype=torch.bfloat16)
    labels = _labels(64, vocab)
    ref_x = x.double().requires_grad_()
    ref, _ = reference(ref_x, labels, label_smoothing=0.1)
    ref.backward()
    xx = x.clone().requires_grad_()
    cross_entropy(xx, labels, label_smoothing=0.1).backward()
    assert_close(xx.grad, ref_x.grad, torch.bfloat16, "grad")


def test_bad_inputs():
    x = torch.randn(3, 10, device=DEVICE)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(x, torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(x, torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(x[0], torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(x, torch.zeros(3, dtype=torch.long, device=DEVICE), reduction="max")
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(x, torch.zeros(3, dtype=torch.long, device=DEVICE), label_smoothing=1.5)
    labels = torch.zeros(3, dtype=torch.long, device=DEVICE)
    for softcap in (0.0, float("inf"), float("nan")):  # inf * tanh(x / inf) would be NaN
        with pytest.raises(ValueError, match="softcap must be None or a finite number > 0"):
            cross_entropy(x, labels, softcap=softcap)
    for z_loss in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="z_loss must be a finite number >= 0"):
            cross_entropy(x, labels, z_loss=z_loss)
    with pytest.raises(ValueError, match=r"V >= 1"):
        cross_entropy(torch.randn(3, 0, device=DEVICE), torch.full((3,), -100, device=DEVICE))
    with pytest.raises(ValueError, match="labels must be a torch.Tensor, got list"):
        cross_entropy(x, [0, 1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_sharing_memory_get_their_own_gradients(backend):
    """Logits whose rows overlap in memory (one row expanded, row stride 0) cannot hold the
    in-place gradient: they are copied first, and each row gets its own gradient."""
    row = torch.randn(1, 7, device=DEVICE, requires_grad=True)
    labels = torch.tensor([0, 3, 6, -100], device=DEVICE)
    with force_backend(backend):
        loss = cross_entropy(row.expand(4, 7), labels)
        loss.backward()
    ref_row = row.detach().double().requires_grad_()
    ref, _ = reference(ref_row.expand(4, 7), labels)
    ref.backward()
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(row.grad, ref_row.grad, torch.float32, "grad")


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[-1]], ids=["plain", "all"])
def test_persistent_grid_strides_over_rows(monkeypatch, options):
    """PERSISTENT_PROGRAMS_PER_SM > 0: fewer programs than rows, each looping over rows, same results
    (on CPU the interpreter stands in 4 SMs, so 13 rows run on 4 programs)."""
    ce = importlib.import_module("medusa_liger.kernels.cross_entropy")  # the package re-exports the function
    monkeypatch.setattr(ce, "PERSISTENT_PROGRAMS_PER_SM", 1)
    _check("triton", 13, 123, torch.float32, "mean", options)


@pytest.mark.gpu
def test_gpu_persistent_grid_llama_vocab_bf16(monkeypatch):
    ce = importlib.import_module("medusa_liger.kernels.cross_entropy")  # the package re-exports the function
    monkeypatch.setattr(ce, "PERSISTENT_PROGRAMS_PER_SM", 2)
    _check("triton", 700, 128256, torch.bfloat16, "mean", {"label_smoothing": 0.1})


def _one_launch_rows(N, V, dtype, options, seed=0):
    """ce_rows as the fused loss runs it (both passes in one launch): (loss, lse, correct, gradient)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g) * 3).to(DEVICE, dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    loss, lse = torch.empty(N, device=DEVICE), torch.empty(N, device=DEVICE)
    correct = torch.empty(N, dtype=torch.int32, device=DEVICE)
    scale = torch.full((1,), 0.5, device=DEVICE)
    ce_rows(z, labels, scale=scale, lse=lse, loss=loss, correct=correct, compute_lse=True, write_grad=True, **options)
    return loss, lse, correct, z


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[-1]], ids=["plain", "all"])
def test_l2_hints_change_nothing_but_caching(monkeypatch, options):
    """L2_HINTS (evict-last / evict-first loads and stores, the default) gives the results of plain
    loads and stores, bit for bit."""
    ce = importlib.import_module("medusa_liger.kernels.cross_entropy")
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    N, V = (700, 128256) if HAS_CUDA else (13, 1100)
    with force_backend("triton"):
        monkeypatch.setattr(ce, "L2_HINTS", False)
        want = _one_launch_rows(N, V, dtype, options)
        monkeypatch.setattr(ce, "L2_HINTS", True)
        got = _one_launch_rows(N, V, dtype, options)
    for name, a, b in zip(("loss", "lse", "correct", "gradient"), got, want):
        assert torch.equal(a, b), name


def _neg_inf_logits(pattern, N=4, V=1100):
    """Logits with -inf entries and labels that never target one (so the loss stays finite)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(600, V, (N,), generator=g)
    if pattern == "leading_block":  # the whole first block (512 columns in the interpreter) is -inf
        x[:, :600] = float("-inf")
    elif pattern == "scattered":
        x[torch.rand(N, V, generator=g) < 0.3] = float("-inf")
    else:  # "all_but_target": one finite logit per row, the target's (loss 0, gradient 0)
        x.fill_(float("-inf"))
        x[torch.arange(N), labels] = torch.randn(N, generator=g, dtype=torch.float64)
    x[torch.arange(N), labels] = x[torch.arange(N), labels].nan_to_num(neginf=0.5)
    labels[-1] = -100  # an ignored row (its column 0 may be -inf: still loss 0, gradient 0)
    return x.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["leading_block", "scattered", "all_but_target"])
@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-2, "softcap": 4.0}], ids=["plain", "zloss-softcap"])
def test_neg_inf_logits_match_torch(backend, pattern, options):
    """-inf logits (a masked or padded vocabulary) get probability 0 and gradient 0, never NaN."""
    x, labels = _neg_inf_logits(pattern)
    ref_x = x.clone().requires_grad_()
    ref, ref_lse = reference(ref_x, labels, reduction="none", **options)
    ref.sum().backward()
    xx = x.float().requires_grad_()
    with force_backend(backend):
        out, lse = cross_entropy(xx, labels, reduction="none", return_lse=True, **options)
        out.sum().backward()
    assert_close(out, ref, torch.float32, "loss")
    assert_close(lse[:-1], ref_lse[:-1], torch.float32, "lse")
    assert_close(xx.grad, ref_x.grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits_with_label_smoothing_match_torch(backend):
    """With label_smoothing, mean_j y_j = -inf makes the loss +inf, as F.cross_entropy gives; the
    gradient stays finite and equal to F.cross_entropy's (-eps / V at the -inf logits)."""
    x, labels = _neg_inf_logits("leading_block")
    ref_x = x.clone().requires_grad_()
    ref, _ = reference(ref_x, labels, reduction="none", label_smoothing=0.1)
    ref.sum().backward()
    assert torch.isinf(ref[:-1]).all()
    xx = x.float().requires_grad_()
    with force_backend(backend):
        out = cross_entropy(xx, labels, reduction="none", label_smoothing=0.1)
        out.sum().backward()
    assert torch.equal(out.isinf(), ref.isinf()) and out[-1] == 0
    assert_close(xx.grad, ref_x.grad, torch.float32, "grad")


def test_the_pytorch_paths_row_steps_keep_each_rows_target(monkeypatch):
    """The PyTorch path works in steps of _TORCH_ROWS_PER_STEP rows (4096); no test had more rows than
    that, so a step reading the first step's targets (a wrong loss past row 4096) went unseen."""
    from medusa_liger.kernels import multi_head_linear_cross_entropy, multi_head_linear_cross_entropy_reference

    monkeypatch.setattr(importlib.import_module("medusa_liger.kernels.cross_entropy"), "_TORCH_ROWS_PER_STEP", 3)
    x = torch.randn(11, 7, dtype=torch.float64, requires_grad=True)
    labels = _labels(11, 7).cpu()  # (the PyTorch path, on the CPU on any host)
    labels[[2, 7]] = -100
    with force_backend("torch"):
        for reduction in ("none", "mean"):
            torch.testing.assert_close(cross_entropy(x, labels, reduction=reduction, label_smoothing=0.1),
                                       F.cross_entropy(x, labels, reduction=reduction, label_smoothing=0.1))
        hidden = torch.randn(2, 7, 5, dtype=torch.float64)
        weight = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
        head_labels = torch.randint(0, 7, (2, 7))
        head_labels[0, 3] = -100
        out = multi_head_linear_cross_entropy(hidden, weight, head_labels, [1, 3])
    expected = multi_head_linear_cross_entropy_reference(hidden, weight, head_labels, [1, 3])
    torch.testing.assert_close(out.loss.double(), expected.loss.double())
    torch.testing.assert_close(out.head_losses.double(), expected.head_losses.double())
    (got,) = torch.autograd.grad(out.loss, weight)
    (want,) = torch.autograd.grad(expected.loss, weight)
    torch.testing.assert_close(got, want)


def _row_reference(x, labels, *, ignore_index=-100, scale=None, **options):
    """fp64 per-row (loss, lse, correct, gradient * scale) of ce_rows on [N, V] logits (``reference``'s
    rows); rows whose label is ignore_index or outside [0, V) are ignored (loss 0, correct 0, gradient 0)."""
    V = x.shape[1]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < V)
    y = x.double().requires_grad_()
    rows, lse = reference(y, torch.where(valid, labels, ignore_index), ignore_index=ignore_index, reduction="none",
                          **options)
    factor = torch.ones(len(labels), dtype=torch.float64) if scale is None else scale.double().expand(len(labels))
    (rows * factor.to(rows.device)).sum().backward()
    softcap = options.get("softcap")
    top = (y if softcap is None else softcap * torch.tanh(y / softcap)).argmax(-1)
    return rows.detach(), lse.detach(), (top == labels) & valid, y.grad


def _tied_rows():
    """Rows whose maxima tie or step down across the row kernel's column blocks (sized from this device's
    block: 512 columns in the interpreter, 8192 on a GPU), plus ignored rows whose argmax is column 0
    (their target is read as 0): the first argmax and the valid mask decide."""
    block = launch_config(1 << 20, DEVICE)[0]
    V = 2 * block + 76  # three blocks, the last one partial
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, V, generator=g, dtype=torch.float64)
    x[0, [5, block + 188]] = 9.0  # a tie across blocks: the first one is the argmax
    x[1, [block + 88, 2 * block + 26]] = 9.0  # a tie between blocks 1 and 2
    x[2, 3], x[2, 2 * block + 36] = 9.0, 7.0  # block maxima 9, ~3, 7: the later, smaller block max is no argmax
    x[3, 0] = 9.0  # ignored row (ignore_index) whose argmax is column 0
    x[4, 0] = 9.0  # out-of-range label (the GPU's ignored row) whose argmax is column 0
    x[5, [100, 101]] = 9.0  # a tie inside one block
    labels = torch.tensor([block + 188, 2 * block + 26, 2 * block + 36, -100, V, 101, 17])
    labels[6] = int(x[6].argmax())
    return x.float().to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("write_grad", [False, True], ids=["loss only", "one launch"])
def test_row_op_accuracy_keeps_the_first_argmax_and_never_counts_ignored_rows(backend, write_grad):
    """ce_rows' loss, lse and accuracy without the gradient pass (the fused loss under no_grad, the plain
    online log-sum-exp) and with it (the online sum that keeps 1 - P_t), against fp64 and torch.argmax."""
    x, labels = _tied_rows()
    ref_loss, ref_lse, ref_correct, ref_grad = _row_reference(x, labels, z_loss=1e-2, label_smoothing=0.1)
    N = len(labels)
    lse, loss = torch.full((N,), float("nan"), device=DEVICE), torch.full((N,), float("nan"), device=DEVICE)
    correct = torch.full((N,), -1, dtype=torch.int32, device=DEVICE)
    with force_backend(backend):
        ce_rows(x, labels, scale=torch.ones(1, device=DEVICE), lse=lse, loss=loss, correct=correct,
                write_grad=write_grad, z_loss=1e-2, label_smoothing=0.1)
    assert correct.tolist() == ref_correct.int().tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(lse, ref_lse, torch.float32, "lse")
    if write_grad:
        assert_close(x, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0}],
                         ids=["plain", "smoothing-zloss-softcap"])
def test_gradient_pass_without_a_saved_miss_and_with_per_row_scales(monkeypatch, backend, options):
    """ce_rows' pass 2 alone (compute_lse=False) without target_miss: the target column from
    exp(y_t - lse) - (1 - eps); a per-row scale, split across the PyTorch path's row steps."""
    monkeypatch.setattr(importlib.import_module("medusa_liger.kernels.cross_entropy"), "_TORCH_ROWS_PER_STEP", 4)
    N, V = 9, 1100
    x = (torch.randn(N, V, device=DEVICE) * 3)
    labels = _labels(N, V)
    scale = torch.randn(N, device=DEVICE)
    _, _, _, ref_grad = _row_reference(x, labels, scale=scale.cpu(), **options)
    lse, loss = torch.empty(N, device=DEVICE), torch.empty(N, device=DEVICE)
    with force_backend(backend):
        ce_rows(x, labels, lse=lse, loss=loss, **options)
        ce_rows(x, labels, scale=scale, lse=lse, compute_lse=False, write_grad=True, **options)
    assert_close(x, ref_grad.to(DEVICE), torch.float32, "grad")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter, on the -inf row
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ignored_row_of_only_neg_inf_logits_has_loss_and_gradient_zero(backend):
    """lse = -inf makes that row's probabilities NaN; the row is ignored, so loss and gradient stay 0."""
    x = torch.randn(3, 37, device=DEVICE)
    x[1] = float("-inf")
    labels = torch.tensor([4, -100, 30], device=DEVICE)
    xx = x.clone().requires_grad_()
    ref, _ = reference(x[[0, 2]].double(), labels[[0, 2]], reduction="sum", z_loss=1e-3)
    with force_backend(backend):
        out = cross_entropy(xx, labels, reduction="none", z_loss=1e-3)
        out.sum().backward()
    assert out[1] == 0 and torch.equal(xx.grad[1], torch.zeros(37, device=DEVICE))
    assert not xx.grad.isnan().any()
    assert_close(out.sum(), ref, torch.float32, "loss")
    _, _, _, ref_grad = _row_reference(x[[0, 2]], labels[[0, 2]], z_loss=1e-3)
    assert_close(xx.grad[[0, 2]], ref_grad, torch.float32, "grad")


def test_persistent_grid_with_fewer_rows_than_programs_stays_inside_its_rows(monkeypatch):
    """3 rows with 1 program per SM (the interpreter stands in 4 SMs): the grid is capped at the rows
    (min(rows, programs)), so no program writes the 4th row of the buffer the rows are a view of."""
    ce = importlib.import_module("medusa_liger.kernels.cross_entropy")
    monkeypatch.setattr(ce, "PERSISTENT_PROGRAMS_PER_SM", 1)
    V = 123
    buf = torch.randn(4, V, device=DEVICE)
    labels = torch.tensor([5, 7, 9, 11], device=DEVICE)
    lse, loss = torch.full((4,), 5.0, device=DEVICE), torch.full((4,), 5.0, device=DEVICE)
    before = buf.clone()
    _, _, _, ref_grad = _row_reference(buf[:3], labels[:3])
    with force_backend("triton"):
        ce_rows(buf[:3], labels[:3], scale=torch.ones(1, device=DEVICE), lse=lse[:3], loss=loss[:3], write_grad=True)
    assert torch.equal(buf[3], before[3]) and lse[3] == 5.0 and loss[3] == 5.0
    assert_close(buf[:3], ref_grad, torch.float32, "grad")


def test_the_triton_backend_runs_the_row_kernel(monkeypatch):
    """force_backend("triton") must reach the Triton kernel (else every "triton" case tests the PyTorch path)."""
    ce = importlib.import_module("medusa_liger.kernels.cross_entropy")

    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch path ran under force_backend('triton')")

    monkeypatch.setattr(ce, "_rows_torch", refuse)
    x = torch.randn(3, 20, device=DEVICE, requires_grad=True)
    with force_backend("triton"):
        cross_entropy(x, torch.tensor([1, 2, 3], device=DEVICE)).backward()
    assert x.grad.abs().sum() > 0


def test_option_edges():
    x = torch.randn(3, 10, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4])
    # label_smoothing 1.0 is in range (a uniform target), as in F.cross_entropy; below 0 is refused.
    with force_backend("torch"):
        torch.testing.assert_close(cross_entropy(x, labels, label_smoothing=1.0),
                                   F.cross_entropy(x, labels, label_smoothing=1.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(x, labels, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="ignore_index must be an int"):
        cross_entropy(x, labels, ignore_index=1.5)
    with pytest.raises(ValueError, match="labels must have shape"):
        cross_entropy(x, labels[:, None])
    with pytest.raises(ValueError, match="labels is on meta"):
        cross_entropy(x, labels.to("meta"))


def test_next_power_of_two():
    from medusa_liger.kernels.utils import next_power_of_2

    assert [next_power_of_2(n) for n in (1, 2, 3, 512, 513)] == [1, 2, 4, 512, 1024]
