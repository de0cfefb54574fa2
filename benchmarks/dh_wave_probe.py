"""Does the dh GEMM's partial last wave cost what its tile count says, on a power-capped H100?

The exp-operand path's hidden-gradient GEMM (``exp_operand.row_scaled_gemm``: dh[C, H] = r * (E @ W),
K = V = 128256) runs 128 x 256 tiles on one persistent program per SM. A 4096-row chunk has
32 x 16 = 512 tiles: 3.88 waves on 132 SMs, so in the last wave 16 SMs idle for one whole tile
(~1.7 ms). Counting tiles, that is 3% of the GEMM, and stream-K scheduling (the last wave's K loops
spread over every SM) would win it back. But the card runs these GEMMs at its power cap: with 16 SMs
idle the other 116 may clock higher, and then the tail costs less than its tiles. This probe
measures it: the GEMM's rate at chunks whose tile counts fill 3.76, 3.88, 4.00 and 4.12 waves
(3968, 4096, 4224 and 4352 rows), each timed as a back-to-back loop of ~0.3 s (sustained, at the
cap), in interleaved rounds, beside cuBLAS on the same product and ``GemmConfig(cublas=True)`` (cuBLAS's
product, then one pass scaling the rows). E holds what the path writes: exp(x - x_t) with x and x_t
of unit variance (the power drawn, and so the clocks, depend on the data).

    python benchmarks/dh_wave_probe.py            # H100: about a minute
    python benchmarks/dh_wave_probe.py --quick    # small shapes, a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402

from medusa_liger.kernels import exp_operand  # noqa: E402
from medusa_liger.kernels.utils import multiprocessors  # noqa: E402


def back_to_back(fn, calls: int):
    def run() -> None:
        for _ in range(calls):
            fn()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cfg = exp_operand._tiles("dh", common.DEVICE)
    if args.quick:
        H, V, chunks, rounds, seconds = 64, 512, [32, 48], 2, 0.0
    else:
        H, V, chunks, rounds, seconds = 4096, 128256, [3968, 4096, 4224, 4352], args.rounds, 0.3
    dtype = torch.bfloat16 if common.CUDA else torch.float32
    sms = multiprocessors(common.DEVICE)
    # One E, W and output at the largest chunk; smaller chunks use their leading rows (contiguous views).
    e = torch.empty(max(chunks), V, device=common.DEVICE, dtype=dtype)
    for r0 in range(0, e.shape[0], 512):  # exp(x - x_t), x and x_t ~ N(0, 1), built in fp32 blocks
        rows = e[r0 : r0 + 512]
        x = torch.randn(rows.shape, device=common.DEVICE) - torch.randn(rows.shape[0], 1, device=common.DEVICE)
        rows.copy_(x.exp_())
    w = torch.randn(V, H, device=common.DEVICE, dtype=dtype) * H**-0.5
    r = torch.rand(max(chunks), device=common.DEVICE) / V
    out = torch.empty(max(chunks), H, device=common.DEVICE, dtype=dtype)
    cases, calls = {}, {}
    gpu_tiles = dict(exp_operand.GPU_TILES)

    def ours(C: int, cublas: bool) -> None:
        exp_operand.GPU_TILES = {**gpu_tiles, "dh": gpu_tiles["dh"]._replace(cublas=cublas)}
        try:
            exp_operand.row_scaled_gemm(e[:C], w, r[:C], out[:C], False)
        finally:
            exp_operand.GPU_TILES = gpu_tiles

    names = ("ours Triton", "ours cuBLAS + row scale", "cuBLAS alone")
    for C in chunks:
        variants = (lambda C=C: ours(C, False), lambda C=C: ours(C, True), lambda C=C: torch.mm(e[:C], w, out=out[:C]))
        for name, fn in zip(names, variants):
            one = common.bench(fn, rep=20) if common.CUDA else 1.0
            calls[(name, C)] = max(1, int(seconds * 1e3 / one))
            cases[(name, C)] = back_to_back(fn, calls[(name, C)])
    times = common.interleaved_rounds(cases, rounds)
    rows = []
    for C in chunks:
        tile_count = -(-C // cfg.bm) * -(-H // cfg.bn)
        cells = [C, tile_count, f"{tile_count / sms:.2f}"]
        for name in names:
            ms = statistics.median(times[(name, C)]) / calls[(name, C)]
            cells += [f"{ms:.3f}", f"{2 * C * H * V / (ms * 1e-3) / 1e12:.0f}"]
        rows.append(cells)
    common.write_table(
        "dh_wave_probe", "dh GEMM rate against its last wave's fill (sustained, interleaved rounds)",
        ["chunk rows", "tiles", "waves", *[f"{n} {unit}" for n in names for unit in ("ms", "TFLOP/s")]], rows,
        notes=[f"dh[C, {H}] = r * (E[C, {V}] @ W), {dtype}, {cfg.bm} x {cfg.bn} tiles on {sms} SMs; each cell the "
               f"median of {rounds} interleaved rounds of a back-to-back loop of ~{seconds} s, per call. "
               "If the partial last wave cost its idle SMs' share, the rate at 4.00 waves would beat 3.88 by "
               "3% and 3.76 by 6%."])


if __name__ == "__main__":
    main()
