"""Soft targets: the KL row kernel, the fused loss's ``teacher`` option, and Medusa-2 self-distillation
(``lm_loss="kl"``: the backbone learns the distribution of its original self: with its LoRA adapters
off, or a frozen copy when it trains whole).

Everything is checked against float64 autograd on materialized logits: the row kernel on both
backends, the fused op (loss, per-head metrics, every gradient, none to the teacher) with and without
skip_ignored, segments, bias, softcap and z-loss, head by head, and the model against the naive
definition written here from the backbone's full forward with and without its adapters.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from medusa_liger.heads import MedusaConfig, MedusaModel
from medusa_liger.kernels import (
    Teacher,
    force_backend,
    head_by_head_linear_cross_entropy,
    multi_head_linear_cross_entropy,
)
from medusa_liger.kernels import fused_linear_cross_entropy as flce
from medusa_liger.kernels.kl_divergence import kl_rows
from medusa_liger.kernels.reference import generalized_jsd
from medusa_liger.kernels.reference import multi_head_linear_cross_entropy_reference as reference
from tests.test_heads import V as TINY_V
from tests.test_heads import (
    assert_triton_path_matches_torch_path,
    batch,
    naive_medusa_loss,
    randomize_heads,
    tiny_llama,
)
from tests.utils import (DEVICE, DTYPES, HAS_CUDA, REL_NORM_TOLERANCES, VOCABS, assert_rel_close, poison_,
                         rel_norm_error)

BACKENDS = ["torch", "triton"]


def divergence_definition(student, teacher, bias, teacher_bias, softcap, z_loss, valid, factor, temperature=1.0,
                          reverse=False, jsd_beta=None):
    """(row losses, d(factor * sum of row losses)/d student) in float64 autograd; at a temperature tau,
    tau^2 times the divergence of the distributions of logits / tau: KL(teacher || student), reversed
    KL(student || teacher), or with jsd_beta the generalized JSD (reference.generalized_jsd)."""
    x = student.double().requires_grad_()
    y, u = x, teacher.double()
    if bias is not None:
        y, u = y + bias.double(), u + teacher_bias.double()
    if softcap is not None:
        y, u = softcap * torch.tanh(y / softcap), softcap * torch.tanh(u / softcap)
    log_q, log_p = torch.log_softmax(y / temperature, -1), torch.log_softmax(u / temperature, -1)
    p = log_p.exp()
    if jsd_beta is not None:
        rows = temperature**2 * generalized_jsd(log_p, log_q, jsd_beta)
    elif reverse:  # (log q at 0 where q is 0, so that its gradient there is 0, not 0 * inf)
        q = log_q.exp()
        safe_log_q = torch.where(q > 0, log_q, torch.zeros_like(log_q))
        rows = temperature**2 * torch.where(q > 0, q * (safe_log_q - log_p), torch.zeros_like(q)).sum(-1)
    else:
        rows = temperature**2 * torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    rows = rows + z_loss * torch.logsumexp(y, -1).square()
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    (grad,) = torch.autograd.grad(factor * rows.sum(), x)
    return rows.detach(), grad


# --------------------------------------------------------------------------------- row kernel
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [123, 1100])  # one block, and several blocks on either backend
@pytest.mark.parametrize("bias, softcap, z_loss, temperature, reverse",
                         [(False, None, 0.0, 1.0, False), (True, 4.0, 0.01, 1.0, False), (True, 4.0, 0.0, 2.5, False),
                          (False, None, 0.0, 0.5, False), (False, None, 0.0, 1.0, True), (True, 4.0, 0.01, 1.0, True),
                          (False, None, 0.0, 2.0, True)])
def test_kl_rows_match_fp64(backend, dtype, V, bias, softcap, z_loss, temperature, reverse):
    _check_kl_rows(backend, dtype, V, bias, softcap, z_loss, temperature, reverse)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", list(VOCABS.values()), ids=list(VOCABS))
def test_gpu_kl_rows_at_real_vocab_sizes(vocab):
    _check_kl_rows("triton", torch.bfloat16, vocab, False, None, 0.0)


def _check_kl_rows(backend, dtype, V, bias, softcap, z_loss, temperature=1.0, reverse=False):
    rows, T = 6, 6
    student = (torch.randn(rows, V, device=DEVICE) * 3).to(dtype)
    teacher = (torch.randn(rows, V, device=DEVICE) * 3).to(dtype)
    # Columns the distribution the divergence weighs by rules out add nothing (the teacher's forward,
    # the student's reversed).
    (student if reverse else teacher)[1, : V // 2] = float("-inf")
    b = torch.randn(V, device=DEVICE) if bias else None
    tb = torch.randn(V, device=DEVICE) if bias else None
    labels = torch.randint(0, V, (T,), device=DEVICE)
    labels[3] = -100
    student[2] = teacher[2]  # one row where the student already equals the teacher
    # Shift 1 over one sequence of T = rows: row 2's target is ignored, and the last row's is past the end.
    valid = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    valid[2], valid[5] = False, False
    ref_loss, ref_grad = divergence_definition(student, teacher, b, tb, softcap, z_loss, valid, 0.5, temperature,
                                                reverse)
    loss = poison_(torch.empty(rows, device=DEVICE))
    correct = torch.full((rows,), -1, dtype=torch.int32, device=DEVICE)
    grad = student.clone()
    with force_backend(backend):
        kl_rows(grad, teacher.clone(), labels, shift=1, bias=b, teacher_bias=tb, scale=torch.tensor([0.5], device=DEVICE),
                loss=loss, correct=correct, z_loss=z_loss, softcap=softcap, temperature=temperature, reverse=reverse,
                write_grad=True)
    assert_rel_close(loss, ref_loss, dtype, "row losses")
    assert_rel_close(grad, ref_grad, dtype, "gradient")
    assert (grad[~valid] == 0).all() and (loss[~valid] == 0).all()
    y = student.double() + (0 if b is None else b.double())
    expected = (y.argmax(-1) == torch.cat([labels[1:], labels[:1]])) & valid  # softcap keeps the argmax
    assert correct.tolist() == expected.int().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_kl_of_a_student_equal_to_its_teacher_is_zero(backend, reverse):
    logits = torch.randn(4, 300, device=DEVICE) * 5
    loss = torch.empty(4, device=DEVICE)
    grad = logits.clone()
    with force_backend(backend):
        kl_rows(grad, logits, torch.arange(4, device=DEVICE), scale=torch.ones(1, device=DEVICE), loss=loss,
                reverse=reverse, write_grad=True)
    assert loss.abs().max() < 1e-5 and grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_minus_inf_under_the_other_ones_mass_is_infinite_not_nan(backend, reverse):
    """Forward: a student -inf where the teacher has mass; reversed: a teacher -inf under the student's."""
    student, teacher = torch.randn(2, 64, device=DEVICE), torch.randn(2, 64, device=DEVICE)
    (teacher if reverse else student)[0, 5] = float("-inf")
    loss = torch.empty(2, device=DEVICE)
    with force_backend(backend):
        kl_rows(student, teacher, torch.zeros(2, dtype=torch.long, device=DEVICE), loss=loss, reverse=reverse,
                scale=torch.ones(1, device=DEVICE), write_grad=True)
    assert loss[0] == float("inf") and torch.isfinite(loss[1])
    assert not student.isnan().any() and torch.isfinite(student[1]).all()  # the gradients, written in place
    if reverse:  # +inf pushes the student off the column the teacher rules out; the rest stays finite
        assert student[0, 5] == float("inf") and torch.isfinite(student[0, :5]).all()


