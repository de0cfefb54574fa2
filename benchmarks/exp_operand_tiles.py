"""Tile configurations of the exp-operand GEMMs under sustained load (H100).

A Medusa-loss step of setting (b) runs its two big GEMMs back to back for ~250 ms, long enough for
the card to sit at its power cap with lowered clocks; a single-chunk do_bench (exp_operand_probe.py)
measures bursts instead. Here each measurement is one step's worth of frozen chunks (K=5 heads x
N/C chunks of C=4096 rows, H=4096, V=128256, bf16) through the library's exp-operand chunk, with one
GEMM's tile configuration (kernels/exp_operand.GPU_TILES) changed at a time, against cuBLAS's two
GEMMs alone on the same chunks. Rounds are interleaved, so drift hits every configuration alike.
``--compare`` times other versions of kernels/exp_operand.py (e.g. the one before a change) beside
this one, on the same chunks and base tiles.

    python benchmarks/exp_operand_tiles.py
    git show HEAD~1:medusa_liger/kernels/exp_operand.py > /tmp/before.py
    python benchmarks/exp_operand_tiles.py --variants= --compare /tmp/before.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, installed or not

from benchmarks.common import interleaved_rounds, load_module_file, write_table  # noqa: E402

import torch  # noqa: E402
from medusa_liger.kernels import exp_operand  # noqa: E402
from medusa_liger.kernels.chunking import mm_into  # noqa: E402

K, N, C, H, V = 5, 16384, 4096, 4096, 128256
BASE = dict(exp_operand.GPU_TILES)
# Changes from BASE, one GEMM's configuration at a time (fields of exp_operand.GemmConfig).
VARIANTS = [
    dict(logits=dict(group=4)),
    dict(logits=dict(subtile=True)),
    dict(logits=dict(subtile=True, stages=4)),
    dict(logits=dict(subtile=True, stages=4, group=4)),
    dict(logits=dict(subtile=True, bk=128, stages=2)),
    dict(dh=dict(group=4)),
    dict(logits=dict(warp_specialize=True)),
    dict(logits=dict(warp_specialize=True, subtile=True)),
    dict(logits=dict(warp_specialize=True, subtile=True, stages=4)),
    dict(dh=dict(warp_specialize=True)),
    dict(dh=dict(warp_specialize=True, stages=4)),
    dict(logits=dict(warp_specialize=True, warps=4, bn=128, stages=4)),
    dict(dh=dict(cublas=True)),
    # Two CTAs an SM (13-16): one CTA's MUFU-bound epilogue beside the other's MMAs (the epilogue costs
    # ~3% of the logits GEMM when it runs alone: benchmarks/NOTES.md, run 103).
    dict(logits=dict(bn=128, warps=4, stages=2, programs_per_sm=2)),
    dict(logits=dict(bn=128, warps=4, stages=3, subtile=True, programs_per_sm=2)),
    dict(logits=dict(bn=128, warps=8, stages=2, programs_per_sm=2)),
    dict(logits=dict(bm=64, warps=4, stages=2, subtile=True, programs_per_sm=2)),
    # The ping-pong Gluon logits GEMM (17-18): two consumer warpgroups alternating 128 x 128 tiles,
    # so one's epilogue runs beside the other's MMAs (kernels/exp_operand_gluon.py).
    dict(logits=dict(gluon=True, bn=128, stages=4, group=8)),
    dict(logits=dict(gluon=True, bn=128, stages=4, group=16)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: all; "
                        "empty: none)")
    parser.add_argument("--compare", action="append", default=[], metavar="PATH",
                        help="another exp_operand.py to time with the base tiles (repeatable)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("exp_operand_tiles.py needs a CUDA device")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, H, generator=g).to(dev, dtype)
    w = (torch.randn(V, H, generator=g) * H**-0.5).to(dev, dtype)
    target = torch.randint(0, V, (N,), generator=g).to(dev)
    valid = torch.ones(N, dtype=torch.bool, device=dev)
    scale = torch.full((1,), 1.0 / N, device=dev)
    e = torch.empty(C, V, device=dev, dtype=dtype)
    dh = torch.empty(N, H, device=dev, dtype=dtype)
    loss, correct = torch.empty(N, device=dev), torch.empty(N, device=dev, dtype=torch.int32)

    def ours(module=exp_operand) -> None:
        for _ in range(K):
            for r0 in range(0, N, C):
                module.exp_operand_chunk(e, h[r0 : r0 + C], w, target[r0 : r0 + C], valid[r0 : r0 + C], scale,
                                         loss[r0 : r0 + C], correct[r0 : r0 + C], dh[r0 : r0 + C], False, None, False)

    def cublas() -> None:
        for _ in range(K):
            for r0 in range(0, N, C):
                mm_into(e, h[r0 : r0 + C], w.t(), accumulate=False)
                mm_into(dh[r0 : r0 + C], e, w, accumulate=False)

    def with_tiles(change):
        def run() -> None:
            exp_operand.GPU_TILES = {gemm: cfg._replace(**change.get(gemm, {})) for gemm, cfg in BASE.items()}
            try:
                ours()
            finally:
                exp_operand.GPU_TILES = dict(BASE)
        return run

    base = f"ours, base {BASE}"
    cases = {"cuBLAS logits + dh GEMMs alone": cublas, base: with_tiles({})}
    chosen = VARIANTS if args.variants is None else [VARIANTS[int(i)] for i in args.variants.split(",") if i]
    cases.update({f"ours, {change}": with_tiles(change) for change in chosen})
    for path in args.compare:
        module = load_module_file(path, f"exp_operand_{Path(path).stem}")
        module.GPU_TILES = dict(BASE)
        cases[f"ours with {path}, base tiles"] = lambda module=module: ours(module)
    names = list(cases)  # the table keeps this order, failed cases included
    expected = None
    for name, fn in list(cases.items()):  # compile and warm; drop what fails to build or computes wrong
        try:
            fn()
            torch.cuda.synchronize()
            if name == base:
                expected = loss.clone(), dh.clone()
            elif expected is not None and not (torch.allclose(loss, expected[0], rtol=1e-3, atol=1e-5)
                                               and torch.allclose(dh.float(), expected[1].float(), rtol=2e-2, atol=1e-6)):
                raise AssertionError("results differ from the base configuration's")
        except Exception as exc:
            print(f"{name}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            del cases[name]
    measured = interleaved_rounds(cases, args.rounds)
    times = {name: measured.get(name, []) for name in names}
    base_ms = statistics.median(times[base])
    rows = []
    for name, ts in times.items():
        if not ts:
            rows.append([name, "failed to build", "", ""])
            continue
        ms = statistics.median(ts)
        quartiles = statistics.quantiles(ts, n=4)
        rows.append([name, f"{ms:.1f}", f"{quartiles[0]:.1f} - {quartiles[2]:.1f}", f"{base_ms / ms:.3f}"])
        print(rows[-1], flush=True)
    # A comparison of versions alone gets its own table, beside the tile sweep's.
    write_table("exp_operand_tiles" if chosen else "exp_operand_compare", f"Exp-operand GEMM tiles under sustained load: (b) frozen, {K} heads x "
                f"{N // C} chunks of {C} rows, H={H}, V={V}, bf16",
                ["pipeline", f"median ms ({args.rounds} interleaved rounds)", "interquartile range", "speed vs base"], rows,
                ["Variants: fields of kernels/exp_operand.GemmConfig changed from the base; 'ours with PATH': "
                 "another version of kernels/exp_operand.py (--compare); subtile: the logits "
                 "epilogue in two column halves (half the store buffer's shared memory, so room for a 4th stage); "
                 "warp_specialize: Triton's producer/consumer warps. Each row is one step's worth of chunks (~250 ms of "
                 "GEMMs), so the card runs at its power cap as in the real step."])


if __name__ == "__main__":
    main()
