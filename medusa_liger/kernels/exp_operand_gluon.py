"""The exp-operand logits GEMM as a ping-pong warp-specialized Gluon kernel (Hopper, opt-in).

Same output as ``exp_operand._exp_logits_kernel`` (E = exp(h W^T - shift) with the target column at
0, each tile's row sums of E, each row's largest non-target logit), by another schedule. Triton's
Hopper kernels run the epilogue's exponentials while the tensor cores wait (~3% of the GEMM at
K = 4096). Gluon (Triton's lower-level dialect, ``triton.experimental.gluon``, Triton 3.5+) lets a
kernel name its own warp partitions; this one has three:

    producer   (1 warp):  TMA loads of every tile's K steps, in tile order, into a ring of stages
    consumer 0 (4 warps): the program's even tiles: wgmma mainloop, then the epilogue
    consumer 1 (4 warps): the odd tiles

Each consumer owns a whole BM x BN tile (its own accumulator in registers). The mainloops take
turns (a pair of mbarriers), so one consumer's epilogue runs beside the other's MMAs (ping-pong, as
in CUTLASS's and FlashAttention-3's Hopper kernels).

What it measured on an H100 (benchmarks/NOTES.md, runs 108-117; gluon_pingpong_probe.py):

* The schedule works: the cycle-counter trace (``trace=``) shows each consumer's epilogue (6850
  cycles with the exponentials, 834 without) inside the other's mainloop, handoffs of ~60 cycles,
  and the same cycles per tile with and without the exponentials (39.3k).
* It is not faster. The mainloop itself runs at 84% of the MMA rate (39.1k cycles for a tile's
  32.8k cycles of MMAs): 128 x 128 tiles read ~20% more operand bytes from shared memory per MMA
  than the cooperative 128 x 256 tiles, with the TMA writes on top. As a plain GEMM it is 2.6%
  slower than cuBLAS over a (b) step's GEMMs, and with the exp epilogue 1.6-2.2% slower than the
  Triton kernel. And the card runs these steps at its power cap, where the epilogue's extra work
  costs clock (time) even when it is hidden in cycles: the exp variant took 1.5% more time than the
  plain one for the same cycles per tile.

So it is off by default; ``GemmConfig(gluon=True)`` selects it (bm, bn, bk, stages, group used).
GPU only: Gluon has no interpreter mode.
"""

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.language.core import _aggregate as aggregate
except ImportError:  # pragma: no cover - no triton, or one without Gluon's Hopper ops
    gluon = None

# No ``from __future__ import annotations`` here: Gluon aggregates check their fields' annotated types.

