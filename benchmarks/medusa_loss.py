"""Medusa loss benchmark: K heads (ResBlock, then a vocab projection) forward+backward, bf16.

Settings: (a) one trainable [V, H] projection per head; (b) one shared frozen projection (Medusa
heads that reuse the backbone's lm_head). Head k predicts the token k+2 ahead, weight 0.8**k. In the
same run, for N = 4096 and 16384 tokens:

* naive: per head, logits = y_k @ W_k^T in bf16, then F.cross_entropy on logits.float() (Medusa's
  own trainer does this);
* liger: liger-kernel 0.8.5 LigerFusedLinearCrossEntropyLoss, once per head;
* cce: cut-cross-entropy 25.1.1 linear_cross_entropy, once per head;
* ours: one multi_head_linear_cross_entropy call for all heads (fp32 and bf16 weight-grad accumulation).

Reported: median ms of one training step's loss part (ResBlocks + projection + CE, forward and
backward), peak memory beyond the parameters and inputs (GiB; includes the weight gradients, the
ResBlock activations and the hidden-state gradients), and the matmul floor (6NHV FLOP per trainable
projection, 4NHV frozen, at the bf16 matmul rate measured in the same run) as a fraction of the time.
A failing or out-of-memory column is recorded, never a crash.

    python benchmarks/medusa_loss.py           # H100: about 4 minutes
    python benchmarks/medusa_loss.py --quick   # small shapes, a smoke test (also on CPU)
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow HF's
# optional `kernels` package (transformers probes it): import our helpers from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402

from medusa_liger.kernels import multi_head_linear_cross_entropy  # noqa: E402
from medusa_liger.kernels.fused_linear_cross_entropy import default_chunk_rows  # noqa: E402
from medusa_liger.kernels.reference import shifted_targets  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


class ResBlock(nn.Module):
    """Medusa's head block: y = x + silu(linear(x))."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, device=DEVICE, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class Problem:
    """Parameters and inputs of one setting; ``params`` are what the step trains."""

    def __init__(self, K: int, B: int, T: int, H: int, V: int, dtype: torch.dtype, shared_frozen: bool) -> None:
        self.K, self.N, self.H, self.V = K, B * T, H, V
        self.shifts = [k + 2 for k in range(K)]
        self.head_weights = [0.8**k for k in range(K)]
        self.blocks = nn.ModuleList([ResBlock(H, dtype) for _ in range(K)])
        if shared_frozen:
            w = (torch.randn(V, H, device=DEVICE, dtype=dtype) * H**-0.5).requires_grad_(False)
            self.weights = [w] * K
        else:
            self.weights = [(torch.randn(V, H, device=DEVICE, dtype=dtype) * H**-0.5).requires_grad_() for _ in range(K)]
        self.x = torch.randn(B, T, H, device=DEVICE, dtype=dtype)  # the frozen backbone's last hidden state
        self.labels = torch.randint(0, V, (B, T), device=DEVICE)
        self.labels[:, -7:] = -100
        self.targets = [shifted_targets(self.labels, s).reshape(-1) for s in self.shifts]
        self.params = list(self.blocks.parameters()) + [w for w in self.weights[:1 if shared_frozen else K]
                                                          if w.requires_grad]
        self.flops = K * (4 if shared_frozen else 6) * self.N * H * V

    def clear_grads(self) -> None:
        for p in self.params:
            p.grad = None


def naive(p: Problem) -> torch.Tensor:
    loss = 0.0
    for k in range(p.K):
        logits = p.blocks[k](p.x) @ p.weights[k].t()
        ce = F.cross_entropy(logits.float().reshape(-1, p.V), p.targets[k])
        loss = loss + p.head_weights[k] * ce
    return loss


def make_liger() -> Callable[[Problem], torch.Tensor] | None:
    module = common.optional_import("liger_kernel.transformers")
    if module is None:
        return None
    ce = module.LigerFusedLinearCrossEntropyLoss()

    def liger(p: Problem) -> torch.Tensor:
        loss = 0.0
        for k in range(p.K):
            y = p.blocks[k](p.x).reshape(-1, p.H)
            loss = loss + p.head_weights[k] * ce(p.weights[k], y, p.targets[k])
        return loss

    return liger


