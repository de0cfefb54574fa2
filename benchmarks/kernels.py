"""Kernel benchmark: forward+backward of RMSNorm, SwiGLU, RoPE and cross-entropy at Llama-3-8B sizes.

For each op, in the same run: PyTorch eager (HF's own code), ``torch.compile`` of that code,
liger-kernel (optional import) and ours. Reported per row: median ms of forward+backward, peak
extra memory (GiB) while one forward+backward runs, achieved GB/s counting the minimum traffic
(every input read once and every output written once, forward and backward), and that rate as a
share of a device copy measured in the same run. Inputs rotate over a few sets so no timing reads
a warm cache. One failing column is recorded as ``error: ...``, never a crash; before timing, each
implementation's outputs and input gradients are compared with eager's, and one that differs is
recorded as ``wrong: ...`` instead of timed.

    python benchmarks/kernels.py            # full sizes (H100: about 2 minutes)
    python benchmarks/kernels.py --quick    # tiny shapes, a smoke test (also on CPU)
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow HF's
# optional `kernels` package (transformers probes it): import our helpers from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402

from medusa_liger.kernels.rms_norm import rms_norm  # noqa: E402
from medusa_liger.kernels.rope import apply_rotary_pos_emb  # noqa: E402
from medusa_liger.kernels.swiglu import swiglu  # noqa: E402

CUDA, DEVICE, DTYPE = common.CUDA, common.DEVICE, common.DTYPE
N_SETS = 3  # input sets rotated between calls


@dataclass
class Op:
    """One benchmarked op: how to build an input set, its implementations and its minimum traffic."""

    name: str
    shape: str
    make: Callable[[], tuple[tuple, list[int], tuple | None]]  # -> (args, indices needing grad, grads)
    n_bytes: int
    impls: dict[str, Callable[[], Callable]] = field(default_factory=dict)  # name -> builder of forward


def _randn(*shape, requires_grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_(requires_grad)


def fwd_bwd(forward: Callable, args: tuple, diff: list[int], grads: tuple | None) -> None:
    """One forward and backward; gradients via autograd.grad so nothing accumulates between calls."""
    out = forward(*args)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.grad(outs, [args[i] for i in diff], grads)


# --------------------------------------------------------------------------------------------- ops
def rms_norm_op(rows: int, hidden: int) -> Op:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    eps = 1e-6
    # One weight shared by every input set (8 KiB: nothing to rotate), so modules keep their Parameter.
    weight = torch.nn.Parameter(1.0 + 0.1 * torch.randn(hidden, device=DEVICE).to(DTYPE))

    def make():
        return (_randn(rows, hidden, requires_grad=True), weight), [0, 1], (_randn(rows, hidden),)

    def module_forward(module_cls, compile_it=False, **kwargs):
        module = module_cls(hidden, eps=eps, **kwargs).to(DEVICE, DTYPE)
        module.weight = weight
        call = torch.compile(module) if compile_it else module
        return lambda x, w: call(x)

    def liger():
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        return module_forward(LigerRMSNorm)

    op = Op("RMSNorm", f"x[{rows}, {hidden}]", make, 5 * rows * hidden * DTYPE.itemsize)
    op.impls = {"eager (HF)": lambda: module_forward(LlamaRMSNorm),
                "torch.compile": lambda: module_forward(LlamaRMSNorm, compile_it=True),
                "liger": liger, "ours": lambda: lambda x, w: rms_norm(x, w, eps)}
    return op


def swiglu_op(rows: int, inter: int) -> Op:
    from transformers.activations import ACT2FN

    def make():
        gate, up = _randn(rows, inter, requires_grad=True), _randn(rows, inter, requires_grad=True)
        return (gate, up), [0, 1], (_randn(rows, inter),)

    def hf(gate, up):
        return ACT2FN["silu"](gate) * up  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)

    def liger():
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply

    # Ours as SwiGLUMLP runs it: gradients written over gate/up (Liger does the same).
    op = Op("SwiGLU", f"gate/up[{rows}, {inter}]", make, 8 * rows * inter * DTYPE.itemsize)
    op.impls = {"eager (HF)": lambda: hf, "torch.compile": lambda: torch.compile(hf), "liger": liger,
                "ours": lambda: lambda g, u: swiglu(g, u, inplace_backward=True)}
    return op


def rope_op(batch: int, n_q: int, n_kv: int, seq: int, dim: int, hf_layout: bool) -> Op:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf

    # Liger rotates HF-layout q/k in place and writes dq/dk over the incoming gradients (its
    # transpose(1, 2).contiguous() is a no-op there: hence its 0.00 GiB). Every implementation must
    # still see the same inputs, so each set keeps an untouched copy, restored before each one.
    pristine: list[tuple[torch.Tensor, torch.Tensor]] = []

    def heads_tensor(n_heads: int) -> torch.Tensor:
        # HF's layout: a transposed view of a [B, T, heads, D] projection; else contiguous [B, heads, T, D].
        if hf_layout:
            return _randn(batch, seq, n_heads, dim).transpose(1, 2)
        return _randn(batch, n_heads, seq, dim)

    def make():
        q, k = heads_tensor(n_q).requires_grad_(), heads_tensor(n_kv).requires_grad_()
        angle = torch.rand(batch, seq, dim // 2, device=DEVICE).repeat(1, 1, 2) * 6.3
        cos, sin = angle.cos().to(DTYPE), angle.sin().to(DTYPE)  # [B, T, D], duplicated halves as HF
        # Gradients arrive in the inputs' layout (SDPA's backward returns dq/dk shaped like q/k),
        # the same tensors for every implementation.
        grads = (heads_tensor(n_q), heads_tensor(n_kv))
        pristine.extend((t, t.detach().clone()) for t in (q, k, *grads))
        return (q, k, cos, sin), [0, 1], grads

    def fresh_inputs(build: Callable[[], Callable]) -> Callable[[], Callable]:
        def builder() -> Callable:
            with torch.no_grad():
                for live, saved in pristine:
                    live.copy_(saved)  # same values, same strides, before each implementation
            return build()
        return builder

    def liger():
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return liger_rotary_pos_emb

    qk = batch * seq * (n_q + n_kv) * dim
    n_bytes = (4 * qk + 4 * batch * seq * dim) * DTYPE.itemsize  # q,k read+written twice; cos,sin twice
    name = "RoPE (HF layout)" if hf_layout else "RoPE (contiguous)"
    op = Op(name, f"q[{batch}, {n_q}, {seq}, {dim}], k[{batch}, {n_kv}, {seq}, {dim}]", make, n_bytes)
    impls = {"eager (HF)": lambda: hf, "torch.compile": lambda: torch.compile(hf), "liger": liger,
             "ours": lambda: apply_rotary_pos_emb}
    op.impls = {impl: fresh_inputs(build) for impl, build in impls.items()}
    return op


def cross_entropy_op(rows: int, vocab: int) -> Op:
    import torch.nn.functional as F

    def make():
        labels = torch.randint(0, vocab, (rows,), device=DEVICE)
        return (_randn(rows, vocab, requires_grad=True), labels), [0], None

    def eager(logits, labels):
        return F.cross_entropy(logits.float(), labels)  # the fp32 upcast HF's loss does

    def liger():
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        return LigerCrossEntropyLoss()

    def ours():
        from medusa_liger.kernels.cross_entropy import cross_entropy  # another engineer's kernel

        return cross_entropy

    # Minimum: read the logits once and write their gradient once (in place).
    op = Op("CrossEntropy", f"logits[{rows}, {vocab}]", make, 2 * rows * vocab * DTYPE.itemsize)
    op.impls = {"eager (HF)": lambda: eager, "torch.compile": lambda: torch.compile(eager), "liger": liger,
                "ours": ours}
    return op


# ------------------------------------------------------------------------------------------ check
def check_against_eager(op: Op, seed: int = 1234) -> dict[str, str]:
    """{impl: why} for each implementation whose outputs or input gradients differ from eager's (HF's own
    code) on one input set of ``op``, so that a wrong implementation is reported instead of timed.

    Every implementation gets the same fresh inputs (``op.make`` under one seed: some write gradients over
    their inputs or rotate in place), and its outputs are copied before backward for the same reason.
    Errors are compared in float32 relative to the reference's largest value: 2e-2 in half precision,
    1e-4 in float32. An implementation that raises is left to the timing, which records the error."""

    def run(build: Callable[[], Callable]) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        args, diff, grads = op.make()
        out = build()(*args)
        outs = out if isinstance(out, tuple) else (out,)
        named = {f"output {i}": o.detach().float().clone() for i, o in enumerate(outs)}
        inputs_grads = torch.autograd.grad(outs, [args[i] for i in diff], grads)
        return named | {f"gradient of input {i}": g.detach().float().clone() for i, g in zip(diff, inputs_grads)}

    reference = run(op.impls["eager (HF)"])
    tol = 2e-2 if DTYPE in (torch.bfloat16, torch.float16) else 1e-4
    wrong = {}
    for impl, build in op.impls.items():
        if impl == "eager (HF)" or (impl == "torch.compile" and not CUDA):  # (not timed on CPU either)
            continue
        try:
            tensors = run(build)
        except Exception:
            continue
        for name, ref in reference.items():
            got = tensors.get(name)
            if got is None or got.shape != ref.shape:
                wrong[impl] = f"{name}: shape {None if got is None else list(got.shape)}, eager {list(ref.shape)}"
                break
            error = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            if not error <= tol:  # (NaN fails too)
                wrong[impl] = f"{name} {error:.2g} off eager's (relative to its largest value)"
                break
    if CUDA:
        torch._dynamo.reset()  # the timing compiles afresh, for its own shapes (not as dynamic after these)
        torch.cuda.empty_cache()
    return wrong


# ------------------------------------------------------------------------------------------ driver
def graph_ms(step: Callable[[], None]) -> float:
    """Median ms of ``step`` replayed as a CUDA graph: GPU time alone, without the host's launch and
    autograd overhead, which the eager timing includes whenever it exceeds the kernels' own time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = common.bench(graph.replay)
    del graph
    return ms