if gluon is not None:
    # The Triton kernel's tile order (a Gluon kernel may call a Triton function of scalars).
    from medusa_liger.kernels.exp_operand import _tile_of

    LOG2E = gl.constexpr(1.4426950408889634)

    @gluon.constexpr_function
    def _consumer_layout(BM, BN):
        """The wgmma accumulator layout of one warpgroup (4 warps) holding a BM x BN tile."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, min(BN, 256), 16])

    @aggregate
    class _Shared:
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
        STATS: gl.constexpr
        trace_ptr: gl.tensor
        TRACE: gl.constexpr

        @gluon.constexpr_function
        def __init__(self, a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, shift_ptr, target_ptr,
                     row_max_ptr, tile_sum_ptr, M, N, K, GROUP, EXP, MMA_DEPTH,
                     STATS, trace_ptr, TRACE):
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
            self.STATS = gl.constexpr(STATS)
            self.trace_ptr = trace_ptr
            self.TRACE = gl.constexpr(TRACE)

    @gluon.jit
    def _clock():
        """The SM's cycle counter (both consumers of a program read the same one)."""
        return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _trace(s, i, point: gl.constexpr):
        """TRACE only: trace[program, local tile i, point] = the SM's clock (64 tiles x 4 points a program)."""
        if s.TRACE:
            slot = (gl.program_id(0) * 64 + i) * 4 + point
            gl.store(s.trace_ptr + slot, _clock(), mask=i < 64)

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
        layout: gl.constexpr = _consumer_layout(BM, BN)
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
            _trace(s, i, 0)  # the mainloop starts
            step = i * k_steps
            for kk in range(k_steps):
                stage = step % STAGES
                mbarrier.wait(s.ready.index(stage), (step // STAGES) & 1)
                acc = warpgroup_mma(s.a_bufs.index(stage), s.b_bufs.index(stage).permute((1, 0)), acc,
                                    use_acc=kk > 0, is_async=True)
                # Keep MMA_DEPTH wgmma groups in flight; the one issued MMA_DEPTH steps ago is done, so its
                # stage goes back to the producer.
                acc = warpgroup_mma_wait(MMA_DEPTH, deps=(acc, ))
                mbarrier.arrive(s.empty.index((step + STAGES - MMA_DEPTH) % STAGES), count=1,
                                pred=kk >= MMA_DEPTH)
                step += 1
            mbarrier.arrive(s.turn.index(1 - WHICH), count=1)
            _trace(s, i, 1)  # its last MMA is issued
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            _trace(s, i, 2)  # its MMAs are done: the epilogue starts
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
                if s.STATS:  # off only to measure what the statistics cost
                    gl.store(s.tile_sum_ptr + rows * tiles_n + tn, gl.sum(e, axis=1), mask=in_rows)
                    gl.atomic_max(s.row_max_ptr + rows, gl.max(x, axis=1), mask=in_rows, sem="relaxed")
            else:
                tma.store_wait(0)
                c_buf.store(acc.to(s.c_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(s.c_desc, [tm * BM, tn * BN], c_buf)
            _trace(s, i, 3)  # the epilogue is done (its store in flight)
        tma.store_wait(0)

    @gluon.jit
    def _consumer_1(s):
        _consumer(s, 1)

    @gluon.jit
    def _pingpong_kernel(a_desc, b_desc, c_desc, shift_ptr, target_ptr, row_max_ptr, tile_sum_ptr, M, N, K,
                         STAGES: gl.constexpr, GROUP: gl.constexpr, EXP: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                         PRODUCER_REGS: gl.constexpr, MMA_DEPTH: gl.constexpr, STATS: gl.constexpr, trace_ptr,
                         TRACE: gl.constexpr):
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
        s = _Shared(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, shift_ptr, target_ptr,
                    row_max_ptr, tile_sum_ptr, M, N, K, GROUP, EXP, MMA_DEPTH, STATS, trace_ptr, TRACE)
        gl.warp_specialize([
            (_consumer, (s, 0)),
            (_consumer_1, (s, )),
            (_producer, (s, )),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def exp_logits(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, shift: torch.Tensor, e: torch.Tensor,
               row_max: torch.Tensor, *, bm: int = 128, bn: int = 128, bk: int = 64, stages: int = 4, group: int = 8,
               mma_depth: int = 1) -> torch.Tensor:
    """``exp_operand.exp_logits`` by this kernel: E into ``e`` [C, V] (bf16), ``row_max`` raised in
    place; returns the per-tile row sums [C, cdiv(V, bn)] fp32. h [C, H] and w [V, H]: contiguous bf16."""
    return _launch(h, w, e, exp=True, shift=shift, target=t, row_max=row_max, bm=bm, bn=bn, bk=bk,
                   stages=stages, group=group, mma_depth=mma_depth)


def matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, **tiles) -> None:
    """c = a @ b.T by the same kernel with a plain store (a [M, K], b [N, K]: for measuring the schedule)."""
    _launch(a, b, c, exp=False, **tiles)


def _launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, exp: bool, shift=None, target=None,
            row_max=None, bm: int = 128, bn: int = 128, bk: int = 64, stages: int = 4, group: int = 8,
            mma_depth: int = 1, consumer_regs: int = 232, producer_regs: int = 40,
            programs: int | None = None, stats: bool = True, trace: torch.Tensor | None = None) -> torch.Tensor | None:
    if gluon is None:
        raise RuntimeError("the Gluon exp-operand GEMM needs Triton 3.5+ with triton.experimental.gluon")
    if not all(x.is_cuda for x in (a, b, c)):  # Gluon has no interpreter mode
        raise ValueError(f"the Gluon GEMM runs on CUDA tensors only, got {a.device}, {b.device}, {c.device}")
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype or c.dtype != a.dtype:
        raise ValueError(f"a, b and c must all be bf16 or all fp16, got {a.dtype}, {b.dtype}, {c.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or tuple(c.shape) != (a.shape[0], b.shape[0]):
        raise ValueError(f"expected a [M, K], b [N, K] and c [M, N], got {list(a.shape)}, {list(b.shape)}, "
                         f"{list(c.shape)}")
    M, K = a.shape
    N = b.shape[0]
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[a.dtype]
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gdt))
    b_desc = TensorDescriptor.from_tensor(b, [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gdt))
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn], gl.NVMMASharedLayout.get_default_for([bm, bn], gdt))
    tile_sum = torch.empty(M, triton.cdiv(N, bn), device=a.device) if exp else torch.empty(1, device=a.device)
    if not exp:  # the exp epilogue's inputs are never read
        shift = row_max = torch.empty(1, device=a.device)
        target = torch.empty(1, device=a.device, dtype=torch.int32)
    if programs is None:
        programs = torch.cuda.get_device_properties(a.device).multi_processor_count
    # 4 + 4 + 1 warps run as 3 warpgroups: 168 registers each at launch (3 x 128 x 168 <= 64K), then
    # reallocated to consumer_regs (the worker consumer), producer_regs and the rest (the default one).
    if trace is not None and trace.numel() < programs * 64 * 4:
        raise ValueError(f"trace must hold [programs={programs}, 64, 4] int64, got shape {list(trace.shape)}")
    _pingpong_kernel[(programs,)](a_desc, b_desc, c_desc, shift, target, row_max, tile_sum, M, N, K,
                                  STAGES=stages, GROUP=group, EXP=exp, CONSUMER_REGS=consumer_regs,
                                  PRODUCER_REGS=producer_regs, MMA_DEPTH=mma_depth, STATS=stats,
                                  trace_ptr=tile_sum if trace is None else trace, TRACE=trace is not None,
                                  num_warps=4, maxnreg=168)
    return tile_sum if exp else None