# ------------------------------------------------------------------------------ fused op
def _distill_problem(shared_hidden: bool, dtype=torch.float64, device=DEVICE):
    """Three heads over [2, 11] tokens (shifts 1, 2, 3), H = 16, V = 37: heads 0 and 2 learn teachers
    (head 2's shares the student's projection and is read 2 positions on), head 1 its labels."""
    B, T, H, V, K = 2, 11, 16, 37, 3
    g = torch.Generator().manual_seed(5)

    def rand(*shape, grad=False):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    hidden = rand(B, T, H, grad=True) if shared_hidden else rand(K, B, T, H, grad=True)
    weight = rand(K, V, H, grad=True)
    bias = rand(V, grad=True)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    # Every other label is head 0's own top-1 (shift 1), so its accuracy is neither 0 nor 1.
    h0 = (hidden if shared_hidden else hidden[0]).detach()
    top1 = (h0 @ weight[0].detach().T + bias.detach()).argmax(-1)
    labels[:, 1::2] = top1[:, 0:-1:2]
    labels[0, 2:5] = -100
    segments = torch.zeros(B, T, dtype=torch.long, device=device)
    segments[1, 6:] = 1
    # Teachers close to the students, so the KLs are not degenerate; head 0's with its own bias.
    t_hidden = h0 + 0.3 * rand(B, T, H)
    t_weight = weight[0].detach() + 0.3 * rand(V, H)
    teacher = [(t_hidden, t_weight, rand(V)), None, Teacher(t_hidden, weight[2], offset=2)]
    return hidden, weight, bias, labels, segments, teacher


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared_hidden", [False, True])
@pytest.mark.parametrize("skip_ignored", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_teacher_heads_match_the_reference(backend, shared_hidden, skip_ignored, reduction):
    hidden, weight, bias, labels, segments, teacher = _distill_problem(shared_hidden)
    options = dict(bias=bias, segment_ids=segments, z_loss=0.01, softcap=6.0, reduction=reduction)
    shifts, head_weights = [1, 2, 3], [1.0, 0.5, 0.25]
    ref = reference(hidden, weight, labels, shifts, head_weights, teacher=teacher, compute_dtype=torch.float64,
                    **options)
    ref_grads = torch.autograd.grad(ref.loss, [hidden, weight, bias])
    with force_backend(backend):
        out = multi_head_linear_cross_entropy(hidden, weight, labels, shifts, head_weights, teacher=teacher,
                                              chunk_size=7, skip_ignored=skip_ignored, **options)
    grads = torch.autograd.grad(out.loss, [hidden, weight, bias])
    tol = REL_NORM_TOLERANCES[torch.float64 if backend == "torch" else torch.float32]
    assert_rel_close(out.loss.detach(), ref.loss.detach(), torch.float64 if backend == "torch" else torch.float32)
    assert torch.allclose(out.head_losses.double(), ref.head_losses.double(), rtol=tol, atol=1e-6)
    assert out.head_tokens.tolist() == ref.head_tokens.tolist()
    assert out.head_accuracy.tolist() == ref.head_accuracy.tolist()
    assert 0 < ref.head_accuracy[0] < 1, "the problem should make accuracy informative"
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_rel_close(g, r, torch.float64 if backend == "torch" else torch.float32, name)
    assert teacher[0][0].grad is None and teacher[0][1].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("skip_ignored", "reverse"), [(False, False), (True, False), (False, True), (True, True)])
