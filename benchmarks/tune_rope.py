"""RoPE launch-config sweep: forward+backward time of each tile / warp / order config, per layout.

For q[4, 32, 4096, 128], k[4, 8, 4096, 128] bf16 with cos/sin [4, 4096, 128], in both layouts
(HF's transposed view of [B, T, n, D] storage, and contiguous [B, n, T, D]), every config of
``medusa_liger.kernels.rope.rope_launch`` listed in ``CANDIDATES`` runs forward+backward through
``RoPEFunction`` (as training does), is checked against HF's eager result (fp32 math on the same
bf16 inputs, bf16 tolerance) and timed with triton.testing.do_bench (median, 3 input sets rotated).
liger-kernel (if importable) and our default public entry point are timed in the same run.
Every implementation runs on its own copy of the same input sets: Liger rotates HF-layout q/k and
dq/dk in place (``transpose(1, 2).contiguous()`` is a no-op there), which once left every later
config checked against a stale reference ("FAIL q_out max err 11.3" on every HF-layout row).

Prints a table per layout sorted by time, the best config per layout, forward-only and
backward-only times of the best, and writes benchmarks/results/tune_rope_<card>.md (and $OUT).
A failing config is recorded, never a crash; configs stop being started after ``--budget``
seconds (default 85) so the whole run stays under 2 minutes on an H100/H200.

    python benchmarks/tune_rope.py            # full sizes (GPU)
    python benchmarks/tune_rope.py --quick    # tiny shapes, a few configs (also on CPU)
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

# Python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow HF's
# optional `kernels` package (transformers probes it): import our helpers from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402

from medusa_liger.kernels.rope import RoPEFunction, apply_rotary_pos_emb, default_config, rope_launch  # noqa: E402

CUDA, DEVICE, DTYPE = common.CUDA, common.DEVICE, common.DTYPE
N_SETS = 3
ATOL = RTOL = 2e-2 if DTYPE == torch.bfloat16 else 1e-5  # bf16: one rounding of a value ~|x|

# (heads, block_t, num_warps, heads_fastest, evict, shared_cs), the two layout families interleaved
# and most promising first (the time budget cuts the tail). Every config runs on both layouts: one
# compile serves both (strides are runtime arguments). The defaults of rope.py run first anyway.
HF_FAMILY = [  # several heads x a few positions, heads-first
    (8, 4, 4, True, False, False), (8, 4, 8, True, False, False), (8, 2, 4, True, False, True),
    (8, 2, 4, True, False, False), (8, 4, 8, True, False, True), (8, 8, 8, True, False, True),
    (8, 4, 4, True, True, True), (4, 8, 4, True, False, True), (16, 2, 4, True, False, True),
    (32, 1, 4, True, False, True), (32, 1, 8, True, False, False), (8, 4, 2, True, False, True),
    (8, 8, 8, True, False, False), (8, 4, 4, False, False, True), (8, 1, 4, True, False, False),
    (1, 32, 4, True, False, False),
]
CONTIGUOUS_FAMILY = [  # one or a few heads x a run of positions, positions-first
    (1, 32, 4, False, False, False), (1, 16, 4, False, False, False), (2, 16, 4, False, False, False),
    (1, 32, 8, False, False, False), (4, 8, 4, False, False, True), (1, 64, 8, False, False, False),
    (2, 32, 8, False, False, True), (2, 16, 4, False, True, True), (1, 32, 4, False, True, False),
    (1, 16, 2, False, False, False), (4, 16, 8, False, False, True), (2, 16, 4, True, False, True),
    (1, 128, 8, False, False, False), (1, 8, 4, False, False, False),
]
CANDIDATES = [c for pair in itertools.zip_longest(HF_FAMILY, CONTIGUOUS_FAMILY) for c in pair if c]
QUICK_CANDIDATES = [(8, 4, 4, True, False, False), (1, 32, 4, False, True, False), (2, 4, 2, False, False, True)]
KEYS = ("heads", "block_t", "num_warps", "heads_fastest", "evict", "shared_cs")

def cfg_name(cfg: dict) -> str:
    return (f"heads={cfg['heads']} block_t={cfg['block_t']} warps={cfg['num_warps']} "
            f"{'heads-first' if cfg['heads_fastest'] else 'positions-first'}{' evict' if cfg['evict'] else ''}"
            f"{' shared-cs' if cfg['shared_cs'] and cfg['heads'] > 1 else ''}")


def make_set(batch: int, n_q: int, n_kv: int, seq: int, dim: int, hf_layout: bool) -> tuple:
    """(q, k, cos, sin, dq_out, dk_out) as benchmarks/kernels.py builds them."""

    def heads_tensor(n_heads: int) -> torch.Tensor:
        if hf_layout:
            return torch.randn(batch, seq, n_heads, dim, device=DEVICE, dtype=DTYPE).transpose(1, 2)
        return torch.randn(batch, n_heads, seq, dim, device=DEVICE, dtype=DTYPE)

    q, k = heads_tensor(n_q).requires_grad_(), heads_tensor(n_kv).requires_grad_()
    angle = torch.rand(batch, seq, dim // 2, device=DEVICE).repeat(1, 1, 2) * 6.3
    return q, k, angle.cos().to(DTYPE), angle.sin().to(DTYPE), heads_tensor(n_q), heads_tensor(n_kv)


def copy_set(inputs: tuple) -> tuple:
    """A fresh copy of one input set with the same values and strides (q/k leaves again)."""
    fresh = [t.detach().clone() for t in inputs]  # clone keeps a dense tensor's strides
    for copy, original in zip(fresh[:2], inputs[:2]):
        copy.requires_grad_(original.requires_grad)
    return tuple(fresh)


def layout_default(shape: tuple, hf_layout: bool) -> dict:
    """rope.py's default config for ``shape`` in the given layout (meta tensors: no memory)."""
    batch, n_q, n_kv, seq, dim = shape
    if hf_layout:
        q = torch.empty(batch, seq, n_q, dim, device="meta").transpose(1, 2)
        k = torch.empty(batch, seq, n_kv, dim, device="meta").transpose(1, 2)
    else:
        q, k = torch.empty(batch, n_q, seq, dim, device="meta"), torch.empty(batch, n_kv, seq, dim, device="meta")
    return default_config(q, k)


