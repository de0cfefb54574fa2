"""Self-distillation loss benchmark: the backbone's KL(teacher || student) term of Medusa-2, bf16.

The LoRA setting of ``train.lm_loss=kl``: the student's last hidden state h [N, H] needs a gradient,
the teacher's h' [N, H] (the backbone with its adapters off) is a constant, and both project through
the same frozen lm_head W [V, H]. Forward+backward of the loss, N = 4096 and 16384 tokens, H = 4096,
V = 128256, in the same run:

* naive: both logits materialized (bf16 GEMMs), log_softmax in fp32, F.kl_div(log_target=True);
* liger: liger-kernel 0.8.5 LigerFusedLinearJSDLoss with beta=0 (its forward KL(teacher || student)),
  weight_soft_loss=1, weight_hard_loss=0 (the chunked loss; it compiles its chunk function);
* ours: multi_head_linear_cross_entropy with teacher=[(h', W)] (kernels/kl_divergence.py's row kernel);
* ours, hard labels: the same op's cross-entropy on the labels, for the cost of distilling instead;
* the generalized JSD at beta = 0.5 (beta KL(teacher || m) + (1 - beta) KL(student || m), m the
  mixture): Liger's LigerFusedLinearJSDLoss(beta=0.5) and ours, Teacher(..., jsd_beta=0.5)
  (kernels/jsd.py's row kernel); their loss values are compared once per size with the float64 value
  from the same bf16 logits (the same definition and the same mean over valid tokens).

Reported: median ms, peak memory beyond the inputs (GiB), and the matmul floor as a fraction of the
time: 6NHV FLOP (student logits, teacher logits, hidden gradient) for the KL columns, 4NHV for the
cross-entropy column, at the bf16 matmul rate measured in the same run.

    python benchmarks/self_distill_loss.py           # H100: about 2 minutes
    python benchmarks/self_distill_loss.py --quick   # small shapes, a smoke test (also on CPU)
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# Python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow HF's
# optional `kernels` package (transformers probes it): import our helpers from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402

from medusa_liger.kernels import Teacher, multi_head_linear_cross_entropy  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


class Problem:
    def __init__(self, N: int, H: int, V: int, dtype: torch.dtype) -> None:
        self.N, self.H, self.V = N, H, V
        self.weight = torch.randn(V, H, device=DEVICE, dtype=dtype) * H**-0.5
        self.teacher = torch.randn(N, H, device=DEVICE, dtype=dtype)
        # The student near its teacher, as after a few LoRA steps.
        self.student = (self.teacher + 0.1 * torch.randn_like(self.teacher)).requires_grad_()
        self.labels = torch.randint(0, V, (1, N), device=DEVICE)
        self.labels[:, -7:] = -100
        self.targets = torch.cat([self.labels[0, 1:], self.labels.new_full((1,), -100)])  # shift 1

    def clear_grads(self) -> None:
        self.student.grad = None


def naive(p: Problem) -> torch.Tensor:
    log_q = torch.log_softmax((p.student @ p.weight.t()).float(), -1)
    with torch.no_grad():
        log_p = torch.log_softmax((p.teacher @ p.weight.t()).float(), -1)
    rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    valid = p.targets != -100
    return (rows * valid).sum() / valid.sum()


def make_liger(beta: float) -> Callable[[Problem], torch.Tensor] | None:
    module = common.optional_import("liger_kernel.chunked_loss")
    if module is None:
        return None
    jsd = module.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta)

    def liger(p: Problem) -> torch.Tensor:
        return jsd(p.student, p.weight, p.teacher, p.weight, p.targets)

    return liger


def ours(p: Problem) -> torch.Tensor:
    h = p.student.view(1, p.N, p.H)
    return multi_head_linear_cross_entropy(h, p.weight, p.labels, [1],
                                           teacher=[(p.teacher.view(1, p.N, p.H), p.weight)]).loss


def ours_jsd(p: Problem) -> torch.Tensor:
    h = p.student.view(1, p.N, p.H)
    teacher = Teacher(p.teacher.view(1, p.N, p.H), p.weight, jsd_beta=0.5)
    return multi_head_linear_cross_entropy(h, p.weight, p.labels, [1], teacher=[teacher]).loss


def jsd_fp64(p: Problem, beta: float, rows_per_step: int = 512) -> float:
    """The mean JSD over the valid rows in float64, from the bf16 logits both implementations' GEMMs
    produce: the value an exact loss on those logits gives."""
    total, count = 0.0, 0
    for r0 in range(0, p.N, rows_per_step):
        valid = p.targets[r0 : r0 + rows_per_step] != -100
        log_q, log_p = (torch.log_softmax((h[r0 : r0 + rows_per_step] @ p.weight.t()).double(), -1)
                        for h in (p.student.detach(), p.teacher))
        log_m = torch.logaddexp(math.log(beta) + log_p, math.log(1 - beta) + log_q)
        rows = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
        total, count = total + float(rows[valid].sum()), count + int(valid.sum())
    return total / count


def ours_hard_labels(p: Problem) -> torch.Tensor:
    return multi_head_linear_cross_entropy(p.student.view(1, p.N, p.H), p.weight, p.labels, [1]).loss


def measure(p: Problem, loss_fn: Callable[[Problem], torch.Tensor], rep: int) -> tuple[float, float]:
    def step() -> None:
        p.clear_grads()
        loss_fn(p).backward()

    gib = common.peak_extra_memory_gib(step)
    ms = common.bench(step, warmup=1, rep=rep)
    p.clear_grads()
    return ms, gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    args = parser.parse_args()
    H, V, token_counts = (64, 512, [256]) if args.quick else (4096, 128256, [4096, 16384])
    dtype = torch.bfloat16 if CUDA else torch.float32
    rate = common.matmul_tflops(torch.bfloat16) if CUDA else float("nan")
    methods = {"naive": naive, "liger JSD beta=0": make_liger(0.0), "ours": ours, "ours, hard labels (CE)": ours_hard_labels,
               "liger JSD beta=0.5": make_liger(0.5), "ours JSD beta=0.5": ours_jsd}
    rows, agreement = [], []
    for N in token_counts:
        # Liger compiles its chunk function; a fresh compile per size, as a training run of one size gets
        # (recompiling for the second size inside one process failed in torch 2.11's guard code).
        torch._dynamo.reset()
        p = Problem(N, H, V, dtype)
        if methods["liger JSD beta=0.5"] is not None:
            with torch.no_grad():
                theirs, mine = (float(methods[m](p)) for m in ("liger JSD beta=0.5", "ours JSD beta=0.5"))
                exact = jsd_fp64(p, 0.5)
            agreement.append(f"N={N}: fp64 {exact:.6g}, ours {mine:.6g} (relative error {abs(mine - exact) / exact:.1e}), "
                             f"liger {theirs:.6g} ({abs(theirs - exact) / exact:.1e})")
            print("JSD values,", agreement[-1], flush=True)
        row: list[object] = [N]
        for name, fn in methods.items():
            if fn is None:
                row.append("not installed")
                continue
            floor_ms = (4 if "CE" in name else 6) * N * H * V / (rate * 1e12) * 1e3
            try:
                ms, gib = measure(p, fn, rep=1000)
                row.append(f"{ms:.1f} ms / {gib:.2f} GiB / {floor_ms / ms:.0%}" if floor_ms == floor_ms
                           else f"{ms:.1f} ms / {gib:.2f} GiB")
            except torch.cuda.OutOfMemoryError:
                row.append("OOM")
            except Exception as exc:  # a baseline that breaks here is recorded, not fatal
                row.append(f"error: {type(exc).__name__}: {str(exc)[:60]}")
            p.clear_grads()
            common.free_memory()
            print(N, name, row[-1], flush=True)
        rows.append(row)
        del p
        common.free_memory()
    notes = [
        f"H={H}, V={V}, {str(dtype).replace('torch.', '')}; one frozen lm_head shared by student and teacher, "
        f"student hidden state trainable; bf16 matmul rate measured in this run: {rate:.0f} TFLOP/s.",
        "Cells: median ms of forward+backward / peak memory beyond the inputs / matmul floor (6NHV for KL and "
        "JSD: student logits, teacher logits, hidden gradient; 4NHV for CE) as a fraction of the time.",
        *(["JSD beta=0.5 loss values on the same inputs, against float64 from the same bf16 logits: "
           + "; ".join(agreement) + "."] if agreement else []),
    ]
    common.write_table("self_distill_loss_h100" if not args.quick else "self_distill_loss_quick",
                       "Self-distillation loss (KL to the adapters-off backbone): forward+backward",
                       ["tokens", *methods], rows, notes)


if __name__ == "__main__":
    main()
