"""Row-kernel launch sweep: how close the fused loss's cross-entropy pass gets to the copy bandwidth.

The fused loss runs ``ce_rows`` once per chunk with both passes in one launch: pass 1 reads a logits
row (lse, loss, argmax), pass 2 reads it again and overwrites it with the gradient. That is three
crossings of the [C, V] chunk, two if pass 2 finds the row still in L2. This script times it at
C = 4096 and 2048 rows of V = 128256 bf16 for every combination of

    BLOCK x num_warps      (``cross_entropy.launch_config``; the default is 8192 x 16)
    programs               one per row (default), or k per SM striding over the rows
    L2 hints               pass 1 loads evict-last, pass 2 loads and stores evict-first

reports ms and GB/s (three crossings counted, so above the copy bandwidth means pass 2 hit L2) next
to the copy bandwidth of the same run, and checks each config's gradient against the one of the
default launch with plain loads and stores.

    python benchmarks/tune_row_kernel.py          # H100: about a minute
    python benchmarks/tune_row_kernel.py --quick  # small shapes, a few configs (also on CPU)
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402

CE = importlib.import_module("medusa_liger.kernels.cross_entropy")  # the module (the package exports a function)
DEVICE = common.DEVICE


def run_config(z0: torch.Tensor, labels: torch.Tensor, block: int, warps: int, per_sm: int, hints: bool,
               rep: int) -> tuple[float, torch.Tensor]:
    """(median ms of the row kernel alone, its gradient) for one launch config."""
    C = z0.shape[0]
    z = torch.empty_like(z0)
    lse, loss = torch.empty(C, device=DEVICE), torch.empty(C, device=DEVICE)
    correct = torch.empty(C, dtype=torch.int32, device=DEVICE)
    scale = torch.full((1,), 1.0 / C, device=DEVICE)
    saved = (CE.launch_config, CE.PERSISTENT_PROGRAMS_PER_SM, CE.L2_HINTS)
    CE.launch_config = lambda n_cols, device: (block, warps)
    CE.PERSISTENT_PROGRAMS_PER_SM, CE.L2_HINTS = per_sm, hints
    try:
        def step() -> None:
            z.copy_(z0)  # the kernel overwrites its input; the copy is timed apart and subtracted
            CE.ce_rows(z, labels, seq_len=C, scale=scale, lse=lse, loss=loss, correct=correct,
                       compute_lse=True, write_grad=True)

        step()
        ms = common.bench(step, rep=rep) - common.bench(lambda: z.copy_(z0), rep=rep)
        return max(ms, 0.0), z.clone()
    finally:
        CE.launch_config, CE.PERSISTENT_PROGRAMS_PER_SM, CE.L2_HINTS = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, a few configs: a smoke run")
    args = parser.parse_args()
    if args.quick:
        V, chunks, blocks, warps, per_sm, rep = 1000, [64], [256, 512], [4], [0, 1], 3
    else:
        V, chunks, blocks, warps, per_sm, rep = 128256, [4096, 2048], [4096, 8192, 16384], [8, 16, 32], [0, 1, 2], 30
    bw = common.copy_bandwidth_gbs() if common.CUDA else float("nan")
    rows = []
    for C in chunks:
        g = torch.Generator().manual_seed(0)
        z0 = (torch.randn(C, V, generator=g) * 3).to(DEVICE, common.DTYPE)
        labels = torch.randint(0, V, (C,), generator=g).to(DEVICE)
        crossing = 3 * z0.numel() * z0.element_size()
        default = CE.launch_config(V, DEVICE)
        _, want = run_config(z0, labels, *default, 0, False, rep)
        for block, nw, k, hints in itertools.product(blocks, warps, per_sm, (False, True)):
            try:
                ms, grad = run_config(z0, labels, block, nw, k, hints, rep)
                ok = torch.equal(grad, want) or bool(((grad.float() - want.float()).abs().max() <= 1e-6).item())
            except Exception as exc:  # a config that does not compile is recorded, not fatal
                print(f"C={C} {block}x{nw} p{k} hints={hints}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                continue
            mark = " (default)" if (block, nw, k, hints) == (*default, 0, CE.L2_HINTS) else ""
            rows.append([C, f"{block} x {nw}{mark}", "per row" if k == 0 else f"{k}/SM", "on" if hints else "off",
                         f"{ms:.3f}", f"{crossing / ms / 1e6:.0f}" if ms > 0 else "-", "ok" if ok else "DIFFERS"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        del z0, labels, want
        common.free_memory()
    rows.sort(key=lambda r: (-r[0], float(r[4])))
    notes = [f"V={V}, {str(common.DTYPE).replace('torch.', '')}; copy bandwidth in this run {bw:.0f} GB/s "
             "(read + write). GB/s counts three crossings of the chunk (pass 1 read, pass 2 read + write): above "
             "the copy bandwidth means pass 2 found rows in L2. do_bench medians (L2 flushed), the restoring copy "
             "subtracted. 'gradient': bit-equal (or within 1e-6) to the default launch's with plain loads and stores."]
    common.write_table("tune_row_kernel" + ("_quick" if args.quick else ""), "Cross-entropy row kernel: launch sweep",
                       ["chunk C", "BLOCK x warps", "programs", "L2 hints", "ms", "GB/s", "gradient"], rows, notes)


if __name__ == "__main__":
    main()