def reference(inputs: tuple) -> list[torch.Tensor]:
    """HF's eager apply_rotary_pos_emb in fp32 on the same inputs: [q_out, k_out, dq, dk]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf

    q, k, cos, sin, dq_out, dk_out = inputs
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    q_ref, k_ref = hf(q32, k32, cos.float(), sin.float())
    dq, dk = torch.autograd.grad((q_ref, k_ref), (q32, k32), (dq_out.float(), dk_out.float()))
    return [q_ref.detach(), k_ref.detach(), dq, dk]


def fwd_bwd(forward, inputs: tuple) -> list[torch.Tensor]:
    q, k, cos, sin, dq_out, dk_out = inputs
    q_out, k_out = forward(q, k, cos, sin)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    return [q_out, k_out, dq, dk]


def check(results: list[torch.Tensor], ref: list[torch.Tensor]) -> str:
    """'ok' or the first mismatch (name and max error), at bf16 tolerance."""
    for name, got, want in zip(("q_out", "k_out", "dq", "dk"), results, ref):
        if got.shape != want.shape:
            return f"FAIL {name} shape {list(got.shape)}"
        err = (got.float() - want).abs()
        bad = err > ATOL + RTOL * want.abs()
        if bool(torch.isnan(got).any()) or bool(bad.any()):
            return f"FAIL {name} max err {err.max().item():.3g}"
    return "ok"


def measure(forward, master_sets: list, ref: list, n_bytes: int, copy_gbs: float) -> dict:
    """Correctness on set 0, then the median ms of forward+backward over the rotated sets.

    ``forward`` gets copies of ``master_sets``, so an implementation that writes its inputs or
    incoming gradients (Liger in HF layout) changes nothing the next one sees.
    """
    sets = [copy_set(inputs) for inputs in master_sets]
    try:
        status = check(fwd_bwd(forward, sets[0]), ref)  # also compiles the kernels
        rotation = itertools.cycle(range(len(sets)))
        for _ in range(len(sets)):
            fwd_bwd(forward, sets[next(rotation)])
        ms = common.bench(lambda: fwd_bwd(forward, sets[next(rotation)]))
        gbs = n_bytes / (ms * 1e-3) / 1e9
        return {"ms": ms, "gbs": gbs, "pct": 100.0 * gbs / copy_gbs, "status": status}
    except Exception as exc:  # one broken config never sinks the sweep
        message = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
        return {"ms": float("inf"), "status": "error: " + message[:160]}
    finally:
        sets.clear()  # the copies go before the next implementation allocates its own
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def split_times(cfg: dict, inputs: tuple) -> tuple[float, float]:
    """Forward-only and backward-only kernel time (ms) of one config, outside autograd."""
    q, k, cos, sin, dq_out, dk_out = inputs
    fwd = common.bench(lambda: rope_launch(q, k, cos, sin, backward=False, config=cfg))
    bwd = common.bench(lambda: rope_launch(dq_out, dk_out, cos, sin, backward=True, config=cfg))
    return fwd, bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, three configs (smoke test)")
    parser.add_argument("--budget", type=float, default=85.0, help="seconds after which no config starts")
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(0)
    shape = (1, 4, 2, 37, 16) if args.quick else (4, 32, 8, 4096, 128)
    batch, n_q, n_kv, seq, dim = shape
    qk = batch * seq * (n_q + n_kv) * dim
    n_bytes = (4 * qk + 4 * batch * seq * dim) * DTYPE.itemsize  # as benchmarks/kernels.py counts
    copy_gbs = common.copy_bandwidth_gbs() if CUDA else float("nan")
    print(f"[tune] copy bandwidth {copy_gbs:.0f} GB/s; floor {n_bytes / (copy_gbs * 1e9) * 1e3:.3f} ms", flush=True)
    liger = None
    if CUDA:
        module = common.optional_import("liger_kernel.transformers.rope")
        liger = getattr(module, "liger_rotary_pos_emb", None)
    candidates = [dict(zip(KEYS, c)) for c in (QUICK_CANDIDATES if args.quick else CANDIDATES)]

    # Both layouts live side by side so each config (one compile) is timed on both before the
    # next starts: the time budget then trims the tail of the list evenly.
    layouts = {"HF layout": True, "contiguous": False}
    sets = {name: [make_set(*shape, hf) for _ in range(N_SETS)] for name, hf in layouts.items()}
    refs = {name: reference(sets[name][0]) for name in layouts}
    defaults = {name: layout_default(shape, hf) for name, hf in layouts.items()}
    configs = list(defaults.values())
    configs = [c for i, c in enumerate(configs) if c not in configs[:i]]
    configs += [c for c in candidates if c not in configs]  # defaults first: never cut

    results: dict[str, dict[str, dict]] = {name: {} for name in layouts}
    baselines = {"ours (default, public API)": apply_rotary_pos_emb}
    if liger is not None:
        baselines["liger 0.8.5"] = liger
    for layout in layouts:
        for name, fn in baselines.items():
            results[layout][name] = measure(fn, sets[layout], refs[layout], n_bytes, copy_gbs)
            print(f"[tune] {layout} {name}: {results[layout][name]}", flush=True)
    for cfg in configs:
        for layout in layouts:
            name = cfg_name(cfg) + (" (default)" if cfg == defaults[layout] else "")
            if time.time() - start > args.budget:
                results[layout][name] = {"ms": float("inf"), "status": "skipped (time budget)"}
                continue
            res = measure(lambda q, k, c, s, cfg=cfg: RoPEFunction.apply(q, k, c, s, cfg),
                          sets[layout], refs[layout], n_bytes, copy_gbs)
            results[layout][name] = {**res, "cfg": cfg}
            print(f"[tune] {layout} {name}: {res}", flush=True)

    rows, notes, best = [], [f"Copy bandwidth (read + write) in this run: {copy_gbs:.0f} GB/s.", ""], {}
    for layout in layouts:
        liger_ms = results[layout].get("liger 0.8.5", {}).get("ms")
        for name, res in sorted(results[layout].items(), key=lambda item: item[1]["ms"]):
            timed = res["ms"] != float("inf")
            rows.append([layout, name, f"{res['ms']:.4f}" if timed else "-",
                         f"{res['gbs']:.0f}" if timed else "-", f"{res['pct']:.0f}%" if timed else "-",
                         f"{liger_ms / res['ms']:.2f}x" if timed and liger_ms else "-", res["status"]])
        tuned = [(res["ms"], name, res["cfg"]) for name, res in results[layout].items()
                 if "cfg" in res and res["status"] == "ok" and res["ms"] != float("inf")]
        if tuned:
            ms, name, cfg = min(tuned, key=lambda item: item[0])
            best[layout] = cfg
            fwd, bwd = split_times(cfg, sets[layout][0])
            target = f"; liger {liger_ms:.4f} ms -> {liger_ms / ms:.2f}x (target 1.5x)" if liger_ms else ""
            notes.append(f"- best {layout}: {name}: {ms:.4f} ms (forward {fwd:.4f} + backward {bwd:.4f} ms "
                         f"kernel-only){target}; config={cfg}")
    notes += ["", f"Total sweep time {time.time() - start:.0f} s. GB/s counts 4 x|q,k| + 4 x|cos| "
              "(read + write, forward and backward), as benchmarks/kernels.py does."]
    header = ["layout", "config", "median ms (fwd+bwd)", "GB/s", "% of copy BW", "speedup vs liger", "check"]
    shape_text = f"q[{batch}, {n_q}, {seq}, {dim}], k[{batch}, {n_kv}, {seq}, {dim}]"
    title = f"RoPE launch-config sweep, forward+backward, {str(DTYPE).replace('torch.', '')}, {shape_text}"
    common.write_table("tune_rope_quick" if args.quick else "tune_rope", title, header, rows, notes)
    for layout, cfg in best.items():
        print(f"BEST {layout}: {cfg}", flush=True)


if __name__ == "__main__":
    main()
