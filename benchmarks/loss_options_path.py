"""What label smoothing and z-loss cost the Medusa loss: the exp-operand path with and without them,
and the row kernel that took them before (kernels/exp_operand.py's rank-1 terms and row rescale).

    python benchmarks/loss_options_path.py            # settings (a) and (b) of medusa_loss.py, N = 16384
    python benchmarks/loss_options_path.py --quick    # small shapes (a smoke test, also on the CPU)

Each setting: K = 5 heads (ResBlock + projection), head by head as the Medusa model runs them,
fp32 weight-gradient accumulation, bf16; the methods in interleaved rounds (one timed step each per
round), medians. Each option's exp path and row kernel are also checked against each other (loss
and the gradients' relative difference), so a fast wrong answer cannot pass unnoticed.
(`smoothing_path_h100.md`, run 122, came from this script's first version, smoothing only.)
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

# Each option at a value used in practice: eps 0.1, z 1e-4 (PaLM's).
OPTIONS = {"smoothing 0.1": dict(label_smoothing=0.1), "z-loss 1e-4": dict(z_loss=1e-4)}


def ours(**options):
    def loss(p: Problem) -> torch.Tensor:
        return head_by_head_linear_cross_entropy(p.x, list(p.blocks), p.weights, p.labels, p.shifts, p.head_weights,
                                                 params=p.params, accum_dtype=torch.float32, **options).loss
    return loss


def gradients(p: Problem, fn) -> tuple[float, list[torch.Tensor]]:
    p.clear_grads()
    loss = fn(p)
    loss.backward()
    grads = [q.grad.detach().float().clone() for q in p.params]
    p.clear_grads()
    return float(loss.detach()), grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    K, B, T, H, V = (5, 4, 4096, 4096, 128256) if not args.quick else (3, 2, 64, 64, 512)
    dtype = torch.bfloat16 if common.CUDA else torch.float32
    methods = {"neither": ours()}
    for name, options in OPTIONS.items():
        methods[name] = ours(**options)
        methods[f"{name}, row kernel"] = with_row_kernel(ours(**options))
    rows, notes = [], []
    for setting, frozen in (("(a) per-head trainable", False), ("(b) shared frozen", True)):
        p = Problem(K, B, T, H, V, dtype, shared_frozen=frozen)
        for name in OPTIONS:
            loss_fast, g_fast = gradients(p, methods[name])
            loss_rows, g_rows = gradients(p, methods[f"{name}, row kernel"])
            worst = max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(g_fast, g_rows))
            notes.append(f"{setting}, {name}: loss {loss_fast:.6f} (exp path) vs {loss_rows:.6f} (row kernel); "
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
    common.write_table("loss_options_path" + ("_quick" if args.quick else "") + "_h100",
                       "Label smoothing and z-loss on the Medusa loss: exp-operand path vs row kernel",
                       ["setting", "tokens", *methods], rows, notes)


if __name__ == "__main__":
    main()
