"""What label smoothing costs the Medusa loss: the exp-operand path with and without it, and the row
kernel that took smoothed losses before (kernels/exp_operand.py's rank-1 terms).

    python benchmarks/smoothing_path.py            # settings (a) and (b) of medusa_loss.py, N = 16384
    python benchmarks/smoothing_path.py --quick    # small shapes (a smoke test, also on the CPU)

Each setting: K = 5 heads (ResBlock + projection), head by head as the Medusa model runs them,
fp32 weight-gradient accumulation, bf16; the three methods in interleaved rounds (one timed step
each per round), medians. The smoothed exp path and row kernel are also checked against each other
(loss and the gradients' relative difference), so a fast wrong answer cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # see medusa_loss.py
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402
from benchmarks.medusa_loss import Problem, training_step, with_row_kernel  # noqa: E402
from medusa_liger.kernels import head_by_head_linear_cross_entropy  # noqa: E402

EPS = 0.1


def ours(eps: float):
    def loss(p: Problem) -> torch.Tensor:
        return head_by_head_linear_cross_entropy(p.x, list(p.blocks), p.weights, p.labels, p.shifts, p.head_weights,
                                                 params=p.params, accum_dtype=torch.float32,
                                                 label_smoothing=eps).loss
    return loss


def gradients(p: Problem, fn) -> tuple[float, list[torch.Tensor]]:
    p.clear_grads()
    loss = fn(p)
    loss.backward()
    grads = [q.grad.detach().float().clone() for q in p.params]
    p.clear_grads()
    return float(loss), grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    K, B, T, H, V = (5, 4, 4096, 4096, 128256) if not args.quick else (3, 2, 64, 64, 512)
    dtype = torch.bfloat16 if common.CUDA else torch.float32
    methods = {"no smoothing": ours(0.0), f"smoothing {EPS}": ours(EPS),
               f"smoothing {EPS}, row kernel": with_row_kernel(ours(EPS))}
    rows, notes = [], []
    for setting, frozen in (("(a) per-head trainable", False), ("(b) shared frozen", True)):
        p = Problem(K, B, T, H, V, dtype, shared_frozen=frozen)
        loss_fast, g_fast = gradients(p, methods[f"smoothing {EPS}"])
        loss_rows, g_rows = gradients(p, methods[f"smoothing {EPS}, row kernel"])
        worst = max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(g_fast, g_rows))
        notes.append(f"{setting}: loss {loss_fast:.6f} (exp path) vs {loss_rows:.6f} (row kernel); "
                     f"largest relative gradient difference {worst:.2e}")
        steps = {name: training_step(p, fn) for name, fn in methods.items()}
        for step in steps.values():
            step()
        times = common.interleaved_rounds(steps, args.rounds)
        medians = {name: statistics.median(t) for name, t in times.items()}
        rows.append([setting, p.N, *[f"{medians[name]:.1f} ms" for name in methods]])
        del p, steps
        common.free_memory()
    notes.append(f"K={K} heads (ResBlock + projection, head by head), H={H}, V={V}, {str(dtype).replace('torch.', '')}, "
                 f"fp32 weight-gradient accumulation; median of {args.rounds} interleaved rounds of one step each.")
    common.write_table("smoothing_path" + ("_quick" if args.quick else "") + "_h100",
                       "Label smoothing on the Medusa loss: exp-operand path vs row kernel",
                       ["setting", "tokens", *methods], rows, notes)


if __name__ == "__main__":
    main()
