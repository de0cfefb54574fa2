"""The generalized Jensen-Shannon divergence: the JSD row kernel (kernels/jsd.py) on both backends, and
the fused loss's ``Teacher(jsd_beta=...)``, against float64 autograd on materialized logits.

The definition (test_self_distillation.divergence_definition) takes the reference's
(``reference.generalized_jsd``), written independently of the kernel:
log m by torch.logaddexp, every term masked where its weight is 0 (so autograd never sees 0 * inf).
The closed-form bound and the exact zero below, and the model-level definitions in
test_self_distillation.py, check that definition itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from medusa_liger.heads import MedusaConfig
from medusa_liger.kernels import Teacher, force_backend, multi_head_linear_cross_entropy
from medusa_liger.kernels.jsd import jsd_rows
from medusa_liger.kernels.reference import multi_head_linear_cross_entropy_reference as reference
from tests.test_self_distillation import _distill_problem, assert_teachers_match_the_reference, divergence_definition
from tests.utils import DEVICE, DTYPES, HAS_CUDA, VOCABS, assert_rel_close, poison_

BACKENDS = ["torch", "triton"]


# --------------------------------------------------------------------------------- row kernel
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [123, 1100])  # one block, and several blocks on either backend
@pytest.mark.parametrize("beta, bias, softcap, z_loss, temperature",
                         [(0.5, False, None, 0.0, 1.0), (0.1, True, 5.0, 1e-2, 1.0), (0.9, False, None, 0.0, 2.5),
                          (0.3, True, 4.0, 0.0, 0.6)])
def test_jsd_rows_match_fp64(backend, dtype, V, beta, bias, softcap, z_loss, temperature):
    rows, T = 6, 6
    student = (torch.randn(rows, V, device=DEVICE) * 3).to(dtype)
    teacher = (torch.randn(rows, V, device=DEVICE) * 3).to(dtype)
    # -inf on either side: a column only one distribution rules out, and one both rule out.
    student[0, : V // 3] = float("-inf")
    teacher[1, V // 4 : V // 2] = float("-inf")
    student[4, 7], teacher[4, 7] = float("-inf"), float("-inf")
    b = torch.randn(V, device=DEVICE) if bias else None
    tb = torch.randn(V, device=DEVICE) if bias else None
    labels = torch.randint(0, V, (T,), device=DEVICE)
    labels[3] = -100
    student[2] = teacher[2]
    # Shift 1 over one sequence of T = rows: row 2's target is ignored, and the last row's is past the end.
    valid = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    valid[2], valid[5] = False, False
    ref_loss, ref_grad = divergence_definition(student, teacher, b, tb, softcap, z_loss, valid, 0.5, temperature,
                                                jsd_beta=beta)
    loss = poison_(torch.empty(rows, device=DEVICE))
    correct = torch.full((rows,), -1, dtype=torch.int32, device=DEVICE)
    grad = student.clone()
    with force_backend(backend):
        jsd_rows(grad, teacher.clone(), labels, beta=beta, shift=1, bias=b, teacher_bias=tb,
                 scale=torch.tensor([0.5], device=DEVICE), loss=loss, correct=correct, z_loss=z_loss, softcap=softcap,
                 temperature=temperature, write_grad=True)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_rel_close(loss, ref_loss, dtype, "row losses")
    assert_rel_close(grad, ref_grad, dtype, "gradient")
    assert (grad[~valid] == 0).all() and (loss[~valid] == 0).all()
    assert (grad[0, : V // 3] == 0).all(), "no gradient where the student has no mass"
    y = student.double() + (0 if b is None else b.double())
    expected = (y.argmax(-1) == torch.cat([labels[1:], labels[:1]])) & valid  # softcap keeps the argmax
    assert correct.tolist() == expected.int().tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("vocab", list(VOCABS.values()), ids=list(VOCABS))
def test_gpu_jsd_rows_at_real_vocab_sizes(vocab):
    """bf16 rows of real vocabularies (several of the GPU's blocks), against fp64."""
    rows = 4
    student = (torch.randn(rows, vocab, device="cuda") * 4).bfloat16()
    teacher = (torch.randn(rows, vocab, device="cuda") * 4).bfloat16()
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    valid = torch.ones(rows, dtype=torch.bool, device="cuda")
    ref_loss, ref_grad = divergence_definition(student, teacher, None, None, None, 0.0, valid, 1.0, jsd_beta=0.5)
    loss = torch.empty(rows, device="cuda")
    grad = student.clone()
    jsd_rows(grad, teacher, labels, beta=0.5, scale=torch.ones(1, device="cuda"), loss=loss, write_grad=True)
    assert_rel_close(loss, ref_loss, torch.bfloat16, "row losses")
    assert_rel_close(grad, ref_grad, torch.bfloat16, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_jsd_of_a_student_equal_to_its_teacher_is_exactly_zero(backend, beta):
    """The mixture of two equal distributions is taken as log(beta + (1 - beta)) = 0 exactly."""
    logits = torch.randn(4, 300, device=DEVICE) * 5
    logits[1, :20] = float("-inf")
    loss = torch.empty(4, device=DEVICE)
    grad = logits.clone()
    with force_backend(backend):
        jsd_rows(grad, logits, torch.arange(4, device=DEVICE), beta=beta, scale=torch.ones(1, device=DEVICE),
                 loss=loss, write_grad=True)
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_is_bounded_where_one_side_rules_a_token_out(backend):
    """Disjoint supports: JSD_beta = -beta log(beta) - (1 - beta) log(1 - beta), its largest value."""
    V, beta = 64, 0.3
    student = torch.zeros(1, V, device=DEVICE)
    teacher = torch.zeros(1, V, device=DEVICE)
    student[0, V // 2 :], teacher[0, : V // 2] = float("-inf"), float("-inf")
    loss = torch.empty(1, device=DEVICE)
    with force_backend(backend):
        jsd_rows(student, teacher, torch.zeros(1, dtype=torch.long, device=DEVICE), beta=beta,
                 scale=torch.ones(1, device=DEVICE), loss=loss, write_grad=True)
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert abs(loss.item() - bound) < 1e-6
    assert torch.isfinite(student).all()


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 1.5, True, "half", float("nan")])
def test_jsd_rows_refuse_a_beta_outside_the_open_interval(beta):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="beta must be a number in \\(0, 1\\)"):
        jsd_rows(x, x.clone(), torch.zeros(2, dtype=torch.long), beta=beta, loss=torch.empty(2))


