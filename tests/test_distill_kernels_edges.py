"""Edges of the teacher-row kernels (kernels/kl_divergence.py, kernels/jsd.py) on both backends, against
float64 autograd (test_self_distillation.divergence_definition):

* the student's top-1 read across blocks (its column, not its offset in the block), first index on ties;
* a teacher row whose row stride is not the student's (a slice of a wider buffer);
* a teacher bias without a student bias;
* an infinite numerator (a -inf under the weighting side's mass) that a later, much larger running max
  rescales by exp(-huge) = 0: it must stay infinite, never NaN;
* an ignored row whose divergence is infinite: loss 0, gradient 0 (not 0 * inf).

The vocabulary sizes span several of the interpreter's blocks (512 columns); on the GPU the same rows fit
in one block, and the checks hold there too.
"""

from __future__ import annotations

import pytest
import torch

from medusa_liger.kernels import force_backend
from medusa_liger.kernels.jsd import jsd_rows
from medusa_liger.kernels.kl_divergence import kl_rows
from tests.test_self_distillation import divergence_definition
from tests.utils import DEVICE, assert_rel_close, poison_

# The kernels compute inf * 0 on branches a tl.where then discards; numpy says so in the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
BACKENDS = ["torch", "triton"]
# (name, extra kwargs of the row op, kwargs of divergence_definition)
DIVERGENCES = [("kl", dict(reverse=False), dict(reverse=False)), ("reverse_kl", dict(reverse=True), dict(reverse=True)),
               ("jsd", dict(beta=0.3), dict(jsd_beta=0.3))]


def _rows_op(name):
    return jsd_rows if name == "jsd" else kl_rows


def _run(backend, name, op_kwargs, student, teacher, labels, **kwargs):
    """(loss, correct, gradient) of the row op on ``backend``, gradient at factor 0.5."""
    rows = student.shape[0]
    loss = poison_(torch.empty(rows, device=DEVICE))
    correct = torch.full((rows,), -1, dtype=torch.int32, device=DEVICE)
    grad = student.clone()
    with force_backend(backend):
        _rows_op(name)(grad, teacher, labels, scale=torch.tensor([0.5], device=DEVICE), loss=loss, correct=correct,
                       write_grad=True, **op_kwargs, **kwargs)
    return loss, correct, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, op_kwargs, ref_kwargs", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
def test_top1_is_the_rows_column_across_blocks(backend, name, op_kwargs, ref_kwargs):
    """The student's argmax in the second and third of three 512-column blocks, and a tie across blocks
    (the first index wins): correct compares the column itself with the target."""
    V = 1100
    student = torch.randn(5, V, device=DEVICE)
    teacher = torch.randn(5, V, device=DEVICE)
    top = [700, 1099, 3, 1030, 600]
    for r, c in enumerate(top):
        student[r, c] = 9.0
    student[4, 1050] = 9.0  # a tie with column 600: the first one is the top-1
    # Row 3's target is another column; every other row's target is its top-1.
    labels = torch.tensor([700, 1099, 3, 5, 600], device=DEVICE)
    loss, correct, _ = _run(backend, name, op_kwargs, student, teacher, labels)
    assert correct.tolist() == [1, 1, 1, 0, 1]
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, op_kwargs, ref_kwargs", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
@pytest.mark.parametrize("V", [123, 1100])
def test_teacher_rows_with_their_own_stride(backend, name, op_kwargs, ref_kwargs, V):
    """The teacher a [:, :V] slice of a wider buffer (row stride V + 37), the student contiguous."""
    rows = 4
    student = torch.randn(rows, V, device=DEVICE) * 3
    wide = torch.randn(rows, V + 37, device=DEVICE) * 3
    teacher = wide[:, :V]
    labels = torch.randint(0, V, (rows,), device=DEVICE)
    valid = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    ref_loss, ref_grad = divergence_definition(student, teacher, None, None, None, 0.0, valid, 0.5, **ref_kwargs)
    loss, _, grad = _run(backend, name, op_kwargs, student, teacher, labels)
    assert_rel_close(loss, ref_loss, torch.float32, "row losses")
    assert_rel_close(grad, ref_grad, torch.float32, "gradient")
    assert torch.equal(wide[:, :V], teacher) and teacher.data_ptr() == wide.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, op_kwargs, ref_kwargs", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_teacher_bias_without_a_student_bias(backend, name, op_kwargs, ref_kwargs, softcap):
    rows, V = 4, 123
    student = torch.randn(rows, V, device=DEVICE) * 3
    teacher = torch.randn(rows, V, device=DEVICE) * 3
    tb = torch.randn(V, device=DEVICE) * 2
    labels = torch.randint(0, V, (rows,), device=DEVICE)
    valid = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    # divergence_definition adds both biases or neither: a zero student bias stands for none.
    ref_loss, ref_grad = divergence_definition(student, teacher, torch.zeros(V, device=DEVICE), tb, softcap, 0.0,
                                               valid, 0.5, **ref_kwargs)
    loss, _, grad = _run(backend, name, op_kwargs, student, teacher, labels, teacher_bias=tb, softcap=softcap)
    assert_rel_close(loss, ref_loss, torch.float32, "row losses")
    assert_rel_close(grad, ref_grad, torch.float32, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_an_infinite_numerator_stays_infinite_under_a_much_larger_later_max(backend, reverse):
    """Row 0: a -inf on the other side under the weighting side's mass in the first block, where the
    weighting side's logits are -200; its max is 0 two blocks on, so the running numerator is rescaled
    by exp(-200) = 0 in fp32. inf * 0 must not turn the loss or the gradient into NaN. (Whether such a
    row is +inf or finite depends on fp32 underflow of its weight exp(-200): either is accepted.) Row 1
    is an ordinary row and must match float64."""
    V = 1100
    student = torch.randn(2, V, device=DEVICE)
    teacher = torch.randn(2, V, device=DEVICE)
    weighing, other = (student, teacher) if reverse else (teacher, student)
    weighing[0, :512] = -200.0
    weighing[0, 512:] = -300.0
    weighing[0, 900] = 0.0
    other[0, 5] = float("-inf")
    labels = torch.zeros(2, dtype=torch.long, device=DEVICE)
    loss, _, grad = _run(backend, "kl", dict(reverse=reverse), student, teacher, labels)
    assert not loss.isnan().any() and not grad.isnan().any()
    assert loss[0] >= 0
    valid = torch.ones(1, dtype=torch.bool, device=DEVICE)
    ref_loss, ref_grad = divergence_definition(student[1:], teacher[1:], None, None, None, 0.0, valid, 0.5,
                                               reverse=reverse)
    assert_rel_close(loss[1:], ref_loss, torch.float32, "row losses")
    assert_rel_close(grad[1:], ref_grad, torch.float32, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_an_ignored_row_with_an_infinite_divergence_has_zero_loss_and_gradient(backend, reverse):
    """Row 0 is ignored (label -100) and its divergence is +inf (a -inf under the weighting side's mass):
    the reversed KL's gradient on that column is +inf before the row's factor, which must not become
    inf * 0 = NaN. Row 1 counts and has the same infinite divergence."""
    V = 123
    student = torch.randn(2, V, device=DEVICE)
    teacher = torch.randn(2, V, device=DEVICE)
    (teacher if reverse else student)[:, 5] = float("-inf")
    labels = torch.tensor([-100, 3], device=DEVICE)
    loss, correct, grad = _run(backend, "kl", dict(reverse=reverse), student, teacher, labels)
    assert loss[0] == 0 and (grad[0] == 0).all() and correct[0] == 0
    assert loss[1] == float("inf") and not grad[1].isnan().any()
