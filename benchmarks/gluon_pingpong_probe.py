"""Probe: can a ping-pong Gluon GEMM hide the exp-operand epilogue under MMAs (H100, Triton 3.6)?

The exp-epilogue logits GEMM (kernels/exp_operand.py) costs ~3% more than cuBLAS's plain GEMM: its
epilogue's exponentials run on the MUFU while the tensor cores wait, because Triton's Hopper
kernels have no second consumer warpgroup (benchmarks/NOTES.md, run 104). Gluon (Triton's
lower-level dialect, in 3.6 as triton.experimental.gluon) lets a kernel name its own warp
partitions. This kernel has three:

    producer   (1 warp):  TMA loads of every tile's K steps, in tile order, into a ring of stages
    consumer 0 (4 warps): the program's even tiles: wgmma mainloop, then the epilogue
    consumer 1 (4 warps): the odd tiles

Each consumer owns a whole BM x BN tile (its own accumulator in registers). The two mainloops take
turns on the tensor cores, and each epilogue runs beside the other consumer's mainloop (ping-pong,
as in CUTLASS's and FlashAttention-3's Hopper kernels).

Measured here (after checks against torch and the library's Triton kernel): whole (b) steps' GEMMs
with the logits GEMM by cuBLAS, the Triton exp kernel and this one (plain and exp), in interleaved
rounds long enough for the power cap (single-call rounds were too noisy to rank kernels 1-3% apart);
or, with --trace, each consumer's timeline from the SM's cycle counter. The kernel lives in
kernels/exp_operand_gluon.py; results in results/exp_operand_gluon_h100.md and NOTES.md, runs 108-117.

    python benchmarks/gluon_pingpong_probe.py [--quick] [--trace] [--rounds 15]
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from medusa_liger.kernels import exp_operand_gluon  # noqa: E402


def pingpong(a, b, c, *, exp=False, shift=None, target=None, row_max=None, **tiles):
    """c = a @ b.T, or (exp) E and the tile sums (the library's Gluon kernel)."""
    return exp_operand_gluon._launch(a, b, c, exp=exp, shift=shift, target=target, row_max=row_max, **tiles)


# ---------------------------------------------------------------------------------------------------
# The probe

M, K, N = 4096, 4096, 128256


def check(quick: bool) -> list[str]:
    """Plain and exp modes against torch and against the library's Triton exp kernel."""
    from medusa_liger.kernels import exp_operand

    lines = []
    shapes = [(256, 192, 1000), (1000, 320, 3000), (M, K, N)] if not quick else [(256, 192, 1000), (1000, 320, 3000)]
    for m, k, n in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        a = (torch.randn(m, k, device="cuda", generator=g) * 0.5).bfloat16()
        b = (torch.randn(n, k, device="cuda", generator=g) * 0.05).bfloat16()
        c = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        pingpong(a, b, c, programs=3)  # several tiles per program: the ring wraps across tiles
        ref = a.float() @ b.float().T
        err = ((c.float() - ref).abs().max() / ref.abs().max()).item()
        lines.append(f"plain {m}x{n}x{k}: max error / max |ref| = {err:.2e}")
        lines[-1] += "" if err < 1e-2 else "  FAILED"
        target = torch.randint(0, n, (m,), device="cuda", generator=g)
        valid = torch.rand(m, device="cuda", generator=g) > 0.1
        t, x_t, shift, row_max, _ = exp_operand.target_logits(a, b, target, valid)
        e_ref = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        rm_ref = row_max.clone()
        sums_ref = exp_operand.exp_logits(a, b, t, shift.clone(), e_ref, rm_ref).sum(1)
        for depth, group in ((1, 8), (2, 16), (2, 32)):
            e = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            rm = row_max.clone()
            sums = pingpong(a, b, e, exp=True, shift=shift, target=t, row_max=rm, mma_depth=depth, group=group).sum(1)
            e_err = ((e.float() - e_ref.float()).abs().max() / e_ref.float().abs().max()).item()
            s_err = ((sums - sums_ref).abs() / sums_ref.abs().clamp_min(1e-30)).max().item()
            same_max = torch.allclose(rm, rm_ref, rtol=1e-5, atol=1e-5)
            lines.append(f"exp {m}x{n}x{k} depth {depth} group {group}: E vs Triton's {e_err:.2e}, "
                         f"row sums {s_err:.2e}, row max equal {same_max}")
            lines[-1] += "" if e_err < 2e-2 and s_err < 1e-2 and same_max else "  FAILED"
    return lines


def step_rounds(rounds: int) -> None:
    """A (b) step's GEMMs (5 heads x 4 chunks: logits GEMM, then cuBLAS's dh = E @ W), with the logits
    GEMM by each kernel, in interleaved rounds of whole steps (~250 ms: the card at its power cap)."""
    from benchmarks.common import interleaved_rounds
    from medusa_liger.kernels import exp_operand
    from medusa_liger.kernels.chunking import mm_into

    g = torch.Generator(device="cuda").manual_seed(2)
    w = (torch.randn(N, K, device="cuda", generator=g) * K**-0.5).bfloat16()
    hs = [torch.randn(M, K, device="cuda", generator=g).bfloat16() for _ in range(4)]
    e = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    dh = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, N, (M,), device="cuda", generator=g)
    valid = torch.ones(M, device="cuda", dtype=torch.bool)
    shifts = [exp_operand.target_logits(h, w, target, valid) for h in hs]

    def step(logits):
        def run():
            for _ in range(5):
                for c in range(4):
                    logits(c)
                    mm_into(dh, e, w, accumulate=False)
        return run

    def triton_exp(c):
        t, _, shift, row_max, _ = shifts[c]
        exp_operand.exp_logits(hs[c], w, t, shift, e, row_max)

    def gluon(**kw):
        def run(c):
            t, _, shift, row_max, _ = shifts[c]
            pingpong(hs[c], w, e, shift=shift, target=t, row_max=row_max, **kw)
        return run

    cases = {
        "cuBLAS logits": step(lambda c: mm_into(e, hs[c], w.t(), accumulate=False)),
        "Triton exp logits (library)": step(triton_exp),
        "Gluon plain logits": step(gluon()),
        "Gluon exp logits": step(gluon(exp=True)),
        "Gluon exp logits without the row statistics": step(gluon(exp=True, stats=False)),
        "Gluon plain logits, 64 x 256 tiles, 3 stages": step(gluon(bm=64, bn=256, stages=3)),
        "Gluon exp logits, 64 x 256 tiles, 3 stages": step(gluon(exp=True, bm=64, bn=256, stages=3)),
    }
    for name, fn in list(cases.items()):
        try:
            fn()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
            print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
            del cases[name]
    times = interleaved_rounds(cases, rounds)
    base = statistics.median(times["cuBLAS logits"])
    print(f"\n{rounds} interleaved rounds of whole (b) steps' GEMMs (20 x logits [{M}, {K}] x [{N}, {K}]^T, "
          "then cuBLAS dh = E @ W), bf16")
    print("| logits GEMM | median ms / step | interquartile range | vs cuBLAS logits |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        med = statistics.median(ts)
        print(f"| {name} | {med:.1f} | {q[0]:.1f} - {q[2]:.1f} | {med / base:.3f} |")


def trace_schedule() -> None:
    """Each consumer's timeline from the SM's cycle counter (exp_operand_gluon's TRACE switch), for the
    plain and the exp epilogue on one chunk after the card has warmed: medians over programs and tiles."""
    from medusa_liger.kernels import exp_operand

    g = torch.Generator(device="cuda").manual_seed(3)
    w = (torch.randn(N, K, device="cuda", generator=g) * K**-0.5).bfloat16()
    h = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    e = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    t, _, shift, row_max, _ = exp_operand.target_logits(h, w, torch.randint(0, N, (M,), device="cuda", generator=g),
                                                     torch.ones(M, device="cuda", dtype=torch.bool))
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    print("\n| epilogue | mainloop (first to last MMA issued) | handoff (last MMA issued to the next tile's first) "
          "| MMA drain | epilogue | consumer's wait for its turn | cycles per tile |")
    print("|---|---|---|---|---|---|---|")
    for exp in (False, True):
        trace = torch.zeros(programs, 64, 4, dtype=torch.int64, device="cuda")
        for _ in range(30):  # ~200 ms of the same GEMM first: clocks at the power cap
            pingpong(h, w, e, exp=exp, shift=shift, target=t, row_max=row_max)
        pingpong(h, w, e, exp=exp, shift=shift, target=t, row_max=row_max, trace=trace)
        torch.cuda.synchronize()
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
        cols = {k: [] for k in ("main", "handoff", "drain", "epi", "wait", "period")}
        for p in range(programs):
            n = min(64, len(range(p, tiles, programs)))
            tr = trace[p, :n].tolist()
            for i in range(1, n - 2):
                s0, i0, d0, e0 = tr[i]
                cols["main"].append(i0 - s0)
                cols["handoff"].append(tr[i + 1][0] - i0)
                cols["drain"].append(d0 - i0)
                cols["epi"].append(e0 - d0)
                cols["wait"].append(tr[i + 2][0] - e0)
                cols["period"].append(tr[i + 1][0] - s0)
        med = {k: statistics.median(v) for k, v in cols.items()}
        print(f"| {'exp' if exp else 'plain'} | {med['main']:.0f} | {med['handoff']:.0f} | {med['drain']:.0f} | "
              f"{med['epi']:.0f} | {med['wait']:.0f} | {med['period']:.0f} |")
    print("A 128 x 128 x 4096 tile is 32768 cycles of MMAs at 2048 bf16 FMAs a cycle.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the correctness checks on small shapes only")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--trace", action="store_true", help="the consumers' timelines (cycle counter) instead "
                        "of the step rounds")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gluon_pingpong_probe.py needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}; torch {torch.__version__}; triton {triton.__version__}")
    for line in check(args.quick):
        print(line)
    if args.quick:
        return
    if args.trace:
        trace_schedule()
    else:
        step_rounds(args.rounds)


if __name__ == "__main__":
    main()
