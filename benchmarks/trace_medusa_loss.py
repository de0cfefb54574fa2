"""Where the time of one Medusa-loss step goes, kernel by kernel (GPU, torch.profiler).

For one setting of benchmarks/medusa_loss.py it profiles a few forward+backward steps of each
method and reports, per method: the step's wall time (CUDA events), the summed kernel time, the time
the GPU sat idle between kernels (wall - kernels), and the kernels grouped by name with their time
per step. Comparing ours head by head with "ours' GEMMs alone" (cuBLAS on the same chunk plan) says
whether the difference is in the GEMMs themselves, in the small kernels between them, or in gaps.

    python benchmarks/trace_medusa_loss.py --setting b --tokens 16384

Writes benchmarks/results/trace_medusa_loss_<setting>_<acc>_<card>.md (and a copy under $OUT).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
import threading
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402
from benchmarks.medusa_loss import (  # noqa: E402
    Problem, gemms_alone, make_ours_head_by_head, training_step, with_row_kernel)


NOTE = ("wall: median of the timed steps (CUDA events); kernels: summed kernel time per step over 3 profiled "
        "steps run right after (the power-capped card's clocks drift between the two, so 'idle' can come out "
        "negative); sm clock and power: NVML samples during the timed steps.")


def timed_steps(step, n: int) -> tuple[float, dict[str, float]]:
    """Median ms of ``n`` steps (CUDA events), and the SM clock / power sampled meanwhile (if NVML is there)."""
    samples: dict[str, list[float]] = collections.defaultdict(list)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                samples["sm clock MHz"].append(torch.cuda.clock_rate())
                samples["power W"].append(torch.cuda.power_draw() / 1000)
            except Exception:  # no NVML (pynvml) on this machine: no telemetry
                return
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = [common.time_once(step) for _ in range(n)]
    done.set()
    sampler.join()
    return statistics.median(times), {k: statistics.median(v) for k, v in samples.items() if v}


def kernel_table(step, n: int) -> tuple[float, list[tuple[str, int, float]]]:
    """(kernel ms per step, [(kernel name, launches per step, ms per step)]) over ``n`` profiled steps."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.elapsed_us() > 0:
            name = event.name[:90]
            per_name[name][0] += 1
            per_name[name][1] += event.time_range.elapsed_us() / 1e3  # us -> ms
    rows = sorted(((name, count // n, ms / n) for name, (count, ms) in per_name.items()), key=lambda r: -r[2])
    return sum(r[2] for r in rows), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=("a", "b"), default="b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--acc", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()
    K, H, V, T = 5, 4096, 128256, 4096
    try:
        rows = common.token_rows(args.tokens, T)
    except ValueError as error:
        parser.error(f"--tokens: {error}")
    if not torch.cuda.is_available():
        raise SystemExit("trace_medusa_loss.py needs a CUDA device")
    acc = torch.float32 if args.acc == "fp32" else torch.bfloat16
    p = Problem(K, rows, T, H, V, torch.bfloat16, shared_frozen=args.setting == "b")
    methods = {
        "ours head by head": make_ours_head_by_head(acc),
        "ours head by head, row kernel": with_row_kernel(make_ours_head_by_head(acc)),
        "ours' GEMMs alone": gemms_alone(acc),
    }
    info = common.env_info()
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    emit(f"# setting ({args.setting}) N={args.tokens} {args.acc} acc; {info['card']}; torch {info['torch']}; "
          f"triton {info['triton']}; {info['date']}")
    emit(NOTE)
    for name, fn in methods.items():
        step = training_step(p, fn)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        wall, telemetry = timed_steps(step, args.steps)
        kernels_ms, rows = kernel_table(step, 3)
        p.clear_grads()
        common.free_memory()
        extra = "".join(f", {k} {v:.0f}" for k, v in telemetry.items())
        emit(f"\n## {name}: wall {wall:.1f} ms, kernels {kernels_ms:.1f} ms, idle {wall - kernels_ms:.1f} ms{extra}")
        emit("| kernel | launches/step | ms/step |\n|---|---|---|")
        for kname, count, ms in rows[: args.top]:
            emit(f"| {kname} | {count} | {ms:.2f} |")
        rest = rows[args.top:]
        emit(f"| ({len(rest)} other kernels) | {sum(r[1] for r in rest)} | {sum(r[2] for r in rest):.2f} |")


    name = f"trace_medusa_loss_{args.setting}_{args.acc}_{common.card_slug()}.md"
    (common.RESULTS_DIR / name).write_text("\n".join(lines) + "\n")
    if os.environ.get("OUT"):
        shutil.copy(common.RESULTS_DIR / name, Path(os.environ["OUT"]) / name)


if __name__ == "__main__":
    main()