def test_teacher_temperatures_match_the_reference(backend, skip_ignored, reverse):
    """Per-teacher temperatures (2.0 on head 0, 0.7 on head 2): tau^2 KL at logits / tau, forward or
    reversed, every gradient."""
    hidden, weight, bias, labels, segments, teacher = _distill_problem(True)
    teacher = [Teacher(*teacher[0], temperature=2.0, reverse=reverse), None,
               Teacher(teacher[2].hidden, teacher[2].weight, offset=2, temperature=0.7, reverse=reverse)]
    options = dict(bias=bias, segment_ids=segments, softcap=6.0)
    args = (hidden, weight, labels, [1, 2, 3], [1.0, 0.5, 0.25])
    t0 = teacher[0]
    plain = reference(*args, teacher=[Teacher(t0.hidden, t0.weight, t0.bias, reverse=reverse), None, None],
                      compute_dtype=torch.float64, **options)
    _, ref = assert_teachers_match_the_reference(backend, skip_ignored, args, teacher, options)
    assert abs(float(plain.head_losses[0]) - float(ref.head_losses[0])) > 1e-3, "the temperature should matter"


def assert_teachers_match_the_reference(backend, skip_ignored, args, teacher, options):
    """The fused op with ``teacher`` on ``backend`` against the fp64 reference: head losses and the
    gradients of hidden, weight and bias (``args`` = (hidden, weight, labels, shifts, head_weights),
    ``options`` holding bias). Returns the reference's output."""
    hidden, weight, bias = args[0], args[1], options["bias"]
    ref = reference(*args, teacher=teacher, compute_dtype=torch.float64, **options)
    ref_grads = torch.autograd.grad(ref.loss, [hidden, weight, bias])
    with force_backend(backend):
        out = multi_head_linear_cross_entropy(*args, teacher=teacher, chunk_size=7, skip_ignored=skip_ignored,
                                              **options)
    grads = torch.autograd.grad(out.loss, [hidden, weight, bias])
    work = torch.float64 if backend == "torch" else torch.float32
    assert_rel_close(out.head_losses.double(), ref.head_losses.double(), work, "head_losses")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_rel_close(g, r, work, name)
    return out, ref


@pytest.mark.parametrize(("temperature", "divergence"),
                         [(1.7, dict(reverse=False)), (1.7, dict(reverse=True)), (0.8, dict(jsd_beta=0.4))],
                         ids=["forward", "reverse", "jsd"])
