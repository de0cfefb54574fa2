"""The cross-entropy row kernel against another version of kernels/cross_entropy.py, same run.

The row kernel is memory-bound and within 7% of its floor, so any change to it (here: the
target column's gradient from the other columns' mass) must be timed against the version before
it on the same card, in interleaved rounds (H100s drift by up to 10% between minutes). Two uses:

    ce_rows, one launch  [4096, V] bf16: both passes, as each chunk of the fused multi-head loss
    cross_entropy        [8192, V] bf16: forward + backward, as the patched backbone's loss

    git show HEAD~1:medusa_liger/kernels/cross_entropy.py > /tmp/before.py
    python benchmarks/cross_entropy_compare.py --before /tmp/before.py
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, installed or not

from benchmarks.common import bench, interleaved_rounds, load_module_file, write_table  # noqa: E402

import torch  # noqa: E402

V = 128256


def cases(module, name: str) -> dict[str, callable]:
    g = torch.Generator(device="cpu").manual_seed(0)
    chunk = (torch.randn(4096, V, generator=g) * 3).to("cuda", torch.bfloat16)
    chunk_labels = torch.randint(0, V, (4096,), generator=g).cuda()
    logits = (torch.randn(8192, V, generator=g) * 3).to("cuda", torch.bfloat16)
    labels = torch.randint(0, V, (8192,), generator=g).cuda()
    lse, loss = torch.empty(4096, device="cuda"), torch.empty(4096, device="cuda")
    correct = torch.empty(4096, device="cuda", dtype=torch.int32)
    scale = torch.full((1,), 1.0 / 4096, device="cuda")

    def one_launch() -> None:  # overwrites the chunk with its gradient: the values stay finite
        module.ce_rows(chunk, chunk_labels, scale=scale, lse=lse, loss=loss, correct=correct, write_grad=True)

    def forward_backward() -> None:
        x = logits.requires_grad_()
        module.cross_entropy(x, labels).backward()
        x.grad = None

    return {f"ce_rows one launch [4096, V], {name}": one_launch,
            f"cross_entropy fwd+bwd [8192, V], {name}": forward_backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="another cross_entropy.py")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cross_entropy_compare.py needs a CUDA device")
    current = importlib.import_module("medusa_liger.kernels.cross_entropy")
    before = load_module_file(args.before, f"cross_entropy_{Path(args.before).stem}")
    runs = {**cases(current, "this version"), **cases(before, f"{args.before}")}
    times = interleaved_rounds(runs, args.rounds, timer=lambda fn: bench(fn, warmup=25, rep=200))
    rows = []
    for name, ts in times.items():
        rows.append([name, f"{statistics.median(ts):.3f}", f"{min(ts):.3f} - {max(ts):.3f}"])
        print(rows[-1], flush=True)
    write_table("cross_entropy_compare", "Cross-entropy row kernel: this version against another, same run",
                ["work, version", f"median ms ({args.rounds} interleaved rounds of do_bench medians)", "range"], rows,
                ["do_bench (L2 cleared between calls), V = 128256, bf16. One launch: compute_lse and write_grad "
                 "in one kernel, as the fused loss runs each chunk."])


if __name__ == "__main__":
    main()
