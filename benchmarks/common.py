"""Shared benchmark helpers: timing, memory, the machine's two ceilings, and result tables.

Every table we commit states the card, the library versions and the date, and compares against
baselines measured in the same run: absolute times drift between machines, ratios much less.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import importlib
import importlib.util
import os
import platform
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32  # the interpreter has no bf16 arithmetic
if not CUDA:
    # Without a GPU the scripts' --quick mode runs our kernels through Triton's CPU interpreter; this
    # must be set before triton is imported, and every script imports this module first.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def token_rows(tokens: int, row_tokens: int) -> int:
    """How many rows of ``row_tokens`` tokens hold ``tokens`` tokens: a benchmark's batch shape, never a
    silently smaller problem (ValueError unless ``tokens`` is a positive multiple of ``row_tokens``)."""
    if tokens <= 0 or tokens % row_tokens:
        raise ValueError(f"token counts must be positive multiples of the row length {row_tokens}, got {tokens}")
    return tokens // row_tokens


def optional_import(name: str):
    """Import ``name`` or return None (baselines such as liger-kernel are optional)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a baseline that breaks on this torch/triton
        print(f"[bench] optional import {name} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        module = sys.modules.get(name)
        return getattr(module, "__version__", "n/a")


def env_info() -> dict[str, str]:
    """The card, software versions and date that every results table carries."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger-kernel": _version("liger-kernel"),
        "cut-cross-entropy": _version("cut-cross-entropy"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["card"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
        info["cuda"] = str(torch.version.cuda)
    else:
        info["card"] = "CPU (no CUDA device)"
    return info


def card_slug() -> str:
    """Short name of the card for file names: "h100", "h200", ... or "cpu"."""
    if not torch.cuda.is_available():
        return "cpu"
    match = re.search(r"([A-Z]\d{2,4})", torch.cuda.get_device_name(0))
    return match.group(1).lower() if match else "gpu"


def bench(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` (CUDA events through triton.testing.do_bench).

    ``warmup`` and ``rep`` are milliseconds of warm-up and of measurement, as do_bench takes them.
    do_bench also clears the L2 cache between calls.
    """
    if not torch.cuda.is_available():
        fn()
        return sorted(time_once(fn) for _ in range(3))[1]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def time_once(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on the GPU (for calls long enough to time alone,
    tens of ms and up), the wall clock on the CPU."""
    if not CUDA:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def interleaved_rounds(cases: dict[str, Callable[[], object]], rounds: int,
                       timer: Callable[[Callable[[], object]], float] = time_once) -> dict[str, list[float]]:
    """``timer(case)`` for every case, ``rounds`` times, in a fresh random order each round, so that
    the card's drift (up to 10% between minutes on an H100) hits every case alike and no case always
    follows the same one. Returns {name: [ms per round]}."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases.items())
    for _ in range(rounds):
        random.shuffle(order)
        for name, fn in order:
            times[name].append(timer(fn))
    return times


def load_module_file(path: str | Path, name: str):
    """Import the Python file at ``path`` as module ``name`` (another version of one of our modules,
    timed beside the current one)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chunk_operands(C: int, H: int, V: int, dtype: torch.dtype) -> SimpleNamespace:
    """The fused loss's per-chunk operands on DEVICE: hidden h [C, H], projection w [V, H], logits
    z [C, V], hidden gradient dh [C, H], and zeroed weight-gradient accumulators acc32 (fp32) and
    acc16 (``dtype``) [V, H]."""
    return SimpleNamespace(
        h=torch.randn(C, H, device=DEVICE, dtype=dtype),
        w=torch.randn(V, H, device=DEVICE, dtype=dtype) * H**-0.5,
        z=torch.randn(C, V, device=DEVICE, dtype=dtype),
        dh=torch.empty(C, H, device=DEVICE, dtype=dtype),
        acc32=torch.zeros(V, H, device=DEVICE, dtype=torch.float32),
        acc16=torch.zeros(V, H, device=DEVICE, dtype=dtype),
    )


def free_memory() -> None:
    """Drop what the last measurement left: Python garbage, then the caching allocator's free blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def frees_memory(fn: Callable) -> Callable:
    """Decorator: ``free_memory()`` once ``fn`` has returned, so the tensors its locals held (and the
    closures that timed them) are gone before the next measurement allocates."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            free_memory()

    return wrapper


def peak_extra_memory_gib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated while ``fn`` runs, minus what was allocated before it (GiB)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


@frees_memory
def copy_bandwidth_gbs(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n_bytes / (ms * 1e-3) / 1e9


@frees_memory
def matmul_tflops(dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Rate of an n x n x n matrix product on random data, in TFLOP/s (the matmul ceiling)."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    out = torch.empty(n, n, dtype=dtype, device="cuda")
    ms = bench(lambda: torch.mm(a, b, out=out))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def fmt(value: object, digits: int = 2) -> str:
    """Format a number for a table cell (strings pass through)."""
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def write_table(
    name: str,
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    notes: Sequence[str] = (),
) -> Path:
    """Write a Markdown table (with the environment) to benchmarks/results/<name>.md and print it.

    When ``$OUT`` is set (the device machine), a copy goes there too so it comes back.
    """
    info = env_info()
    # The file name says which card produced it: "kernels_h100" run on an H200 -> kernels_h200.md.
    name = re.sub(r"_(h100|h200|cpu)$", "", name) + "_" + card_slug()
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    if notes:
        lines += [""] + [f"{note}" for note in notes]
    text = "\n".join(lines) + "\n"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    out = os.environ.get("OUT")
    if out:
        shutil.copy(path, Path(out) / path.name)
    print(text, flush=True)
    return path