def measure(op: Op, impl: str, sets: list, copy_gbs: float) -> dict:
    """Time, memory and bandwidth of one implementation, or an error string."""
    if impl == "torch.compile" and not CUDA:
        return {"error": "skipped (no CUDA: compile on CPU is slow and not what we compare)"}
    try:
        forward = op.impls[impl]()
        rotation = itertools.cycle(range(len(sets)))

        def step():
            args, diff, grads = sets[next(rotation)]
            fwd_bwd(forward, args, diff, grads)

        for _ in range(len(sets)):  # compile / autotune / first-call costs out of the timing
            step()
        ms = common.bench(step)
        memory = common.peak_extra_memory_gib(step)
        gbs = op.n_bytes / (ms * 1e-3) / 1e9
        try:
            gpu_ms = graph_ms(step) if CUDA else float("nan")
        except Exception as exc:  # not capturable (a host sync, a compiled graph's guards): say so
            print(f"[bench] {op.name} {impl}: no CUDA graph: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
            gpu_ms = float("nan")
        return {"ms": ms, "mem": memory, "gbs": gbs, "pct": 100.0 * gbs / copy_gbs, "gpu_ms": gpu_ms}
    except Exception as exc:  # record and go on: one broken column never sinks the table
        message = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
        return {"error": "error: " + message[:160]}
    finally:
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def verdict(op: Op, results: dict[str, dict], copy_gbs: float) -> str:
    """The issue's target for ``op``, pass or miss (and by how much, against the bandwidth floor)."""
    ours = results.get("ours", {})
    if "ms" not in ours:
        return f"- {op.name}: ours failed ({ours.get('error', 'no result')}): MISS"
    ms, mem = ours["ms"], ours["mem"]
    floor_ms = op.n_bytes / (copy_gbs * 1e9) * 1e3
    liger = results.get("liger", {}).get("ms")
    compiled = results.get("torch.compile", {}).get("ms")
    checks: list[tuple[str, bool]] = []
    if op.name == "RMSNorm":
        checks.append(("<= 0.45 ms", ms <= 0.45))
        if compiled:
            checks.append((f"< torch.compile {compiled:.3f} ms", ms < compiled))
        if liger:
            checks.append((f"< Liger {liger:.3f} ms", ms < liger))
    elif op.name == "SwiGLU":
        checks.append(("<= 1.6 ms", ms <= 1.6))
        liger_mem = results.get("liger", {}).get("mem")
        if liger_mem is not None:
            checks.append((f"memory <= Liger {liger_mem:.2f} GiB", mem <= liger_mem + 1e-3))
    elif op.name.startswith("RoPE"):
        if liger:
            checks.append((f">= 1.5x faster than Liger {liger:.3f} ms (got {liger / ms:.2f}x)", liger / ms >= 1.5))
        else:
            checks.append(("Liger baseline missing, target not checkable", False))
    elif op.name == "CrossEntropy":
        nv_gib = op.n_bytes / 2 / 2**30
        checks.append(("<= 2.5 ms", ms <= 2.5))
        checks.append((f"no extra [N, V] buffer (peak {mem:.2f} GiB < {nv_gib:.2f} GiB)", mem < 0.5 * nv_gib))
    parts = [f"{text}: {'pass' if ok else 'MISS'}" for text, ok in checks]
    if not all(ok for _, ok in checks):
        parts.append(f"(ours {ms:.3f} ms vs bandwidth floor {floor_ms:.3f} ms = {ms / floor_ms:.2f}x)")
    return f"- {op.name} (ours {ms:.3f} ms): " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--only", nargs="*", default=None, help="subset of ops by name prefix, e.g. RMSNorm RoPE")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quick:
        ops = [rms_norm_op(64, 256), swiglu_op(64, 512), rope_op(1, 4, 2, 32, 64, True), cross_entropy_op(32, 1000)]
    else:
        ops = [rms_norm_op(16384, 4096), swiglu_op(16384, 14336), rope_op(4, 32, 8, 4096, 128, True),
               rope_op(4, 32, 8, 4096, 128, False), cross_entropy_op(8192, 128256)]
    if args.only:
        ops = [op for op in ops if any(op.name.startswith(prefix) for prefix in args.only)]
    # Each implementation is checked against eager on a few rows of the op's own widths before it is timed
    # (full-size inputs would be copied once per implementation); the quick shapes are checked as they are.
    check_ops = {} if args.quick else {op.name: op for op in (
        rms_norm_op(256, 4096), swiglu_op(256, 14336), rope_op(1, 32, 8, 256, 128, True),
        rope_op(1, 32, 8, 256, 128, False), cross_entropy_op(256, 128256))}
    if CUDA:
        common.optional_import("liger_kernel")  # logs why, if the baseline is missing
    copy_gbs = common.copy_bandwidth_gbs()
    print(f"[bench] copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    rows, notes = [], [f"Copy bandwidth (read + write) measured in this run: {copy_gbs:.0f} GB/s.", "",
                       "Targets from the issue (same run, same card):"]
    for op in ops:
        try:
            sets = [op.make() for _ in range(N_SETS if not args.quick else 2)]
        except Exception as exc:
            rows.append([op.name, op.shape, "all", f"error: inputs: {type(exc).__name__}: {exc}", "", "", "", ""])
            continue
        results = {}
        wrong = check_against_eager(check_ops.get(op.name, op))
        for impl in op.impls:
            if impl in wrong:
                results[impl] = {"error": f"wrong: {wrong[impl]}"}
                print(f"[bench] {op.name} {impl}: {results[impl]['error']}", flush=True)
                rows.append([op.name, op.shape, impl, results[impl]["error"], "-", "-", "-", "-"])
                continue
            results[impl] = res = measure(op, impl, sets, copy_gbs)
            print(f"[bench] {op.name} {impl}: {res}", flush=True)
            if "error" in res:
                rows.append([op.name, op.shape, impl, res["error"], "-", "-", "-", "-"])
            else:
                gpu = res["gpu_ms"]
                rows.append([op.name, op.shape, impl, f"{res['ms']:.3f}", "-" if gpu != gpu else f"{gpu:.3f}",
                             f"{res['mem']:.2f}", f"{res['gbs']:.0f}", f"{res['pct']:.0f}%"])
        if not args.quick:  # the targets are stated for the full sizes only
            notes.append(verdict(op, results, copy_gbs))
        del sets
        if CUDA:
            torch.cuda.empty_cache()
    notes += ["", "GB/s counts the minimum traffic: each input read once and each output written once, in "
              "forward and backward (RMSNorm 5 x|x|; SwiGLU 8 x|gate|; RoPE 4 x|q,k| + 4 x|cos|; "
              "cross-entropy 2 x|logits|, gradient in place). Peak memory is allocated-while-running minus "
              "allocated-before, gradient outputs preallocated. Liger and ours write SwiGLU / "
              "cross-entropy gradients over their inputs; Liger's RMSNorm writes dx over dy.",
              "Median ms is eager forward + autograd.grad, host overhead included (what the targets use); "
              "'GPU ms' replays the same step as a CUDA graph, so it is the kernels' time alone. Where the two "
              "differ, the host, not the kernels, sets the eager time at this size."]
    header = ["op", "shape", "impl", "median ms (fwd+bwd)", "GPU ms (CUDA graph)", "peak extra GiB", "GB/s",
              "% of copy BW"]
    name = "kernels_h100" if not args.quick else "kernels_quick"
    title = f"Fused kernels, forward+backward, {str(DTYPE).replace('torch.', '')}"
    common.write_table(name, title, header, rows, notes)


if __name__ == "__main__":
    main()
