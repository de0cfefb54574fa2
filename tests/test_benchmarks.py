"""The benchmark scripts' argument checks (the benchmarks themselves run on a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import token_rows

ROOT = Path(__file__).resolve().parents[1]


def test_token_counts_are_whole_rows():
    assert token_rows(16384, 4096) == 4 and token_rows(4096, 4096) == 1
    for tokens in (0, -4096, 1024, 6000):  # no row, or rows cut: a smaller problem than the table would say
        with pytest.raises(ValueError, match=f"positive multiples of the row length 4096, got {tokens}"):
            token_rows(tokens, 4096)


@pytest.mark.parametrize("script, flags, flag", [("medusa_loss.py", ["--quick", "--sizes", "256,100"], "--sizes"),
                                                 ("trace_medusa_loss.py", ["--tokens", "6000"], "--tokens")])
def test_token_counts_that_are_not_whole_rows_are_refused(script, flags, flag):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *flags], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"error: {flag}: token counts must be positive multiples of the row length" in result.stderr


def _benchmark_module(script: str):
    """A benchmark script imported as a module (its main() not run), under a name of its own."""
    import importlib.util

    name = "bench_" + script.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shared_frozen", [False, True])
def test_medusa_loss_benchmark_reports_a_wrong_method_instead_of_timing_it(shared_frozen):
    import torch

    ml = _benchmark_module("medusa_loss.py")
    torch.manual_seed(0)
    p = ml.Problem(2, 1, 32, 16, 64, torch.float32, shared_frozen)

    def heads_unweighted(p):  # every head at weight 1: the wrong loss, the wrong gradients
        return sum(torch.nn.functional.cross_entropy(p.blocks[k](p.x).reshape(-1, p.H) @ p.weights[k].t(),
                                                     p.targets[k]) for k in range(p.K))

    def blocks_untrained(p):  # the right loss, but no ResBlock gradient
        return ml.naive(p).detach().requires_grad_()

    methods = {"naive": ml.naive, "ours fp32 acc": ml.make_ours(torch.float32),
               "ours head by head, fp32 acc": ml.make_ours_head_by_head(torch.float32),
               "ours' GEMMs alone, fp32 acc": ml.gemms_alone(torch.float32), "missing": None,
               "heads unweighted": heads_unweighted, "blocks untrained": blocks_untrained}
    wrong, errors = ml.check_against_naive(p, methods)
    assert set(wrong) == {"heads unweighted", "blocks untrained"}, wrong
    assert set(errors) == {"ours fp32 acc", "ours head by head, fp32 acc", "heads unweighted", "blocks untrained"}
    assert errors["ours fp32 acc"] < 1e-4 and errors["blocks untrained"] == 1.0
    assert wrong["heads unweighted"].startswith("loss") and wrong["blocks untrained"].startswith("gradients")


@pytest.mark.parametrize("sizes", ["128,256", "256,128"])
def test_medusa_loss_target_rounds_and_setting_c_use_the_largest_token_count(sizes, monkeypatch):
    ml = _benchmark_module("medusa_loss.py")
    seen = []

    def measure(p, fn, reps):
        if p.masked and ("(c)", p.N) not in seen:
            seen.append(("(c)", p.N))
        return 1.0, 0.0

    monkeypatch.setattr(ml, "measure", measure)
    monkeypatch.setattr(ml, "check_against_naive", lambda p, methods: ({}, {}), raising=False)
    monkeypatch.setattr(ml, "target_rounds", lambda p, methods, rounds: seen.append(("rounds", p.N)) or {})
    monkeypatch.setattr(ml.common, "write_table", lambda *args, **kwargs: None)
    init = ml.Problem.__init__

    def recording_init(self, *args, masked_prompts=False, **kwargs):
        init(self, *args, masked_prompts=masked_prompts, **kwargs)
        self.masked = masked_prompts

    monkeypatch.setattr(ml.Problem, "__init__", recording_init)
    monkeypatch.setattr(sys, "argv", ["medusa_loss.py", "--quick", "--sizes", sizes])
    ml.main()
    assert seen == [("rounds", 256), ("rounds", 256), ("(c)", 256)]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the message for a machine without a GPU")
@pytest.mark.parametrize("script, flags", [("ce_target_miss_ab.py", []), ("gluon_pingpong_probe.py", ["--quick"]),
                                           ("sanitize_probe.py", ["--unwritten"]), ("exp_operand_tiles.py", []),
                                           ("cross_entropy_compare.py", ["--before", "x.py"]),
                                           ("trace_medusa_loss.py", [])])
def test_gpu_only_benchmarks_say_so_without_a_gpu(script, flags):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *flags], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{script} needs a CUDA device" in result.stderr


def test_kernels_benchmark_reports_a_wrong_implementation_instead_of_timing_it():
    import torch.nn.functional as F

    kb = _benchmark_module("kernels.py")
    norm, glu, rope = kb.rms_norm_op(33, 64), kb.swiglu_op(33, 96), kb.rope_op(1, 4, 2, 9, 16, True)
    norm.impls["scaled"] = lambda: lambda x, w: kb.rms_norm(x, w, 1e-6) * 1.1  # 10% off: past bf16 tolerance
    glu.impls["gate frozen"] = lambda: lambda g, u: F.silu(g.detach()) * u + 0 * g  # a wrong gradient
    glu.impls["raises"] = lambda: lambda g, u: 1 / 0  # left to the timing, which records the error
    rope.impls["one rotation late"] = lambda: lambda q, k, cos, sin: kb.apply_rotary_pos_emb(q, k, cos.roll(1, 1),
                                                                                         sin.roll(1, 1))
    wrong = {op.name: kb.check_against_eager(op) for op in (norm, glu, rope)}
    assert set(wrong["RMSNorm"]) == {"scaled"} and wrong["RMSNorm"]["scaled"].startswith("output 0")
    assert set(wrong["SwiGLU"]) == {"gate frozen"}
    assert wrong["SwiGLU"]["gate frozen"].startswith("gradient of input 0")
    assert set(wrong["RoPE (HF layout)"]) == {"one rotation late"}
    ce = kb.cross_entropy_op(17, 50)
    assert kb.check_against_eager(ce) == {}  # liger (if installed) and ours agree with eager
