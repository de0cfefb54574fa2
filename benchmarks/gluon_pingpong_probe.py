"""Probe: can a ping-pong Gluon GEMM hide the exp-operand epilogue under MMAs (H100, Triton 3.6)?

The exp-epilogue logits GEMM (kernels/exp_operand.py) costs ~3% more than cuBLAS's plain GEMM: its
epilogue's exponentials run on the MUFU while the tensor cores wait, because Triton's Hopper
kernels have no second consumer warpgroup (benchmarks/NOTES.md, run 104). Gluon (Triton's
lower-level dialect, in 3.6 as triton.experimental.gluon) lets a kernel name its own warp
partitions. This kernel has three:

    producer   (1 warp):  TMA loads of every tile's K steps, in tile order, into a ring of stages
    consumer 0 (4 warps): the program's even tiles: wgmma mainloop, then the epilogue
    consumer 1 (4 warps): the odd tiles

Each consumer owns a whole BM x BN tile (its own accumulator in registers). The ring is filled in
tile order, so consumer 1's first stages arrive only as consumer 0's last ones are consumed: the
two mainloops alternate on the tensor cores, and each epilogue runs beside the other consumer's
mainloop (ping-pong, as in CUTLASS's and FlashAttention-3's Hopper kernels).

Measured here on [4096, 4096] x [128256, 4096]^T (one chunk of the Medusa loss, bf16): this
kernel with a plain bf16 store and with the exp epilogue, the library's Triton exp kernel, and
cuBLAS, in interleaved rounds of loops long enough to reach the power cap. Correctness is checked
against torch first.

    python benchmarks/gluon_pingpong_probe.py [--quick]
"""


import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402
from triton.language.core import _aggregate as aggregate  # noqa: E402

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.constexpr_function
def consumer_layout(BM, BN):
    """The wgmma accumulator layout of one warpgroup (4 warps) holding a BM x BN tile."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, min(BN, 256), 16])


@aggregate
class Shared:
    """What every partition reads: descriptors, the stage ring and its barriers, the epilogue's inputs."""

    a_desc: tma.tensor_descriptor
    b_desc: tma.tensor_descriptor
    c_desc: tma.tensor_descriptor
    a_bufs: gl.shared_memory_descriptor
    b_bufs: gl.shared_memory_descriptor
    c_bufs: gl.shared_memory_descriptor
    ready: gl.shared_memory_descriptor
    empty: gl.shared_memory_descriptor
    turn: gl.shared_memory_descriptor
    shift_ptr: gl.tensor
    target_ptr: gl.tensor
    row_max_ptr: gl.tensor
    tile_sum_ptr: gl.tensor
    M: gl.tensor
    N: gl.tensor
    K: gl.tensor
    GROUP: gl.constexpr
    EXP: gl.constexpr
    MMA_DEPTH: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, shift_ptr, target_ptr,
                 row_max_ptr, tile_sum_ptr, M, N, K, GROUP, EXP, MMA_DEPTH):
        self.a_desc = a_desc
        self.b_desc = b_desc
        self.c_desc = c_desc
        self.a_bufs = a_bufs
        self.b_bufs = b_bufs
        self.c_bufs = c_bufs
        self.ready = ready
        self.empty = empty
        self.turn = turn
        self.shift_ptr = shift_ptr
        self.target_ptr = target_ptr
        self.row_max_ptr = row_max_ptr
        self.tile_sum_ptr = tile_sum_ptr
        self.M = M
        self.N = N
        self.K = K
        self.GROUP = gl.constexpr(GROUP)
        self.EXP = gl.constexpr(EXP)
        self.MMA_DEPTH = gl.constexpr(MMA_DEPTH)