# ------------------------------------------------------------------------------ fused op
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skip_ignored", [False, True])
def test_jsd_teachers_match_the_reference(backend, skip_ignored):
    """Head 0: JSD_0.3 at temperature 1.5 with a teacher bias; head 1: labels; head 2: a KL teacher
    read 2 positions on: every gradient, the divergence kinds mixed in one call."""
    hidden, weight, bias, labels, segments, teacher = _distill_problem(True)
    teacher = [Teacher(*teacher[0], temperature=1.5, jsd_beta=0.3), None, teacher[2]]
    options = dict(bias=bias, segment_ids=segments, softcap=6.0)
    args = (hidden, weight, labels, [1, 2, 3], [1.0, 0.5, 0.25])
    t0 = teacher[0]
    kl = reference(*args, teacher=[Teacher(t0.hidden, t0.weight, t0.bias, temperature=1.5), None, teacher[2]],
                   compute_dtype=torch.float64, **options)
    out, ref = assert_teachers_match_the_reference(backend, skip_ignored, args, teacher, options)
    assert abs(float(kl.head_losses[0]) - float(ref.head_losses[0])) > 1e-3, "the JSD should differ from the KL"
    assert out.head_accuracy.tolist() == ref.head_accuracy.tolist()


@pytest.mark.parametrize(("entry", "match"), [
    (dict(jsd_beta=1.0), "teacher\\[0\\] jsd_beta must be a number in \\(0, 1\\)"),
    (dict(jsd_beta="0.5"), "teacher\\[0\\] jsd_beta must be a number in \\(0, 1\\)"),
    (dict(jsd_beta=0.5, reverse=True), "teacher\\[0\\] reverse must be False with jsd_beta"),
])
def test_bad_jsd_teacher_raises(entry, match):
    hidden, weight, _, labels, _, teacher = _distill_problem(True)
    bad = [Teacher(teacher[0][0], teacher[0][1], **entry), None, None]
    with pytest.raises(ValueError, match=match):
        multi_head_linear_cross_entropy(hidden, weight, labels, [1, 2, 3], teacher=bad)


@pytest.mark.parametrize(("fields", "match"), [
    (dict(jsd_beta=0.0), "jsd_beta must be a number in \\(0, 1\\)"),
    (dict(jsd_beta=0.5, kl_direction="reverse"), "kl_direction must be 'forward' with jsd_beta"),
])
def test_medusa_config_checks_jsd_beta(fields, match):
    with pytest.raises(ValueError, match=match):
        MedusaConfig(**fields)