def make_cce() -> Callable[[Problem], torch.Tensor] | None:
    module = common.optional_import("cut_cross_entropy")
    if module is None:
        return None

    def cce(p: Problem) -> torch.Tensor:
        loss = 0.0
        for k in range(p.K):
            y = p.blocks[k](p.x).reshape(-1, p.H)
            loss = loss + p.head_weights[k] * module.linear_cross_entropy(y, p.weights[k], p.targets[k])
        return loss

    return cce


def make_ours(accum_dtype: torch.dtype) -> Callable[[Problem], torch.Tensor]:
    def ours(p: Problem) -> torch.Tensor:
        hidden = [block(p.x) for block in p.blocks]
        return multi_head_linear_cross_entropy(hidden, p.weights, p.labels, p.shifts, p.head_weights,
                                               accum_dtype=accum_dtype).loss

    return ours


def measure(p: Problem, loss_fn: Callable[[Problem], torch.Tensor], reps: int) -> tuple[float, float]:
    """(median ms, peak extra GiB) of one forward+backward; gradients are freed between calls.

    ``reps`` is do_bench's measuring time in ms (at least one call).
    """

    def step() -> None:
        p.clear_grads()
        loss_fn(p).backward()

    p.clear_grads()
    gib = common.peak_extra_memory_gib(step)
    p.clear_grads()
    ms = common.bench(step, warmup=1, rep=reps)
    p.clear_grads()
    return ms, gib


def cleanup() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    args = parser.parse_args()
    if args.quick:
        K, H, V, token_counts, T = 5, 256, 4096, [512], 256
    else:
        K, H, V, token_counts, T = 5, 4096, 128256, [4096, 16384], 4096
    dtype = torch.bfloat16 if CUDA else torch.float32
    rate = common.matmul_tflops(torch.bfloat16) if CUDA else float("nan")
    methods: dict[str, Callable | None] = {
        "naive": naive,
        "liger per head": make_liger(),
        "cce per head": make_cce(),
        "ours fp32 acc": make_ours(torch.float32),
        "ours bf16 acc": make_ours(torch.bfloat16),
    }
    rows = []
    for setting, shared_frozen in (("(a) per-head trainable", False), ("(b) shared frozen", True)):
        for N in token_counts:
            p = Problem(K, N // T, T, H, V, dtype, shared_frozen)
            floor_ms = p.flops / (rate * 1e12) * 1e3 if rate == rate else float("nan")
            grads_gib = sum(w.numel() * w.element_size() for w in p.weights[: (0 if shared_frozen else K)]) / 2**30
            row = [setting, N, f"{floor_ms:.1f}", f"{grads_gib:.2f}"]
            for name, fn in methods.items():
                if fn is None:
                    row.append("not installed")
                    continue
                try:
                    ms, gib = measure(p, fn, reps=2000 if N > 4096 else 1000)
                    row.append(f"{ms:.1f} ms / {gib:.2f} GiB / {floor_ms / ms:.0%}" if floor_ms == floor_ms
                               else f"{ms:.1f} ms / {gib:.2f} GiB")
                except torch.cuda.OutOfMemoryError:
                    row.append("OOM")
                except Exception as exc:  # a baseline that breaks here is recorded, not fatal
                    row.append(f"error: {type(exc).__name__}: {str(exc)[:60]}")
                p.clear_grads()
                cleanup()
                print(setting, N, name, row[-1], flush=True)
            rows.append(row)
            del p
            cleanup()
    header = ["setting", "tokens", "matmul floor ms", "weight grads GiB", *methods]
    notes = [
        f"K={K} heads (shift k+2, weight 0.8**k), H={H}, V={V}, {str(dtype).replace('torch.', '')}; "
        f"bf16 matmul rate measured in this run: {rate:.0f} TFLOP/s.",
        "Cells: median ms of forward+backward (ResBlocks + projections + CE) / peak memory beyond parameters "
        "and inputs (includes weight gradients, ResBlock activations, hidden-state gradients) / matmul floor "
        "(6NHV per trainable projection, 4NHV frozen) as a fraction of the time.",
        f"ours computes every gradient in forward (one [{default_chunk_rows(V, dtype)}, V] logit chunk, at most one "
        "fp32 weight-gradient accumulator at a time); its hidden-state gradients ([N, H] per head) live from "
        "forward to backward.",
    ]
    common.write_table("medusa_loss_h100" if not args.quick else "medusa_loss_quick",
                       "Medusa multi-head loss: forward+backward", header, rows, notes)


if __name__ == "__main__":
    main()