@gluon.jit
def _tile_of(tile, M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP: gl.constexpr):
    """Tile index -> (tile row, tile column), GROUP tile rows at a time (their B tiles shared in L2)."""
    tiles_n = gl.cdiv(N, BN)
    per_group = GROUP * tiles_n
    first_m = (tile // per_group) * GROUP
    size = gl.minimum(gl.cdiv(M, BM) - first_m, GROUP)
    return first_m + (tile % per_group) % size, (tile % per_group) // size


@gluon.jit
def _producer(s):
    BM: gl.constexpr = s.a_desc.block_type.shape[0]
    BK: gl.constexpr = s.a_desc.block_type.shape[1]
    BN: gl.constexpr = s.b_desc.block_type.shape[0]
    STAGES: gl.constexpr = s.a_bufs.type.shape[0]
    tiles = gl.cdiv(s.M, BM) * gl.cdiv(s.N, BN)
    step = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        tm, tn = _tile_of(tile, s.M, s.N, BM, BN, s.GROUP)
        for k in range(0, s.K, BK):
            stage = step % STAGES
            # A stage's barrier starts "phase 1 complete": the first pass over the ring does not wait.
            mbarrier.wait(s.empty.index(stage), ((step // STAGES) & 1) ^ 1)
            bar = s.ready.index(stage)
            mbarrier.expect(bar, s.a_desc.block_type.nbytes + s.b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(s.a_desc, [tm * BM, k], bar, s.a_bufs.index(stage))
            tma.async_copy_global_to_shared(s.b_desc, [tn * BN, k], bar, s.b_bufs.index(stage))
            step += 1


@gluon.jit
def _consumer(s, WHICH: gl.constexpr):
    BM: gl.constexpr = s.a_desc.block_type.shape[0]
    BK: gl.constexpr = s.a_desc.block_type.shape[1]
    BN: gl.constexpr = s.b_desc.block_type.shape[0]
    STAGES: gl.constexpr = s.a_bufs.type.shape[0]
    MMA_DEPTH: gl.constexpr = s.MMA_DEPTH
    layout: gl.constexpr = consumer_layout(BM, BN)
    row_layout: gl.constexpr = gl.SliceLayout(1, layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, layout)
    c_buf = s.c_bufs.index(WHICH)
    tiles_n = gl.cdiv(s.N, BN)
    tiles = gl.cdiv(s.M, BM) * tiles_n
    k_steps = gl.cdiv(s.K, BK)
    first = gl.program_id(0)
    programs = gl.num_programs(0)
    # This consumer takes the program's local tiles WHICH, WHICH + 2, ...; local tile i's K steps are
    # ring steps i * k_steps ... (the producer's order).
    for i in range(WHICH, gl.cdiv(tiles - first, programs), 2):
        tile = first + i * programs
        tm, tn = _tile_of(tile, s.M, s.N, BM, BN, s.GROUP)
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
        # Mainloops take turns: tile i's starts once tile i - 1's last MMA is issued (by the other
        # consumer). Then every earlier step has been loaded, so each ready barrier's phase parity
        # below is unambiguous (a consumer could otherwise wait two phases ahead of a stage), and
        # the tensor cores run one mainloop at a time while the other consumer runs its epilogue.
        # Consumer 0's first wait passes on the fresh barrier (parity 1).
        mbarrier.wait(s.turn.index(WHICH), ((i // 2) & 1) ^ (1 - WHICH))
        step = i * k_steps
        for kk in range(k_steps):
            stage = step % STAGES
            mbarrier.wait(s.ready.index(stage), (step // STAGES) & 1)
            acc = warpgroup_mma(s.a_bufs.index(stage), s.b_bufs.index(stage).permute((1, 0)), acc,
                                use_acc=kk > 0, is_async=True)
            # Keep MMA_DEPTH wgmma groups in flight; the one issued MMA_DEPTH steps ago is done, so its
            # stage goes back to the producer.
            acc = warpgroup_mma_wait(MMA_DEPTH, deps=(acc, ))
            mbarrier.arrive(s.empty.index((step + STAGES - MMA_DEPTH) % STAGES), count=1, pred=kk >= MMA_DEPTH)
            step += 1
        mbarrier.arrive(s.turn.index(1 - WHICH), count=1)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        for d in gl.static_range(MMA_DEPTH):  # the tile's last steps (those it has)
            mbarrier.arrive(s.empty.index((step + STAGES - MMA_DEPTH + d) % STAGES), count=1,
                            pred=k_steps >= MMA_DEPTH - d)

        rows = tm * BM + gl.arange(0, BM, layout=row_layout)
        cols = tn * BN + gl.arange(0, BN, layout=col_layout)
        if s.EXP:
            in_rows = rows < s.M
            shift2 = gl.load(s.shift_ptr + rows, mask=in_rows, other=float("inf")) * LOG2E
            target = gl.load(s.target_ptr + rows, mask=in_rows, other=-1)
            off = (gl.expand_dims(cols, 0) == gl.expand_dims(target, 1)) | (gl.expand_dims(cols, 0) >= s.N)
            x = gl.where(off, float("-inf"), acc)
            e = gl.exp2(x * LOG2E - gl.expand_dims(shift2, 1))
            tma.store_wait(0)  # this consumer's previous tile has left c_buf
            c_buf.store(e.to(s.c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(s.c_desc, [tm * BM, tn * BN], c_buf)
            gl.store(s.tile_sum_ptr + rows * tiles_n + tn, gl.sum(e, axis=1), mask=in_rows)
            gl.atomic_max(s.row_max_ptr + rows, gl.max(x, axis=1), mask=in_rows, sem="relaxed")
        else:
            tma.store_wait(0)
            c_buf.store(acc.to(s.c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(s.c_desc, [tm * BM, tn * BN], c_buf)
    tma.store_wait(0)


@gluon.jit
def _consumer_1(s):
    _consumer(s, 1)


@gluon.jit
def pingpong_kernel(a_desc, b_desc, c_desc, shift_ptr, target_ptr, row_max_ptr, tile_sum_ptr, M, N, K,
                    STAGES: gl.constexpr, GROUP: gl.constexpr, EXP: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    PRODUCER_REGS: gl.constexpr, MMA_DEPTH: gl.constexpr):
    """C = A @ B^T (A [M, K], B [N, K], both K-major), or the exp epilogue's E, tile sums and row max."""
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    s = Shared(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, shift_ptr, target_ptr, row_max_ptr,
               tile_sum_ptr, M, N, K, GROUP, EXP, MMA_DEPTH)
    gl.warp_specialize([
        (_consumer, (s, 0)),
        (_consumer_1, (s, )),
        (_producer, (s, )),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def pingpong(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, exp: bool = False, shift=None, target=None,
             row_max=None, bm: int = 128, bn: int = 128, bk: int = 64, stages: int = 4, group: int = 8,
             consumer_regs: int = 232, producer_regs: int = 40, mma_depth: int = 1, programs: int | None = None) -> torch.Tensor | None:
    """c = a @ b.T, or (exp) c = E and returns the tile sums [M, cdiv(N, bn)] (row_max raised in place)."""
    M, K = a.shape
    N = b.shape[0]
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[a.dtype]
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gdt))
    b_desc = TensorDescriptor.from_tensor(b, [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gdt))
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn], gl.NVMMASharedLayout.get_default_for([bm, bn], gdt))
    tile_sum = torch.empty(M, triton.cdiv(N, bn), device=a.device) if exp else torch.empty(1, device=a.device)
    if not exp:
        shift = row_max = torch.empty(1, device=a.device)
        target = torch.empty(1, device=a.device, dtype=torch.int32)
    if programs is None:
        programs = torch.cuda.get_device_properties(a.device).multi_processor_count
    pingpong_kernel[(programs,)](a_desc, b_desc, c_desc, shift, target, row_max, tile_sum, M, N, K,
                                 STAGES=stages, GROUP=group, EXP=exp, CONSUMER_REGS=consumer_regs,
                                 PRODUCER_REGS=producer_regs, MMA_DEPTH=mma_depth, num_warps=4,
                                 maxnreg=168)
    return tile_sum if exp else None


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
        t, x_t, shift, row_max = exp_operand.target_logits(a, b, target, valid)
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


def timed_rounds(methods: dict, rounds: int, calls: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per method and round: ms per call (CUDA events over ``calls`` calls) and the SM clock (MHz)
    sampled while they run. Each round starts at another method, so no method always follows the same one."""
    import time

    names = list(methods)
    times = {name: [] for name in names}
    clocks = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = methods[name]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(calls):
                fn(i)
            end.record()
            while not end.query():  # the calls run for ~100 ms: sample the clock meanwhile
                try:
                    clocks[name].append(torch.cuda.clock_rate())
                except Exception:  # noqa: BLE001 - no NVML here: no clocks
                    pass
                time.sleep(0.01)
            end.synchronize()
            times[name].append(start.elapsed_time(end) / calls)
    return times, clocks


def main() -> None:
    from medusa_liger.kernels import exp_operand

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}; torch {torch.__version__}; triton {triton.__version__}")
    for line in check(args.quick):
        print(line)
    if args.quick:
        return
    g = torch.Generator(device="cuda").manual_seed(1)
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
    hs = [torch.randn(M, K, device="cuda", generator=g).bfloat16() for _ in range(4)]
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, N, (M,), device="cuda", generator=g)
    valid = torch.ones(M, device="cuda", dtype=torch.bool)
    shifts = [exp_operand.target_logits(h, w, target, valid) for h in hs]

    def triton_exp(i):
        t, _, shift, row_max = shifts[i % 4]
        exp_operand.exp_logits(hs[i % 4], w, t, shift, out, row_max)

    def gluon(**kw):
        def run(i):
            t, _, shift, row_max = shifts[i % 4]
            if kw.get("exp"):
                pingpong(hs[i % 4], w, out, shift=shift, target=t, row_max=row_max, **kw)
            else:
                pingpong(hs[i % 4], w, out, **kw)
        return run

    methods = {
        "cuBLAS mm (plain)": lambda i: torch.mm(hs[i % 4], w.T, out=out),
        "Triton exp (library)": triton_exp,
        "Gluon plain": gluon(),
        "Gluon exp": gluon(exp=True),
        "Gluon plain, BK 128, 2 stages": gluon(bk=128, stages=2),
        "Gluon exp, BK 128, 2 stages": gluon(exp=True, bk=128, stages=2),
    }
    for name, fn in list(methods.items()):  # compile, and drop what fails to
        try:
            fn(0)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
            print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
            del methods[name]
    timed_rounds(methods, 1, args.calls)  # to the power cap
    times, clocks = timed_rounds(methods, args.rounds, args.calls)
    flop = 2 * M * N * K
    base = statistics.median(times["cuBLAS mm (plain)"])
    print(f"\n{args.rounds} interleaved rounds of {args.calls} calls, [{M}, {K}] x [{N}, {K}]^T bf16; "
          "Mcycles: median ms x median SM clock")
    print("| method | median ms / call | TFLOP/s | vs cuBLAS | SM clock MHz | Mcycles / call |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        clock = statistics.median(clocks[name]) if clocks[name] else float("nan")
        print(f"| {name} | {med:.3f} | {flop / med / 1e9:.0f} | {med / base:.3f} | {clock:.0f} | {med * clock / 1e3:.2f} |")


if __name__ == "__main__":
    main()