def test_teacher_temperature_gradcheck(temperature, divergence):
    """float64 gradcheck of the PyTorch path at a teacher temperature, KL forward and reversed and the
    generalized JSD (two heads, one with a teacher, on a problem small enough to perturb every input)."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(2, 11, 3, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (1, 6), generator=g)
    labels[0, 4] = -100
    teacher = [Teacher(torch.randn(1, 6, 3, dtype=torch.float64, generator=g),
                       torch.randn(11, 3, dtype=torch.float64, generator=g), temperature=temperature, **divergence),
               None]

    def f(h, w):
        return multi_head_linear_cross_entropy(h, w, labels, [1, 2], [1.0, 0.5], chunk_size=4, teacher=teacher).loss

    with force_backend("torch"), flce.reentrant_backward():
        assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-7)


def test_teacher_gradcheck():
    """float64 gradcheck of the PyTorch path with teachers on two of three heads."""
    hidden, weight, bias, labels, segments, teacher = _distill_problem(True, device=torch.device("cpu"))
    hidden, weight, bias = (t.detach()[..., :5].clone().requires_grad_() if t.dim() > 1 else t.detach().clone()
                            .requires_grad_() for t in (hidden, weight, bias))
    teacher = [None, None, Teacher(teacher[2].hidden[..., :5].clone(), teacher[2].weight[..., :5].detach().clone(),
                                   offset=2)]

    def f(h, w, b):
        return multi_head_linear_cross_entropy(h, w, labels, [1, 2, 3], [1.0, 0.5, 0.25], bias=b,
                                               segment_ids=segments, z_loss=0.01, chunk_size=4,
                                               teacher=teacher).loss

    with force_backend("torch"), flce.reentrant_backward():
        assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skip_ignored", [False, True])
def test_teacher_offset_reads_rows_further_on(backend, skip_ignored):
    """offset = o equals offset 0 on a teacher whose rows were moved o positions back by hand."""
    hidden, weight, bias, labels, segments, teacher = _distill_problem(True)
    t = teacher[2]
    moved = torch.zeros_like(t.hidden)
    moved[:, : -t.offset] = t.hidden[:, t.offset :]
    with force_backend(backend):
        runs = [multi_head_linear_cross_entropy(hidden, weight, labels, [1, 2, 3], teacher=[None, None, entry],
                                                segment_ids=segments, chunk_size=5, skip_ignored=skip_ignored)
                for entry in (t, Teacher(moved, t.weight))]
    grads = [torch.autograd.grad(out.loss, [hidden, weight]) for out in runs]
    torch.testing.assert_close(runs[0].head_losses, runs[1].head_losses)
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_by_head_passes_the_teacher_through(backend):
    hidden, weight, bias, labels, segments, teacher = _distill_problem(True)
    blocks = [torch.nn.Linear(16, 16, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    head_inputs = [lambda x, m=m: x + torch.nn.functional.silu(m(x)) for m in blocks]
    params = [p for m in blocks for p in m.parameters()] + [weight]
    with force_backend(backend):
        out = head_by_head_linear_cross_entropy(hidden, head_inputs, list(weight.unbind(0)), labels, [1, 2, 3],
                                                [1.0, 0.5, 0.25], params=params, teacher=teacher,
                                                segment_ids=segments)
        grads = torch.autograd.grad(out.loss, [hidden, *params])
        ref = multi_head_linear_cross_entropy([f(hidden) for f in head_inputs], list(weight.unbind(0)), labels,
                                              [1, 2, 3], [1.0, 0.5, 0.25], teacher=teacher, segment_ids=segments)
        ref_grads = torch.autograd.grad(ref.loss, [hidden, *params])
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.head_losses, ref.head_losses)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize(
    "teacher, match",
    [([None, None], "len\\(shifts\\) = 3"), ([None, None, (torch.zeros(2, 11, 16),)], "teacher\\[2\\]"),
     ([None, None, (torch.zeros(2, 11, 15), torch.zeros(37, 16))], "teacher\\[2\\] hidden must have shape"),
     ([None, None, (torch.zeros(2, 11, 16), torch.zeros(36, 16))], "teacher\\[2\\] weight must have shape"),
     ([None, None, (torch.zeros(2, 11, 16, dtype=torch.long), torch.zeros(37, 16))], "teacher\\[2\\] hidden"),
     ([None, None, ("x", torch.zeros(37, 16))], "must be a tensor"),
     ([None, None, (torch.zeros(2, 11, 16), torch.zeros(37, 16), torch.zeros(36))], "teacher\\[2\\] bias"),
     ([None, None, Teacher(torch.zeros(2, 11, 16), torch.zeros(37, 16), offset=3)], "offset must be an int in \\[0, "),
     ([None, None, Teacher(torch.zeros(2, 11, 16), torch.zeros(37, 16), offset=-1)], "offset"),
     ([None, None, [torch.zeros(2, 11, 16)]], "teacher\\[2\\] must be None, a Teacher"),
     *[([None, None, Teacher(torch.zeros(2, 11, 16), torch.zeros(37, 16), temperature=tau)],
        "teacher\\[2\\] temperature must be a finite number > 0") for tau in (0.0, -1.0, float("nan"), float("inf"), True)],
     ([None, None, Teacher(torch.zeros(2, 11, 16), torch.zeros(37, 16), reverse="yes")], "teacher\\[2\\] reverse must be")],
)
def test_bad_teacher_raises(teacher, match):
    h, w = torch.randn(2, 11, 16), torch.randn(37, 16)
    with pytest.raises(ValueError, match=match):
        multi_head_linear_cross_entropy(h, w, torch.zeros(2, 11, dtype=torch.long), [1, 2, 3], teacher=teacher)


def test_teacher_temperature_refuses_z_loss():
    h, w = torch.randn(2, 11, 16), torch.randn(37, 16)
    with pytest.raises(ValueError, match="z_loss must be 0 with a teacher temperature"):
        multi_head_linear_cross_entropy(h, w, torch.zeros(2, 11, dtype=torch.long), [1],
                                        teacher=[Teacher(h, w, temperature=2.0)], z_loss=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        kl_rows(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), loss=torch.zeros(2),
                temperature=0.0)


def _teacher_rows(op: str):
    from medusa_liger.kernels.jsd import jsd_rows

    return kl_rows if op == "kl" else (lambda *args, **kw: jsd_rows(*args, beta=0.3, **kw))


@pytest.mark.parametrize("op", ["kl", "jsd"])
@pytest.mark.parametrize(("options", "match"), [
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"temperature": True}, "temperature must be a finite number"),
    ({"temperature": 2.0, "z_loss": 1e-3}, "z_loss must be 0 at a temperature other than 1"),
    ({"scale": torch.ones(2), "write_grad": True}, "scale \\(one element\\)"),
    ({"write_grad": True}, "scale \\(one element\\)"),
])
def test_teacher_rows_refuse_bad_options_themselves(op, options, match):
    """The row ops are public: they check what the fused op checks before calling them."""
    with pytest.raises(ValueError, match=match):
        _teacher_rows(op)(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, dtype=torch.long),
                          loss=torch.zeros(2), **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl", "jsd"])
def test_a_row_without_a_target_is_never_correct(backend, op):
    """Rows without a target read target 0 (row_targets' placeholder): a student whose argmax is token 0
    there must not count as correct."""
    student = torch.zeros(3, 5, device=DEVICE)
    student[:, 0] = 5.0
    labels = torch.tensor([0, -100, 0], device=DEVICE)  # shift 1: row 0's target ignored, row 2's past the end
    correct = torch.full((3,), -1, dtype=torch.int32, device=DEVICE)
    with force_backend(backend):
        _teacher_rows(op)(student, torch.zeros(3, 5, device=DEVICE), labels, shift=1,
                          loss=torch.zeros(3, device=DEVICE), correct=correct)
    assert correct.tolist() == [0, 1, 0]


@pytest.mark.parametrize("op", ["kl", "jsd"])
def test_the_pytorch_paths_row_steps_keep_each_rows_target(op, monkeypatch):
    """The PyTorch path works in steps of _TORCH_ROWS_PER_STEP rows (2048), each with its own row_start:
    a step reading the first step's targets (wrong validity past row 2048) went unseen."""
    import importlib

    torch.manual_seed(0)
    student, teacher = torch.randn(8, 7) * 3, torch.randn(8, 7) * 3
    labels = torch.randint(0, 7, (2, 4))
    labels[1, 2] = -100  # shift 1 over rows of 4: rows 3 and 7 have no target (past the end), row 5 is ignored

    def run() -> tuple[torch.Tensor, ...]:
        loss, correct, grad = torch.empty(8), torch.empty(8, dtype=torch.int32), student.clone()
        with force_backend("torch"):
            _teacher_rows(op)(grad, teacher.clone(), labels.flatten(), seq_len=4, shift=1, loss=loss,
                              correct=correct, scale=torch.ones(1), write_grad=True)
        return loss, correct, grad

    whole = run()
    monkeypatch.setattr(importlib.import_module("medusa_liger.kernels.kl_divergence"), "_TORCH_ROWS_PER_STEP", 3)
    for got, want in zip(run(), whole):
        torch.testing.assert_close(got, want)
    assert (whole[0][[3, 5, 7]] == 0).all() and (whole[0][[0, 1, 2, 4, 6]] > 0).all()


def test_teacher_refuses_label_smoothing():
    h, w = torch.randn(2, 11, 16), torch.randn(37, 16)
    with pytest.raises(ValueError, match="label_smoothing must be 0 with a teacher"):
        multi_head_linear_cross_entropy(h, w, torch.zeros(2, 11, dtype=torch.long), [1], teacher=[(h, w)],
                                        label_smoothing=0.1)


def test_teacher_halves_the_rows_per_chunk(monkeypatch):
    """Two [C, V] buffers with a teacher: the default plan keeps the logit bytes, not the rows."""
    budgets = []
    original = flce.plan_chunk_rows
    monkeypatch.setattr(flce, "plan_chunk_rows", lambda *a, **k: budgets.append(a[6] if len(a) > 6 else None)
                        or original(*a, **k))
    h, w = torch.randn(1, 8, 4), torch.randn(10, 4)
    labels = torch.zeros(1, 8, dtype=torch.long)
    with force_backend("torch"):
        multi_head_linear_cross_entropy(h, w, labels, [1])
        multi_head_linear_cross_entropy(h, w, labels, [1], teacher=[(h, w)])
    assert budgets == [None, flce.FROZEN_CHUNK_BYTES // 2]


# --------------------------------------------------------------------------------- model
JSD_BETA = 0.3  # the "jsd" direction of the model-level tests below


def _divergence_config(direction: str) -> dict:
    """MedusaConfig's fields for a test's direction: "forward", "reverse" or "jsd" (beta JSD_BETA)."""
    return {"kl_direction": "forward", "jsd_beta": JSD_BETA} if direction == "jsd" else {"kl_direction": direction}


def _divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, cfg: MedusaConfig) -> torch.Tensor:
    """The definition of the configured divergence of teacher log_p from student log_q, per row (finite
    logits): KL(p || q), reversed KL(q || p), or with jsd_beta b, b KL(p || m) + (1 - b) KL(q || m) for
    the mixture m = b p + (1 - b) q."""
    if cfg.jsd_beta is not None:
        b = cfg.jsd_beta
        log_m = torch.logaddexp(math.log(b) + log_p, math.log(1 - b) + log_q)
        return (b * log_p.exp() * (log_p - log_m) + (1 - b) * log_q.exp() * (log_q - log_m)).sum(-1)
    if cfg.kl_direction == "reverse":
        log_p, log_q = log_q, log_p
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _lora_model(head_by_head: bool, lm_loss: str = "kl", kl_temperature: float = 1.0,
                direction: str = "forward") -> MedusaModel:
    from peft import LoraConfig, get_peft_model

    backbone = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                       lora_dropout=0.0))
    cfg = MedusaConfig(num_heads=2, mode="joint", lm_loss=lm_loss, head_by_head=head_by_head,
                       kl_temperature=kl_temperature, **_divergence_config(direction))
    return MedusaModel.from_backbone(backbone, cfg)


def _perturb_adapters(model: MedusaModel, std: float = 0.2) -> None:
    """Move LoRA's B off zero, so the backbone leaves its adapters-off self (its teacher)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def _naive_distill_loss(model: MedusaModel, ids, labels):
    """The definition: the heads' naive loss with the backbone's CE swapped for KL(original || backbone)
    at every position t whose label t + 1 is valid, averaged over those positions. The original is the
    frozen copy when the model keeps one, else the backbone with its adapters off. At kl_temperature
    tau: tau^2 KL of both distributions at logits / tau."""
    total, _, lm_ce = naive_medusa_loss(model, ids, labels)
    with torch.no_grad():
        if model.teacher is not None:
            teacher = model.teacher(input_ids=ids).logits[:, :-1].double()
        else:
            with model.backbone.disable_adapter():
                teacher = model.backbone(input_ids=ids).logits[:, :-1].double()
    student = model.backbone(input_ids=ids).logits[:, :-1].double()
    tau = model.config.kl_temperature
    log_p, log_q = torch.log_softmax(teacher / tau, -1), torch.log_softmax(student / tau, -1)
    rows = tau**2 * _divergence_rows(log_p, log_q, model.config)
    valid = labels[:, 1:] != -100
    kl = rows[valid].mean()
    return total - model.config.lm_loss_weight * lm_ce + model.config.lm_loss_weight * kl, kl


def _assert_distillation_matches_the_definition(model: MedusaModel, move_off_teacher) -> list[str]:
    """The backbone's KL is exactly 0 while the student is its teacher; after ``move_off_teacher``
    the loss, the KL and every gradient equal the definition's. Returns the trained parameters' names."""
    model.train()
    randomize_heads(model)
    ids, labels = batch()
    with force_backend("torch"):
        start = model(ids, labels=labels)
    assert start.lm_loss.abs() < 1e-6  # LoRA starts as the identity (B = 0); a copy is its original
    move_off_teacher(model)
    other = copy.deepcopy(model)
    with force_backend("torch"):
        out = model(ids, labels=labels)
    out.loss.backward()
    expected, kl = _naive_distill_loss(other, ids, labels)
    expected.backward()
    assert kl > 1e-3, "the student should have moved off its teacher"
    torch.testing.assert_close(out.lm_loss.double(), kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), expected.double(), rtol=1e-4, atol=1e-6)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (name, p), q in zip(trained, [q for q in other.parameters() if q.requires_grad]):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)
    return [name for name, _ in trained]


@pytest.mark.parametrize(("head_by_head", "tau", "direction"),
                         [(True, 1.0, "forward"), (False, 1.0, "forward"), (True, 0.5, "forward"), (True, 1.0, "reverse"),
                          (True, 1.0, "jsd"), (False, 2.0, "jsd")])
def test_self_distillation_starts_at_zero_and_matches_the_definition(head_by_head, tau, direction):
    pytest.importorskip("peft")
    model = _lora_model(head_by_head, kl_temperature=tau, direction=direction)
    trained = _assert_distillation_matches_the_definition(model, _perturb_adapters)
    assert any("lora_" in name for name in trained)


def _full_model(head_by_head: bool) -> MedusaModel:
    """Full Medusa-2 (the whole backbone trains) with a frozen copy of the backbone as the teacher."""
    cfg = MedusaConfig(num_heads=2, mode="joint", lm_loss="kl", head_by_head=head_by_head)
    model = MedusaModel.from_backbone(tiny_llama(), cfg)
    model.add_frozen_teacher()
    return model


def _perturb_backbone(model: MedusaModel, std: float = 0.05) -> None:
    """Move the trained backbone off its frozen copy, as training would."""
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize("head_by_head", [True, False])
def test_frozen_teacher_starts_at_zero_and_matches_the_definition(head_by_head):
    model = _full_model(head_by_head)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    frozen = {name: p.clone() for name, p in model.teacher.named_parameters()}
    trained = _assert_distillation_matches_the_definition(model, _perturb_backbone)
    assert not model.teacher.training  # train() keeps the teacher in eval mode
    assert any(n.startswith("backbone.") for n in trained) and not any(n.startswith("teacher.") for n in trained)
    for name, p in model.teacher.named_parameters():
        assert p.grad is None and torch.equal(p, frozen[name]), name


def test_frozen_teacher_through_the_triton_path():
    model = _full_model(True).to(DEVICE)
    _perturb_backbone(model)
    randomize_heads(model)
    assert_triton_path_matches_torch_path(model)


def test_self_distillation_through_the_triton_path():
    """Both kinds of soft targets at once (the backbone's KL and the heads' backbone targets), once
    through the Triton kernels (the interpreter on CPU) against the PyTorch path."""
    pytest.importorskip("peft")
    model = _lora_model(True).to(DEVICE)
    model.config.head_targets = "backbone"
    _perturb_adapters(model)
    randomize_heads(model)
    assert_triton_path_matches_torch_path(model)


def _naive_backbone_targets_loss(model: MedusaModel, ids, labels):
    """The definition of head_targets="backbone": head k (shift s) learns KL(p || q_k) where p is the
    backbone's own next-token distribution at position t + s - 1 (the same token), averaged over
    the positions whose label t + s is valid; the rest as in naive_medusa_loss. At kl_temperature
    tau: tau^2 KL of both distributions at logits / tau; kl_direction "reverse": KL(q_k || p); with
    jsd_beta, the generalized JSD (_divergence_rows)."""
    cfg = model.config
    tau = cfg.kl_temperature
    total, _, lm_ce = naive_medusa_loss(model, ids, labels)
    out = model.backbone(input_ids=ids, output_hidden_states=True)
    hidden, backbone_logits = out.hidden_states[-1], out.logits.detach().double()
    total = 0.0 if cfg.mode == "heads" else cfg.lm_loss_weight * lm_ce
    losses = []
    for k in range(cfg.num_heads):
        s = k + 2
        z = hidden
        for block in model.heads.blocks[k]:
            z = z + torch.nn.functional.silu(z @ block.linear.weight.T + block.linear.bias)
        proj = model.lm_head.weight if cfg.shared_lm_head else model.heads.lm_heads[k].weight
        log_q = torch.log_softmax((z @ proj.T)[:, :-s].double() / tau, -1)
        log_p = torch.log_softmax(backbone_logits[:, s - 1 : -1] / tau, -1)
        rows = tau**2 * _divergence_rows(log_p, log_q, cfg)
        losses.append(rows[labels[:, s:] != -100].mean())
        total = total + cfg.heads_loss_weight * cfg.decay**k * losses[-1]
    return total, torch.stack(losses)


@pytest.mark.parametrize("mode", ["heads", "joint"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(("head_by_head", "tau", "direction"),
                         [(True, 1.0, "forward"), (False, 1.0, "forward"), (True, 2.0, "forward"), (True, 1.0, "reverse"),
                          (True, 1.0, "jsd"), (False, 0.5, "jsd")])
def test_heads_learn_the_backbones_own_distribution(mode, shared, head_by_head, tau, direction):
    cfg = MedusaConfig(num_heads=2, mode=mode, shared_lm_head=shared, head_targets="backbone",
                       head_by_head=head_by_head, kl_temperature=tau, **_divergence_config(direction))
    model = MedusaModel.from_backbone(tiny_llama(), cfg)
    model.train()
    randomize_heads(model)
    other = copy.deepcopy(model)
    ids, labels = batch()
    with force_backend("torch"):
        out = model(ids, labels=labels)
    out.loss.backward()
    expected, head_losses = _naive_backbone_targets_loss(other, ids, labels)
    expected.backward()
    torch.testing.assert_close(out.head_losses.double(), head_losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), expected.double(), rtol=1e-4, atol=1e-6)
    trained = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert trained and len(trained) == len([q for q in other.parameters() if q.grad is not None])
    for (name, p), q in zip(trained, [q for q in other.parameters() if q.grad is not None]):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("divergence", [[], ["train.jsd_beta=0.5"]], ids=["kl", "jsd"])
def test_a_medusa1_run_with_backbone_targets_trains(tmp_path, divergence):
    from medusa_liger.train.build import build_medusa, build_tokenizer_and_backbone
    from medusa_liger.train.data import load_examples
    from medusa_liger.train.logging import read_metrics
    from medusa_liger.train.loop import train
    from tests.train_helpers import short_config

    cfg = short_config(tmp_path, "train.mode=heads", "heads.targets=backbone", "train.steps=3", "logging.every=1",
                       "checkpoint.every=0", "export.formats=[medusa]", "data.eval_fraction=0.0", *divergence)
    _, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    medusa = build_medusa(cfg, backbone)
    assert medusa.config.head_targets == "backbone" and medusa.config.jsd_beta == cfg.train.jsd_beta
    with force_backend("torch"):
        train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 3 and all(0.0 <= r["loss/head0"] < 20 for r in rows)


def test_kl_needs_a_peft_backbone():
    model = MedusaModel.from_backbone(tiny_llama(), MedusaConfig(num_heads=1, mode="joint", lm_loss="kl"))
    ids, labels = batch()
    with force_backend("torch"), pytest.raises(ValueError, match="lm_loss='kl'.*peft"):
        model(ids, labels=labels)
    with pytest.raises(ValueError, match="lm_loss must be one of"):
        MedusaConfig(lm_loss="jsd")
    with pytest.raises(ValueError, match="head_targets must be one of"):
        MedusaConfig(head_targets="teacher")


def test_heads_mode_ignores_lm_loss():
    """In heads mode (a joint run's warm-up) there is no backbone term, so no teacher pass."""
    pytest.importorskip("peft")
    model = _lora_model(True)
    model.config.mode = "heads"
    model.config.lm_loss = "kl"
    calls = []
    original = model._hidden  # (forward's backbone pass, hidden_states' body)
    model._hidden = lambda *a, **k: calls.append(k.get("teacher", False)) or original(*a, **k)
    ids, labels = batch()
    with force_backend("torch"):
        out = model(ids, labels=labels)
    assert out.lm_loss is None and calls == [False]


def test_train_config_needs_joint_mode_for_kl(tmp_path):
    from tests.train_helpers import short_config

    with pytest.raises(ValueError, match="train.lm_loss"):
        short_config(tmp_path, "train.lm_loss=kl", "train.mode=heads")
    for extra in ([], ["lora.enabled=true"]):
        assert short_config(tmp_path, "train.lm_loss=kl", *extra).train.lm_loss == "kl"


@pytest.mark.parametrize("lora", [False, True])
def test_build_keeps_a_frozen_teacher_only_without_lora(tmp_path, lora):
    pytest.importorskip("peft")
    from medusa_liger.train.build import build_medusa, build_tokenizer_and_backbone, trainable_parameters
    from medusa_liger.train.data import load_examples
    from tests.train_helpers import short_config

    cfg = short_config(tmp_path, "train.lm_loss=kl", f"lora.enabled={str(lora).lower()}")
    _, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    model = build_medusa(cfg, backbone)
    assert (model.teacher is None) == lora
    assert build_medusa(cfg, backbone, teacher=False).teacher is None
    assert not any(name.startswith("teacher.") for name in trainable_parameters(model))


def test_a_self_distillation_run_trains(tmp_path):
    """`train` with lm_loss=kl on the tiny LoRA config: the backbone's KL starts at 0 and stays
    small while the heads learn, and every logged loss is finite."""
    pytest.importorskip("peft")
    from medusa_liger.train.logging import read_metrics
    from medusa_liger.train.loop import train
    from tests.train_helpers import short_config

    cfg = short_config(tmp_path, "lora.enabled=true", "lora.r=4", "lora.alpha=8", "train.lm_loss=kl",
                       "train.steps=4", "logging.every=1", "checkpoint.every=0", "export.formats=[medusa]",
                       "data.eval_fraction=0.0")
    with force_backend("torch"):
        train(cfg)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "lm_loss" in r]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert abs(rows[0]["lm_loss"]) < 1e-5 and all(0 <= r["lm_loss"] < 0.5 for r in rows)


def test_a_full_self_distillation_run_resumes_exactly(tmp_path, monkeypatch):
    """Full Medusa-2 with lm_loss=kl (a frozen copy as teacher): the KL starts at 0 and grows as the
    backbone trains; a run killed after its step-2 checkpoint and resumed logs the same losses as a
    straight run (the teacher is rebuilt from the weights as loaded, never from a checkpoint, which
    holds none of it)."""
    from safetensors.torch import load_file

    from medusa_liger.train.logging import read_metrics
    from medusa_liger.train.loop import train
    from tests.train_helpers import losses, short_config, train_killed_at

    extra = ["train.lm_loss=kl", "train.steps=4", "logging.every=1", "checkpoint.every=2", "export.formats=[medusa]",
             "data.eval_fraction=0.0"]
    with force_backend("torch"):
        train(short_config(tmp_path / "straight", *extra))
        train_killed_at(3, short_config(tmp_path / "killed", *extra), monkeypatch)
        train(short_config(tmp_path / "killed", *extra, "train.resume=auto"))
    rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert rows[0]["lm_loss"] == 0.0 and rows[-1]["lm_loss"] > 0.0
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    saved = load_file(tmp_path / "straight" / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert any(name.startswith("backbone.") for name in saved) and not any(name.startswith("teacher.") for name in saved)


def _bf16_autocast_and_fp32_runs(model: MedusaModel, ids: torch.Tensor):
    """(output under bf16 autocast on the Triton path, an fp32 copy made first, its output on the
    PyTorch path), both after backward."""
    fp32 = copy.deepcopy(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids)
    out.loss.backward()
    with force_backend("torch"):
        ref = fp32(ids)
    ref.loss.backward()
    return out, fp32, ref


@pytest.mark.gpu
@pytest.mark.parametrize("teacher", ["adapters off", "frozen copy"])
def test_cuda_bf16_self_distillation_matches_fp32(teacher):
    """Both teachers under bf16 autocast on the Triton path against fp32 on the PyTorch path: the KL
    and the gradients of what trains (LoRA's B, or the backbone's projections)."""
    assert HAS_CUDA
    if teacher == "adapters off":
        pytest.importorskip("peft")
        model, move_off, checked = _lora_model(True), _perturb_adapters, lambda name: "lora_B" in name
    else:
        model, move_off = _full_model(True), _perturb_backbone
        checked = lambda name: name.startswith("backbone.") and "proj" in name  # noqa: E731
    model = model.to(DEVICE)
    move_off(model)
    out, fp32, ref = _bf16_autocast_and_fp32_runs(model, torch.randint(0, TINY_V, (2, 64), device=DEVICE))
    assert ref.lm_loss > 1e-3
    torch.testing.assert_close(out.lm_loss.float(), ref.lm_loss.float(), rtol=5e-2, atol=2e-3)
    for (name, p), q in zip(model.named_parameters(), fp32.parameters()):
        if p.grad is not None and checked(name):
            assert_rel_close(p.grad.float(), q.grad.float(), torch.bfloat16, name)


@pytest.mark.gpu
def test_cuda_bf16_backbone_targets_match_fp32():
    assert HAS_CUDA
    cfg = MedusaConfig(num_heads=3, mode="heads", head_targets="backbone")
    model = MedusaModel.from_backbone(tiny_llama(hidden=128, vocab=1000).to(DEVICE), cfg)
    randomize_heads(model)
    out, fp32, ref = _bf16_autocast_and_fp32_runs(model, torch.randint(0, 1000, (2, 64), device=DEVICE))
    torch.testing.assert_close(out.head_losses, ref.head_losses, rtol=5e-2, atol=5e-3)
    for (name, p), q in zip(model.heads.named_parameters(), fp32.heads.parameters()):
        # q - p of two close distributions: bf16 logits lose more of it than of a one-hot gradient.
        assert rel_norm_error(p.grad.float(), q.grad.float()) < 5e-2, name
